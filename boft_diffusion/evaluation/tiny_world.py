"""Tiny-world measures of a pipeline: subject fidelity, re-contextualisation, language drift, and
mask IoU of control; all in [0, 1], scored without a learned model (``tiny/metrics.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..outputs.read import TrainedAdapter
from ..tiny import metrics, world
from .sampling import Sampler, sample


def recontext_prompts(instance_prompt: str, backgrounds: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """("<instance prompt> on a <colour> background", colour) for ``backgrounds`` (default: the
    colours unlike the demo subject's)."""
    colours = backgrounds or world.SUBJECTS[world.DEFAULT_SUBJECT].backgrounds
    return [(world.on_background(instance_prompt, c), c) for c in colours]


def subject_backgrounds(profile: metrics.SubjectProfile) -> list[str]:
    """Palette colours the subject stands out on: neither of its two colours."""
    own = {metrics.nearest_palette(colour) for colour in profile.colors}
    return [c for c in world.COLORS if c not in own]


def class_captions(n: int, seed: int) -> list[str]:
    """Captions of held-out (colour, shape, background) scenes: ordinary prompts that do not
    mention the subject, to measure language drift."""
    return [world.caption(scene) for scene in world.held_out_scenes(n, seed)]


Prompted = list[tuple[str, Image.Image]]


@dataclass
class TinyWorldSamples:
    """The (prompt, image) pairs each DreamBooth measure scores, kept so that a report can show them."""

    subject: Prompted
    recontext: Prompted
    captions: Prompted
    class_prompt: Prompted


def tiny_world_samples(
    pipe, instance_prompt: str, class_prompt: str, num_images: int = 16, seed: int = 0, steps: int = 25,
    guidance: float | None = None, backgrounds: Sequence[str] | None = None,
) -> TinyWorldSamples:
    """The pipeline as it is (adapter on or off) on each measure's prompts; every measure has its own
    seeds. ``backgrounds``: the re-context colours (default: those unlike the demo subject)."""

    def draw(prompts: list[str], first_seed: int) -> Prompted:
        return list(zip(prompts, sample(pipe, prompts, first_seed, steps, guidance), strict=True))

    recontext = recontext_prompts(instance_prompt, backgrounds)
    return TinyWorldSamples(
        subject=draw([instance_prompt] * num_images, seed),
        recontext=draw([recontext[i % len(recontext)][0] for i in range(num_images)], seed + 1000),
        captions=draw(class_captions(num_images, seed + 2000), seed + 2000),
        class_prompt=draw([class_prompt] * num_images, seed + 3000),
    )


def sample_scores(samples: TinyWorldSamples, instance_images: Sequence[Image.Image]) -> dict[str, list[float]]:
    """Per-sample measures, all in [0, 1] (the benchmark's confidence intervals need them).

    subject: subject fidelity of instance-prompt samples; recontext_background: whether
    "<instance prompt> on a <colour> background" got that background; recontext_subject: subject
    fidelity of those same samples (the subject kept in context); class_prompt_fidelity: prompt
    fidelity on held-out ordinary captions (language drift); class_subject: subject fidelity of
    class-prompt samples (should stay low: the class must not turn into the subject); class_shape:
    whether class-prompt samples are drawn as that shape (should stay high: the class must not break).
    """
    profile = metrics.SubjectProfile(instance_images)
    return {
        "subject": [metrics.subject_fidelity(im, profile) for _, im in samples.subject],
        "recontext_background": background_hits(samples.recontext),
        "recontext_subject": [metrics.subject_fidelity(im, profile) for _, im in samples.recontext],
        "class_prompt_fidelity": [metrics.prompt_fidelity(im, p)["mean"] for p, im in samples.captions],
        "class_subject": [metrics.subject_fidelity(im, profile) for _, im in samples.class_prompt],
        "class_shape": [metrics.prompt_fidelity(im, p)["shape_class"] for p, im in samples.class_prompt],
    }


def score_samples(samples: TinyWorldSamples, instance_images: Sequence[Image.Image]) -> dict[str, float]:
    """The means of :func:`sample_scores`."""
    return {key: float(np.mean(values)) for key, values in sample_scores(samples, instance_images).items()}


def background_hits(pairs: Prompted) -> list[float]:
    """1 for each image whose background is the colour its prompt asks for, else 0."""
    return [metrics.prompt_fidelity(im, p)["background"] for p, im in pairs]


def tiny_world_scores(
    pipe, instance_images: Sequence[Image.Image], instance_prompt: str, class_prompt: str,
    num_images: int = 16, seed: int = 0, steps: int = 25, guidance: float | None = None,
) -> dict[str, float]:
    """``score_samples`` of the pipeline as it is (adapter on or off), re-context on the colours
    the subject (read off its instance images) stands out on."""
    backgrounds = subject_backgrounds(metrics.SubjectProfile(instance_images))
    samples = tiny_world_samples(pipe, instance_prompt, class_prompt, num_images, seed, steps, guidance, backgrounds)
    return score_samples(samples, instance_images)


def instance_self_score(instance_images: Sequence[Image.Image]) -> float:
    """Subject fidelity of each instance image against a profile of the others (leave one out)."""
    images = list(instance_images)
    if len(images) < 3:
        return float(np.mean([metrics.subject_fidelity(im, images) for im in images]))
    scores = [metrics.subject_fidelity(im, images[:i] + images[i + 1 :]) for i, im in enumerate(images)]
    return float(np.mean(scores))


def compare_samples(adapter: TrainedAdapter, instance_prompt: str, class_prompt: str,
                    **kwargs: Any) -> dict[str, TinyWorldSamples]:
    """``tiny_world_samples`` with the adapter switched off ("base") and on ("adapter"), same seeds."""
    drawn = {}
    for name, enabled in (("base", False), ("adapter", True)):
        adapter.switch(enabled=enabled)
        drawn[name] = tiny_world_samples(adapter.pipe, instance_prompt, class_prompt, **kwargs)
    return drawn


def compare_tiny_world(adapter: TrainedAdapter, instance_images, instance_prompt: str, class_prompt: str,
                       **kwargs: Any) -> dict[str, Any]:
    """The same measures with the adapter switched off (base) and on, plus the instance images' own score."""
    kwargs.setdefault("backgrounds", subject_backgrounds(metrics.SubjectProfile(instance_images)))
    drawn = compare_samples(adapter, instance_prompt, class_prompt, **kwargs)
    return {"instances": instance_self_score(instance_images),
            **{name: score_samples(samples, instance_images) for name, samples in drawn.items()}}


def tiny_control_scores(sample_fn: Sampler, num_images: int = 32, seed: int = 0) -> dict[str, float]:
    """Mask IoU against held-out control maps, and colour fidelity of the same samples.

    The maps place held-out (colour, shape, background) combinations anywhere, at
    any size, and the prompts do not say where: only the control can place the shape."""
    scenes = world.free_placement_scenes(num_images, seed=seed + 4242, held_out=True)
    ious, background, colour = [], [], []
    for i, scene in enumerate(scenes):
        mask = world.render_mask(scene)
        image = sample_fn(mask.convert("RGB"), world.caption(scene), seed + i)
        ious.append(metrics.control_fidelity(image, mask))
        fidelity = metrics.prompt_fidelity(image, scene)
        background.append(fidelity["background"])
        colour.append(fidelity["shape_color"])
    return {"control_iou": float(np.mean(ious)), "background": float(np.mean(background)),
            "shape_color": float(np.mean(colour))}
