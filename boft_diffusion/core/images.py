"""Converting between Pillow images and tensors, and pasting images into grids, labelled or not (no torchvision)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class LabelledRow:
    """One row of a labelled comparison: a title (the prompt), and per column group its images and a note."""

    title: str
    groups: Sequence[Sequence[Image.Image]]
    notes: Sequence[str] = ()


GAP = 12
FONT_SIZE = 13


def labelled_comparison(rows: Sequence[LabelledRow], headers: Sequence[str], scale: int = 1) -> Image.Image:
    """Column groups side by side under their ``headers`` ("base", "adapter"); above each row its
    title and under each header the group's note, drawn with Pillow's default font, so the
    picture says what it shows without the code that made it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 5
    width, height = (side * scale for side in rows[0].groups[0][0].size)
    per_group = max(len(images) for row in rows for images in row.groups)
    group_width = per_group * width
    has_notes = any(row.notes for row in rows)
    row_height = line * (2 if has_notes else 1) + height + GAP
    canvas = Image.new("RGB", (GAP + len(headers) * (group_width + GAP), line + GAP // 2 + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    lefts = [GAP + g * (group_width + GAP) for g in range(len(headers))]
    for left, header in zip(lefts, headers, strict=True):
        draw.text((left + group_width // 2, 2), header, fill="black", font=font, anchor="mt")
    top = line + GAP // 2
    for row in rows:
        draw.text((GAP, top), row.title, fill="black", font=font)
        for left, note in zip(lefts, row.notes, strict=False):
            draw.text((left, top + line), note, fill=(70, 70, 70), font=font)
        images_top = top + line * (2 if has_notes else 1)
        for left, images in zip(lefts, row.groups, strict=True):
            for index, image in enumerate(images):
                tile = image.convert("RGB").resize((width, height), Image.NEAREST)
                canvas.paste(tile, (left + index * width, images_top))
        top += row_height
    return canvas
