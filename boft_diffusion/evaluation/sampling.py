"""Sampling helpers of the evaluation: seeded batches, and ``(condition, prompt, seed) -> image``
samplers for the base model and for a control folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..families.loading import guidance_kwargs
from ..outputs.read import TrainedAdapter
from ..tiny.evaluate import generate

Sampler = Callable[[Image.Image, str, int], Image.Image]


def sample(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float | None, batch_size: int = 16):
    """One image per prompt, image ``i`` seeded with ``seed + i`` whatever the batch size."""
    return generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance, batch_size)


def base_sampler(pipe, steps: int = 25, guidance: float | None = None) -> Sampler:
    """The pipeline as it is, ignoring the condition: the uncontrolled reference."""

    def run(condition: Image.Image, prompt: str, seed: int) -> Image.Image:
        with torch.no_grad():
            return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        **guidance_kwargs(guidance)).images[0]

    return run


def control_sampler(adapter: TrainedAdapter, scale: float = 1.0, steps: int = 25,
                    guidance: float | None = None) -> Sampler:
    """Samples of a control folder loaded with ``load_outputs``, conditioned on the given image."""

    def run(condition: Image.Image, prompt: str, seed: int) -> Image.Image:
        return adapter.sample(condition, control_scale=scale, prompt=prompt, num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(seed), **guidance_kwargs(guidance))

    return run
