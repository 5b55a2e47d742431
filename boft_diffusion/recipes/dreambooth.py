"""DreamBooth with BOFT: the run's typed config, its flags, and the recipe's steps.

The recipe learns a subject from a few instance images, optionally keeping the class prior with
class images the base model draws (prior preservation), captions, subject masks, aspect-ratio
buckets, a latent cache, text-encoder adapters and a learned identifier embedding.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.files import EMBEDDINGS_NAME, atomic_write, write_text
from ..core.identifier import IdentifierEmbedding, add_identifier_embeddings, identifier_words, initializer_vectors
from ..exports.writers import export_merged_pipeline
from ..families import EncodedPrompts, ModelFamily
from ..families.denoising import NoisedBatch
from ..families.loading import guidance_kwargs
from ..kinds.registry import ADAPTER_KINDS, adapter_kind, set_adapters_enabled
from ..outputs.write import boft_summary, peft_interop_note, save_dreambooth
from ..tiny.bundled import DEFAULT_INSTANCE_PROMPT, example_subject_dir
from ..training.cli import add_flag, parse_recipe_flags, recipe_parser, run_config
from ..training.config import RunConfig, config_from_flags
from ..training.data import augment_batch, bucket_sizes, caption_path, center_crop_tensor, list_images, read_captions
from ..training.losses import denoising_loss, dreambooth_loss
from ..training.sampling import vae_decodes_in_own_dtype
from ..training.subject_data import ImageSet, Part, Segment, bucket_groups, cache_latents, segments_of
from ..training.trainer import Recipe, TrainingError, place
from .base import DiffusionRecipe

logger = logging.getLogger("boft_diffusion")

DEFAULT_BACKGROUND_LOSS_WEIGHT = 0.1


@dataclass
class SubjectConfig:
    """The instance images and how they are read and augmented."""

    instance_data_dir: str | None
    instance_prompt: str
    caption_extension: str | None
    caption_dropout_rate: float
    instance_mask_dir: str | None
    background_loss_weight: float | None
    center_crop: bool
    bucket: bool
    cache_latents: bool
    random_flip: bool
    validation_data_dir: str | None


@dataclass
class PriorConfig:
    """Prior preservation: class images (drawn by the base model when short) and their loss weight."""

    with_prior_preservation: bool
    class_data_dir: str | None
    class_prompt: str | None
    class_prompts_from_captions: bool
    prior_loss_weight: float
    num_class_images: int
    sample_batch_size: int


@dataclass
class TextConfig:
    """What trains on the text side: encoder adapters and the identifier's embedding."""

    train_text_encoder: bool
    text_encoder_target_modules: list[str]
    train_identifier_embedding: bool
    identifier_token: list[str] | None
    initializer_token: list[str] | None
    identifier_learning_rate: float
    identifier_only_fraction: float


@dataclass
class DreamBoothConfig:
    run: RunConfig
    subject: SubjectConfig
    prior: PriorConfig
    text: TextConfig
    save_merged: bool

    @classmethod
    def from_flags(cls, argv: list[str] | None = None, description: str | None = None) -> DreamBoothConfig:
        """The config of ``train_dreambooth.py`` flags (and the ``--config`` file they name), with the
        defaults that depend on other flags resolved, so the run records what it used."""
        parser = build_parser(description)
        args = parse_recipe_flags(parser, argv)
        if args.instance_mask_dir and args.background_loss_weight is None:
            args.background_loss_weight = DEFAULT_BACKGROUND_LOSS_WEIGHT
        return config_from_flags(cls, vars(args), run=run_config(parser, args))

    @property
    def identifier(self) -> list[str]:
        """The identifier's words: --identifier_token, else the instance prompt's words the class prompt lacks."""
        return self.text.identifier_token or identifier_words(self.subject.instance_prompt, self.prior.class_prompt)


def dotted_suffix(text: str) -> str:
    """``txt`` or ``.txt`` -> ``.txt``."""
    return text if text.startswith(".") else f".{text}"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of train_dreambooth.py (diffusers' names), shared with the demo."""
    return recipe_parser(description, add_dreambooth_args, default_output_dir="outputs/dreambooth", default_steps=300)


def add_dreambooth_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("subject and prior")
    add_subject_args(group)
    add_validation_data_args(group)
    add_prior_args(group)
    add_text_args(group)
    add_baseline_args(group)


def add_subject_args(group: Any) -> None:
    add_flag(group, "--instance_data_dir", default=None,
             help="Images of the subject (default: the bundled striped star, boft_diffusion/tiny/subjects/sks_star).")
    add_flag(group, "--instance_prompt", default=DEFAULT_INSTANCE_PROMPT,
             help="Names the subject: the bundled subjects use two rare words, each given a learned "
                  "embedding by --train_identifier_embedding.")
    add_flag(group, "--caption_extension", default=None, type=dotted_suffix,
             help="e.g. .txt: an instance image's sidecar file (photo.png -> photo.txt) is its prompt; "
                  "images without one use --instance_prompt. Describe what is not the subject "
                  "(\"a photo of sks star on a red background\") so the identifier does not absorb it.")
    add_flag(group, "--caption_dropout_rate", type=float, default=0.0,
             help="Probability of training a captioned image on --instance_prompt instead, so the "
                  "plain prompt keeps working.")
    add_flag(group, "--instance_mask_dir", default=None,
             help="Subject masks (white: the subject), one per instance image with the same file stem. "
                  "The instance loss outside the mask is weighted by --background_loss_weight, so "
                  "the identifier learns the subject rather than the photos' backgrounds.")
    add_flag(group, "--background_loss_weight", type=float, default=None,
             help=f"Weight of the instance loss outside the subject mask (with --instance_mask_dir; "
                  f"default {DEFAULT_BACKGROUND_LOSS_WEIGHT}).")


def add_validation_data_args(group: Any) -> None:
    add_flag(group, "--validation_data_dir", default=None,
             help="Held-out images of the subject (captioned like the instance images): a validation loss at "
                  "fixed noise and timesteps, printed and logged at every validation, comparable across steps "
                  "and runs.")


def add_prior_args(group: Any) -> None:
    add_flag(group, "--class_data_dir", default=None, help="Class images; generated with the base model if short.")
    add_flag(group, "--class_prompt", default=None, help='e.g. "a photo of star".')
    add_flag(group, "--class_prompts_from_captions", action="store_true",
             help="With --caption_extension: draw the class images from the instance captions with the "
                  "identifier taken out (\"a photo of star on a red background\"), each written beside "
                  "its image, so the prior is kept in the subject's contexts. With --caption_extension, "
                  "a class image's caption file is its prompt (else --class_prompt), and "
                  "--caption_dropout_rate drops it to --class_prompt.")
    add_flag(group, "--with_prior_preservation", action="store_true")
    add_flag(group, "--prior_loss_weight", bounds=(0, None), type=float, default=1.0)
    add_flag(group, "--num_class_images", bounds=(0, None), type=int, default=50)
    add_flag(group, "--sample_batch_size", bounds=(1, None), type=int, default=8, help="Batch size for class image generation.")
    add_flag(group, "--center_crop", action="store_true", help="Centre crop instead of random crop.")
    add_flag(group, "--bucket", action="store_true",
             help="Aspect-ratio buckets: sizes of about --resolution² pixels, each image resized to the "
                  "bucket nearest its aspect ratio and cropped only by what the grid leaves over; every "
                  "batch comes from one bucket. Default: a --resolution square crop.")
    add_flag(group, "--cache_latents", action="store_true",
             help="Encode every instance and class image with the VAE once, in memory (needs "
                  "--center_crop and no --random_flip: each step must see the same pixels).")
    add_flag(group, "--random_flip", action="store_true")


def add_text_args(group: Any) -> None:
    add_flag(group, "--train_text_encoder", action="store_true", help="Also put BOFT adapters on the text encoder.")
    add_flag(group, "--text_encoder_target_modules", nargs="+", default=list(ModelFamily.text_encoder_target_modules))
    add_flag(group, "--train_identifier_embedding", action="store_true",
             help="Also learn the identifier word's token embedding (pivotal tuning), saved as "
                  "learned_embeds.safetensors; prompts without the identifier encode exactly as before.")
    add_flag(group, "--identifier_token", nargs="+", default=None,
             help="The identifier word(s) (default: the instance prompt's words the class prompt lacks).")
    add_flag(group, "--initializer_token", nargs="+", default=None,
             help="With --train_identifier_embedding: start each identifier from this word's embedding "
                  "instead of its own, one word per identifier (e.g. the subject's colour).")
    add_flag(group, "--identifier_learning_rate", bounds=(0, None), type=float, default=5e-3,
             help="Learning rate of the identifier embedding.")
    add_flag(group, "--identifier_only_fraction", bounds=(0, None), type=float, default=0.0,
             help="With --train_identifier_embedding: this fraction of the steps, the first, learns only the "
                  "identifier's embedding (textual inversion), then the adapters join, their --lr_scheduler run "
                  "over the steps left.")


def add_baseline_args(group: Any) -> None:
    add_flag(group, "--adapter_type", default="boft", choices=list(ADAPTER_KINDS),
             help="lora / oft: PEFT LoRA or PEFT OFT instead of BOFT, as same-budget baselines (need peft).")
    add_flag(group, "--lora_rank", bounds=(1, None), type=int, default=4)
    add_flag(group, "--oft_block_size", bounds=(2, None), type=int, default=16, help="Block size of --adapter_type oft.")
    add_flag(group, "--save_merged", run_control=True, action="store_true",
             help="Also export a full diffusers pipeline with the adapter merged, in output_dir/merged.")




def class_captions(config: DreamBoothConfig, instance_prompts: list[str]) -> list[str]:
    """The instance captions with the identifier's words taken out ("a photo of sks star on a red
    background" -> "a photo of star on a red background"), each once, in order."""
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, config.identifier)) + r")\b", re.IGNORECASE)
    return list(dict.fromkeys(" ".join(pattern.sub("", prompt).split()) for prompt in instance_prompts))


def check_config(config: DreamBoothConfig) -> None:
    """Refuse settings that would be ignored, contradict each other or are out of range, before
    anything loads."""
    subject, prior, text = config.subject, config.prior, config.text
    refusals = [
        (text.initializer_token and not text.train_identifier_embedding,
         "--initializer_token needs --train_identifier_embedding (it starts the learned embedding)."),
        (text.identifier_only_fraction and not text.train_identifier_embedding,
         "--identifier_only_fraction needs --train_identifier_embedding (the embedding is what those steps learn)."),
        (text.identifier_only_fraction >= 1,
         f"--identifier_only_fraction {text.identifier_only_fraction} leaves no step for the adapters; give less than 1."),
        (not 0 <= subject.caption_dropout_rate <= 1,
         f"--caption_dropout_rate {subject.caption_dropout_rate} is not a probability."),
        (subject.caption_dropout_rate and not subject.caption_extension,
         "--caption_dropout_rate needs --caption_extension (there are no captions to drop)."),
        (prior.class_prompts_from_captions and not (subject.caption_extension and prior.with_prior_preservation),
         "--class_prompts_from_captions needs --caption_extension and --with_prior_preservation."),
        (subject.background_loss_weight is not None and not subject.instance_mask_dir,
         "--background_loss_weight needs --instance_mask_dir."),
        (subject.background_loss_weight is not None and subject.background_loss_weight < 0,
         f"--background_loss_weight {subject.background_loss_weight} is negative."),
        (subject.cache_latents and (subject.random_flip or not subject.center_crop),
         "--cache_latents encodes each image once, so every step must see the same pixels: "
         "pass --center_crop and leave out --random_flip."),
        (prior.with_prior_preservation and (not prior.class_data_dir or not prior.class_prompt),
         "--with_prior_preservation needs --class_data_dir and --class_prompt."),
        (config.run.adapter.adapter_type != "boft" and config.save_merged, "--save_merged is for BOFT adapters."),
        (config.run.model.base_quantization != "none" and config.save_merged,
         f"--save_merged with --base_quantization {config.run.model.base_quantization} would merge into rounded "
         "base weights; train without --save_merged and export the adapter merged on the unquantised base "
         "(python -m boft_diffusion.export OUTPUT_DIR --format merged)."),
    ]
    for refused, message in refusals:
        if refused:
            raise TrainingError(message)


def warn_captions_without_identifier(config: DreamBoothConfig, paths: list[Path], prompts: list[str]) -> None:
    """A caption that never names the subject teaches its image as the class, not the subject."""
    if not config.text.identifier_token and not config.prior.class_prompt:
        return  # no way to tell which words name the subject
    identifier = {w.lower() for w in config.identifier}
    unnamed = [path.name for path, prompt in zip(paths, prompts, strict=True)
               if not identifier & set(re.findall(r"[\w']+", prompt.lower()))]
    if unnamed:
        logger.warning("captions without the identifier %s: %s", " ".join(sorted(identifier)), ", ".join(unnamed))


def drop_captions(rows: list[int], plain: int, rate: float, generator: torch.Generator) -> list[int]:
    """Each caption's row, or with probability ``rate`` the plain prompt's (no draw at rate 0)."""
    if rate == 0:
        return rows
    dropped = (torch.rand(len(rows), generator=generator) < rate).tolist()
    return [plain if drop else row for row, drop in zip(rows, dropped, strict=True)]


def identifier_vectors(config: DreamBoothConfig, encoder: torch.nn.Module, tokenizer: Any) -> list[torch.Tensor] | None:
    """The starting embeddings of the identifier words (--initializer_token), or None for their own."""
    text, words = config.text, config.identifier
    if not text.identifier_token and not config.prior.class_prompt:
        raise TrainingError("--train_identifier_embedding: name the identifier with --identifier_token "
                            "(or give --class_prompt: the identifier is then the word it lacks).")
    if not words:
        raise TrainingError("--train_identifier_embedding: every word of the instance prompt is in the class "
                            "prompt; name the identifier with --identifier_token.")
    if not text.initializer_token:
        return None
    if len(text.initializer_token) != len(words):
        raise TrainingError(f"--initializer_token: {len(text.initializer_token)} words for {len(words)} identifier "
                            f"words ({' '.join(words)}); give one per identifier.")
    try:
        return initializer_vectors(encoder, tokenizer, text.initializer_token)
    except ValueError as error:
        raise TrainingError(f"--initializer_token: {error}") from error


def ensure_class_images(pipe: Any, config: DreamBoothConfig, accelerator: Any, captions: list[str] | None = None) -> None:
    """Generate class images with the base model until the folder holds ``num_class_images``.

    Without ``captions`` every image is drawn from --class_prompt. With them, image ``i`` is drawn
    from ``captions[i % len(captions)]`` and that caption is written beside it (before it, so an
    image never lacks its caption). Files are numbered and written atomically, so an interrupted
    generation resumes where it stopped and never leaves a half-written image behind.
    """
    prior, extension = config.prior, config.subject.caption_extension
    folder = Path(prior.class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        existing = list_images(folder, extension)
        uncaptioned = [p.name for p in existing if captions and not caption_path(p, extension).is_file()]
        if uncaptioned:
            raise TrainingError(f"--class_prompts_from_captions: {folder} already holds class images without "
                                f"{extension} captions ({', '.join(uncaptioned[:3])}...); give a new --class_data_dir.")
        if len(existing) < prior.num_class_images:
            logger.info("generating %d class images for %r in %s", prior.num_class_images - len(existing),
                        captions or prior.class_prompt, folder)
            draw_class_images(pipe, config, folder, len(existing), captions)
    accelerator.wait_for_everyone()


def draw_class_images(pipe: Any, config: DreamBoothConfig, folder: Path, start: int, captions: list[str] | None) -> None:
    """Class images ``start`` .. ``num_class_images - 1``, image ``i`` from seed ``seed + 7919 i``."""
    prior, validation, extension = config.prior, config.run.validation, config.subject.caption_extension
    seed = config.run.trainer.seed
    for first in range(start, prior.num_class_images, prior.sample_batch_size):
        numbers = range(first, min(first + prior.sample_batch_size, prior.num_class_images))
        generators = [torch.Generator().manual_seed(seed + 7919 * i) for i in numbers]
        prompts = [captions[i % len(captions)] if captions else prior.class_prompt for i in numbers]
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=validation.num_inference_steps, generator=generators,
                          **guidance_kwargs(validation.guidance_scale)).images
        for number, prompt, image in zip(numbers, prompts, images, strict=True):
            files = {f"class_{number:05d}{extension}": partial(write_text, text=prompt)} if captions else {}
            files[f"class_{number:05d}.png"] = partial(image.save, format="PNG")
            atomic_write(folder, files)


class DreamBooth(DiffusionRecipe):
    """A DreamBooth run: ``DreamBooth(DreamBoothConfig.from_flags(argv)).train()``."""

    run_name = "boft-dreambooth"

    def __init__(self, config: DreamBoothConfig) -> None:
        super().__init__(config)
        self.config: DreamBoothConfig = config
        self.kind = adapter_kind(config.run.adapter.adapter_type)
        self.classes: ImageSet | None = None
        self.class_prompts: list[str] = []
        self.cached_prompts: EncodedPrompts | None = None
        self.latent_cache: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def setup(self) -> None:
        check_config(self.config)
        self.setup_run()
        self.load_model()
        self.setup_instances()  # before the adapters: unreadable images must fail first
        self.setup_adapters()  # before class images: invalid block sizes must fail first
        self.setup_prior()
        self.place_frozen()
        self.setup_gradient_checkpointing()
        self.setup_prompts()
        self.setup_held_out()
        self.image_sets = [self.instances, self.classes] if self.classes else [self.instances]
        self.dataset_len = max(len(images.tensors) for images in self.image_sets)
        if self.config.subject.cache_latents:
            self.latent_cache = cache_latents(self.image_sets, self.pipe.vae, self.device)

    def read_images(self, folder: str | Path, what: str, mask_dir: str | None = None) -> ImageSet:
        subject = self.config.subject
        buckets = bucket_sizes(self.resolution, self.family.latent_multiple(self.pipe)) if subject.bucket else None
        return ImageSet.from_folder(folder, self.resolution, subject.center_crop, self.run.dataloader_num_workers,
                                    what, subject.caption_extension, mask_dir, buckets)

    def setup_instances(self) -> None:
        subject = self.config.subject
        folder = subject.instance_data_dir or example_subject_dir()
        self.instances = self.read_images(folder, "instance images", subject.instance_mask_dir)
        logger.info("%d instance images from %s", len(self.instances.tensors), folder)
        self.instance_prompts = [subject.instance_prompt] * len(self.instances.paths)
        if subject.caption_extension:
            paths = self.instances.paths
            self.instance_prompts = read_captions(paths, subject.caption_extension, subject.instance_prompt)
            captioned = sum(caption_path(p, subject.caption_extension).is_file() for p in paths)
            logger.info("%d of %d instance images have their own caption", captioned, len(paths))
            warn_captions_without_identifier(self.config, paths, self.instance_prompts)

    def setup_adapters(self) -> None:
        """Adapters on the denoiser, and on the text encoders (or their identifier embedding) when
        those train; the modules that train, denoiser first."""
        text = self.config.text
        place(self.denoiser, dtype=self.dtype)
        self.quantize_denoiser()
        self.add_adapters(self.denoiser, self.run.adapter.boft_target_modules)
        self.modules = {self.family.denoiser_name: self.denoiser}
        if len(self.encoders) > 1:
            logger.info("%s: %d text encoders condition the denoiser", self.family.name, len(self.encoders))
        if not (text.train_text_encoder or text.train_identifier_embedding):
            return
        for encoder in (encoder for encoder in self.encoders if encoder.trainable):
            place(encoder.module, dtype=self.dtype)
            if text.train_text_encoder:
                self.add_adapters(encoder.module, text.text_encoder_target_modules)
            if text.train_identifier_embedding:
                self.add_identifier(encoder.module, encoder.tokenizer)
            self.modules[encoder.name] = encoder.module

    def add_identifier(self, encoder: torch.nn.Module, tokenizer: Any) -> None:
        vectors = identifier_vectors(self.config, encoder, tokenizer)
        words = self.config.identifier
        try:
            add_identifier_embeddings(encoder, tokenizer, words, vectors)
        except ValueError as error:
            raise TrainingError(f"--train_identifier_embedding: {error}") from error
        initializers = self.config.text.initializer_token
        start = f", starting from {', '.join(repr(w) for w in initializers)}" if initializers else ""
        logger.info("learning the embedding of %s%s", ", ".join(repr(w) for w in words), start)

    def setup_prior(self) -> None:
        """Class images drawn by the base model (adapters off) where the folder is short, then read."""
        prior, subject = self.config.prior, self.config.subject
        if not prior.with_prior_preservation:
            return
        captions = class_captions(self.config, self.instance_prompts) if prior.class_prompts_from_captions else None
        switch = self.kind.switch_off_for_base
        if switch:
            set_adapters_enabled(self.modules.values(), False)
        with self.accelerator.autocast(), vae_decodes_in_own_dtype(self.pipe.vae):  # the UNet may be half already
            ensure_class_images(self.pipe, self.config, self.accelerator, captions)
        if switch:
            set_adapters_enabled(self.modules.values(), True)
        self.classes = self.read_images(prior.class_data_dir, "class images")
        self.class_prompts = [prior.class_prompt] * len(self.classes.paths)
        if subject.caption_extension:
            self.class_prompts = read_captions(self.classes.paths, subject.caption_extension, prior.class_prompt)

    def setup_gradient_checkpointing(self) -> None:
        if not self.run.model.gradient_checkpointing:
            return
        self.denoiser.enable_gradient_checkpointing()
        if self.config.text.train_text_encoder:
            for encoder in self.encoders:
                if encoder.trainable:
                    encoder.module.gradient_checkpointing_enable()

    def setup_prompts(self) -> None:
        """Every distinct prompt once, each example's row among them, and the prompts encoded once
        when no text encoder trains."""
        instance_prompt, class_prompt = self.config.subject.instance_prompt, self.config.prior.class_prompt
        classes = [class_prompt] if self.classes else []
        self.prompts = list(dict.fromkeys([instance_prompt, *self.instance_prompts, *classes, *self.class_prompts]))
        self.instance_rows = [self.prompts.index(prompt) for prompt in self.instance_prompts]
        self.plain_row = self.prompts.index(instance_prompt)
        self.class_rows = [self.prompts.index(prompt) for prompt in self.class_prompts]
        self.plain_class_row = self.prompts.index(class_prompt) if self.classes else None
        self.class_captioned = any(row != self.plain_class_row for row in self.class_rows)
        if not {encoder.name for encoder in self.encoders} & set(self.modules):
            with torch.no_grad():
                self.cached_prompts = self.encode({}, self.prompts)
            self.release_text_encoders()

    def setup_held_out(self) -> None:
        """The --validation_data_dir images and their prompts, for the validation loss."""
        subject = self.config.subject
        self.held_out = None
        if not subject.validation_data_dir:
            return
        self.held_out = self.read_images(subject.validation_data_dir, "validation images")
        self.held_out_prompts = [subject.instance_prompt] * len(self.held_out.paths)
        if subject.caption_extension:
            self.held_out_prompts = read_captions(self.held_out.paths, subject.caption_extension,
                                                  subject.instance_prompt)

    def validation_loss(self) -> dict[str, float]:
        """The instance loss of every held-out image at noise and a timestep drawn from a fixed seed per
        image, centre-cropped and unflipped: the same draws at every validation and in every run."""
        held, losses = self.held_out, []
        with torch.no_grad():
            for index, (tensor, target) in enumerate(zip(held.tensors, held.targets, strict=True)):
                pixels = center_crop_tensor(tensor[:3], target).unsqueeze(0)
                size_ids = self.family.size_ids([held.original_sizes[index]], [held.offsets[index]], target,
                                                self.device)
                part = Part(pixels, pixels.new_zeros(1, 0, *target), size_ids, [0], 1)
                prompts = self.encode(self.modules, [self.held_out_prompts[index]])
                generator = torch.Generator().manual_seed(self.run.trainer.seed + 104729 * (index + 1))
                noised, prediction = self.predict(self.modules, part, prompts, generator)
                losses.append(denoising_loss(prediction, self.objective.target(noised),
                                             self.example_weights(noised)).item())
        return {"validation_loss": sum(losses) / len(losses)}

    def trainer_recipe(self) -> Recipe:
        subject = self.config.subject
        recipe = super().trainer_recipe()
        recipe.validation_metrics = self.validation_loss if self.held_out else None
        recipe.learning_rates = {IdentifierEmbedding.PARAMETER_SUFFIX: self.config.text.identifier_learning_rate}
        if self.config.text.identifier_only_fraction:
            recipe.head_start = (IdentifierEmbedding.PARAMETER_SUFFIX,)
            recipe.head_start_fraction = self.config.text.identifier_only_fraction
        recipe.schedule = {"caption_dropout_rate": subject.caption_dropout_rate, "bucket": subject.bucket}
        recipe.groups = bucket_groups(self.instances, self.dataset_len) if subject.bucket else None
        return recipe

    # one micro-batch ---------------------------------------------------------------------------------
    def segments(self, indices: list[int], generator: torch.Generator) -> list[Segment]:
        """The micro-batch's instance examples, then its class examples, cut where the size changes."""
        rate = self.config.subject.caption_dropout_rate
        rows = drop_captions([self.instance_rows[i % len(self.instance_rows)] for i in indices], self.plain_row, rate,
                             generator)
        segments = segments_of(self.instances, [i % len(self.instances.tensors) for i in indices], rows, True)
        if self.classes:
            rows = [self.class_rows[i % len(self.class_rows)] for i in indices]
            if self.class_captioned:  # a draw only then, so runs without class captions replay as before
                rows = drop_captions(rows, self.plain_class_row, rate, generator)
            segments += segments_of(self.classes, [i % len(self.classes.tensors) for i in indices], rows, False)
        return segments

    def prepare(self, segment: Segment, generator: torch.Generator) -> Part:
        """A segment's pixels, masks, size ids and cached posteriors, after crops and flips."""
        images, subject = segment.images, self.config.subject
        target = images.targets[segment.picks[0]]
        batch, crops = augment_batch([images.tensors[i] for i in segment.picks], size=target, generator=generator,
                                     random_crop=not subject.center_crop, random_flip=subject.random_flip)
        originals = [images.original_sizes[i] for i in segment.picks]
        offsets = [(top + images.offsets[i][0], left + images.offsets[i][1])
                   for i, (top, left) in zip(segment.picks, crops, strict=True)]
        cached = None
        if self.latent_cache is not None:
            entries = [self.latent_cache[self.image_sets.index(images)][i] for i in segment.picks]
            cached = tuple(torch.stack(values) for values in zip(*entries, strict=True))
        return Part(batch[:, :3], batch[:, 3:], self.family.size_ids(originals, offsets, target, self.device),
                    segment.rows, len(segment.picks) if segment.instance else 0, cached)

    def part_prompts(self, models: dict[str, torch.nn.Module], parts: list[Part]) -> list[EncodedPrompts]:
        """Each part's encoded prompts: from the cache, or every prompt of the micro-batch through the
        trained encoders at once."""
        if self.cached_prompts is not None:
            return [self.cached_prompts[part.rows] for part in parts]
        encoded = self.encode(models, [self.prompts[row] for part in parts for row in part.rows])
        starts = [sum(part.count for part in parts[:i]) for i in range(len(parts))]
        return [encoded[start : start + part.count] for start, part in zip(starts, parts, strict=True)]

    def predict(self, models: dict[str, torch.nn.Module], part: Part, prompts: EncodedPrompts,
                generator: torch.Generator) -> tuple[NoisedBatch, torch.Tensor]:
        """The part's latents noised (from its cached posterior, else its pixels) and the denoiser's prediction."""
        noised = self.noise(part.pixels, part.posterior, generator)
        prediction = self.family.denoise(models[self.family.denoiser_name], noised.noisy, noised.timesteps, prompts,
                                         part.size_ids, self.dtype, self.run.validation.guidance_scale)
        return noised, prediction.float()

    def subject_weight(self, masks: torch.Tensor, size: torch.Size) -> torch.Tensor | None:
        """Per-latent-pixel loss weight: 1 on the subject, --background_loss_weight elsewhere."""
        if masks.shape[1] == 0:
            return None
        weight = self.config.subject.background_loss_weight
        coverage = torch.nn.functional.interpolate(masks.float(), size=tuple(size), mode="area").to(self.device)
        return weight + (1 - weight) * coverage

    def compute_loss(self, models: dict[str, torch.nn.Module], indices: list[int],
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        parts = [self.prepare(segment, generator) for segment in self.segments(indices, generator)]
        if len({part.pixels.shape[-2:] for part in parts}) == 1:
            parts = [Part.join(parts)]
        instance_losses, prior_losses = [], []
        for part, prompts in zip(parts, self.part_prompts(models, parts), strict=True):
            noised, prediction = self.predict(models, part, prompts, generator)
            target, weights = self.objective.target(noised), self.example_weights(noised)
            k = part.instances
            if k:
                instance_losses.append((denoising_loss(
                    prediction[:k], target[:k], None if weights is None else weights[:k],
                    self.subject_weight(part.masks, noised.latents.shape[-2:])), k))
            if part.count > k:
                prior_losses.append((denoising_loss(prediction[k:], target[k:],
                                                    None if weights is None else weights[k:]), part.count - k))
        return dreambooth_loss(instance_losses, prior_losses, self.config.prior.prior_loss_weight)

    # validation and outputs --------------------------------------------------------------------------
    def validate(self, step: int) -> list[list[Image.Image]]:
        count, seed = self.run.validation.num_validation_images, self.run.trainer.seed
        prompts = self.run.validation.validation_prompt or [self.config.subject.instance_prompt]
        return [self.sample([prompt] * count, [seed + i for i in range(count)]) for prompt in prompts]

    def save_outputs(self, folder: Path, step: int) -> None:
        config = self.config
        metadata = {"instance_prompt": config.subject.instance_prompt, "class_prompt": config.prior.class_prompt,
                    "train_steps": step, "resolution": self.resolution,
                    "prior_preservation": bool(config.prior.with_prior_preservation)}
        save_dreambooth(folder, self.denoiser, metadata, {e.name: e.module for e in self.encoders if e.trainable},
                        text_encoder_adapter=config.text.train_text_encoder,
                        identifier=config.text.train_identifier_embedding, save=self.kind.save)

    def finish(self, steps: int) -> None:
        super().finish(steps)
        if self.config.save_merged:
            export_merged_pipeline(self.pipe, Path(self.run.trainer.output_dir) / "merged")

    def model_card(self, trainable: int, steps: int) -> str:
        """The output folder's README; the BOFT line comes from the adapter's own config, so it shows
        the block size the adapter was built with (the default included)."""
        config, model, kind = self.config, self.run.model.pretrained_model_name_or_path, self.kind.name
        output_dir, prompt = self.run.trainer.output_dir, config.subject.instance_prompt
        boft = self.run.adapter.boft()
        load_line = (f'load_outputs(pipe, "{output_dir}")' if kind == "boft" else
                     'from boft_diffusion.kinds.peft_baselines import load_peft_adapter\n'
                     f'load_outputs(pipe, "{output_dir}", load=load_peft_adapter)')
        identifier = (f"\nThe identifier's learned token embedding is in `{EMBEDDINGS_NAME}` (`{{word: vector}}`); "
                      "`load_outputs` installs it.\n" if config.text.train_identifier_embedding else "")
        prior = f"yes, weight {config.prior.prior_loss_weight}" if config.prior.with_prior_preservation else "no"
        return f"""---
library_name: boft-diffusion
base_model: {model}
tags: [boft, dreambooth, stable-diffusion, peft]
instance_prompt: {prompt}
---
# {kind.upper()} DreamBooth adapter

Trained with `train_dreambooth.py` from boft-diffusion on **{model}**
for {steps} steps. Trigger prompt: `{prompt}`.

{boft_summary(boft, trainable)}
Prior preservation: {prior}.
{identifier}
![validation samples](validation/latest.png)

## Use

```python
import boft_diffusion as bd
from boft_diffusion.outputs.read import load_outputs
pipe = bd.load_pipeline("{model}")
{load_line}
image = pipe("{prompt}").images[0]
```

{peft_interop_note(boft) if kind == "boft" else ""}
"""


def train(config: DreamBoothConfig) -> dict[str, Any]:
    """Train a DreamBooth adapter as ``config`` describes; returns the trainer's last logs."""
    return DreamBooth(config).train()
