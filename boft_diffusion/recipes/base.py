"""What every recipe does the same way, written once: refuse bad settings before anything loads,
set up accelerate, load the base model and its family, put adapters on, encode prompts through
the encoders being trained, sample validation images, run the shared trainer and end the run
(validation picture, model card).

A recipe subclasses :class:`DiffusionRecipe`, lists its set-up steps in ``setup`` and supplies
the loss, validation and outputs as methods; the model family answers everything that differs
between SD, SDXL and later families.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..core.adapters import count_trainable_parameters
from ..core.quantize import quantize_linears, storage_bytes
from ..families import EncodedPrompts, ModelFamily, family_of
from ..families.denoising import NoisedBatch
from ..families.loading import guidance_kwargs, load_pipeline, quiet_progress
from ..kinds.registry import AdapterSpec, adapter_kind
from ..outputs.write import save_latest_validation, write_model_card
from ..training.cli import check_resolution
from ..training.config import RunConfig
from ..training.sampling import vae_decodes_in_own_dtype
from ..training.trainer import (
    Recipe,
    Trainer,
    TrainingError,
    check_compile_backend,
    check_output_dir,
    make_accelerator,
    place,
    weight_dtype,
)

logger = logging.getLogger("boft_diffusion")


class DiffusionRecipe:
    """One training run of a recipe: ``train()`` runs ``setup()``, the shared loop, and ``finish()``."""

    run_name = "boft"
    #: Files whose presence marks an output folder as holding a finished run.
    adapter_files: tuple[str, ...] = ("adapter_model.safetensors",)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.run: RunConfig = config.run
        self.modules: dict[str, nn.Module] = {}
        self.dataset_len = 0

    # the run ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self.setup()
        trainer = Trainer(self.run.trainer, self.accelerator, self.trainer_recipe())
        result = trainer.train()
        if self.accelerator.is_main_process:
            self.finish(trainer.step)
        trainer.close()
        return result

    def setup(self) -> None:
        """The recipe's set-up steps, in order (the order fixes which random draws each one sees)."""
        raise NotImplementedError

    def trainer_recipe(self) -> Recipe:
        return Recipe(modules=self.modules, dataset_len=self.dataset_len, compute_loss=self.compute_loss,
                      save_outputs=self.save_outputs, validate=self.validate, run_name=self.run_name)

    def compute_loss(self, models: dict[str, nn.Module], indices: list[int],
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def save_outputs(self, folder: Path, step: int) -> None:
        raise NotImplementedError

    def validate(self, step: int) -> list[list[Image.Image]]:
        raise NotImplementedError

    def model_card(self, trainable: int, steps: int) -> str:
        raise NotImplementedError

    def finish(self, steps: int) -> None:
        """The end of a run on the main process: the card's picture and the model card."""
        output_dir = Path(self.run.trainer.output_dir)
        save_latest_validation(output_dir)
        trainable = sum(count_trainable_parameters(m) for m in self.modules.values())
        write_model_card(output_dir, self.model_card(trainable, steps))

    # shared steps ------------------------------------------------------------------------------------
    def setup_run(self) -> None:
        """Refuse an adapter configuration that cannot be built and an output folder holding another
        run, then start accelerate (seeded)."""
        self.run.adapter.boft()
        if self.run.model.base_quantization != "none" and self.run.adapter.adapter_type != "boft":
            raise TrainingError(f"--base_quantization {self.run.model.base_quantization} is for BOFT adapters; "
                                f"--adapter_type {self.run.adapter.adapter_type} is not tested on a quantised base.")
        check_output_dir(self.run.trainer, self.adapter_files)
        self.accelerator = make_accelerator(self.run.trainer)
        self.dtype = weight_dtype(self.accelerator)
        self.device = self.accelerator.device
        check_compile_backend(self.run.trainer, self.device)

    def load_model(self) -> None:
        """The base pipeline in float32 on the run's device, its family, the training resolution
        and the family's objective; every frozen part stops asking for gradients."""
        model = self.run.model
        self.pipe = quiet_progress(load_pipeline(model.pretrained_model_name_or_path, dtype=torch.float32,
                                                 device=self.device, revision=model.revision, variant=model.variant))
        self.family: ModelFamily = family_of(self.pipe)
        self.resolution = check_resolution(model.resolution, self.family, self.pipe)
        noise, adapter = self.run.noise, self.run.adapter
        self.objective = self.family.objective(self.pipe, noise.density())
        flow = self.objective.prediction_type == "flow"
        if flow and noise.snr_gamma:
            raise TrainingError(f"--snr_gamma weighs DDPM timesteps; {self.family.name} trains by flow matching: "
                                "use --weighting_scheme.")
        if not flow and noise.weighting_scheme != "none":
            raise TrainingError(f"--weighting_scheme is for the flow-matching models (Flux.1, SD3), not "
                                f"{self.family.name}; use --snr_gamma.")
        adapter.boft_target_modules = adapter.boft_target_modules or list(self.family.default_target_modules)
        self.denoiser = self.family.denoiser(self.pipe)
        self.encoders = self.family.text_encoders(self.pipe)
        for module in (self.denoiser, self.pipe.vae, *(encoder.module for encoder in self.encoders)):
            module.requires_grad_(False)

    def quantize_denoiser(self) -> None:
        """With --base_quantization: the denoiser's frozen Linear weights stored quantised, before its
        adapters wrap them (call it once the denoiser is in the run's precision)."""
        method = self.run.model.base_quantization
        before = storage_bytes(self.denoiser)
        count = quantize_linears(self.denoiser, method)
        if count:
            logger.info("%s: %d frozen Linear layers stored as %s; its weights take %.1f MiB instead of %.1f MiB",
                        self.family.denoiser_name, count, method, storage_bytes(self.denoiser) / 2**20, before / 2**20)

    def add_adapters(self, model: nn.Module, targets: list[str]) -> None:
        """Put the configured adapter kind on ``targets`` of ``model``."""
        adapter = self.run.adapter
        spec = AdapterSpec(adapter.adapter_type, list(targets),
                           adapter.boft(targets, self.run.model.pretrained_model_name_or_path),
                           adapter.lora_rank, adapter.oft_block_size)
        adapter_kind(adapter.adapter_type).apply(model, spec)

    def place_frozen(self) -> None:
        """The VAE and text encoders on the device, in the run's precision (the family's for the VAE)."""
        place(self.pipe.vae, self.device, self.family.vae_dtype(self.pipe.vae, self.dtype))
        for encoder in self.encoders:
            place(encoder.module, self.device, self.dtype)

    def encode(self, models: dict[str, nn.Module], prompts: list[str]) -> EncodedPrompts:
        """``prompts`` through the family's text encoders, each replaced by its prepared module in
        ``models`` where it trains."""
        current = [dataclasses.replace(encoder, module=models.get(encoder.name, encoder.module))
                   for encoder in self.encoders]
        return self.family.encode_prompts(current, prompts, self.device, self.run.model.max_sequence_length)

    def release_text_encoders(self) -> None:
        """Text encoders back to the CPU once every training prompt is encoded, where the denoiser runs
        on an accelerator: T5-XXL alone is 9 GB in bf16, what keeps Flux off a 24 GB card. The
        pipelines encode validation prompts on the CPU then."""
        if self.device.type == "cpu" or not self.family.offloads_text_encoders:
            return
        for encoder in self.encoders:
            encoder.module.to("cpu", torch.float32)
        logger.info("text encoders moved to the CPU: training prompts are cached")

    def noise(self, pixels: torch.Tensor, posterior: tuple[torch.Tensor, torch.Tensor] | None,
              generator: torch.Generator) -> NoisedBatch:
        """Latents of ``pixels`` (or a cached posterior's sample) noised by the family's objective."""
        offset = self.run.noise.noise_offset
        if posterior is not None:
            return self.objective.noise_posterior(*posterior, generator, self.device, offset)
        return self.objective.noise_pixels(self.pipe.vae, pixels.to(self.device), generator, self.device, offset)

    def example_weights(self, noised: NoisedBatch) -> torch.Tensor | None:
        """Per-example loss weights of the drawn noise levels (the objective's: min-SNR with
        --snr_gamma, the flow models' --weighting_scheme), or None for plain MSE."""
        return self.objective.loss_weights(noised, self.run.noise.snr_gamma)

    def sample(self, prompts: list[str], seeds: list[int], **options: Any) -> list[Image.Image]:
        """The pipeline's images for ``prompts``, one seed each, with the run's validation sampling."""
        validation = self.run.validation
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.no_grad(), vae_decodes_in_own_dtype(self.pipe.vae):
            return self.pipe(prompts, num_inference_steps=validation.num_inference_steps, generator=generators,
                             **guidance_kwargs(validation.guidance_scale),
                             **self.family.sampling_kwargs(self.resolution, self.run.model.max_sequence_length),
                             **options).images
