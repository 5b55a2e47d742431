"""--config FILE: TOML or YAML flags under their names without dashes; the command line wins."""

import json
from pathlib import Path

import pytest

import train_dreambooth
from boft_diffusion import demo
from boft_diffusion.recipes import control, dreambooth
from boft_diffusion.tiny.bundled import example_subject_dir
from boft_diffusion.training.cli import parse_args
from boft_diffusion.training.trainer import FLAGS_JSON, TrainingError

ROOT = Path(__file__).resolve().parent.parent
TOML = """
learning_rate = 2e-3
train_batch_size = 2
boft_target_modules = ["to_q", "conv1"]
random_flip = true
boft_scale = false
instance_prompt = "a photo of sks star on a red background"
"""
YAML = """
learning_rate: 2.0e-3
train_batch_size: 2
boft_target_modules: [to_q, conv1]
random_flip: true
boft_scale: false
instance_prompt: a photo of sks star on a red background
"""


def parse(*argv):
    return parse_args(dreambooth.build_parser(), [*map(str, argv)])


@pytest.mark.parametrize("name, text", [("flags.toml", TOML), ("flags.yaml", YAML)])
def test_config_file_sets_flags_and_the_command_line_wins(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    args = parse("--config", path)
    assert args.learning_rate == 2e-3 and args.train_batch_size == 2 and args.random_flip
    assert args.boft_target_modules == ["to_q", "conv1"] and args.boft_scale is False
    assert args.instance_prompt == "a photo of sks star on a red background"
    assert args.seed == 0  # not in the file: the default
    args = parse("--learning_rate", "5e-4", "--config", path, "--boft_target_modules", "to_k", "--boft_scale")
    assert args.learning_rate == 5e-4 and args.boft_target_modules == ["to_k"] and args.boft_scale is True
    assert args.train_batch_size == 2


@pytest.mark.parametrize("text, message", [
    ("leraning_rate = 1e-3", "unknown key 'leraning_rate' (did you mean 'learning_rate'?)"),
    ('"--seed" = 3', "unknown key '--seed' (did you mean 'seed'?)"),
    ("random_flip = 1", "random_flip is a switch; give true or false, not 1"),
    ("seed = [1, 2]", "seed takes one value, not [1, 2]"),
    ("seed = ", "is not valid TOML"),
])
def test_bad_config_entries_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert train_dreambooth.main(["--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_config_file_kinds_and_values_are_checked(tmp_path, capsys):
    (tmp_path / "flags.json").write_text("{}")
    assert train_dreambooth.main(["--config", str(tmp_path / "flags.json")]) == 2
    assert "use a .toml, .yaml or .yml file" in capsys.readouterr().err
    assert train_dreambooth.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml cannot be read" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- seed\n- 3\n")
    assert train_dreambooth.main(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "must hold a table of flags" in capsys.readouterr().err
    (tmp_path / "choice.toml").write_text('mixed_precision = "fp8"')
    with pytest.raises(SystemExit):  # argparse checks the value as it checks a typed flag
        parse("--config", tmp_path / "choice.toml")
    assert "--mixed_precision: invalid choice: 'fp8'" in capsys.readouterr().err
    (tmp_path / "other.toml").write_text('instance_data_dir = "x"')
    with pytest.raises(TrainingError, match="unknown key 'instance_data_dir'"):  # not a ControlNet flag
        parse_args(control.build_parser(), ["--config", str(tmp_path / "other.toml")])


def test_run_records_resolved_flags_and_resume_names_a_changed_config(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("max_train_steps = 3\ncheckpointing_steps = 2\nboft_block_size = 8\nreport_to = \"none\"\n"
                    "num_inference_steps = 2\nnum_validation_images = 1\nlearning_rate = 2e-3\n")
    out = tmp_path / "out"
    assert train_dreambooth.main(["--config", str(path), "--output_dir", str(out), "--seed", "4"]) == 0
    recorded = json.loads((out / FLAGS_JSON).read_text())
    assert recorded["learning_rate"] == 2e-3 and recorded["seed"] == 4 and recorded["config"] == str(path)
    checkpoint_flags = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["flags"]
    assert checkpoint_flags["learning_rate"] == 2e-3 and "config" not in checkpoint_flags
    path.write_text(path.read_text().replace("boft_block_size = 8", "boft_block_size = 4"))
    assert train_dreambooth.main(["--config", str(path), "--output_dir", str(out), "--seed", "4",
                                  "--resume_from_checkpoint", "latest"]) == 2
    assert "flags changed since: --boft_block_size 8 -> 4" in capsys.readouterr().err


def test_the_demo_config_file_holds_the_demos_flags():
    """demo.py takes its recipe from examples/dreambooth_demo.toml and sets the per-run keys itself:
    for `make demo`'s run (the default subject, paths and seed) its flags are the file's, read as a
    --config file."""
    from_file = vars(parse("--config", demo.RECIPE_FILE))
    steps = demo.read_recipe()["max_train_steps"]
    flags = vars(parse(*demo.training_flags(Path("outputs/demo/adapter"), steps, 0, Path("outputs/demo/class_images"))))
    assert flags.pop("instance_data_dir") == str(example_subject_dir())
    assert from_file.pop("instance_data_dir") is None  # the default: the bundled subject
    assert from_file.pop("config").endswith("dreambooth_demo.toml") and flags.pop("config") is None
    assert from_file == flags


def test_the_demo_without_its_recipe_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "RECIPE_FILE", tmp_path / "dreambooth_demo.toml")
    with pytest.raises(FileNotFoundError, match="dreambooth_demo.toml is missing.*run it from a checkout"):
        demo.training_flags(tmp_path / "adapter", 1, 0, tmp_path / "class_images")
