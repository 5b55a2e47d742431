"""The model-family interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import DEFAULT_TARGET_MODULES
from .denoising import DenoisingObjective
from .flow import TimestepDensity


@dataclass
class TextEncoder:
    """One text encoder of a pipeline, under its component name, with its tokenizer."""

    name: str
    module: nn.Module
    tokenizer: Any
    #: Whether --train_text_encoder and --train_identifier_embedding reach it (not T5, as in
    #: diffusers' Flux and SD3 scripts).
    trainable: bool = True


@dataclass
class EncodedPrompts:
    """Prompts as the denoiser takes them: per-token states, and the pooled vector where the
    family uses one (SDXL). Indexing selects prompt rows."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, rows: Any) -> EncodedPrompts:
        return EncodedPrompts(self.hidden[rows], None if self.pooled is None else self.pooled[rows])


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are: text encoders may wait on the CPU while the denoiser runs elsewhere."""
    return next(module.parameters()).device


class ModelFamily:
    """What a recipe needs to know about one kind of diffusion model; subclasses override."""

    name = "abstract"
    #: The pipeline component that predicts the noise, and the key its module trains under.
    denoiser_name = "unet"
    #: Whether a diffusers ControlNet copied from the denoiser conditions it (--control controlnet).
    supports_controlnet = False
    #: Adapter targets of the text encoders (--train_text_encoder).
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    #: The denoiser's adapter targets when --boft_target_modules is left out.
    default_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    #: Whether train_controlnet.py can condition the denoiser (a UNet's conv_in or a ControlNet).
    supports_control = True
    #: Whether the text encoders wait on the CPU once training prompts are cached (T5 is large).
    offloads_text_encoders = False

    def matches(self, pipe: Any) -> bool:
        """Whether a loaded pipeline belongs to this family."""
        raise NotImplementedError

    def denoiser(self, pipe: Any) -> nn.Module:
        """The network that predicts the noise (the UNet, or a transformer)."""
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        """Every text encoder that conditions the denoiser, in the order prompts are encoded."""
        raise NotImplementedError

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device,
                       max_sequence_length: int | None = None) -> EncodedPrompts:
        """``prompts`` through ``encoders`` as the family's pipeline encodes them for sampling, on
        ``device``; ``max_sequence_length`` is the T5 length of the families that use T5."""
        raise NotImplementedError

    def size_ids(self, original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                 target: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Per-example size conditioning, or None where the family has none."""
        return None

    def denoiser_kwargs(self, prompts: EncodedPrompts, size_ids: torch.Tensor | None,
                        dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward beyond (noisy, timesteps, hidden states)."""
        return {}

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: EncodedPrompts,
                size_ids: torch.Tensor | None, dtype: torch.dtype, guidance_scale: float | None) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents, in their layout; ``guidance_scale`` is the
        guidance a guidance-distilled model (Flux.1-dev) is told it samples with."""
        extras = self.denoiser_kwargs(prompts, size_ids, dtype)
        return denoiser(noisy.to(dtype), timesteps, prompts.hidden.to(dtype), **extras).sample

    def vae_dtype(self, vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """The dtype to keep the frozen VAE in under mixed precision ``dtype``."""
        return dtype

    def objective(self, pipe: Any, density: TimestepDensity) -> Any:
        """How training noises latents and what the denoiser learns to predict (``density`` is for
        the flow-matching families)."""
        return DenoisingObjective.from_pipeline(pipe)

    def latent_multiple(self, pipe: Any) -> int:
        """What every image side must be a multiple of: the VAE's downsampling times the UNet's."""
        return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)

    def native_resolution(self, pipe: Any) -> int:
        """The side the model was trained at, and samples at by default."""
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def sampling_kwargs(self, resolution: int, max_sequence_length: int | None) -> dict[str, Any]:
        """Pipeline arguments that make validation samples match training (none for the UNets)."""
        return {}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


_REGISTRY: list[ModelFamily] = []


def register_family(family: ModelFamily) -> None:
    """Make ``family`` known to :func:`family_of`; families registered earlier are asked first, so
    register a more specific family before a general one."""
    _REGISTRY.append(family)


def registered_families() -> list[ModelFamily]:
    return list(_REGISTRY)


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline; an unknown one is an error naming its class."""
    for family in _REGISTRY:
        if family.matches(pipe):
            return family
    known = ", ".join(f.name for f in _REGISTRY)
    raise ValueError(f"{type(pipe).__name__} belongs to no known model family ({known}).")
