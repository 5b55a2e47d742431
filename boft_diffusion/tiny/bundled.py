"""Paths of what ships with the package: the embedded tiny model, the bundled subjects (package data)
and the example control set (source checkout only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from boft_diffusion.tiny import world

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHECKOUT_DIR = PACKAGE_DIR.parent

#: Folder of the tiny Stable Diffusion pretrained on the shapes world
#: (``scripts/pretrain_tiny_sd.py``), shipped inside the package.
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "tiny" / "model"

#: The prompt of the default bundled subject (the training scripts' default --instance_prompt).
DEFAULT_INSTANCE_PROMPT = world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt

#: The bundled tiny-world control set (shape mask -> image), in a source checkout.
EXAMPLE_CONTROL_DATA = CHECKOUT_DIR / "examples" / "tiny_control"


def example_subject_dir(name: str = world.DEFAULT_SUBJECT) -> Path:
    """The instance images of a bundled subject (package data, so an installed wheel has them)."""
    folder = PACKAGE_DIR / "tiny" / "subjects" / name
    if not folder.is_dir():
        raise FileNotFoundError(f"the bundled subject {name!r} is missing: {folder} does not exist; "
                                "pass --instance_data_dir.")
    return folder


def control_validation_pairs(count: int = 4) -> list[tuple[Any, str]]:
    """Held-out tiny-world scenes as (shape mask image, caption): the control recipe's default validation."""
    return [(world.render_mask(scene).convert("RGB"), world.caption(scene))
            for scene in world.free_placement_scenes(count, seed=99, held_out=True)]
