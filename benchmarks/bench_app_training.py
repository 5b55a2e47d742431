"""The Train tab's acceptance run: the bundled star trained through the app's run queue with the demo
preset (its own steps and learning rate), timed from the Train button to the finished adapter with
no class images drawn yet, then compared tensor by tensor with the adapter the command line trains
from the same recipe (`python train_dreambooth.py --config examples/dreambooth_demo.toml`), which
`make demo` scores.

    python benchmarks/bench_app_training.py --output_dir runs/app_training
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from boft_diffusion.app.studio import Limits
from boft_diffusion.app.training_runs import PRESETS, TrainingLimits, TrainingRequest, TrainingRuns
from boft_diffusion.tiny.bundled import example_subject_dir

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_FILES = ("adapter_model.safetensors", "learned_embeds.safetensors")


def train_in_app(folder: Path) -> tuple[float, Path]:
    """Seconds from submitting to a finished run, and the run's adapter folder."""
    runs = TrainingRuns(folder / "adapters", TrainingLimits(), Limits().upload_quota(), poll_seconds=0.2)
    subject = example_subject_dir()
    steps, learning_rate = PRESETS["demo"].defaults()
    start = time.perf_counter()
    run_id = runs.submit(TrainingRequest(files=sorted(map(str, subject.iterdir())), captions={}, identifier="sks ohwx",
                                         class_noun="star", preset="demo", steps=steps, learning_rate=learning_rate,
                                         model="tiny"))
    try:
        while (status := runs.status(run_id, [run_id]))["status"] in ("queued", "running"):
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        if status["status"] != "finished":
            raise RuntimeError(f"the app's run ended {status['status']}: {status['message']}\n{status['log']}")
        return seconds, folder / "adapters" / status["adapter"]
    finally:
        runs.close()


def train_on_command_line(folder: Path) -> tuple[float, Path]:
    output = folder / "cli"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), "--config",
                    str(ROOT / "examples" / "dreambooth_demo.toml"), "--output_dir", str(output),
                    "--class_data_dir", str(folder / "cli_class_images"), "--report_to", "none"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(folder / "cli.log").open("w"))
    return time.perf_counter() - start, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    folder = Path(args.output_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    app_seconds, app_adapter = train_in_app(folder)
    cli_seconds, cli_adapter = train_on_command_line(folder)
    same = {}
    for name in ADAPTER_FILES:
        ours, theirs = load_file(app_adapter / name), load_file(cli_adapter / name)
        same[name] = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    result = {"date": time.strftime("%Y-%m-%d"), "app_seconds_from_train_button": round(app_seconds, 1),
              "command_line_seconds": round(cli_seconds, 1), "adapters_identical": same}
    (folder / "app_training.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
