"""The model-family interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .denoising import DenoisingObjective


@dataclass
class TextEncoder:
    """One text encoder of a pipeline, under its component name, with its tokenizer."""

    name: str
    module: nn.Module
    tokenizer: Any


@dataclass
class EncodedPrompts:
    """Prompts as the denoiser takes them: per-token states, and the pooled vector where the
    family uses one (SDXL). Indexing selects prompt rows."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, rows: Any) -> EncodedPrompts:
        return EncodedPrompts(self.hidden[rows], None if self.pooled is None else self.pooled[rows])


class ModelFamily:
    """What a recipe needs to know about one kind of diffusion model; subclasses override."""

    name = "abstract"
    #: The pipeline component that predicts the noise, and the key its module trains under.
    denoiser_name = "unet"
    #: Whether a diffusers ControlNet copied from the denoiser conditions it (--control controlnet).
    supports_controlnet = False
    #: Adapter targets of the text encoders (--train_text_encoder).
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def matches(self, pipe: Any) -> bool:
        """Whether a loaded pipeline belongs to this family."""
        raise NotImplementedError

    def denoiser(self, pipe: Any) -> nn.Module:
        """The network that predicts the noise (the UNet, or a transformer)."""
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        """Every text encoder that conditions the denoiser, in the order prompts are encoded."""
        raise NotImplementedError

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device) -> EncodedPrompts:
        """``prompts`` through ``encoders`` as the family's pipeline encodes them for sampling."""
        raise NotImplementedError

    def size_ids(self, original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                 target: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Per-example size conditioning, or None where the family has none."""
        return None

    def denoiser_kwargs(self, prompts: EncodedPrompts, size_ids: torch.Tensor | None,
                        dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward beyond (noisy, timesteps, hidden states)."""
        return {}

    def vae_dtype(self, vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """The dtype to keep the frozen VAE in under mixed precision ``dtype``."""
        return dtype

    def objective(self, pipe: Any) -> DenoisingObjective:
        """How training noises latents and what the denoiser learns to predict."""
        return DenoisingObjective.from_pipeline(pipe)

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
