"""Converting between Pillow images and tensors, and pasting images into grids (no torchvision)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: grayscale, palette, RGBA (on white), 16-bit and float images."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not mid-training) and make it RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    width, height = rows[0][0].size
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * width, len(rows) * height), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (x * width, y * height))
    return grid
