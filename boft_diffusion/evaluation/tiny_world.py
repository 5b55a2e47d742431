"""Tiny-world measures of a pipeline: subject fidelity, re-contextualisation, language drift, and
mask IoU of control; all in [0, 1], scored without a learned model (``tiny/metrics.py``)."""

from __future__ import annotations

from collections.abc import Sequence
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
    return [(f"{instance_prompt} on {'an' if c[0] in 'aeiou' else 'a'} {c} background", c) for c in colours]


def subject_backgrounds(profile: metrics.SubjectProfile) -> list[str]:
    """Palette colours the subject stands out on: neither of its two colours."""
    own = {metrics.nearest_palette(colour) for colour in profile.colors}
    return [c for c in world.COLORS if c not in own]


def class_captions(n: int, seed: int) -> list[str]:
    """Captions of held-out (colour, shape, background) scenes: ordinary prompts that do not
    mention the subject, to measure language drift."""
    return [world.caption(scene) for scene in world.held_out_scenes(n, seed)]


def tiny_world_samples(
    pipe, instance_images: Sequence[Image.Image], instance_prompt: str, class_prompt: str,
    num_images: int = 16, seed: int = 0, steps: int = 25, guidance: float | None = None,
) -> dict[str, list[float]]:
    """Per-sample measures of the pipeline as it is (adapter on or off), all in [0, 1].

    subject: subject fidelity of instance-prompt samples; recontext_background: whether
    "<instance prompt> on a <colour> background" got that background; recontext_subject: subject
    fidelity of those same samples (the subject kept in context); class_prompt_fidelity: prompt
    fidelity on held-out ordinary captions (language drift); class_subject: subject fidelity of
    class-prompt samples (must stay low); class_shape: whether class-prompt samples still draw
    the class's shape.
    """
    profile = metrics.SubjectProfile(instance_images)
    subject = [metrics.subject_fidelity(im, profile) for im in sample(pipe, [instance_prompt] * num_images, seed, steps, guidance)]
    recontext = recontext_prompts(instance_prompt, subject_backgrounds(profile))
    prompts = [recontext[i % len(recontext)][0] for i in range(num_images)]
    in_context = sample(pipe, prompts, seed + 1000, steps, guidance)
    captions = class_captions(num_images, seed + 2000)
    drift = sample(pipe, captions, seed + 2000, steps, guidance)
    class_samples = sample(pipe, [class_prompt] * num_images, seed + 3000, steps, guidance)
    return {
        "subject": subject,
        "recontext_background": [metrics.prompt_fidelity(im, p)["background"] for im, p in zip(in_context, prompts, strict=True)],
        "recontext_subject": [metrics.subject_fidelity(im, profile) for im in in_context],
        "class_prompt_fidelity": [metrics.prompt_fidelity(im, c)["mean"] for im, c in zip(drift, captions, strict=True)],
        "class_subject": [metrics.subject_fidelity(im, profile) for im in class_samples],
        "class_shape": [metrics.prompt_fidelity(im, class_prompt).get("shape_class", 0.0) for im in class_samples],
    }


def tiny_world_scores(pipe, instance_images: Sequence[Image.Image], instance_prompt: str, class_prompt: str,
                      **kwargs: Any) -> dict[str, float]:
    """The means of :func:`tiny_world_samples`."""
    samples = tiny_world_samples(pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    return {key: float(np.mean(values)) for key, values in samples.items()}


def instance_self_score(instance_images: Sequence[Image.Image]) -> float:
    """Subject fidelity of each instance image against a profile of the others (leave one out)."""
    images = list(instance_images)
    if len(images) < 3:
        return float(np.mean([metrics.subject_fidelity(im, images) for im in images]))
    scores = [metrics.subject_fidelity(im, images[:i] + images[i + 1 :]) for i, im in enumerate(images)]
    return float(np.mean(scores))


def compare_tiny_world(adapter: TrainedAdapter, instance_images, instance_prompt: str, class_prompt: str,
                       **kwargs: Any) -> dict[str, Any]:
    """The same measures with the adapter switched off (base) and on, plus the instance images' own score."""
    adapter.switch(enabled=False)
    base = tiny_world_scores(adapter.pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    adapter.switch(enabled=True)
    adapted = tiny_world_scores(adapter.pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    return {"instances": instance_self_score(instance_images), "base": base, "adapter": adapted}


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
