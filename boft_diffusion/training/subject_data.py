"""A DreamBooth run's images: instance and class image sets, and the micro-batch pieces that go
through the VAE, the noise and the denoiser together."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.images import image_to_tensor
from ..families.denoising import posterior
from .data import (
    center_crop_tensor,
    center_offset,
    decode_images,
    load_masks,
    nearest_bucket,
    resize_to_cover,
    warn_small,
)

logger = logging.getLogger("boft_diffusion")


@dataclass(eq=False)  # compared by identity: two sets of equal images stay two sets
class ImageSet:
    """Preprocessed training images: one ``[3, H, W]`` tensor each (``[4, H, W]`` with a mask),
    covering its target size, and what SDXL's size conditioning records of each: the file's size
    and the top-left of a crop made while loading (``--center_crop``)."""

    tensors: list[torch.Tensor]
    paths: list[Path]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each file
    targets: list[tuple[int, int]] = field(default_factory=list)  # (height, width) each is cropped to
    offsets: list[tuple[int, int]] = field(default_factory=list)  # (top, left) of the load-time crop

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int, crop: bool, workers: int, what: str,
                    caption_extension: str | None = None, mask_dir: str | os.PathLike | None = None,
                    buckets: list[tuple[int, int]] | None = None) -> ImageSet:
        """Each image is resized to cover its target: its aspect-ratio bucket (``(width, height)``
        sizes, see ``bucket_sizes``) when given, else a ``resolution`` square. With ``mask_dir``,
        each tensor carries its subject mask as a fourth channel, so crops and flips move image and
        mask together."""
        decoded = decode_images(folder, workers, what, caption_extension)
        targets = [(resolution, resolution)] * len(decoded)
        if buckets:
            targets = [nearest_bucket(image.width, image.height, buckets)[::-1] for _, image in decoded]
        warn_small(decoded, targets)
        loaded = [(path, resize_to_cover(image, width, height))
                  for (path, image), (height, width) in zip(decoded, targets, strict=True)]
        tensors = [image_to_tensor(image) for _, image in loaded]
        if mask_dir is not None:
            masks = load_masks(loaded, mask_dir)
            tensors = [torch.cat([image, mask]) for image, mask in zip(tensors, masks, strict=True)]
        offsets = [(0, 0)] * len(tensors)
        if crop:
            offsets = [center_offset(t.shape[1], t.shape[2], target) for t, target in zip(tensors, targets, strict=True)]
            tensors = [center_crop_tensor(t, target) for t, target in zip(tensors, targets, strict=True)]
        return cls(tensors, [p for p, _ in loaded], [(image.height, image.width) for _, image in decoded],
                   targets, offsets)


@dataclass
class Segment:
    """Consecutive examples of a micro-batch from one image set and of one target size."""

    images: ImageSet
    picks: list[int]
    rows: list[int]  # prompt rows
    instance: bool


def segments_of(images: ImageSet, picks: list[int], rows: list[int], instance: bool) -> list[Segment]:
    """``picks`` cut where the target size changes (prior images of several buckets)."""
    segments: list[Segment] = []
    for pick, row in zip(picks, rows, strict=True):
        if segments and images.targets[segments[-1].picks[0]] == images.targets[pick]:
            segments[-1].picks.append(pick)
            segments[-1].rows.append(row)
        else:
            segments.append(Segment(images, [pick], [row], instance))
    return segments


@dataclass
class Part:
    """Examples of a micro-batch that go through the VAE, the noise and the denoiser together: one
    segment after crops and flips, or several of one size joined (instances first)."""

    pixels: torch.Tensor
    masks: torch.Tensor  # the instances' subject masks, [k, 0 or 1, H, W]
    size_ids: torch.Tensor | None  # the family's size conditioning (SDXL's [n, 6]), None where it has none
    rows: list[int]  # prompt rows
    instances: int  # the first ``instances`` examples are instance images, the rest prior images
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # cached (mean, std) with --cache_latents

    @property
    def count(self) -> int:
        return len(self.rows)

    @classmethod
    def join(cls, parts: list[Part]) -> Part:
        posterior = size_ids = None
        if parts[0].posterior is not None:
            posterior = tuple(torch.cat([part.posterior[k] for part in parts]) for k in range(2))
        if parts[0].size_ids is not None:
            size_ids = torch.cat([part.size_ids for part in parts])
        return cls(torch.cat([part.pixels for part in parts]),
                   torch.cat([part.masks for part in parts if part.instances]),
                   size_ids, [row for part in parts for row in part.rows],
                   sum(part.instances for part in parts), posterior)


def bucket_groups(images: ImageSet, dataset_len: int) -> list[list[int]]:
    """Example indices ``0 .. dataset_len - 1`` (example ``i`` is image ``i % n``) by target size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(dataset_len):
        groups.setdefault(images.targets[index % len(images.tensors)], []).append(index)
    return [groups[target] for target in sorted(groups)]


def cache_latents(image_sets: list[ImageSet], vae: torch.nn.Module, device: torch.device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each image's VAE posterior (mean, std), encoded once (--cache_latents). The crops are
    centred and nothing is flipped (``recipes.dreambooth.check_config`` makes sure), so every step would
    encode exactly these pixels again."""
    cache = []
    for images in image_sets:
        entries = []
        for tensor, target in zip(images.tensors, images.targets, strict=True):
            pixels = center_crop_tensor(tensor[:3], target).unsqueeze(0).to(device)
            mean, std = posterior(vae, pixels)
            entries.append((mean[0], std[0]))
        cache.append(entries)
    logger.info("cached the latents of %d images", sum(len(entries) for entries in cache))
    return cache
