"""Why DreamBooth samples miss the subject: each instance-prompt sample of a bench_dreambooth
run sorted into one failure mode, and the three parts of subject fidelity averaged.

Subject fidelity is the geometric mean of shape, colours and stripes, so one part at zero zeroes
a sample. This script says which part, per method, over every adapter of a bench_dreambooth
phase folder (``OUT/confirm/<subject>/<method>-v...-seedN``), on the same sampling seeds:

    python benchmarks/dreambooth_failure_modes.py --runs OUT/confirm --json modes.json

Modes, first that applies: ``scored`` (fidelity > 0); ``subject_coloured_background`` (the
background is one of the subject's two stripe colours, so the object melts into it);
``wrong_shape``; ``stripe_colours_missing`` (the right shape, but its pixels are not split
between the two stripe colours: blended into a third colour, or one colour only); ``no_stripes``.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_dreambooth import GUIDANCE, bench_setup, fresh_pipeline, instances_of, loader, subject_prompt

from boft_diffusion.evaluation.sampling import sample
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.tiny import metrics

MODES = ("scored", "subject_coloured_background", "wrong_shape", "stripe_colours_missing", "no_stripes")
PARTS = ("score", "shape", "colors", "stripes")


def failure_mode(image, profile: metrics.SubjectProfile) -> tuple[str, dict[str, float]]:
    parts = profile.score(image)
    if parts["score"] > 0:
        return "scored", parts
    background = metrics.background_color(metrics.to_rgb_array(image))
    if np.sqrt(((profile.colors - background) ** 2).sum(-1)).min() < metrics.STRIPE_COLOUR_RADIUS:
        return "subject_coloured_background", parts
    if parts["shape"] == 0:
        return "wrong_shape", parts
    return ("stripe_colours_missing" if parts["colors"] == 0 else "no_stripes"), parts


def run_modes(run_dir: Path, num_images: int, eval_seed: int, guidance: float) -> dict:
    subject = run_dir.parent.name
    method = run_dir.name.split("-v")[0]
    model, subject_prompts = bench_setup(run_dir.parents[2])
    pipe = fresh_pipeline(model)
    load_outputs(pipe, run_dir, load=loader(method))
    profile = metrics.SubjectProfile(instances_of(subject))
    prompt = subject_prompt(subject, subject_prompts)
    counted = [failure_mode(image, profile) for image in sample(pipe, [prompt] * num_images, eval_seed, 25, guidance)]
    return {"run": run_dir.name, "subject": subject, "method": method, "modes": [m for m, _ in counted],
            "parts": {p: [parts[p] for _, parts in counted] for p in PARTS}}


def table(results: list[dict]) -> str:
    by_method = defaultdict(list)
    for result in results:
        by_method[result["method"]].append(result)
    lines = ["| method | runs | " + " | ".join(MODES) + " | " + " | ".join(f"mean {p}" for p in PARTS) + " |",
             "|---" * (2 + len(MODES) + len(PARTS)) + "|"]
    for method, runs in by_method.items():
        modes = [m for r in runs for m in r["modes"]]
        shares = [f"{modes.count(m) / len(modes):.2f}" for m in MODES]
        means = [f"{np.mean([v for r in runs for v in r['parts'][p]]):.2f}" for p in PARTS]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(shares) + " | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="a bench_dreambooth phase folder (e.g. OUT/confirm)")
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--eval_seed", type=int, default=100, help="bench_dreambooth's sampling seed")
    parser.add_argument("--guidance_scale", type=float, default=GUIDANCE, help="bench_dreambooth's guidance")
    parser.add_argument("--json", type=Path, help="write every sample's mode and parts here")
    args = parser.parse_args()
    run_dirs = sorted(p.parent for p in args.runs.glob("*/*/adapter_config.json"))
    if not run_dirs:
        parser.error(f"no adapters under {args.runs}/<subject>/<run>/")
    results = []
    for run_dir in run_dirs:
        results.append(run_modes(run_dir, args.num_images, args.eval_seed, args.guidance_scale))
        print(f"{run_dir.parent.name}/{run_dir.name}: subject {np.mean(results[-1]['parts']['score']):.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
