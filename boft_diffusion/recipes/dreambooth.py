"""DreamBooth with BOFT: subject data, prior preservation, the loss, and the run itself."""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.adapters import apply_boft, count_trainable_parameters, disable_adapters, enable_adapters
from ..core.config import DEFAULT_TARGET_MODULES, BOFTConfig
from ..core.files import EMBEDDINGS_NAME, atomic_write, save_adapter
from ..core.identifier import IdentifierEmbedding, add_identifier_embeddings, identifier_words, initializer_vectors
from ..models.bundled import example_subject_dir
from ..models.export import export_merged_pipeline
from ..models.images import image_to_tensor
from ..models.peft_baselines import apply_lora, apply_oft, save_peft_adapter
from ..models.pipelines import default_guidance, guidance_kwargs, is_sdxl, load_pipeline
from ..outputs.write import peft_interop_note, save_dreambooth, save_latest_validation
from ..tiny import world
from ..training.cli import (
    HelpFormatter,
    add_boft_args,
    add_model_args,
    add_training_args,
    boft_config_from_args,
    check_resolution,
    latent_multiple,
)
from ..training.config import TrainerConfig
from ..training.data import (
    augment_batch,
    bucket_sizes,
    caption_path,
    center_crop_tensor,
    center_offset,
    decode_images,
    list_images,
    load_masks,
    nearest_bucket,
    read_captions,
    resize_to_cover,
    warn_small,
)
from ..training.diffusion import (
    add_time_ids,
    denoising_loss,
    denoising_target,
    encode_prompts,
    encode_prompts_sdxl,
    noise_posterior,
    noised_latents,
    posterior,
    vae_decodes_in_own_dtype,
    vae_dtype,
)
from ..training.trainer import Recipe, Trainer, TrainingError, check_output_dir, make_accelerator, place, weight_dtype

logger = logging.getLogger("boft_diffusion")

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_BACKGROUND_LOSS_WEIGHT = 0.1


@dataclass
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
    """Examples of a micro-batch that go through the VAE, the noise and the UNet together: one
    segment after crops and flips, or several of one size joined (instances first)."""

    pixels: torch.Tensor
    masks: torch.Tensor  # the instances' subject masks, [k, 0 or 1, H, W]
    time_ids: torch.Tensor  # SDXL's size conditioning, [n, 6]
    rows: list[int]  # prompt rows
    instances: int  # the first ``instances`` examples are instance images, the rest prior images
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # cached (mean, std) with --cache_latents

    @property
    def count(self) -> int:
        return len(self.rows)

    @classmethod
    def join(cls, parts: list[Part]) -> Part:
        posterior = None
        if parts[0].posterior is not None:
            posterior = tuple(torch.cat([part.posterior[k] for part in parts]) for k in range(2))
        return cls(torch.cat([part.pixels for part in parts]),
                   torch.cat([part.masks for part in parts if part.instances]),
                   torch.cat([part.time_ids for part in parts]), [row for part in parts for row in part.rows],
                   sum(part.instances for part in parts), posterior)


def bucket_groups(images: ImageSet, dataset_len: int) -> list[list[int]]:
    """Example indices ``0 .. dataset_len - 1`` (example ``i`` is image ``i % n``) by target size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(dataset_len):
        groups.setdefault(images.targets[index % len(images.tensors)], []).append(index)
    return [groups[target] for target in sorted(groups)]


def subject_words(args: argparse.Namespace) -> list[str]:
    """The identifier's words: --identifier_token, else the instance prompt's words the class prompt lacks."""
    return args.identifier_token or identifier_words(args.instance_prompt, args.class_prompt)


def class_captions(args: argparse.Namespace, instance_prompts: list[str]) -> list[str]:
    """The instance captions with the identifier's words taken out ("a photo of sks star on a red
    background" -> "a photo of star on a red background"), each once, in order."""
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, subject_words(args))) + r")\b", re.IGNORECASE)
    return list(dict.fromkeys(" ".join(pattern.sub("", prompt).split()) for prompt in instance_prompts))


def ensure_class_images(pipe, args: argparse.Namespace, accelerator, captions: list[str] | None = None) -> None:
    """Generate class images with the base model until the folder holds ``num_class_images``.

    Without ``captions`` every image is drawn from --class_prompt. With them, image ``i`` is drawn
    from ``captions[i % len(captions)]`` and that caption is written beside it (before it, so an
    image never lacks its caption). Files are numbered and written atomically, so an interrupted
    generation resumes where it stopped and never leaves a half-written image behind.
    """
    folder = Path(args.class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        existing = list_images(folder, args.caption_extension)
        if captions:
            uncaptioned = [p.name for p in existing if not caption_path(p, args.caption_extension).is_file()]
            if uncaptioned:
                raise TrainingError(f"--class_prompts_from_captions: {folder} already holds class images without "
                                    f"{args.caption_extension} captions ({', '.join(uncaptioned[:3])}...); give a "
                                    "new --class_data_dir.")
        missing = args.num_class_images - len(existing)
        if missing > 0:
            logger.info("generating %d class images for %r in %s", missing, captions or args.class_prompt, folder)
            pipe.set_progress_bar_config(disable=True)
            index = len(existing)
            while index < args.num_class_images:
                count = min(args.sample_batch_size, args.num_class_images - index)
                generators = [torch.Generator().manual_seed(args.seed + 7919 * (index + i)) for i in range(count)]
                prompts = [captions[i % len(captions)] if captions else args.class_prompt
                           for i in range(index, index + count)]
                with torch.no_grad():
                    images = pipe(
                        prompts,
                        num_inference_steps=args.num_inference_steps,
                        generator=generators,
                        **guidance_kwargs(args.guidance_scale),
                    ).images
                for prompt, image in zip(prompts, images, strict=True):
                    files = {f"class_{index:05d}{args.caption_extension}":
                             lambda path, text=prompt: Path(path).write_text(text, encoding="utf-8")} if captions else {}
                    files[f"class_{index:05d}.png"] = partial(image.save, format="PNG")
                    atomic_write(folder, files)
                    index += 1
    accelerator.wait_for_everyone()


def model_card(args: argparse.Namespace, boft: BOFTConfig, trainable: int, steps: int) -> str:
    """The output folder's README; the BOFT line comes from the adapter's own config, so it shows
    the block size the adapter was built with (the default included)."""
    load_line = (f'load_outputs(pipe, "{args.output_dir}")' if args.adapter_type == "boft" else
                 'from boft_diffusion.models.peft_baselines import load_peft_adapter\n'
                 f'load_outputs(pipe, "{args.output_dir}", load=load_peft_adapter)')
    identifier = (f"\nThe identifier's learned token embedding is in `{EMBEDDINGS_NAME}` (`{{word: vector}}`); "
                  "`load_outputs` installs it.\n" if args.train_identifier_embedding else "")
    return f"""---
library_name: boft-diffusion
base_model: {args.pretrained_model_name_or_path}
tags: [boft, dreambooth, stable-diffusion, peft]
instance_prompt: {args.instance_prompt}
---
# {args.adapter_type.upper()} DreamBooth adapter

Trained with `train_dreambooth.py` from boft-diffusion on **{args.pretrained_model_name_or_path}**
for {steps} steps. Trigger prompt: `{args.instance_prompt}`.

BOFT: block size {boft.block_size or '-'}, block number {boft.block_num or '-'},
butterfly factors m = {boft.n_butterfly_factor}, dropout {boft.dropout},
targets {', '.join(boft.target_modules)}; {trainable:,} trainable parameters.
Prior preservation: {'yes, weight ' + str(args.prior_loss_weight) if args.with_prior_preservation else 'no'}.
{identifier}
![validation samples](validation/latest.png)

## Use

```python
import boft_diffusion as bd
from boft_diffusion.outputs.read import load_outputs
pipe = bd.load_pipeline("{args.pretrained_model_name_or_path}")
{load_line}
image = pipe("{args.instance_prompt}").images[0]
```

{peft_interop_note(boft.n_butterfly_factor) if args.adapter_type == "boft" else ""}
"""


def dotted_suffix(text: str) -> str:
    """``txt`` or ``.txt`` -> ``.txt``."""
    return text if text.startswith(".") else f".{text}"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of train_dreambooth.py (diffusers' names), shared with the demo."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_args(parser)
    group = parser.add_argument_group("subject and prior")
    group.add_argument("--instance_data_dir", default=None,
                       help="Images of the subject (default: the bundled striped star, boft_diffusion/tiny/subjects/sks_star).")
    group.add_argument("--instance_prompt", default=world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt,
                       help="Names the subject: the bundled subjects use two rare words, each given a learned "
                            "embedding by --train_identifier_embedding.")
    group.add_argument("--caption_extension", default=None, type=dotted_suffix,
                       help="e.g. .txt: an instance image's sidecar file (photo.png -> photo.txt) is its prompt; "
                            "images without one use --instance_prompt. Describe what is not the subject "
                            "(\"a photo of sks star on a red background\") so the identifier does not absorb it.")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0,
                       help="Probability of training a captioned image on --instance_prompt instead, so the "
                            "plain prompt keeps working.")
    group.add_argument("--instance_mask_dir", default=None,
                       help="Subject masks (white: the subject), one per instance image with the same file stem. "
                            "The instance loss outside the mask is weighted by --background_loss_weight, so "
                            "the identifier learns the subject rather than the photos' backgrounds.")
    group.add_argument("--background_loss_weight", type=float, default=None,
                       help=f"Weight of the instance loss outside the subject mask (with --instance_mask_dir; "
                            f"default {DEFAULT_BACKGROUND_LOSS_WEIGHT}).")
    group.add_argument("--class_data_dir", default=None, help="Class images; generated with the base model if short.")
    group.add_argument("--class_prompt", default=None, help='e.g. "a photo of star".')
    group.add_argument("--class_prompts_from_captions", action="store_true",
                       help="With --caption_extension: draw the class images from the instance captions with the "
                            "identifier taken out (\"a photo of star on a red background\"), each written beside "
                            "its image, so the prior is kept in the subject's contexts. With --caption_extension, "
                            "a class image's caption file is its prompt (else --class_prompt), and "
                            "--caption_dropout_rate drops it to --class_prompt.")
    group.add_argument("--with_prior_preservation", action="store_true")
    group.add_argument("--prior_loss_weight", type=float, default=1.0)
    group.add_argument("--num_class_images", type=int, default=50)
    group.add_argument("--sample_batch_size", type=int, default=8, help="Batch size for class image generation.")
    group.add_argument("--center_crop", action="store_true", help="Centre crop instead of random crop.")
    group.add_argument("--bucket", action="store_true",
                       help="Aspect-ratio buckets: sizes of about --resolution² pixels, each image resized to the "
                            "bucket nearest its aspect ratio and cropped only by what the grid leaves over; every "
                            "batch comes from one bucket. Default: a --resolution square crop.")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode every instance and class image with the VAE once, in memory (needs "
                            "--center_crop and no --random_flip: each step must see the same pixels).")
    group.add_argument("--random_flip", action="store_true")
    group.add_argument("--train_text_encoder", action="store_true", help="Also put BOFT adapters on the text encoder.")
    group.add_argument("--text_encoder_target_modules", nargs="+", default=list(TEXT_ENCODER_TARGETS))
    group.add_argument("--train_identifier_embedding", action="store_true",
                       help="Also learn the identifier word's token embedding (pivotal tuning), saved as "
                            "learned_embeds.safetensors; prompts without the identifier encode exactly as before.")
    group.add_argument("--identifier_token", nargs="+", default=None,
                       help="The identifier word(s) (default: the instance prompt's words the class prompt lacks).")
    group.add_argument("--initializer_token", nargs="+", default=None,
                       help="With --train_identifier_embedding: start each identifier from this word's embedding "
                            "instead of its own, one word per identifier (e.g. the subject's colour).")
    group.add_argument("--identifier_learning_rate", type=float, default=5e-3,
                       help="Learning rate of the identifier embedding.")
    group.add_argument("--adapter_type", default="boft", choices=["boft", "lora", "oft"],
                       help="lora / oft: PEFT LoRA or PEFT OFT instead of BOFT, as same-budget baselines (need peft).")
    group.add_argument("--lora_rank", type=int, default=4)
    group.add_argument("--oft_block_size", type=int, default=16, help="Block size of --adapter_type oft.")
    group.add_argument("--save_merged", action="store_true",
                       help="Also export a full diffusers pipeline with the adapter merged, in output_dir/merged.")
    add_training_args(parser, default_output_dir="outputs/dreambooth", default_steps=300)
    add_boft_args(parser, DEFAULT_TARGET_MODULES)
    return parser


def warn_captions_without_identifier(args: argparse.Namespace, paths: list[Path], prompts: list[str]) -> None:
    """A caption that never names the subject teaches its image as the class, not the subject."""
    if not args.identifier_token and not args.class_prompt:
        return  # no way to tell which words name the subject
    identifier = {w.lower() for w in subject_words(args)}
    unnamed = [path.name for path, prompt in zip(paths, prompts, strict=True)
               if not identifier & set(re.findall(r"[\w']+", prompt.lower()))]
    if unnamed:
        logger.warning("captions without the identifier %s: %s", " ".join(sorted(identifier)), ", ".join(unnamed))


def check_instance_flags(args: argparse.Namespace) -> None:
    """Refuse caption, mask and identifier settings that would be ignored or are out of range."""
    if args.initializer_token and not args.train_identifier_embedding:
        raise TrainingError("--initializer_token needs --train_identifier_embedding (it starts the learned embedding).")
    if not 0 <= args.caption_dropout_rate <= 1:
        raise TrainingError(f"--caption_dropout_rate {args.caption_dropout_rate} is not a probability.")
    if args.caption_dropout_rate and not args.caption_extension:
        raise TrainingError("--caption_dropout_rate needs --caption_extension (there are no captions to drop).")
    if args.class_prompts_from_captions and not (args.caption_extension and args.with_prior_preservation):
        raise TrainingError("--class_prompts_from_captions needs --caption_extension and --with_prior_preservation.")
    if args.background_loss_weight is not None and not args.instance_mask_dir:
        raise TrainingError("--background_loss_weight needs --instance_mask_dir.")
    if args.instance_mask_dir and args.background_loss_weight is None:
        args.background_loss_weight = DEFAULT_BACKGROUND_LOSS_WEIGHT
    if args.background_loss_weight is not None and args.background_loss_weight < 0:
        raise TrainingError(f"--background_loss_weight {args.background_loss_weight} is negative.")
    if args.cache_latents and (args.random_flip or not args.center_crop):
        raise TrainingError("--cache_latents encodes each image once, so every step must see the same pixels: "
                            "pass --center_crop and leave out --random_flip.")


def add_adapters(model: torch.nn.Module, args: argparse.Namespace, targets: list[str]) -> None:
    if args.adapter_type == "lora":
        apply_lora(model, args.lora_rank, targets)
    elif args.adapter_type == "oft":
        apply_oft(model, args.oft_block_size, targets)
    else:
        apply_boft(model, boft_config_from_args(args, targets))


def add_identifier(text_encoder: torch.nn.Module, tokenizer, args: argparse.Namespace) -> None:
    if not args.identifier_token and not args.class_prompt:
        raise TrainingError("--train_identifier_embedding: name the identifier with --identifier_token "
                            "(or give --class_prompt: the identifier is then the word it lacks).")
    words = subject_words(args)
    if not words:
        raise TrainingError("--train_identifier_embedding: every word of the instance prompt is in the class "
                            "prompt; name the identifier with --identifier_token.")
    if args.initializer_token and len(args.initializer_token) != len(words):
        raise TrainingError(f"--initializer_token: {len(args.initializer_token)} words for {len(words)} identifier "
                            f"words ({' '.join(words)}); give one per identifier.")
    try:
        vectors = initializer_vectors(text_encoder, tokenizer, args.initializer_token) if args.initializer_token else None
    except ValueError as error:
        raise TrainingError(f"--initializer_token: {error}") from error
    try:
        add_identifier_embeddings(text_encoder, tokenizer, words, vectors)
    except ValueError as error:
        raise TrainingError(f"--train_identifier_embedding: {error}") from error
    start = f", starting from {', '.join(repr(w) for w in args.initializer_token)}" if args.initializer_token else ""
    logger.info("learning the embedding of %s%s", ", ".join(repr(w) for w in words), start)


def pooled_mean(losses: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The mean over examples of per-part mean losses ``(loss, examples)``; one part is returned as is."""
    if len(losses) == 1:
        return losses[0][0]
    return sum(loss * count for loss, count in losses) / sum(count for _, count in losses)


def cache_latents(image_sets: list[ImageSet], vae, device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each image's VAE posterior (mean, std), encoded once (--cache_latents). The crops are
    centred and nothing is flipped (``check_instance_flags`` makes sure), so every step would
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train a DreamBooth BOFT adapter as described by parsed ``train_dreambooth.py`` flags."""
    args.guidance_scale = default_guidance(args.pretrained_model_name_or_path, args.guidance_scale)
    check_instance_flags(args)
    config = TrainerConfig.from_args(args)
    check_output_dir(config, ["adapter_model.safetensors"])
    if args.with_prior_preservation and (not args.class_data_dir or not args.class_prompt):
        raise TrainingError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    accelerator = make_accelerator(config)
    dtype = weight_dtype(accelerator)
    if args.adapter_type != "boft" and args.save_merged:
        raise TrainingError("--save_merged is for BOFT adapters.")
    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype=torch.float32, device=accelerator.device,
                         revision=args.revision, variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    resolution = check_resolution(args.resolution, pipe)
    buckets = bucket_sizes(resolution, latent_multiple(pipe)) if args.bucket else None
    instance_dir = args.instance_data_dir or example_subject_dir()
    instances = ImageSet.from_folder(instance_dir, resolution, args.center_crop, args.dataloader_num_workers,
                                     "instance images", args.caption_extension, args.instance_mask_dir, buckets)
    logger.info("%d instance images from %s", len(instances.tensors), instance_dir)
    instance_prompts = [args.instance_prompt] * len(instances.paths)
    if args.caption_extension:
        instance_prompts = read_captions(instances.paths, args.caption_extension, args.instance_prompt)
        captioned = sum(caption_path(p, args.caption_extension).is_file() for p in instances.paths)
        logger.info("%d of %d instance images have their own caption", captioned, len(instance_prompts))
        warn_captions_without_identifier(args, instances.paths, instance_prompts)

    # Build the adapters first: invalid block sizes must fail before minutes of class generation.
    sdxl = is_sdxl(pipe)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    # every text encoder by its module name, with its tokenizer (SDXL has two)
    encoders = {"text_encoder": (text_encoder, tokenizer)}
    if sdxl:
        encoders["text_encoder_2"] = (pipe.text_encoder_2, pipe.tokenizer_2)
        logger.info("SDXL: both text encoders condition the UNet, with pooled embeddings and size ids")
    for module in (unet, vae, *(encoder for encoder, _ in encoders.values())):
        module.requires_grad_(False)
    place(unet, dtype=dtype)
    add_adapters(unet, args, args.boft_target_modules)
    modules: dict[str, torch.nn.Module] = {"unet": unet}
    if args.train_text_encoder or args.train_identifier_embedding:
        for name, (encoder, encoder_tokenizer) in encoders.items():
            place(encoder, dtype=dtype)
            if args.train_text_encoder:
                add_adapters(encoder, args, args.text_encoder_target_modules)
            if args.train_identifier_embedding:
                add_identifier(encoder, encoder_tokenizer, args)
            modules[name] = encoder

    classes, class_prompts = None, []
    if args.with_prior_preservation:
        boft = args.adapter_type == "boft"  # a fresh LoRA or OFT is the identity already
        for module in modules.values():
            if boft:
                disable_adapters(module)
        with accelerator.autocast(), vae_decodes_in_own_dtype(vae):  # the UNet may already be in half precision
            ensure_class_images(pipe, args, accelerator,
                                class_captions(args, instance_prompts) if args.class_prompts_from_captions else None)
        for module in modules.values():
            if boft:
                enable_adapters(module)
        classes = ImageSet.from_folder(args.class_data_dir, resolution, args.center_crop, args.dataloader_num_workers,
                                       "class images", args.caption_extension, buckets=buckets)
        class_prompts = (read_captions(classes.paths, args.caption_extension, args.class_prompt)
                         if args.caption_extension else [args.class_prompt] * len(classes.paths))

    device = accelerator.device
    place(vae, device, vae_dtype(vae, dtype, sdxl))
    for encoder, _ in encoders.values():
        place(encoder, device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder, _ in encoders.values():
                encoder.gradient_checkpointing_enable()

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = list(dict.fromkeys([args.instance_prompt] + instance_prompts
                                 + ([args.class_prompt] if classes else []) + class_prompts))
    instance_rows = [prompts.index(prompt) for prompt in instance_prompts]
    plain_row = prompts.index(args.instance_prompt)
    class_rows = [prompts.index(prompt) for prompt in class_prompts]
    plain_class_row = prompts.index(args.class_prompt) if classes else None
    class_captioned = any(row != plain_class_row for row in class_rows)

    def encode(models: dict[str, torch.nn.Module], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states (and SDXL's pooled embeddings) of ``texts``, through the prepared encoders
        in ``models`` where they train."""
        current = [models.get(name, encoder) for name, (encoder, _) in encoders.items()]
        if sdxl:
            return encode_prompts_sdxl([t for _, t in encoders.values()], current, texts, device)
        return encode_prompts(tokenizer, current[0], texts, device), None

    cached_embeddings = None
    if not set(encoders) & set(modules):
        with torch.no_grad():
            cached_embeddings = encode({}, prompts)
    dataset_len = max(len(instances.tensors), len(classes.tensors) if classes else 0)
    image_sets = [instances, classes] if classes else [instances]
    latent_cache = cache_latents(image_sets, vae, device) if args.cache_latents else None

    def subject_weight(masks: torch.Tensor, size: torch.Size) -> torch.Tensor | None:
        """Per-latent-pixel loss weight: 1 on the subject, --background_loss_weight elsewhere."""
        if masks.shape[1] == 0:
            return None
        coverage = torch.nn.functional.interpolate(masks.float(), size=tuple(size), mode="area").to(device)
        return args.background_loss_weight + (1 - args.background_loss_weight) * coverage

    def prepare(segment: Segment, generator: torch.Generator) -> Part:
        """A segment's pixels, masks, size ids and cached posteriors, after crops and flips."""
        images = segment.images
        target = images.targets[segment.picks[0]]
        batch, crops = augment_batch([images.tensors[i] for i in segment.picks], size=target, generator=generator,
                                     random_crop=not args.center_crop, random_flip=args.random_flip)
        originals = [images.original_sizes[i] for i in segment.picks]
        offsets = [(top + images.offsets[i][0], left + images.offsets[i][1])
                   for i, (top, left) in zip(segment.picks, crops, strict=True)]
        cached = None
        if latent_cache is not None:
            entries = [latent_cache[image_sets.index(images)][i] for i in segment.picks]
            cached = tuple(torch.stack(values) for values in zip(*entries, strict=True))
        return Part(batch[:, :3], batch[:, 3:], add_time_ids(originals, offsets, target, device), segment.rows,
                    len(segment.picks) if segment.instance else 0, cached)

    def drop_captions(rows: list[int], plain: int, generator: torch.Generator) -> list[int]:
        """Each caption's row, or with probability --caption_dropout_rate the plain prompt's."""
        if args.caption_dropout_rate == 0:
            return rows
        dropped = (torch.rand(len(rows), generator=generator) < args.caption_dropout_rate).tolist()
        return [plain if drop else row for row, drop in zip(rows, dropped, strict=True)]

    def compute_loss(models: dict[str, torch.nn.Module], indices: list[int], generator: torch.Generator):
        prompt_rows = drop_captions([instance_rows[i % len(instance_rows)] for i in indices], plain_row, generator)
        segments = segments_of(instances, [i % len(instances.tensors) for i in indices], prompt_rows, True)
        if classes:
            rows = [class_rows[i % len(class_rows)] for i in indices]
            if class_captioned:  # a draw only then, so runs without class captions replay as before
                rows = drop_captions(rows, plain_class_row, generator)
            segments += segments_of(classes, [i % len(classes.tensors) for i in indices], rows, False)
        parts = [prepare(segment, generator) for segment in segments]
        if len({part.pixels.shape[-2:] for part in parts}) == 1:
            parts = [Part.join(parts)]
        if cached_embeddings is None:
            # every prompt of the micro-batch through the trained encoders at once
            embeddings = encode(models, [prompts[row] for part in parts for row in part.rows])
        instance_losses, prior_losses, start = [], [], 0
        for part in parts:
            if cached_embeddings is not None:
                hidden, pooled = (None if e is None else e[part.rows] for e in cached_embeddings)
            else:
                hidden, pooled = (None if e is None else e[start : start + part.count] for e in embeddings)
            start += part.count
            if part.posterior is not None:
                noised = noise_posterior(*part.posterior, vae.config.scaling_factor, noise_scheduler, generator,
                                         device, args.noise_offset)
            else:
                noised = noised_latents(vae, noise_scheduler, part.pixels.to(device), generator, device,
                                        args.noise_offset)
            timesteps = noised.timesteps
            conditions = {} if pooled is None else {"added_cond_kwargs": {
                "text_embeds": pooled.to(dtype), "time_ids": part.time_ids.to(dtype)}}
            prediction = models["unet"](noised.noisy.to(dtype), timesteps, hidden.to(dtype), **conditions).sample.float()
            target = denoising_target(noise_scheduler, noised.latents, noised.noise, timesteps)
            k = part.instances
            if k:
                instance_losses.append((denoising_loss(
                    prediction[:k], target[:k], timesteps[:k], noise_scheduler, args.snr_gamma,
                    subject_weight(part.masks, noised.latents.shape[-2:])), k))
            if part.count > k:
                prior_losses.append((denoising_loss(prediction[k:], target[k:], timesteps[k:], noise_scheduler,
                                                    args.snr_gamma), part.count - k))
        instance_loss = pooled_mean(instance_losses)
        if not classes:
            return instance_loss, {}
        prior_loss = pooled_mean(prior_losses)
        loss = instance_loss + args.prior_loss_weight * prior_loss
        return loss, {"instance_loss": instance_loss.item(), "prior_loss": prior_loss.item()}

    validation_prompts = args.validation_prompt or [args.instance_prompt]

    def validate(step: int) -> list[list[Image.Image]]:
        rows = []
        with torch.no_grad(), vae_decodes_in_own_dtype(vae):
            for prompt in validation_prompts:
                generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
                rows.append(pipe([prompt] * args.num_validation_images, num_inference_steps=args.num_inference_steps,
                                 generator=generators, **guidance_kwargs(args.guidance_scale)).images)
        return rows

    def save_outputs(folder: Path, step: int) -> None:
        metadata = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt,
                    "train_steps": step, "resolution": resolution,
                    "prior_preservation": bool(args.with_prior_preservation)}
        save_dreambooth(folder, unet, metadata, text_encoder, text_encoder_adapter=args.train_text_encoder,
                        identifier=args.train_identifier_embedding,
                        save=save_adapter if args.adapter_type == "boft" else save_peft_adapter,
                        text_encoder_2=pipe.text_encoder_2 if sdxl else None)

    recipe = Recipe(modules=modules, dataset_len=dataset_len, compute_loss=compute_loss,
                    save_outputs=save_outputs, validate=validate, run_name="boft-dreambooth",
                    learning_rates={IdentifierEmbedding.PARAMETER_SUFFIX: args.identifier_learning_rate},
                    schedule={"caption_dropout_rate": args.caption_dropout_rate, "bucket": args.bucket},
                    groups=bucket_groups(instances, dataset_len) if args.bucket else None)
    trainer = Trainer(config, accelerator, recipe)
    result = trainer.train()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        save_latest_validation(output_dir)
        trainable = sum(count_trainable_parameters(m) for m in modules.values())
        boft = boft_config_from_args(args, args.boft_target_modules)
        (output_dir / "README.md").write_text(model_card(args, boft, trainable, trainer.step))
        if args.save_merged:
            export_merged_pipeline(pipe, output_dir / "merged")
    trainer.close()
    return result

