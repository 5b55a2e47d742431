"""How much of a subject survives the embedded model's VAE: its photos encoded, decoded and scored.

No adapter draws a subject better than the VAE can decode it, so a subject whose photos lose their
pattern in a round trip caps every method alike (issue #37). Prints, per subject, the photos' own
score (leave one out) and their round trip's subject fidelity, then the mean and minimum per pattern;
``--grid`` draws each subject's photos beside their round trips, to see what the VAE loses:

    python benchmarks/vae_round_trip.py --subjects all evaluation:40 --json trips.json
    python benchmarks/vae_round_trip.py --subjects star_ring_white_red sks_star --grid trips.png
    python benchmarks/vae_round_trip.py --vae /tmp/v4_vae --subjects evaluation:12   # a new VAE
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from bench_dreambooth import fresh_pipeline, instances_of
from diffusers import AutoencoderKL

from boft_diffusion.core.images import LabelledRow, labelled_comparison
from boft_diffusion.evaluation.tiny_world import instance_self_score
from boft_diffusion.tiny import metrics, subject_family, world
from boft_diffusion.tiny.evaluate import round_trip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", nargs="+", default=["all", "evaluation:40"],
                        help="As bench_dreambooth.py's: 'all', 'evaluation:N', 'tuning:N' or names.")
    parser.add_argument("--json", type=Path, help="write every subject's two scores here")
    parser.add_argument("--grid", type=Path, help="write a PNG here: per subject, its photos beside their round trips")
    parser.add_argument("--vae", type=Path, help="a diffusers VAE folder, or a model folder with one, to measure "
                        "instead of the embedded model's (pretrain_tiny_sd.py --vae-only writes one)")
    args = parser.parse_args()
    vae = load_vae(args.vae) if args.vae else fresh_pipeline().vae
    rows = {}
    pictures: list[LabelledRow] = []
    by_pattern: dict[str, list[float]] = defaultdict(list)
    for name in [n for spec in args.subjects for n in subject_family.resolve(spec)]:
        scores, picture = measure_subject(vae, name)
        rows[name] = scores
        pictures.append(picture)
        trip = scores["round_trip"]
        by_pattern["bundled" if name in world.SUBJECTS else subject_family.subject_by_name(name).pattern].append(trip)
        print(f"{name}: instances {scores['instances']:.2f}, VAE round trip {trip:.2f}", flush=True)
    print("\n| pattern | subjects | round trip, mean | lowest |\n|---|---|---|---|")
    for pattern, trips in by_pattern.items():
        print(f"| {pattern} | {len(trips)} | {np.mean(trips):.2f} | {min(trips):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.grid:
        labelled_comparison(pictures, ["photos", "VAE round trip"], scale=2).save(args.grid)


def load_vae(folder: Path) -> AutoencoderKL:
    """A VAE folder's weights in fp32, or those of the ``vae`` folder inside a model folder."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--vae {folder}: no diffusers VAE here (config.json missing)")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def measure_subject(vae, name: str) -> tuple[dict[str, float], LabelledRow]:
    """A subject's photos' own score and their round trip's, and the picture row that shows both
    (enlarged twice: a ring or a stripe is a few pixels of a 64x64 photo)."""
    photos = instances_of(name)
    profile = metrics.SubjectProfile(photos)
    decoded = round_trip(vae, photos)
    scores = {"instances": instance_self_score(photos),
              "round_trip": float(np.mean([metrics.subject_fidelity(im, profile) for im in decoded]))}
    title = f"{name}: round trip {scores['round_trip']:.2f}, photos {scores['instances']:.2f}"
    return scores, LabelledRow(title, [photos, decoded])


if __name__ == "__main__":
    main()
