"""Image loading and augmentation with Pillow and torch (no torchvision)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..models.images import open_image, to_rgb

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


def load_images(
    folder: str | os.PathLike, resolution: int, num_workers: int = 0, what: str = "images",
    caption_extension: str | None = None,
) -> list[tuple[Path, Image.Image]]:
    """All decodable images of ``folder``, resized so the shorter side is ``resolution``.

    Unreadable or non-image files are skipped with one warning that lists them; a folder with no
    usable image is an error. Images smaller than ``resolution`` are upscaled with a warning.
    Files ending in ``caption_extension`` are captions, not candidates.
    """
    paths = list_images(folder, caption_extension)

    def decode(path: Path) -> Image.Image | None:
        try:
            return open_image(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None

    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            decoded = list(pool.map(decode, paths))
    else:
        decoded = [decode(p) for p in paths]
    skipped = [p.name for p, image in zip(paths, decoded, strict=True) if image is None]
    if skipped:
        logger.warning("skipped %d unreadable or non-image file(s) in %s: %s", len(skipped), folder, ", ".join(skipped))
    images = [(p, image) for p, image in zip(paths, decoded, strict=True) if image is not None]
    if not images:
        raise DataError(f"no usable {what} in {folder} (found {len(paths)} file(s), none decodable as an image).")
    small = [p.name for p, image in images if min(image.size) < resolution]
    if small:
        logger.warning("upscaling %d image(s) smaller than %dpx: %s", len(small), resolution, ", ".join(small))
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


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def center_crop_tensor(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` window of a ``[C, H, W]`` tensor (all channels alike)."""
    _, height, width = tensor.shape
    top, left = (height - size) // 2, (width - size) // 2
    return tensor[:, top : top + size, left : left + size]


def augment_batch(
    images: Sequence[torch.Tensor],
    size: int,
    generator: torch.Generator,
    random_crop: bool,
    random_flip: bool,
) -> torch.Tensor:
    """Crop each ``[C, H, W]`` tensor to ``size`` (random or centred) and maybe flip it."""
    out = []
    for image in images:
        _, height, width = image.shape
        if random_crop:
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        crop = image[:, top : top + size, left : left + size]
        if random_flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)
