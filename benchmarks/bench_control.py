"""Control on the embedded tiny model: `--control light` against `--control controlnet`.

Trains each mode on the bundled tiny-world control set, then measures on held-out control maps
the mask IoU between generated object and control, and the colour fidelity of the same samples,
for the base model (no control) and each trained control. Prints a markdown table.

    python benchmarks/bench_control.py --max_train_steps 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from boft_diffusion import load_pipeline
from boft_diffusion.core.files import count_file_parameters
from boft_diffusion.evaluation.sampling import base_sampler, control_sampler
from boft_diffusion.evaluation.tiny_world import tiny_control_scores
from boft_diffusion.families.loading import quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.control import ControlConfig, train


def tiny_pipeline():
    return quiet_progress(load_pipeline("tiny", dtype=torch.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_control")
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--snr_gamma", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", default=["light", "controlnet"], choices=["light", "controlnet"])
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="Sampler steps for the evaluation.")
    args = parser.parse_args()
    out = Path(args.output_dir)
    rows = {"base model, no control": (tiny_control_scores(base_sampler(tiny_pipeline(), args.steps), args.num_images),
                                       0, 0.0, 0.0)}
    for mode in args.modes:
        flags = ["--control", mode, "--output_dir", str(out / mode), "--overwrite_output_dir",
                 "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
                 "--train_batch_size", str(args.train_batch_size), "--report_to", "none",
                 "--proportion_empty_prompts", "0.1", "--num_validation_images", "1",
                 "--snr_gamma", str(args.snr_gamma)]
        config = ControlConfig.from_flags(flags)
        start = time.time()
        train(config)
        seconds = time.time() - start
        sampler = control_sampler(load_outputs(tiny_pipeline(), out / mode), steps=args.steps)
        params = sum(count_file_parameters(p) for p in (out / mode).rglob("*.safetensors") if "checkpoint-" not in str(p))
        rows[f"--control {mode}"] = (tiny_control_scores(sampler, args.num_images), params, seconds,
                                     seconds / args.max_train_steps)
    print(f"\nTiny-world control, {args.max_train_steps} steps of batch {args.train_batch_size}, "
          f"{args.num_images} held-out control maps, {args.steps} sampler steps.\n")
    print("| control | trainable params | train time (s) | s/step | mask IoU | background right | shape colour right |")
    print("|---|---|---|---|---|---|---|")
    for label, (scores, params, seconds, per_step) in rows.items():
        print(f"| {label} | {params:,} | {seconds:.0f} | {per_step:.2f} | {scores['control_iou']:.2f} "
              f"| {scores['background']:.2f} | {scores['shape_color']:.2f} |")
    (out / "results.json").write_text(json.dumps({k: v[0] for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
