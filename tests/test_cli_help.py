"""Every command's --help shows the defaults, so a user sees what a run does without reading code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The app's flags that take a value, and the default each one's own help entry must show.
APP_DEFAULTS = {"--host": "127.0.0.1", "--port": "7860", "--model": "tiny", "--adapters_dir": "outputs",
                "--max_size": "768", "--max_steps": "100", "--max_images": "4", "--max_upload_mb": "512",
                "--max_upload_files": "200", "--max_upload_ratio": "100.0", "--max_uploads_folder_mb": "4096",
                "--max_train_images": "30", "--max_train_image_side": "4096", "--max_train_steps": "1000",
                "--max_train_minutes": "60", "--max_queued_runs": "8", "--max_runs_folder_mb": "8192"}
#: Per command, flags whose own --help entry must show their default (a default shown under another
#: flag, such as --max_upload_mb's 512, must not pass for --max_size).
COMMANDS = {
    "train_dreambooth.py": {"--learning_rate": "0.001", "--instance_prompt": "a photo of sks ohwx star",
                            "--boft_target_modules": "to_q to_k to_v to_out.0, with add_q_proj add_k_proj add_v_proj to_add_out on Flux.1 and SD3", "--lora_rank": "4"},
    "train_controlnet.py": {"--control": "light", "--output_dir": "outputs/controlnet", "--num_inference_steps": "25"},
    "app.py": APP_DEFAULTS,
    "-m boft_diffusion.evaluation": {"--num_images": "16", "--num_inference_steps": "25"},
    "-m boft_diffusion.demo": {"--output_dir": "outputs/demo", "--max_train_steps": "300"},
}
#: Where each command's flags are documented: one table row per flag, named in its first cell.
FLAG_DOCS = {"train_dreambooth.py": "docs/training.md", "train_controlnet.py": "docs/training.md",
             "app.py": "docs/app.md"}


def help_text(command: str) -> str:
    args = command.split() if command.startswith("-m") else [str(ROOT / command)]
    result = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_no_library_noise(command):
    text = help_text(command)
    entries = option_entries(text)
    for flag, default in COMMANDS[command].items():
        assert flag in entries, f"{command} --help lists no {flag}"
        entry = " ".join(entries[flag].split())
        assert f"(default: {default})" in entry, f"{command} --help: {flag} lacks its own default {default}: {entry}"
    text = " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    assert "Warning" not in text and "torchvision" not in text


def test_loading_the_pipeline_prints_no_torchvision_warning():
    code = "import boft_diffusion as bd; bd.load_pipeline('tiny')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision" not in result.stderr


def option_entries(text: str) -> dict[str, str]:
    """Each option of an argparse --help text -> its entry (the option's line and its indented continuation)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (?:-[a-zA-Z], )?(--[a-z][a-z0-9_]*)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_app_flag_taking_a_value_has_its_default_checked():
    entries = option_entries(help_text("app.py"))
    takes_value = {flag for flag, entry in entries.items() if re.match(r"\s*--[a-z0-9_]+ [A-Z]", entry)}
    assert takes_value - {"--models"} == set(APP_DEFAULTS), "APP_DEFAULTS must name every app flag taking a value"


def documented_flags(markdown: str) -> set[str]:
    """The flags a page documents: those named in backticks in the first cell of a table row."""
    flags = set()
    for line in markdown.splitlines():
        if line.startswith("|"):
            flags |= set(re.findall(r"`(--[a-z][a-z0-9_]*)`", line.split("|")[1]))
    return flags


@pytest.mark.parametrize("command", FLAG_DOCS)
def test_docs_document_every_flag(command):
    flags = set(re.findall(r"--[a-z][a-z0-9_]+", help_text(command))) - {"--help"}
    page = FLAG_DOCS[command]
    missing = sorted(flags - documented_flags((ROOT / page).read_text()))
    assert not missing, f"{page} has no table row for {command}'s {missing}"
