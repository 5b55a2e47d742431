"""Every command's --help shows the defaults, so a user sees what a run does without reading code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Per command, flags whose own --help entry must show their default.
COMMANDS = {
    "train_dreambooth.py": {"--learning_rate": "0.001", "--instance_prompt": "a photo of sks ohwx star",
                            "--boft_target_modules": "to_q to_k to_v to_out.0", "--lora_rank": "4"},
    "train_controlnet.py": {"--control": "light", "--output_dir": "outputs/controlnet", "--num_inference_steps": "25"},
    "app.py": {"--port": "7860", "--max_size": "768", "--max_upload_mb": "512", "--adapters_dir": "outputs"},
    "-m boft_diffusion.evaluation": {"--num_images": "16", "--num_inference_steps": "25"},
    "-m boft_diffusion.demo": {"--output_dir": "outputs/demo", "--max_train_steps": "300"},
}


def help_text(command: str) -> str:
    args = command.split() if command.startswith("-m") else [str(ROOT / command)]
    result = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def help_entries(text: str) -> dict[str, str]:
    """Each option's own part of a --help text, by its first long flag, whitespace collapsed: an
    entry starts at a line "  -..." and runs over the lines indented deeper."""
    entries: dict[str, list[str]] = {}
    entry: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  -"):
            entry = entries.setdefault(re.search(r"--[\w-]+", line).group(), [])
        elif not line.startswith("   "):
            entry = None
        if entry is not None:
            entry.append(line)
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_no_library_noise(command):
    text = help_text(command)
    entries = help_entries(text)
    for flag, default in COMMANDS[command].items():
        assert flag in entries, f"{command} --help lists no {flag}"
        assert f"(default: {default})" in entries[flag], f"{command} --help: {entries[flag]!r} lacks its default"
    text = " ".join(text.split())
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
