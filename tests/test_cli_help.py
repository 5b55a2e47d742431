"""Every command's --help shows the defaults, so a user sees what a run does without reading code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "train_dreambooth.py": ["--learning_rate LEARNING_RATE", "(default: 0.001)", "(default: a photo of sks ohwx star)",
                            "(default: to_q to_k to_v to_out.0)", "--lora_rank LORA_RANK"],
    "train_controlnet.py": ["(default: light)", "(default: outputs/controlnet)", "(default: 25)"],
    "app.py": ["(default: 7860)", "(default: 512)", "(default: outputs)"],
    "-m boft_diffusion.evaluation": ["(default: 16)", "(default: 25)"],
    "-m boft_diffusion.demo": ["(default: outputs/demo)", "(default: 300)"],
}


def help_text(command: str) -> str:
    args = command.split() if command.startswith("-m") else [str(ROOT / command)]
    result = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_no_library_noise(command):
    text = " ".join(help_text(command).split())
    for expected in COMMANDS[command]:
        assert expected in text, f"{command} --help lacks {expected!r}"
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "Warning" not in text and "torchvision" not in text


def test_loading_the_pipeline_prints_no_torchvision_warning():
    code = "import boft_diffusion as bd; bd.load_pipeline('tiny')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision" not in result.stderr


@pytest.mark.parametrize("command", ["train_dreambooth.py", "train_controlnet.py", "app.py"])
def test_readme_lists_every_flag(command):
    readme = (ROOT / "README.md").read_text()
    flags = set(re.findall(r"--[a-z][a-z0-9_]+", help_text(command))) - {"--help"}
    missing = sorted(flag for flag in flags if not re.search(re.escape(flag) + r"(?![a-z0-9_])", readme))
    assert not missing, f"README does not mention {command}'s {missing}"
