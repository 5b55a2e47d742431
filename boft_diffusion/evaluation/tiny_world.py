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


def recontext_prompts(instance_prompt: str) -> list[tuple[str, str]]:
    """("<instance prompt> on a <colour> background", colour) for colours unlike the subject."""
    colours = list(world.SUBJECTS[world.DEFAULT_SUBJECT].backgrounds)
    return [(f"{instance_prompt} on {'an' if c[0] in 'aeiou' else 'a'} {c} background", c) for c in colours]


def class_captions(n: int, seed: int) -> list[str]:
    """World captions of solid shapes (stars and others), to check for language drift."""
    return [world.caption(scene) for scene in world.training_scenes(n, seed, p_striped=0.0)]


def tiny_world_scores(
    pipe, instance_images: Sequence[Image.Image], instance_prompt: str, class_prompt: str,
    num_images: int = 16, seed: int = 0, steps: int = 25, guidance: float | None = None,
) -> dict[str, float]:
    """Measures of the pipeline as it is (adapter on or off), all in [0, 1].

    subject: subject fidelity of instance-prompt samples; recontext_background: how often
    "<instance prompt> on a <colour> background" gets that background; class_prompt_fidelity:
    prompt fidelity on ordinary captions; class_subject: subject fidelity of class-prompt
    samples (should stay low: the class must not turn into the subject).
    """
    profile = metrics.SubjectProfile(instance_images)
    subject = [metrics.subject_fidelity(im, profile) for im in sample(pipe, [instance_prompt] * num_images, seed, steps, guidance)]
    recontext = recontext_prompts(instance_prompt)
    prompts = [recontext[i % len(recontext)] for i in range(num_images)]
    backgrounds = sample(pipe, [p for p, _ in prompts], seed + 1000, steps, guidance)
    recontext_hits = [metrics.prompt_fidelity(im, p)["background"] for im, (p, _) in zip(backgrounds, prompts, strict=True)]
    captions = class_captions(num_images, seed + 2000)
    fidelity = [metrics.prompt_fidelity(im, c)["mean"] for im, c in zip(sample(pipe, captions, seed + 2000, steps, guidance), captions, strict=True)]
    class_subject = [metrics.subject_fidelity(im, profile) for im in sample(pipe, [class_prompt] * num_images, seed + 3000, steps, guidance)]
    return {
        "subject": float(np.mean(subject)),
        "recontext_background": float(np.mean(recontext_hits)),
        "class_prompt_fidelity": float(np.mean(fidelity)),
        "class_subject": float(np.mean(class_subject)),
    }


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
