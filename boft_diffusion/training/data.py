"""Image loading and augmentation with Pillow and torch (no torchvision)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core.images import open_image, to_rgb

logger = logging.getLogger("boft_diffusion")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Sidecar captions: never image candidates, whether or not this run reads them.
CAPTION_SUFFIXES = {".txt", ".caption"}


class DataError(ValueError):
    """Unusable training data; the message names the folder or file."""


def list_images(folder: str | os.PathLike, caption_extension: str | None = None) -> list[Path]:
    """The files of ``folder`` that may be images: hidden files and caption sidecars left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist.")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in CAPTION_SUFFIXES
        and not (caption_extension and p.name.lower().endswith(caption_extension.lower()))
    )


def caption_path(image: Path, extension: str) -> Path:
    """The sidecar caption of ``image``: ``photo.png`` -> ``photo.txt``."""
    return image.with_name(image.stem + extension)


def _decoded_or_none(path: Path) -> Image.Image | None:
    """The image at ``path``, or None when it does not decode."""
    try:
        return open_image(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def decode_images(
    folder: str | os.PathLike, num_workers: int = 0, what: str = "images", caption_extension: str | None = None,
) -> list[tuple[Path, Image.Image]]:
    """All decodable images of ``folder`` at their own size, as RGB.

    Unreadable or non-image files are skipped with one warning that lists them; a folder with no
    usable image is an error. Files ending in ``caption_extension`` are captions, not candidates.
    """
    paths = list_images(folder, caption_extension)
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            decoded = list(pool.map(_decoded_or_none, paths))
    else:
        decoded = [_decoded_or_none(p) for p in paths]
    skipped = [p.name for p, image in zip(paths, decoded, strict=True) if image is None]
    if skipped:
        logger.warning("skipped %d unreadable or non-image file(s) in %s: %s", len(skipped), folder, ", ".join(skipped))
    images = [(p, image) for p, image in zip(paths, decoded, strict=True) if image is not None]
    if not images:
        raise DataError(f"no usable {what} in {folder} (found {len(paths)} file(s), none decodable as an image).")
    return images


def warn_small(images: Sequence[tuple[Path, Image.Image]], targets: Sequence[tuple[int, int]]) -> None:
    """One warning naming the images that must be upscaled to cover their ``(height, width)`` target."""
    small = [p.name for (p, image), (height, width) in zip(images, targets, strict=True)
             if image.width < width or image.height < height]
    if small:
        sizes = sorted({f"{w}px" if w == h else f"{w}x{h}px" for h, w in targets})
        logger.warning("upscaling %d image(s) smaller than %s: %s", len(small), " / ".join(sizes), ", ".join(small))


def load_images(
    folder: str | os.PathLike, resolution: int, num_workers: int = 0, what: str = "images",
    caption_extension: str | None = None,
) -> list[tuple[Path, Image.Image]]:
    """All decodable images of ``folder`` (see :func:`decode_images`), resized so the shorter side
    is ``resolution``; smaller images are upscaled with a warning."""
    images = decode_images(folder, num_workers, what, caption_extension)
    warn_small(images, [(resolution, resolution)] * len(images))
    return [(p, resize_shorter_side(image, resolution)) for p, image in images]


def read_captions(images: Sequence[Path], extension: str, default: str) -> list[str]:
    """Each image's prompt from its sidecar (``photo.png`` -> ``photo.txt``), else ``default``.

    A sidecar that cannot be read as UTF-8 text, or is blank, is an error naming it: silently
    training that image on the default prompt would hide the mistake.
    """
    captions = []
    for image in images:
        sidecar = caption_path(image, extension)
        if not sidecar.is_file():
            captions.append(default)
            continue
        try:
            text = " ".join(sidecar.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"caption file {sidecar} is not readable UTF-8 text ({error}).") from error
        if not text:
            raise DataError(f"caption file {sidecar} is empty.")
        captions.append(text)
    return captions


def load_masks(images: Sequence[tuple[Path, Image.Image]], mask_dir: str | os.PathLike) -> list[torch.Tensor]:
    """For each loaded image, the mask in ``mask_dir`` with the same file stem, as ``[1, H, W]``
    in [0, 1] at the image's size. White is the subject; a mask with transparency (a cut-out)
    uses its alpha channel instead. Missing, duplicate, unreadable or differently shaped masks
    are errors naming the file."""
    mask_dir = Path(mask_dir)
    by_stem: dict[str, Path] = {}
    for path in list_images(mask_dir):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in by_stem:
            raise DataError(f"two masks for {path.stem!r} in {mask_dir}: {by_stem[path.stem].name}, {path.name}.")
        by_stem[path.stem] = path
    missing = [path.name for path, _ in images if path.stem not in by_stem]
    if missing:
        raise DataError(f"no mask in {mask_dir} for {len(missing)} image(s): {', '.join(missing)}.")
    masks = []
    for path, image in images:
        mask_path = by_stem[path.stem]
        try:
            with Image.open(mask_path) as mask:
                mask.load()
                gray = mask_channel(mask)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise DataError(f"mask {mask_path} is not a readable image ({error}).") from error
        (mask_w, mask_h), (image_w, image_h) = gray.size, image.size
        if abs(mask_w * image_h - image_w * mask_h) > 0.01 * mask_h * image_h:
            raise DataError(f"mask {mask_path} is {mask_w}x{mask_h}, its image {path.name} is {image_w}x{image_h}: "
                            "the shapes differ.")
        gray = gray.resize(image.size, Image.BILINEAR)
        masks.append(torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0).unsqueeze(0))
    return masks


def mask_channel(mask: Image.Image) -> Image.Image:
    """The subject as an 8-bit gray image: the alpha channel of a cut-out, else the brightness."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        return mask.convert("RGBA").getchannel("A")
    return to_rgb(mask).convert("L")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BICUBIC)


def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as ``(width, height)``: sides that are multiples of ``multiple``, each
    size as close to ``resolution``² pixels as the grid allows without exceeding it, aspect ratios
    up to ``max_ratio``; square first."""
    area = resolution * resolution
    sizes = set()
    for width in range(multiple, int(resolution * max_ratio**0.5) + multiple, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= max_ratio:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda size: (abs(math.log(size[0] / size[1])), size))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio), the larger on a tie."""
    return min(buckets, key=partial(_bucket_distance, math.log(width / height)))


def _bucket_distance(ratio: float, size: tuple[int, int]) -> tuple[float, int]:
    """How far a bucket's log aspect ratio is from ``ratio``; the larger bucket first on a tie."""
    return abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled, aspect kept, to the smallest size that covers ``width`` x ``height``."""
    scale = max(width / image.width, height / image.height)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image if new_size == image.size else image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def center_offset(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(top, left)`` of the centred ``size = (height, width)`` window."""
    return (height - size[0]) // 2, (width - size[1]) // 2


def center_crop_tensor(tensor: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The centred ``size`` window (``(height, width)`` or a square side) of a ``[C, H, W]`` tensor
    (all channels alike)."""
    size = (size, size) if isinstance(size, int) else size
    top, left = center_offset(tensor.shape[1], tensor.shape[2], size)
    return tensor[:, top : top + size[0], left : left + size[1]]


def augment_batch(
    images: Sequence[torch.Tensor],
    size: int | tuple[int, int],
    generator: torch.Generator,
    random_crop: bool,
    random_flip: bool,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Crop each ``[C, H, W]`` tensor to ``size`` (a square side or ``(height, width)``; random or
    centred) and maybe flip it. Returns the batch and each crop's top-left ``(top, left)`` as the
    model sees it (SDXL conditions on it): a flipped crop's left is measured in the flipped image."""
    height_out, width_out = (size, size) if isinstance(size, int) else size
    out, crops = [], []
    for image in images:
        _, height, width = image.shape
        if random_crop:
            top = int(torch.randint(0, height - height_out + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - width_out + 1, (1,), generator=generator))
        else:
            top, left = center_offset(height, width, (height_out, width_out))
        crop = image[:, top : top + height_out, left : left + width_out]
        if random_flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
            left = width - left - width_out
        out.append(crop)
        crops.append((top, left))
    return torch.stack(out), crops
