"""Which background the embedded model draws when a prompt names none, per sampler.

A fifth of DreamBooth's failed samples put the subject on a background of its own stripe colour,
and the base model's habit is where that comes from (BENCHMARKS.md, "Why samples miss the
subject"). This counts the nearest palette colour of each sample's border for prompts without a
background, under the model's own sampler and under others from the same scheduler config, on
the DreamBooth benchmark's sampling seeds:

    python benchmarks/base_backgrounds.py --json backgrounds.json
"""

import argparse
import json
from collections import Counter

import diffusers
from bench_dreambooth import GUIDANCE, fresh_pipeline

from boft_diffusion.evaluation.sampling import sample
from boft_diffusion.tiny import metrics

#: name -> (scheduler class, config overrides, steps); None: the model's own scheduler.
SAMPLERS: dict[str, tuple[str | None, dict, int]] = {
    "model default (DPM++ 2M), 25 steps": (None, {}, 25),
    "model default (DPM++ 2M), 100 steps": (None, {}, 100),
    "DPM++ 2M SDE, 25 steps": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 25),
    "Euler ancestral, 25 steps": ("EulerAncestralDiscreteScheduler", {}, 25),
    "DDPM, 100 steps": ("DDPMScheduler", {}, 100),
}


def background_counts(pipe, prompt: str, count: int, seed: int, steps: int, guidance: float) -> Counter:
    images = sample(pipe, [prompt] * count, seed, steps, guidance)
    return Counter(metrics.background_name(metrics.to_rgb_array(image)) for image in images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=["a photo of star", "a photo of triangle", ""])
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--eval_seed", type=int, default=100, help="bench_dreambooth's sampling seed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pipe = fresh_pipeline()
    own = pipe.scheduler
    results = {}
    for name, (scheduler, overrides, steps) in SAMPLERS.items():
        pipe.scheduler = own if scheduler is None else getattr(diffusers, scheduler).from_config(own.config, **overrides)
        for prompt in args.prompts:
            counts = background_counts(pipe, prompt, args.num_images, args.eval_seed, steps, GUIDANCE)
            results.setdefault(name, {})[prompt] = dict(counts.most_common())
            print(f"{name} | {prompt!r}: " + ", ".join(f"{colour} {n}" for colour, n in counts.most_common()),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "guidance": GUIDANCE, "counts": results}, f, indent=1)


if __name__ == "__main__":
    main()
