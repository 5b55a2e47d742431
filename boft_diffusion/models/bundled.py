"""Paths of what ships inside the package: the embedded tiny model and the example data."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHECKOUT_DIR = PACKAGE_DIR.parent

#: Folder of the tiny Stable Diffusion pretrained on the shapes world
#: (``scripts/pretrain_tiny_sd.py``), shipped inside the package.
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "tiny" / "model"

#: The bundled tiny-world control set (shape mask -> image), in a source checkout.
EXAMPLE_CONTROL_DATA = CHECKOUT_DIR / "examples" / "tiny_control"

EXAMPLE_SUBJECT = "sks_star"


def example_subject_dir(name: str = EXAMPLE_SUBJECT) -> Path:
    """The instance images of a bundled subject: package data first (an installed wheel), then the
    ``examples`` folder of a source checkout."""
    candidates = [PACKAGE_DIR / "tiny" / "subjects" / name, CHECKOUT_DIR / "examples" / name]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"the bundled subject {name!r} is missing: neither {candidates[0]} nor {candidates[1]} "
                            "exists; pass --instance_data_dir.")
