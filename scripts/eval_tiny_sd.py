#!/usr/bin/env python
"""Acceptance numbers for a tiny shapes-world pipeline (default: the embedded one).

Reports, on --n samples per row with fixed seeds:
* sampling time of one 64x64 image (25 steps);
* prompt fidelity on held-out (colour, shape, background) combinations, per --guidance;
* the DreamBooth prompt forms: "a photo of sks <shape> on a <colour> background", the same
  with descriptor words the model never saw (``world.UNSEEN_DESCRIPTORS``) in the
  identifier slot, and the bare class prompts "a photo of <shape>", "a <shape>",
  "a photo of <shape> on a <colour> background" (is that shape drawn; stars apart);
* subject fidelity of each bundled subject's instance images, of their VAE round trip,
  and of base-model samples for the subject's instance prompt;
* the first --described evaluation subjects of ``subject_family`` described in words ("a green
  star with white dots on a blue background"): a world-v4 model has the words for every pattern
  and can compose a subject it never saw; a v3 model has words for diagonal stripes only.
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

from boft_diffusion.evaluation.tiny_world import instance_self_score  # noqa: E402
from boft_diffusion.families.loading import load_pipeline, quiet_progress  # noqa: E402
from boft_diffusion.tiny import metrics as M  # noqa: E402
from boft_diffusion.tiny import subject_family  # noqa: E402
from boft_diffusion.tiny import world as W  # noqa: E402
from boft_diffusion.tiny.evaluate import evaluate_prompt_fidelity, generate, round_trip  # noqa: E402


def _background(colour: str) -> str:
    return f"on {'an' if colour[0] in 'aeiou' else 'a'} {colour} background"


def dreambooth_prompts(n: int, descriptors: tuple[str, ...]) -> list[str]:
    """``n`` prompts "a photo of <descriptor> <shape> on a <colour> background", cycling
    through every (shape, colour) pair and the descriptors."""
    pairs = [(s, c) for c in W.COLORS for s in W.SHAPES]
    return [f"a photo of {descriptors[i % len(descriptors)]} {pairs[i % len(pairs)][0]} "
            f"{_background(pairs[i % len(pairs)][1])}" for i in range(n)]


def class_prompts(n: int) -> dict[str, list[str]]:
    """The bare class prompt forms, ``n`` each, cycling through the shapes (and colours)."""
    shapes = [W.SHAPES[i % len(W.SHAPES)] for i in range(n)]
    colours = [W.COLORS[(i // len(W.SHAPES)) % len(W.COLORS)] for i in range(n)]
    return {
        "a photo of <shape>": [f"a photo of {s}" for s in shapes],
        "a <shape>": [f"{'an' if s[0] in 'aeiou' else 'a'} {s}" for s in shapes],
        "a photo of <shape> on a <colour> background": [f"a photo of {s} {_background(c)}"
                                                        for s, c in zip(shapes, colours, strict=True)],
    }


def score_prompts(pipe, prompts: list[str], steps: int, guidance: float) -> dict[str, float]:
    """Mean per-attribute prompt fidelity of one sample per prompt (seeds 0..n-1); for the
    shape class also the stars alone."""
    images = generate(pipe, prompts, list(range(len(prompts))), steps, guidance)
    scores = [M.prompt_fidelity(im, p) for im, p in zip(images, prompts, strict=True)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("background", "shape_class") if k in scores[0]}
    stars = [s["shape_class"] for s, p in zip(scores, prompts, strict=True) if " star" in p]
    if stars:
        out["star_drawn"] = float(np.mean(stars))
    out["n"] = len(prompts)
    return out


def subject_scores(pipe, steps: int, guidance: float, n: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, subject in W.SUBJECTS.items():
        inst = W.render_batch(W.subject_instance_scenes(5, subject=name))
        profile = M.SubjectProfile(list(inst))
        back = round_trip(pipe.vae, inst)
        samples = generate(pipe, [subject.instance_prompt] * n, list(range(n)), steps, guidance)
        out[name] = {
            "instances": float(np.mean([M.subject_fidelity(im, profile) for im in inst])),
            "vae_round_trip": float(np.mean([M.subject_fidelity(im, profile) for im in back])),
            "base_instance_prompt": float(np.mean([M.subject_fidelity(im, profile) for im in samples])),
        }
    return out


def described_subject_scores(pipe, steps: int, guidance: float, n: int, count: int) -> dict:
    """Subject fidelity of base samples prompted with each held-out subject's own captions (its
    photos' captions in turn), as a share of the photos' score against each other; and of the
    photos' VAE round trip, the ceiling any sample of the subject can reach."""
    per_subject = {}
    for subject in subject_family.subjects("evaluation", count):
        scenes = subject_family.instance_scenes(subject)
        photos = [W.render(scene) for scene in scenes]
        prompts = [W.caption(scenes[i % len(scenes)]) for i in range(n)]
        samples = generate(pipe, prompts, list(range(n)), steps, guidance)
        own = instance_self_score(photos)
        back = round_trip(pipe.vae, photos)
        per_subject[subject.name] = {
            "described": float(np.mean([M.subject_fidelity(im, photos) for im in samples])) / own,
            "vae_round_trip": float(np.mean([M.subject_fidelity(im, photos) for im in back])) / own,
            "example_prompt": prompts[0],
        }
    shares = [r["described"] for r in per_subject.values()]
    return {"mean_share": float(np.mean(shares)), "worst_share": float(np.min(shares)),
            "vae_round_trip_mean_share": float(np.mean([r["vae_round_trip"] for r in per_subject.values()])),
            "samples_per_subject": n, "subjects": per_subject}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--described", type=int, default=12, help="evaluation subjects described in words")
    p.add_argument("--output", default=None, help="write the report here (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = quiet_progress(load_pipeline(args.model, device=args.device))
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
        r = evaluate_prompt_fidelity(pipe, scenes, seeds=range(args.n), steps=args.steps, guidance=g)
        report[f"held_out_g{g}"] = r
        print(f"held-out guidance {g}:", {k: round(v, 3) for k, v in r.items()}, flush=True)

    g = args.guidance[0]
    rows = {
        "a photo of sks <shape> on a <colour> background": dreambooth_prompts(args.n, ("sks",)),
        "a photo of <unseen word> <shape> on a <colour> background": dreambooth_prompts(args.n, W.UNSEEN_DESCRIPTORS),
        **class_prompts(args.n),
    }
    for name, prompts in rows.items():
        report[name] = score_prompts(pipe, prompts, args.steps, g)
        print(f"{name}:", {k: round(v, 3) for k, v in report[name].items()}, flush=True)
    report["subjects"] = subject_scores(pipe, args.steps, g, min(args.n, 16))
    for name, r in report["subjects"].items():
        print(f"subject {name}:", {k: round(v, 3) for k, v in r.items()}, flush=True)
    described = described_subject_scores(pipe, args.steps, g, min(args.n, 8), args.described)
    report["held-out subjects described in words"] = described
    print("held-out subjects described in words:",
          {k: round(v, 3) for k, v in described.items() if isinstance(v, float)}, flush=True)
    text = json.dumps(report, indent=1, default=float)
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
