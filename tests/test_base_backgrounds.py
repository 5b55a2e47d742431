"""benchmarks/base_backgrounds.py counts the palette colour of each sample's border."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from base_backgrounds import background_counts  # noqa: E402

from boft_diffusion.tiny import world  # noqa: E402


class BackgroundByBatchIndex:
    """Stands in for a pipeline: the i-th image of each batch is the striped triangle on ``backgrounds[i]``."""

    def __init__(self, backgrounds: list[str]):
        self.backgrounds = backgrounds

    def __call__(self, prompts, num_inference_steps, generator, guidance_scale):
        return SimpleNamespace(images=[world.render_subject(background=self.backgrounds[i], subject="sks_triangle")
                                       for i in range(len(prompts))])


def test_counts_each_samples_background():
    backgrounds = ["purple", "purple", "green", "black", "white"]
    counts = background_counts(BackgroundByBatchIndex(backgrounds), "a photo of star", len(backgrounds), seed=0,
                               steps=1, guidance=4.0)
    assert counts == {"purple": 2, "green": 1, "black": 1, "white": 1}
