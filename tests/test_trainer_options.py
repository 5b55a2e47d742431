"""progress.json: what a watcher reads of a run. --use_ema: the saved adapter is the exponential moving average of the trained tensors (checked by
hand from the checkpoints' raw tensors), the last step's weights sit in raw/, and a resumed run
continues the average bit for bit. --validation_data_dir: a held-out loss at fixed draws."""

import json

import torch
from safetensors.torch import load_file
from test_dreambooth import FAST

import train_dreambooth
from boft_diffusion.training.checkpoints import TRAINABLE_FILE
from boft_diffusion.training.ema import EMA_FILE
from boft_diffusion.training.trainer import PROGRESS_JSON

DECAY = 0.5
EMA = ["--use_ema", "--ema_decay", str(DECAY), "--boft_dropout", "0", "--learning_rate", "0.05"]


def train(out, *flags) -> int:
    return train_dreambooth.main([*FAST, "--output_dir", str(out), *EMA, *map(str, flags)])


def unet_skews(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if key.startswith("unet.") and "boft_skew" in key}


def test_the_adapter_is_the_average_and_raw_holds_the_last_step(tmp_path):
    out = tmp_path / "out"
    assert train(out, "--max_train_steps", "3", "--checkpointing_steps", "1") == 0
    steps = [unet_skews(load_file(out / f"checkpoint-{k}" / TRAINABLE_FILE)) for k in (1, 2)]
    average = unet_skews(load_file(out / "checkpoint-2" / "ema" / EMA_FILE))
    assert average and set(average) == set(steps[0])
    for key, start in average.items():  # after two steps from 0: d^2 * 0 + (1 - d)(d p1 + p2)
        expected = (1 - DECAY) * (DECAY * steps[0][key] + steps[1][key])
        assert torch.allclose(start, expected, atol=1e-7)
    raw, averaged = load_file(out / "raw" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(raw) == set(averaged)
    assert any(not torch.allclose(raw[key], averaged[key]) for key in raw), "the saved adapter is not the last step"


def test_a_resumed_run_continues_the_average_bitwise(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(whole, "--max_train_steps", "4") == 0
    assert train(resumed, "--max_train_steps", "2", "--checkpointing_steps", "1") == 0
    assert train(resumed, "--max_train_steps", "4", "--resume_from_checkpoint", str(resumed / "checkpoint-1"),
                 "--overwrite_output_dir") == 0
    for name in ("adapter_model.safetensors", "raw/adapter_model.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_validation_loss_on_held_out_images_is_logged_and_comparable(tmp_path, caplog):
    """--validation_data_dir: the loss of held-out images at fixed draws, at every validation; the same
    in two runs of the same seed, and moving with the adapter from step to step."""
    import shutil

    from boft_diffusion.tiny.bundled import example_subject_dir

    held_out = tmp_path / "held_out"
    shutil.copytree(example_subject_dir(), held_out)
    flags = ["--validation_data_dir", held_out, "--caption_extension", ".txt", "--validation_steps", "1",
             "--max_train_steps", "3", "--learning_rate", "0.05", "--boft_dropout", "0"]

    def losses(out) -> list[float]:
        caplog.clear()
        with caplog.at_level("INFO", logger="boft_diffusion"):
            assert train_dreambooth.main([*FAST, "--output_dir", str(out), *map(str, flags)]) == 0
        return [float(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records
                if r.getMessage().startswith("validation at step") and "validation_loss" in r.getMessage()]

    first, second = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(first) == 3 and first == second
    assert len(set(first)) == 3, "the loss follows the adapter from step to step"


def test_progress_names_the_step_loss_checkpoint_and_grid_and_survives_a_resume(tmp_path):
    out = tmp_path / "out"
    assert train(out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "2") == 0
    progress = json.loads((out / PROGRESS_JSON).read_text())
    assert progress["step"] == progress["max_steps"] == 3 and progress["finished"] and progress["first_step"] == 0
    assert progress["checkpoint"] == "checkpoint-2" and progress["validation"] == "validation/step-000003.png"
    assert progress["loss"] > 0 and progress["seconds"] > 0 and (out / progress["validation"]).is_file()
    assert train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest") == 0
    resumed = json.loads((out / PROGRESS_JSON).read_text())
    assert (resumed["first_step"], resumed["step"], resumed["finished"]) == (2, 4, True)
