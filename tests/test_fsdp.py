"""torch FSDP2 (``fully_shard``, every adapted layer its own unit) on two CPU processes (gloo): the same
loss curve and adapter as one process on the whole batch. accelerate 1.16 itself never selects FSDP on
the CPU (its fsdp plugin is ignored there and the run is plain data parallel), so this drives torch
directly; docs/training.md says what is and is not verified."""

import json
import os
from pathlib import Path

import torch
from fsdp_worker import adapted_unet, adapter_tensors, train
from safetensors.torch import load_file

from conftest import run_two_processes

HERE = Path(__file__).resolve().parent


def test_fsdp2_on_two_cpu_processes_trains_as_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = run_two_processes(HERE / "fsdp_worker.py", [], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    sharded = load_file(tmp_path / "adapter.safetensors")

    unet = adapted_unet()
    expected_losses = train(unet)
    expected = adapter_tensors(unet)
    assert torch.allclose(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5)
    assert set(sharded) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(sharded[name], tensor, atol=2e-5), name
    assert all(tensor.abs().max() > 0 for name, tensor in expected.items() if "boft_skew" in name), "nothing trained"
