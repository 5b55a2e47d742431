#!/usr/bin/env python
"""Regenerate the example data sets from the shapes world (deterministic).

* ``boft_diffusion/tiny/subjects/<name>/``: for every bundled DreamBooth subject
  (``world.SUBJECTS``: a striped star, triangle and diamond), 5 instance images (64x64
  PNG) on varied backgrounds, their subject masks in ``<name>_masks/`` (for
  ``--instance_mask_dir``) and ``<name>.json`` (prompts and description). Package
  data, so an installed package finds them.
* ``examples/tiny_control/``: a small ControlNet-style data set of shapes placed
  anywhere (captions do not say where, the maps do): ``images/``,
  ``conditioning/`` (binary shape masks), ``edges/`` (edge maps) and
  ``metadata.jsonl`` lines ``{"file_name", "conditioning_file_name",
  "edges_file_name", "text"}`` (paths relative to the folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from boft_diffusion.tiny import world as W  # noqa: E402
from boft_diffusion.tiny.subject_family import write_subject  # noqa: E402


def make_control(out: Path, n: int = 512, seed: int = 2024) -> Path:
    if out.exists():
        shutil.rmtree(out)
    for sub in ("images", "conditioning", "edges"):
        (out / sub).mkdir(parents=True)
    scenes = W.free_placement_scenes(n, seed)
    lines = []
    for i, s in enumerate(scenes):
        name = f"{i:04d}.png"
        W.render(s).save(out / "images" / name, optimize=True)
        W.render_mask(s).save(out / "conditioning" / name, optimize=True)
        W.render_edges(s).save(out / "edges" / name, optimize=True)
        lines.append(json.dumps({
            "file_name": f"images/{name}",
            "conditioning_file_name": f"conditioning/{name}",
            "edges_file_name": f"edges/{name}",
            "text": W.caption(s),
        }))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "examples"), help="where tiny_control/ goes")
    p.add_argument("--subjects", default=str(ROOT / "boft_diffusion" / "tiny" / "subjects"))
    p.add_argument("--n-control", type=int, default=512)
    args = p.parse_args(argv)
    out = Path(args.out)
    for subject in W.SUBJECTS.values():
        write_subject(subject, Path(args.subjects))
    make_control(out / "tiny_control", args.n_control)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote examples to {out} ({size / 1e3:.0f} kB) and subjects to {args.subjects}")


if __name__ == "__main__":
    main()
