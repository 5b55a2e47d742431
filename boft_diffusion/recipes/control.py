"""ControlNet-conditioned finetuning with BOFT: data, the two control modes, and the run."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..core.adapters import apply_boft, count_trainable_parameters, disable_adapters, enable_adapters
from ..core.config import DEFAULT_TARGET_MODULES, BOFTConfig
from ..models.bundled import EXAMPLE_CONTROL_DATA
from ..models.control import (
    CONTROLNET,
    LIGHT,
    Control,
    controlnet_from_unet,
    controlnet_trainable_parameters,
    encoder_for_unet,
    light_control,
)
from ..models.images import image_to_tensor, open_image, to_rgb
from ..models.pipelines import default_guidance, guidance_kwargs, is_sdxl, load_pipeline
from ..outputs.write import peft_interop_note, save_control, save_latest_validation
from ..training.cli import (
    HelpFormatter,
    add_boft_args,
    add_model_args,
    add_training_args,
    boft_config_from_args,
    check_resolution,
)
from ..training.config import TrainerConfig
from ..training.data import DataError, center_crop, center_offset, resize_shorter_side
from ..training.diffusion import (
    add_time_ids,
    denoising_loss,
    denoising_target,
    encode_prompts,
    encode_prompts_sdxl,
    noised_latents,
    vae_decodes_in_own_dtype,
    vae_dtype,
)
from ..training.trainer import Recipe, Trainer, TrainingError, check_output_dir, make_accelerator, place, weight_dtype

logger = logging.getLogger("boft_diffusion")


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


def load_control_dataset(args: argparse.Namespace, resolution: int) -> list[ControlExample]:
    """A Hugging Face dataset with image, conditioning image and caption columns."""
    try:
        import datasets
    except ImportError as error:
        raise DataError("--dataset_name needs the optional package `datasets` (pip install datasets).") from error
    if Path(args.dataset_name).is_dir() and (Path(args.dataset_name) / "dataset_info.json").is_file():
        dataset = datasets.load_from_disk(args.dataset_name)  # a folder written by Dataset.save_to_disk
    else:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    columns = list(dataset.column_names)
    for flag in ("image_column", "conditioning_image_column", "caption_column"):
        if getattr(args, flag) not in columns:
            raise DataError(f"--{flag} {getattr(args, flag)!r} is not a column of {args.dataset_name}; "
                            f"its columns are {columns}.")
    if args.max_train_samples:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    examples, skipped, resized, no_caption = [], [], [], []
    for index, row in enumerate(dataset):
        image, condition = row[args.image_column], row[args.conditioning_image_column]
        if image is None or condition is None:
            skipped.append(f"row {index}")
            continue
        caption = row[args.caption_column]
        if not isinstance(caption, str) or not caption.strip():
            no_caption.append(index)
            caption = ""
        examples.append(_prepare_pair(to_rgb(image), to_rgb(condition), caption, resolution, f"row {index}", resized))
    _report(args.dataset_name, skipped, resized, no_caption)
    if not examples:
        raise DataError(f"no usable rows in {args.dataset_name}.")
    return examples


def model_card(args: argparse.Namespace, boft: BOFTConfig, trainable: int, steps: int) -> str:
    """The output folder's README, as DreamBooth writes one: what was trained, how to load it, what PEFT reads."""
    control = ("the BOFT paper's light control encoder after `conv_in` (trained in full) and BOFT on the UNet"
               if args.control == LIGHT else
               "a ControlNet copied from " + (args.controlnet_model_name_or_path or "the UNet")
               + ", BOFT on its frozen blocks (in `controlnet/`), zero convolutions and conditioning embedding "
                 "trained in full" + (", and BOFT on the UNet" if args.train_unet_boft else ""))
    data = args.dataset_name or args.train_data_dir or "the bundled tiny-world control set"
    return f"""---
library_name: boft-diffusion
base_model: {args.pretrained_model_name_or_path}
tags: [boft, controlnet, stable-diffusion, peft]
---
# BOFT control adapter ({args.control})

Trained with `train_controlnet.py` from boft-diffusion on **{args.pretrained_model_name_or_path}**
for {steps} steps on {data}: {control}.

BOFT: block size {boft.block_size or '-'}, block number {boft.block_num or '-'},
butterfly factors m = {boft.n_butterfly_factor}, dropout {boft.dropout},
targets {', '.join(boft.target_modules)}; {trainable:,} trainable parameters.

![validation: control image, base model, with control (same seed)](validation/latest.png)

## Use

```python
from PIL import Image
import boft_diffusion as bd
from boft_diffusion.outputs.read import load_outputs
pipe = bd.load_pipeline("{args.pretrained_model_name_or_path}")
adapter = load_outputs(pipe, "{args.output_dir}")
image = adapter.sample(condition=Image.open("control.png"), prompt="a red star on a blue background")
```

`control.json` names the mode; the fully trained control parts are boft-diffusion's own files, so
`load_outputs` is the way to load the whole folder. {peft_interop_note(boft.n_butterfly_factor)}
"""


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of train_controlnet.py, sharing training, checkpoint and BOFT flags with DreamBooth."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_args(parser)
    group = parser.add_argument_group("control")
    group.add_argument("--control", default="light", choices=["light", "controlnet"],
                       help="light: the BOFT paper's small control encoder + BOFT on the UNet; "
                            "controlnet: BOFT on a diffusers ControlNet's frozen copy of the UNet.")
    group.add_argument("--controlnet_model_name_or_path", default=None,
                       help="Start from this ControlNet instead of copying the UNet.")
    group.add_argument("--train_unet_boft", action="store_true", help="controlnet mode: also adapt the UNet.")
    group.add_argument("--conditioning_scale", type=float, default=1.0)
    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", default=None,
                       help="Folder with metadata.jsonl (default: the bundled tiny-world control set).")
    group.add_argument("--dataset_name", default=None, help="A Hugging Face dataset (needs `datasets`).")
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--image_column", default="image")
    group.add_argument("--conditioning_image_column", default="conditioning_image")
    group.add_argument("--caption_column", default="text")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0)
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--validation_image", nargs="+", default=None, help="Paired with --validation_prompt.")
    add_training_args(parser, default_output_dir="outputs/controlnet", default_steps=400)
    add_boft_args(parser, DEFAULT_TARGET_MODULES)
    return parser


def default_validation_pairs(count: int = 4) -> list[tuple[Image.Image, str]]:
    """Held-out tiny-world scenes: (shape mask, caption)."""
    from ..tiny import world

    return [(world.render_mask(s).convert("RGB"), world.caption(s)) for s in world.free_placement_scenes(count, seed=99, held_out=True)]


def check_half_precision_device(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse a setting that would crash at the first step: on CPU there is no autocast for the
    ControlNet's float32 conditioning embedding between its half-precision blocks."""
    if args.control == CONTROLNET and args.mixed_precision != "no" and device.type == "cpu":
        raise TrainingError(f"--mixed_precision {args.mixed_precision} with --control controlnet needs a GPU; on CPU "
                            "pass --mixed_precision no (--control light trains in half precision on CPU too).")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train control as described by parsed ``train_controlnet.py`` flags."""
    args.guidance_scale = default_guidance(args.pretrained_model_name_or_path, args.guidance_scale)
    config = TrainerConfig.from_args(args)
    check_output_dir(config, ["adapter_model.safetensors", "control.json"])
    if args.validation_image and args.validation_prompt and len(args.validation_image) != len(args.validation_prompt):
        raise TrainingError("--validation_image and --validation_prompt must come in pairs (same count).")
    accelerator = make_accelerator(config)
    dtype = weight_dtype(accelerator)
    check_half_precision_device(args, accelerator.device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype=torch.float32,
                         device=accelerator.device, revision=args.revision, variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    sdxl = is_sdxl(pipe)
    if sdxl and args.control == CONTROLNET:
        raise TrainingError("--control controlnet is for SD 1.x / 2.x models; on SDXL train --control light.")
    resolution = check_resolution(args.resolution, pipe)
    if args.dataset_name:
        examples = load_control_dataset(args, resolution)
    else:
        examples = load_control_folder(args.train_data_dir or EXAMPLE_CONTROL_DATA, resolution, args.max_train_samples)
    logger.info("%d training pairs", len(examples))

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    text_encoders = [text_encoder, pipe.text_encoder_2] if sdxl else [text_encoder]
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    boft = boft_config_from_args(args)
    modules: dict[str, torch.nn.Module] = {}
    controlnet = encoder = None
    if args.control == LIGHT:
        place(unet, dtype=dtype)
        apply_boft(unet, boft)
        encoder = encoder_for_unet(unet, pipe.vae_scale_factor).to(accelerator.device)
        modules = {"unet": unet, "control_encoder": encoder}
    else:
        from diffusers import ControlNetModel

        if args.controlnet_model_name_or_path:
            controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
        else:
            controlnet = controlnet_from_unet(unet, pipe.vae_scale_factor)
        controlnet.requires_grad_(False)
        place(controlnet, accelerator.device, dtype)
        apply_boft(controlnet, boft)
        for param in controlnet_trainable_parameters(controlnet).values():
            param.requires_grad_(True)  # the Trainer keeps every trainable parameter in float32
        modules["controlnet"] = controlnet
        place(unet, dtype=dtype)
        if args.train_unet_boft:
            apply_boft(unet, boft)
            modules["unet"] = unet
    place(vae, accelerator.device, vae_dtype(vae, dtype, sdxl))
    for module in text_encoders:
        place(module, accelerator.device, dtype)
    place(unet, accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if controlnet is not None:
            controlnet.enable_gradient_checkpointing()

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    captions = sorted({e.caption for e in examples} | {""})
    pooled: dict[str, torch.Tensor] = {}  # SDXL's pooled embeddings by caption
    with torch.no_grad():
        if sdxl:
            hidden, pooled_rows = encode_prompts_sdxl([tokenizer, pipe.tokenizer_2], text_encoders, captions,
                                                      accelerator.device)
            pooled = dict(zip(captions, pooled_rows, strict=True))
        else:
            hidden = encode_prompts(tokenizer, text_encoder, captions, accelerator.device)
        embeddings = dict(zip(captions, hidden, strict=True))
    device = accelerator.device

    def sdxl_conditions(batch: list[ControlExample], texts: list[str]) -> dict[str, Any]:
        """SDXL's pooled text and size ids for the UNet (nothing for SD)."""
        if not sdxl:
            return {}
        time_ids = add_time_ids([e.original_size for e in batch], [e.crop for e in batch], (resolution, resolution),
                                device)
        return {"added_cond_kwargs": {"text_embeds": torch.stack([pooled[t] for t in texts]).to(dtype),
                                      "time_ids": time_ids.to(dtype)}}

    def compute_loss(models: dict[str, torch.nn.Module], indices: list[int], generator: torch.Generator):
        batch = [examples[i] for i in indices]
        pixels = torch.stack([e.image for e in batch]).to(device)
        conditions = torch.stack([(e.condition + 1) / 2 for e in batch]).to(device)
        drop = torch.rand(len(batch), generator=generator) < args.proportion_empty_prompts
        texts = ["" if d else e.caption for e, d in zip(batch, drop.tolist(), strict=True)]
        context = torch.stack([embeddings[text] for text in texts])
        noised = noised_latents(vae, noise_scheduler, pixels, generator, device, args.noise_offset)
        noisy, timesteps = noised.noisy.to(dtype), noised.timesteps
        model_unet = models.get("unet", unet)
        if args.control == LIGHT:
            with light_control(unet, models["control_encoder"], conditions * 2 - 1, args.conditioning_scale):
                prediction = model_unet(noisy, timesteps, context, **sdxl_conditions(batch, texts)).sample
        else:
            down, mid = models["controlnet"](noisy, timesteps, encoder_hidden_states=context,
                                             controlnet_cond=conditions.to(dtype), return_dict=False)
            prediction = model_unet(noisy, timesteps, context, down_block_additional_residuals=down,
                                    mid_block_additional_residual=mid).sample
        target = denoising_target(noise_scheduler, noised.latents, noised.noise, timesteps)
        return denoising_loss(prediction, target, timesteps, noise_scheduler, args.snr_gamma), {}

    if args.validation_image:
        prompts = args.validation_prompt or [""] * len(args.validation_image)
        pairs = [(open_image(path), prompt) for path, prompt in zip(args.validation_image, prompts, strict=True)]
    else:
        pairs = default_validation_pairs()
    control = Control(LIGHT, encoder=encoder) if args.control == LIGHT else Control.for_controlnet(pipe, controlnet)
    size = (resolution, resolution)

    def validate(step: int) -> list[list[Image.Image]]:
        """Per pair: the control image, the base model without control, the trained control (same seed)."""
        rows = []
        with vae_decodes_in_own_dtype(vae):
            for condition_image, prompt in pairs:
                condition_image = condition_image.resize(size)
                sample = {"prompt": prompt, "num_inference_steps": args.num_inference_steps,
                          **guidance_kwargs(args.guidance_scale)}
                for module in modules.values():
                    disable_adapters(module)
                with torch.no_grad():
                    base = pipe(generator=torch.Generator().manual_seed(args.seed), **sample).images[0]
                for module in modules.values():
                    enable_adapters(module)
                adapted = control.sample(pipe, condition_image, size, args.conditioning_scale,
                                         generator=torch.Generator().manual_seed(args.seed), **sample)
                rows.append([condition_image, base, adapted])
        return rows

    def save_outputs(folder: Path, step: int) -> None:
        metadata = {"control": args.control, "train_steps": step, "resolution": resolution,
                    "controlnet_source": args.controlnet_model_name_or_path}
        save_control(folder, args.control, unet if "unet" in modules else None, controlnet, encoder, metadata)

    recipe = Recipe(modules=modules, dataset_len=len(examples), compute_loss=compute_loss,
                    save_outputs=save_outputs, validate=validate, run_name=f"boft-control-{args.control}")
    trainer = Trainer(config, accelerator, recipe)
    result = trainer.train()
    if accelerator.is_main_process:
        save_latest_validation(args.output_dir)
        trainable = sum(count_trainable_parameters(m) for m in modules.values())
        (Path(args.output_dir) / "README.md").write_text(model_card(args, boft, trainable, trainer.step))
    trainer.close()
    return result
