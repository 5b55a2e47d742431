"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet conditioned on its last hidden states."""

from __future__ import annotations

from typing import Any

import torch

from .base import EncodedPrompts, ModelFamily, TextEncoder
from .loading import is_sdxl


def token_ids(tokenizer: Any, prompts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded and truncated to ``max_length`` (default: the tokenizer's context), as
    diffusers' pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class StableDiffusion(ModelFamily):
    name = "sd"
    supports_controlnet = True

    def matches(self, pipe: Any) -> bool:
        return hasattr(pipe, "unet") and hasattr(pipe, "text_encoder") and not is_sdxl(pipe)

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        return [TextEncoder("text_encoder", pipe.text_encoder, pipe.tokenizer)]

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device,
                       max_sequence_length: int | None = None) -> EncodedPrompts:
        encoder = encoders[0]
        return EncodedPrompts(encoder.module(token_ids(encoder.tokenizer, prompts, device))[0])
