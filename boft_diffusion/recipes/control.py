"""ControlNet-conditioned finetuning with BOFT: the run's typed config, its flags, and the recipe's
steps for the two control modes (the BOFT paper's light control encoder, or a diffusers ControlNet
whose frozen copy of the UNet carries BOFT adapters)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..control.networks import (
    CONTROLNET,
    LIGHT,
    Control,
    controlnet_from_unet,
    controlnet_trainable_parameters,
    encoder_for_unet,
    light_control,
)
from ..core.images import open_image
from ..families import EncodedPrompts
from ..families.loading import guidance_kwargs
from ..kinds.registry import set_adapters_enabled
from ..outputs.write import boft_summary, peft_interop_note, save_control
from ..tiny.bundled import EXAMPLE_CONTROL_DATA, control_validation_pairs
from ..training.cli import add_flag, parse_recipe_flags, recipe_parser, run_config
from ..training.config import RunConfig, config_from_flags
from ..training.control_data import ControlDataConfig, ControlExample, load_control_examples
from ..training.losses import denoising_loss
from ..training.sampling import vae_decodes_in_own_dtype
from ..training.trainer import TrainingError, place
from .base import DiffusionRecipe

logger = logging.getLogger("boft_diffusion")


@dataclass
class ControlOptions:
    """Which control mode trains, from what, and how strongly it steers."""

    control: str
    controlnet_model_name_or_path: str | None
    train_unet_boft: bool
    conditioning_scale: float


@dataclass
class ControlConfig:
    run: RunConfig
    control: ControlOptions
    data: ControlDataConfig

    @classmethod
    def from_flags(cls, argv: list[str] | None = None, description: str | None = None) -> ControlConfig:
        """The config of ``train_controlnet.py`` flags (and the ``--config`` file they name)."""
        parser = build_parser(description)
        args = parse_recipe_flags(parser, argv)
        return config_from_flags(cls, vars(args), run=run_config(parser, args))


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of train_controlnet.py, sharing training, checkpoint and BOFT flags with DreamBooth."""
    return recipe_parser(description, add_control_args, default_output_dir="outputs/controlnet", default_steps=400)


def add_control_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control")
    add_flag(group, "--control", default="light", choices=[LIGHT, CONTROLNET],
             help="light: the BOFT paper's small control encoder + BOFT on the UNet; "
                  "controlnet: BOFT on a diffusers ControlNet's frozen copy of the UNet.")
    add_flag(group, "--controlnet_model_name_or_path", default=None,
             help="Start from this ControlNet instead of copying the UNet.")
    add_flag(group, "--train_unet_boft", action="store_true", help="controlnet mode: also adapt the UNet.")
    add_flag(group, "--conditioning_scale", bounds=(0, None), type=float, default=1.0)
    group = parser.add_argument_group("data")
    add_flag(group, "--train_data_dir", default=None,
             help="Folder with metadata.jsonl (default: the bundled tiny-world control set).")
    add_flag(group, "--dataset_name", default=None, help="A Hugging Face dataset (needs `datasets`).")
    add_flag(group, "--dataset_config_name", default=None)
    add_flag(group, "--image_column", default="image")
    add_flag(group, "--conditioning_image_column", default="conditioning_image")
    add_flag(group, "--caption_column", default="text")
    add_flag(group, "--proportion_empty_prompts", bounds=(0, 1), type=float, default=0.0)
    add_flag(group, "--max_train_samples", bounds=(1, None), type=int, default=None)
    add_flag(group, "--validation_image", run_control=True, nargs="+", default=None,
             help="Paired with --validation_prompt.")


def check_config(config: ControlConfig) -> None:
    data = config.data
    if data.validation_image and config.run.validation.validation_prompt and \
            len(data.validation_image) != len(config.run.validation.validation_prompt):
        raise TrainingError("--validation_image and --validation_prompt must come in pairs (same count).")


class ControlTraining(DiffusionRecipe):
    """A control run: ``ControlTraining(ControlConfig.from_flags(argv)).train()``."""

    adapter_files = ("adapter_model.safetensors", "control.json")

    def __init__(self, config: ControlConfig) -> None:
        super().__init__(config)
        self.config: ControlConfig = config
        self.mode = config.control.control
        self.run_name = f"boft-control-{self.mode}"
        self.controlnet = self.encoder = None

    def setup(self) -> None:
        check_config(self.config)
        self.setup_run()
        self.check_half_precision_device()
        self.load_model()
        if not self.family.supports_control:
            raise TrainingError(f"train_controlnet.py conditions SD and SDXL UNets; {self.family.name} is a "
                                "transformer model (train it with train_dreambooth.py).")
        if self.mode == CONTROLNET and not self.family.supports_controlnet:
            raise TrainingError(f"--control controlnet is for SD 1.x / 2.x models, not {self.family.name}; "
                                "train --control light.")
        self.examples = load_control_examples(self.config.data, self.resolution, EXAMPLE_CONTROL_DATA)
        self.dataset_len = len(self.examples)
        logger.info("%d training pairs", self.dataset_len)
        if self.mode == LIGHT:
            self.setup_light()
        else:
            self.setup_controlnet()
        self.place_frozen()
        place(self.denoiser, self.device)
        if self.run.model.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.controlnet is not None:
                self.controlnet.enable_gradient_checkpointing()
        self.encode_captions()
        self.setup_validation()

    def check_half_precision_device(self) -> None:
        """Refuse a setting that would crash at the first step: on CPU there is no autocast for the
        ControlNet's float32 conditioning embedding between its half-precision blocks."""
        precision = self.run.trainer.mixed_precision
        if self.mode == CONTROLNET and precision != "no" and self.device.type == "cpu":
            raise TrainingError(f"--mixed_precision {precision} with --control controlnet needs a GPU; on CPU "
                                "pass --mixed_precision no (--control light trains in half precision on CPU too).")

    def setup_light(self) -> None:
        """BOFT on the UNet and a small zero-initialised control encoder after its conv_in."""
        place(self.denoiser, dtype=self.dtype)
        self.quantize_denoiser()
        self.add_adapters(self.denoiser, self.run.adapter.boft_target_modules)
        self.encoder = encoder_for_unet(self.denoiser, self.pipe.vae_scale_factor).to(self.device)
        self.modules = {"unet": self.denoiser, "control_encoder": self.encoder}

    def setup_controlnet(self) -> None:
        """A ControlNet (given, or copied from the UNet) with BOFT on its frozen blocks and its zero
        convolutions and conditioning embedding trained in full; BOFT on the UNet with --train_unet_boft."""
        from diffusers import ControlNetModel

        source = self.config.control.controlnet_model_name_or_path
        controlnet = (ControlNetModel.from_pretrained(source) if source
                      else controlnet_from_unet(self.denoiser, self.pipe.vae_scale_factor))
        controlnet.requires_grad_(False)
        place(controlnet, self.device, self.dtype)
        self.add_adapters(controlnet, self.run.adapter.boft_target_modules)
        for param in controlnet_trainable_parameters(controlnet).values():
            param.requires_grad_(True)  # the Trainer keeps every trainable parameter in float32
        self.controlnet = controlnet
        self.modules = {"controlnet": controlnet}
        place(self.denoiser, dtype=self.dtype)
        self.quantize_denoiser()
        if self.config.control.train_unet_boft:
            self.add_adapters(self.denoiser, self.run.adapter.boft_target_modules)
            self.modules["unet"] = self.denoiser

    def encode_captions(self) -> None:
        """Every caption (and the empty prompt) encoded once: the text encoders stay frozen here."""
        self.captions = sorted({example.caption for example in self.examples} | {""})
        with torch.no_grad():
            self.encoded = self.encode({}, self.captions)

    def setup_validation(self) -> None:
        data, validation = self.config.data, self.run.validation
        if data.validation_image:
            prompts = validation.validation_prompt or [""] * len(data.validation_image)
            self.pairs = [(open_image(path), prompt)
                          for path, prompt in zip(data.validation_image, prompts, strict=True)]
        else:
            self.pairs = control_validation_pairs()
        self.control = (Control(LIGHT, encoder=self.encoder) if self.mode == LIGHT
                        else Control.for_controlnet(self.pipe, self.controlnet))

    def compute_loss(self, models: dict[str, torch.nn.Module], indices: list[int],
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [self.examples[i] for i in indices]
        pixels = torch.stack([e.image for e in batch]).to(self.device)
        conditions = torch.stack([(e.condition + 1) / 2 for e in batch]).to(self.device)
        drop = torch.rand(len(batch), generator=generator) < self.config.data.proportion_empty_prompts
        texts = ["" if dropped else e.caption for e, dropped in zip(batch, drop.tolist(), strict=True)]
        prompts = self.encoded[[self.captions.index(text) for text in texts]]
        noised = self.noise(pixels, None, generator)
        prediction = self.predict(models, batch, prompts, noised.noisy.to(self.dtype), noised.timesteps, conditions)
        target = self.objective.target(noised)
        return denoising_loss(prediction, target, self.example_weights(noised)), {}

    def predict(self, models: dict[str, torch.nn.Module], batch: list[ControlExample], prompts: EncodedPrompts,
                noisy: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction under control: the light encoder's features added after conv_in, or
        the ControlNet's residuals."""
        unet, context = models.get("unet", self.denoiser), prompts.hidden
        if self.mode == LIGHT:
            size_ids = self.family.size_ids([e.original_size for e in batch], [e.crop for e in batch],
                                            (self.resolution, self.resolution), self.device)
            extras = self.family.denoiser_kwargs(prompts, size_ids, self.dtype)
            with light_control(self.denoiser, models["control_encoder"], conditions * 2 - 1,
                               self.config.control.conditioning_scale):
                return unet(noisy, timesteps, context, **extras).sample
        down, mid = models["controlnet"](noisy, timesteps, encoder_hidden_states=context,
                                         controlnet_cond=conditions.to(self.dtype), return_dict=False)
        return unet(noisy, timesteps, context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    def validate(self, step: int) -> list[list[Image.Image]]:
        """Per pair: the control image, the base model without control, the trained control (same seed)."""
        size, seed, validation = (self.resolution, self.resolution), self.run.trainer.seed, self.run.validation
        rows = []
        with vae_decodes_in_own_dtype(self.pipe.vae):
            for condition_image, prompt in self.pairs:
                condition_image = condition_image.resize(size)
                sample = {"prompt": prompt, "num_inference_steps": validation.num_inference_steps,
                          **guidance_kwargs(validation.guidance_scale)}
                set_adapters_enabled(self.modules.values(), False)
                with torch.no_grad():
                    base = self.pipe(generator=torch.Generator().manual_seed(seed), **sample).images[0]
                set_adapters_enabled(self.modules.values(), True)
                adapted = self.control.sample(self.pipe, condition_image, size, self.config.control.conditioning_scale,
                                              generator=torch.Generator().manual_seed(seed), **sample)
                rows.append([condition_image, base, adapted])
        return rows

    def save_outputs(self, folder: Path, step: int) -> None:
        metadata = {"control": self.mode, "train_steps": step, "resolution": self.resolution,
                    "controlnet_source": self.config.control.controlnet_model_name_or_path}
        save_control(folder, self.mode, self.denoiser if "unet" in self.modules else None, self.controlnet,
                     self.encoder, metadata)

    def model_card(self, trainable: int, steps: int) -> str:
        """The output folder's README, as DreamBooth writes one: what was trained, how to load it, what PEFT reads."""
        options, data = self.config.control, self.config.data
        model, output_dir = self.run.model.pretrained_model_name_or_path, self.run.trainer.output_dir
        boft = self.run.adapter.boft()
        control = ("the BOFT paper's light control encoder after `conv_in` (trained in full) and BOFT on the UNet"
                   if self.mode == LIGHT else
                   "a ControlNet copied from " + (options.controlnet_model_name_or_path or "the UNet")
                   + ", BOFT on its frozen blocks (in `controlnet/`), zero convolutions and conditioning embedding "
                     "trained in full" + (", and BOFT on the UNet" if options.train_unet_boft else ""))
        source = data.dataset_name or data.train_data_dir or "the bundled tiny-world control set"
        return f"""---
library_name: boft-diffusion
base_model: {model}
tags: [boft, controlnet, stable-diffusion, peft]
---
# BOFT control adapter ({self.mode})

Trained with `train_controlnet.py` from boft-diffusion on **{model}**
for {steps} steps on {source}: {control}.

{boft_summary(boft, trainable)}

![validation: control image, base model, with control (same seed)](validation/latest.png)

## Use

```python
from PIL import Image
import boft_diffusion as bd
from boft_diffusion.outputs.read import load_outputs
pipe = bd.load_pipeline("{model}")
adapter = load_outputs(pipe, "{output_dir}")
image = adapter.sample(condition=Image.open("control.png"), prompt="a red star on a blue background")
```

`control.json` names the mode; the fully trained control parts are boft-diffusion's own files, so
`load_outputs` is the way to load the whole folder. {peft_interop_note(boft)}
"""


def train(config: ControlConfig) -> dict[str, Any]:
    """Train control as ``config`` describes; returns the trainer's last logs."""
    return ControlTraining(config).train()
