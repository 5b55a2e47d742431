"""benchmarks/dreambooth_failure_modes.py sorts drawn scenes into the mode that zeroes them."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from dreambooth_failure_modes import failure_mode  # noqa: E402

from boft_diffusion.tiny import metrics, world  # noqa: E402


@pytest.fixture(scope="module")
def star_profile():
    return metrics.SubjectProfile(world.render(scene) for scene in world.subject_instance_scenes(subject="sks_star"))


def drawn(background: str, **shape_changes):
    scene = world.subject_scene("blue", subject="sks_star")
    return world.render(world.Scene(background, (replace(scene.shape, **shape_changes),)))


@pytest.mark.parametrize(("image", "mode"), [
    (lambda: drawn("blue"), "scored"),
    (lambda: drawn("purple"), "subject_coloured_background"),
    (lambda: drawn("blue", kind="square"), "wrong_shape"),
    (lambda: drawn("blue", pattern="solid"), "stripe_colours_missing"),
    (lambda: drawn("blue", color="white", color2="green"), "stripe_colours_missing"),
])
def test_each_mode(star_profile, image, mode):
    assert failure_mode(image(), star_profile)[0] == mode
