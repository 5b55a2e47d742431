"""train_controlnet.py on the embedded tiny model: both control modes, loading back, bad data, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import boft_diffusion as bd
import train_controlnet
from boft_diffusion.control.networks import encoder_for_unet, light_control
from boft_diffusion.core.images import image_to_tensor
from boft_diffusion.families.loading import quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.training.checkpoints import list_checkpoints
from conftest import run_two_processes

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "tiny_control"
FAST = ["--max_train_steps", "3", "--num_inference_steps", "2", "--report_to", "none", "--boft_block_size", "8"]


def run_main(*flags) -> int:
    return train_controlnet.main([*FAST, *map(str, flags)])


def small_dataset(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    lines = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text().splitlines()[:count]]
    for row in lines:
        for key in ("file_name", "conditioning_file_name"):
            (folder / row[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / row[key], folder / row[key])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return folder


@pytest.mark.parametrize("mode", ["light", "controlnet"])
def test_train_and_load_back(tmp_path, mode):
    out = tmp_path / mode
    assert run_main("--control", mode, "--output_dir", out, "--train_data_dir", small_dataset(tmp_path / "data"),
                    "--learning_rate", "1e-2") == 0
    info = json.loads((out / "control.json").read_text())
    assert info["mode"] == mode and info["train_steps"] == 3
    assert (out / "validation" / "step-000003.png").is_file()
    assert (out / "validation" / "latest.png").read_bytes() == (out / "validation" / "step-000003.png").read_bytes()
    card = (out / "README.md").read_text()
    assert f"BOFT control adapter ({mode})" in card and "validation/latest.png" in card
    assert "m = 2: load it with boft-diffusion" in card and "size mismatch for ...boft_R" in card

    pipe = quiet_progress(bd.load_pipeline("tiny", dtype=torch.float32))
    control = load_outputs(pipe, out).control
    assert control.mode == mode
    mask = Image.open(DATA / "conditioning" / "0000.png").convert("RGB")
    generator = torch.Generator().manual_seed(0)
    if mode == "light":
        condition = image_to_tensor(mask)[None]
        handle = control.encoder
        features = handle(condition)
        assert features.abs().sum() > 0, "the zero-initialised output layer did not train"
        with light_control(pipe.unet, handle, condition):
            image = pipe("a red circle on a blue background", num_inference_steps=2, generator=generator).images[0]
    else:
        trainable = load_file(out / "controlnet_trainable.safetensors")
        assert any(k.startswith("controlnet_down_blocks") for k in trainable)
        assert any(v.abs().sum() > 0 for k, v in trainable.items() if k.startswith("controlnet_down_blocks"))
        image = control.controlnet_pipe("a red circle on a blue background", image=mask, num_inference_steps=2, generator=generator).images[0]
    assert image.size == (64, 64)


def test_fresh_light_encoder_leaves_unet_unchanged():
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    encoder = encoder_for_unet(pipe.unet, pipe.vae_scale_factor)
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        expected = pipe.unet(sample, 5, context).sample
        with light_control(pipe.unet, encoder, torch.rand(1, 3, 64, 64)):
            got = pipe.unet(sample, 5, context).sample
    assert torch.equal(got, expected)


def test_bad_control_data_is_reported(tmp_path, caplog):
    data = small_dataset(tmp_path / "data", count=5)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    os.remove(data / rows[0]["conditioning_file_name"])
    (data / rows[1]["file_name"]).write_bytes(b"corrupt")
    Image.open(data / rows[2]["conditioning_file_name"]).resize((32, 32)).save(data / rows[2]["conditioning_file_name"])
    rows[3]["text"] = ""
    rows.append({"file_name": rows[4]["file_name"]})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("WARNING", logger="boft_diffusion"):
        assert run_main("--output_dir", tmp_path / "out", "--train_data_dir", data, "--max_train_steps", "1") == 0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 pair(s)" in messages
    assert "resized 1 conditioning image" in messages
    assert "empty prompt" in messages


def test_missing_metadata_and_dataset_columns(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_main("--output_dir", tmp_path / "a", "--train_data_dir", tmp_path / "empty") == 2
    assert "metadata.jsonl" in capsys.readouterr().err
    import datasets

    images = [Image.open(DATA / "images" / "0000.png").convert("RGB")] * 2
    hints = [Image.open(DATA / "conditioning" / "0000.png").convert("RGB")] * 2
    ds = datasets.Dataset.from_dict({"picture": images, "hint": hints, "text": ["a red circle on a blue background", ""]})
    ds.save_to_disk(tmp_path / "hf")
    assert run_main("--output_dir", tmp_path / "b", "--dataset_name", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "--image_column 'image' is not a column" in err and "picture" in err and "hint" in err
    assert run_main("--output_dir", tmp_path / "c", "--dataset_name", tmp_path / "hf", "--image_column", "picture",
                    "--conditioning_image_column", "hint", "--max_train_steps", "1") == 0


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    data = small_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        command = [sys.executable, str(ROOT / "train_controlnet.py"), *FAST, "--train_data_dir", str(data),
                   "--output_dir", str(out), "--max_train_steps", "6", "--checkpointing_steps", "2",
                   "--control", "controlnet", *extra]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    reference = launch(tmp_path / "ref")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-2000:]
    victim = launch(tmp_path / "killed")
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoint-2").exists():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list_checkpoints(tmp_path / "killed")
    resumed = launch(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    for name in ("controlnet_trainable.safetensors", "controlnet/adapter_model.safetensors"):
        expected, actual = load_file(tmp_path / "ref" / name), load_file(tmp_path / "killed" / name)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


@pytest.mark.slow
def test_two_processes_light_control(tmp_path):
    data = small_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = run_two_processes(ROOT / "train_controlnet.py", [*FAST, "--train_data_dir", data], tmp_path / "o", env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical on all 2 processes" in result.stderr
