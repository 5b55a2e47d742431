#!/usr/bin/env python
"""Acceptance numbers for a tiny shapes-world pipeline (default: the embedded one).

Reports: sampling time of one 64x64 image (25 steps), prompt fidelity on held-out
(colour, shape, background) combinations for each --guidance value, and subject
fidelity of instance images vs. base-model samples for "a photo of sks star".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from boft_diffusion.models.images import image_grid  # noqa: E402
from boft_diffusion.models.pipelines import load_pipeline  # noqa: E402
from boft_diffusion.tiny import metrics as M  # noqa: E402
from boft_diffusion.tiny import world as W  # noqa: E402
from boft_diffusion.tiny.evaluate import evaluate_prompt_fidelity, generate  # noqa: E402


def rows_of(images, columns: int = 8):
    return [images[i : i + columns] for i in range(0, len(images), columns)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default=None, help="save a grid of the held-out samples here (PNG)")
    p.add_argument("--train-check", action="store_true", help="also score captions from the training distribution")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    report = {}
    pipe("a red circle on a blue background", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(3):
        t = time.time()
        pipe("a red circle on a blue background", num_inference_steps=args.steps, guidance_scale=args.guidance[0],
             generator=torch.Generator().manual_seed(i))
        times.append(time.time() - t)
    report["sample_seconds_25_steps"] = min(times)
    print("sampling time (min of 3):", round(min(times), 3), "s", flush=True)

    scenes = W.held_out_scenes(args.n, seed=0)
    for g in args.guidance:
        r = evaluate_prompt_fidelity(pipe, scenes, seeds=range(args.n), steps=args.steps, guidance=g,
                                     return_images=bool(args.grid))
        if args.grid:
            image_grid(rows_of(r.pop("images"))).save(args.grid.replace(".png", f"_g{g}.png"))
        report[f"held_out_g{g}"] = r
        print(f"held-out guidance {g}:", {k: round(v, 3) for k, v in r.items()}, flush=True)
        if args.train_check:
            tr = W.training_scenes(args.n, seed=777)
            tr = [s for s in tr if len(s.shapes) == 1]
            r2 = evaluate_prompt_fidelity(pipe, tr, steps=args.steps, guidance=g)
            report[f"train_g{g}"] = r2
            print(f"train-dist guidance {g}:", {k: round(v, 3) for k, v in r2.items()}, flush=True)

    inst = [W.render(s) for s in W.subject_instance_scenes(5)]
    prof = M.SubjectProfile(inst)
    inst_scores = [M.subject_fidelity(im, prof) for im in inst]
    imgs = generate(pipe, ["a photo of sks star"] * 16, list(range(16)), args.steps, args.guidance[0])
    base_scores = [M.subject_fidelity(im, prof) for im in imgs]
    report["subject_instances"] = float(np.mean(inst_scores))
    report["subject_base_sks_star"] = float(np.mean(base_scores))
    print("subject fidelity: instances", round(np.mean(inst_scores), 3), "base 'a photo of sks star'",
          round(np.mean(base_scores), 3), flush=True)
    if args.grid:
        image_grid(rows_of(imgs)).save(args.grid.replace(".png", "_sks.png"))
    print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
