"""Training runs that are killed, misconfigured or out of disk (issue 16): crash-safe checkpoint
rotation, flags validated before any model loads, one clear line for a full disk, the overwrite
guard on the resume path, half precision on CPU, readable output files."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dreambooth import FAST, ROOT, adapter_tensors, launch, subprocess_env

import train_controlnet
import train_dreambooth
from boft_diffusion.core.files import remove_stale_temporaries, save_adapter
from boft_diffusion.recipes import base as recipe_base
from boft_diffusion.training import checkpoints
from boft_diffusion.training.checkpoints import COMPLETE_JSON, list_checkpoints, resolve_checkpoint


def run_main(*flags) -> int:
    return train_dreambooth.main([*FAST, *map(str, flags)])


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# 7. checkpoint rotation -----------------------------------------------------------------------------------
def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (path / "trainable.safetensors").write_bytes(b"0" * 10)
    if complete:
        sizes = {"trainer_state.json": (path / "trainer_state.json").stat().st_size, "trainable.safetensors": 10}
        (path / COMPLETE_JSON).write_text(json.dumps({"step": step, "files": sizes}))
    return path


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)  # killed before its marker
    half_deleted = fake_checkpoint(tmp_path, 6)
    (half_deleted / "trainable.safetensors").unlink()  # an old in-place delete, killed midway
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-6")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    stale = [tmp_path / f".checkpoint-4.tmp-{dead}", tmp_path / f".checkpoint-2.trash-{dead}",
             tmp_path / "text_encoder" / f".adapter_model.safetensors.{dead}.k2j_x9.tmp"]
    live = [tmp_path / f".checkpoint-6.tmp-{alive}", tmp_path / f".adapter_config.json.{alive}.abc.tmp"]
    for path in stale[:2] + live[:1]:
        path.mkdir(parents=True)
        (path / "optimizer.safetensors").write_bytes(b"x")
    for path in stale[2:] + live[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / ".hidden_but_ours").write_text("kept")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in live) and (tmp_path / ".hidden_but_ours").exists()


DIE_WHILE_DELETING = """
import os, runpy, shutil, signal, sys
from pathlib import Path
real_rmtree = shutil.rmtree
def rmtree(path, *args, **kwargs):
    path = Path(path)
    if "checkpoint-" in path.name and (path / "optimizer.safetensors").exists():
        (path / "optimizer.safetensors").unlink()
        (path / "trainable.safetensors").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill_during_rotation_resumes_from_a_complete_checkpoint(tmp_path):
    reference = launch(tmp_path / "reference", "--checkpoints_total_limit", "1")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    killed = tmp_path / "killed"
    command = [sys.executable, "-c", DIE_WHILE_DELETING, str(ROOT / "train_dreambooth.py"), *FAST,
               "--output_dir", str(killed), "--max_train_steps", "8", "--checkpointing_steps", "2",
               "--train_identifier_embedding", "--identifier_token", "sks", "--checkpoints_total_limit", "1"]
    victim = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert victim.wait(timeout=300) == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-4"]  # not the half-deleted checkpoint-2
    resumed = launch(killed, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    expected, actual = adapter_tensors(tmp_path / "reference"), adapter_tensors(killed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert not [p for p in killed.rglob(".*") if "tmp" in p.name or "trash" in p.name]
    assert [p.name for p in killed.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-6"]


# 8. half precision on CPU ---------------------------------------------------------------------------------
def test_controlnet_half_precision_on_cpu_is_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipe_base, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    for precision in ("fp16", "bf16"):
        assert train_controlnet.main(["--control", "controlnet", "--mixed_precision", precision, "--report_to", "none",
                                      "--output_dir", str(tmp_path / precision)]) == 2
        assert f"--mixed_precision {precision} with --control controlnet needs a GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_light_control_trains_in_half_precision_on_cpu(tmp_path):
    assert train_controlnet.main(["--control", "light", "--mixed_precision", "fp16", "--max_train_steps", "1",
                                  "--num_inference_steps", "1", "--report_to", "none",
                                  "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "control_encoder.safetensors").is_file()


# 9. flags and a full disk ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--gradient_accumulation_steps", "0", "must be >= 1"),
    ("--train_batch_size", "0", "must be >= 1"),
    ("--checkpointing_steps", "-2", "must be >= 0"),
    ("--max_train_steps", "-5", "must be >= 1"),
    ("--learning_rate", "nan", "not a finite number"),
    ("--boft_cayley_neumann_terms", "100000", r"must be in \[0, 32\]"),
    ("--boft_dropout", "1.5", r"must be in \[0, 1\]"),
    ("--num_inference_steps", "0", "must be >= 1"),
])
def test_numeric_flags_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, flag, value, message):
    monkeypatch.setattr(recipe_base, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert run_main("--output_dir", tmp_path / "out", flag, value) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err and message.replace("\\", "") in err.replace("\\", "")


def test_full_disk_is_one_clear_line_and_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    real_save = checkpoints.save_file
    calls = {"n": 0}

    def disk_fills_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # checkpoint-2 writes two safetensors files; checkpoint-4 runs out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", disk_fills_up)
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--checkpointing_steps", "2", "--max_train_steps", "6") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert "could not write" in lines[0] and "checkpoint-4/trainable.safetensors" in lines[0]
    assert "No space left on device" in lines[0] and "earlier checkpoints are intact (latest: checkpoint-2)" in lines[0]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# 10. readable output files --------------------------------------------------------------------------------
def test_adapter_files_take_the_umask_mode(tmp_path):
    import boft_diffusion as bd
    from conftest import make_tiny_unet

    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=["to_q"]))
    previous = os.umask(0o022)
    try:
        save_adapter(unet, tmp_path / "a")
    finally:
        os.umask(previous)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644, name


# 11. the overwrite guard on the resume path ---------------------------------------------------------------
def test_resume_without_checkpoint_refuses_a_folder_of_another_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "light_run"
    out.mkdir()
    (out / "control.json").write_text(json.dumps({"mode": "light"}))
    (out / "adapter_model.safetensors").write_bytes(b"weights of the light run")
    monkeypatch.setattr(recipe_base, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert run_main("--output_dir", out, "--resume_from_checkpoint", "latest") == 2
    err = capsys.readouterr().err
    assert "holds the outputs of another run" in err and "no checkpoint to resume" in err
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights of the light run"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "control.json"]


def test_resume_latest_of_an_empty_folder_still_starts(tmp_path):
    assert run_main("--output_dir", tmp_path / "fresh", "--resume_from_checkpoint", "latest",
                    "--max_train_steps", "1") == 0
    assert load_file(tmp_path / "fresh" / "adapter_model.safetensors")


# 9. --compile with inductor on the CPU -------------------------------------------------------------------
def test_compile_with_inductor_is_refused_on_the_cpu_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """inductor computes wrong gradients on the CPU (issue 36): the flag refuses it there
    rather than train something else; aot_eager (which matches eager) and other devices pass."""
    from boft_diffusion.recipes.dreambooth import DreamBoothConfig
    from boft_diffusion.training.trainer import TrainingError, check_compile_backend

    monkeypatch.setattr(recipe_base, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert run_main("--output_dir", tmp_path / "out", "--compile") == 2
    assert "--compile with the inductor backend computes wrong gradients" in capsys.readouterr().err
    assert train_controlnet.main(["--output_dir", str(tmp_path / "ctl"), "--compile", "--report_to", "none"]) == 2
    aot = DreamBoothConfig.from_flags(["--compile", "--compile_backend", "aot_eager"]).run.trainer
    check_compile_backend(aot, torch.device("cpu"))
    inductor = DreamBoothConfig.from_flags(["--compile"]).run.trainer
    check_compile_backend(inductor, torch.device("cuda"))
    with pytest.raises(TrainingError, match="aot_eager"):
        check_compile_backend(inductor, torch.device("cpu"))
