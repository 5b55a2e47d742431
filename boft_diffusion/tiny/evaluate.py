"""Sampling-based evaluation of a pipeline on the shapes world."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from . import metrics as M
from . import world as W


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float | None = 4.0,
             batch_size: int = 16, **kwargs):
    """One image per (prompt, seed); each sample has its own seeded generator,
    so results do not depend on the batch size. ``guidance=None`` keeps the pipeline's default."""
    import torch

    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        with torch.no_grad():
            res = pipe(list(prompts[i : i + batch_size]), num_inference_steps=steps, generator=gens, **kwargs)
        out.extend(res.images)
    return out


def round_trip(vae, images: Sequence) -> list:
    """``images`` (PIL or uint8 HxWx3 arrays) through the VAE's encoder (its mean, no sampling) and
    decoder, as PIL images: what any sample of them can at best look like after decoding."""
    import torch
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample.float().cpu()
    arrays = ((y.permute(0, 2, 3, 1).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def evaluate_prompt_fidelity(pipe, scenes: Sequence[W.Scene], seeds: Sequence[int] | None = None,
                             steps: int = 25, guidance: float = 4.0, batch_size: int = 16,
                             return_images: bool = False) -> dict:
    """Sample one image per scene caption and score it with
    :func:`metrics.prompt_fidelity`.  Returns mean ``background``,
    ``shape_color``, ``shape_class`` and ``mean`` accuracies (plus ``n`` and
    ``seconds``; ``images`` when ``return_images``)."""
    seeds = list(range(len(scenes))) if seeds is None else list(seeds)
    t = time.time()
    images = generate(pipe, [W.caption(s) for s in scenes], seeds, steps, guidance, batch_size)
    res = [M.prompt_fidelity(im, s) for im, s in zip(images, scenes, strict=False)]
    out = {k: float(np.mean([r[k] for r in res])) for k in ("background", "shape_color", "shape_class", "mean")}
    out["n"] = len(scenes)
    out["seconds"] = time.time() - t
    if return_images:
        out["images"] = images
    return out


def evaluate_subject_fidelity(pipe, prompt: str, instance_images, seeds: Sequence[int] = tuple(range(16)),
                              steps: int = 25, guidance: float = 4.0, batch_size: int = 16) -> dict:
    """Mean :func:`metrics.subject_fidelity` of samples for ``prompt``."""
    prof = M.SubjectProfile(instance_images)
    images = generate(pipe, [prompt] * len(seeds), list(seeds), steps, guidance, batch_size)
    scores = [M.subject_fidelity(im, prof) for im in images]
    return {"subject_fidelity": float(np.mean(scores)), "scores": scores, "images": images}


__all__ = ["generate", "evaluate_prompt_fidelity", "evaluate_subject_fidelity"]
