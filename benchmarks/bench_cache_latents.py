"""``--cache_latents``: training steps/s with and without the latent cache, same seed and flags.

Runs train_dreambooth.py twice back to back in this process (the embedded tiny model and its
bundled subject by default) with prior preservation and ``--center_crop`` (the cache needs a
fixed crop), and prints each run's steps/s, their ratio and each run's final loss, which should
be equal: the cache changes when the VAE runs, not what it computes.

    python benchmarks/bench_cache_latents.py --resolution 128 --max_train_steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from boft_diffusion.recipes.dreambooth import DreamBooth, DreamBoothConfig


def train(output: Path, args: argparse.Namespace, cached: bool) -> dict:
    flags = [
        "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--output_dir", str(output),
        "--with_prior_preservation", "--class_prompt", "a photo of star", "--num_class_images", "8",
        "--class_data_dir", str(output.parent / "class_images"), "--resolution", str(args.resolution),
        "--center_crop", "--max_train_steps", str(args.max_train_steps), "--train_batch_size", "2",
        "--report_to", "none", "--seed", "0", *(["--cache_latents"] if cached else []),
    ]
    return DreamBooth(DreamBoothConfig.from_flags(flags)).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default="tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--max_train_steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = {name: train(Path(scratch) / name, args, cached) for name, cached in
                (("plain", False), ("cached", True))}
    for name, result in rows.items():
        print(json.dumps({"run": name, "resolution": args.resolution, "steps_per_second": result["steps_per_second"],
                          "final_loss": result["loss"]}))
    print(f"cached / plain steps/s: {rows['cached']['steps_per_second'] / rows['plain']['steps_per_second']:.2f}x")


if __name__ == "__main__":
    main()
