"""A control run's data: (image, conditioning image, caption) pairs from a local folder with
``metadata.jsonl`` or a Hugging Face dataset, resized and centre-cropped to the training size."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..core.images import image_to_tensor, open_image, to_rgb
from .data import DataError, center_crop, center_offset, resize_shorter_side

logger = logging.getLogger("boft_diffusion")


@dataclass
class ControlDataConfig:
    """Where the pairs come from and which columns hold them."""

    train_data_dir: str | None
    dataset_name: str | None
    dataset_config_name: str | None
    image_column: str
    conditioning_image_column: str
    caption_column: str
    proportion_empty_prompts: float
    max_train_samples: int | None
    validation_image: list[str] | None


@dataclass
class ControlExample:
    """A training pair, with what SDXL's size conditioning needs: the image file's (height, width)
    and the top-left (top, left) of its centre crop."""

    image: torch.Tensor
    condition: torch.Tensor
    caption: str
    original_size: tuple[int, int] = (0, 0)
    crop: tuple[int, int] = (0, 0)


def _prepare_pair(image: Image.Image, condition: Image.Image, caption: str, resolution: int, name: str,
                  resized: list[str]) -> ControlExample:
    if condition.size != image.size:
        resized.append(name)
        condition = condition.resize(image.size, Image.BILINEAR)
    scaled = resize_shorter_side(image, resolution)
    crop = center_offset(scaled.height, scaled.width, (resolution, resolution))
    condition = center_crop(resize_shorter_side(condition, resolution), resolution)
    return ControlExample(image_to_tensor(center_crop(scaled, resolution)), image_to_tensor(condition), caption,
                          (image.height, image.width), crop)


def load_control_folder(folder: str | os.PathLike, resolution: int, max_samples: int | None = None) -> list[ControlExample]:
    """Read ``metadata.jsonl`` lines {file_name, conditioning_file_name, text} of a local folder.

    Pairs with a missing or corrupt side are skipped and listed; conditioning images of another
    size are resized with a warning; missing captions become the empty prompt with a warning.
    """
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(f"{metadata} not found: a control data folder needs metadata.jsonl with file_name, "
                        "conditioning_file_name and text.")
    examples, skipped, resized, no_caption = [], [], [], []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped.append(f"line {number} (not JSON)")
            continue
        image_name, condition_name = row.get("file_name"), row.get("conditioning_file_name")
        if not image_name or not condition_name:
            skipped.append(f"line {number} ({'image' if not image_name else 'conditioning image'} missing)")
            continue
        try:
            image, condition = open_image(folder / image_name), open_image(folder / condition_name)
        except FileNotFoundError as error:
            skipped.append(f"{Path(error.filename).name} (missing)")
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            skipped.append(f"{image_name} / {condition_name} (unreadable)")
            continue
        caption = row.get("text")
        if not isinstance(caption, str) or not caption.strip():
            no_caption.append(image_name)
            caption = ""
        examples.append(_prepare_pair(image, condition, caption, resolution, image_name, resized))
        if max_samples and len(examples) >= max_samples:
            break
    _report(folder, skipped, resized, no_caption)
    if not examples:
        raise DataError(f"no usable image/conditioning pairs in {folder}.")
    return examples


def _report(source: Any, skipped: list[str], resized: list[str], no_caption: list[str]) -> None:
    if skipped:
        logger.warning("skipped %d pair(s) in %s: %s", len(skipped), source, ", ".join(skipped))
    if resized:
        logger.warning("resized %d conditioning image(s) to their image's size: %s", len(resized), ", ".join(resized))
    if no_caption:
        logger.warning("%d example(s) have no caption and train with the empty prompt: %s",
                       len(no_caption), ", ".join(map(str, no_caption[:10])))


def load_control_dataset(data: ControlDataConfig, resolution: int) -> list[ControlExample]:
    """A Hugging Face dataset with image, conditioning image and caption columns."""
    try:
        import datasets
    except ImportError as error:
        raise DataError("--dataset_name needs the optional package `datasets` (pip install datasets).") from error
    if Path(data.dataset_name).is_dir() and (Path(data.dataset_name) / "dataset_info.json").is_file():
        dataset = datasets.load_from_disk(data.dataset_name)  # a folder written by Dataset.save_to_disk
    else:
        dataset = datasets.load_dataset(data.dataset_name, data.dataset_config_name, split="train")
    columns = list(dataset.column_names)
    for flag in ("image_column", "conditioning_image_column", "caption_column"):
        if getattr(data, flag) not in columns:
            raise DataError(f"--{flag} {getattr(data, flag)!r} is not a column of {data.dataset_name}; "
                            f"its columns are {columns}.")
    if data.max_train_samples:
        dataset = dataset.select(range(min(data.max_train_samples, len(dataset))))
    examples, skipped, resized, no_caption = [], [], [], []
    for index, row in enumerate(dataset):
        image, condition = row[data.image_column], row[data.conditioning_image_column]
        if image is None or condition is None:
            skipped.append(f"row {index}")
            continue
        caption = row[data.caption_column]
        if not isinstance(caption, str) or not caption.strip():
            no_caption.append(index)
            caption = ""
        examples.append(_prepare_pair(to_rgb(image), to_rgb(condition), caption, resolution, f"row {index}", resized))
    _report(data.dataset_name, skipped, resized, no_caption)
    if not examples:
        raise DataError(f"no usable rows in {data.dataset_name}.")
    return examples


def load_control_examples(data: ControlDataConfig, resolution: int, default_folder: str | os.PathLike) -> list[ControlExample]:
    """The run's pairs: --dataset_name, else --train_data_dir, else ``default_folder``."""
    if data.dataset_name:
        return load_control_dataset(data, resolution)
    return load_control_folder(data.train_data_dir or default_folder, resolution, data.max_train_samples)
