"""SDXL: two CLIP text encoders side by side, pooled text and size ids as extra UNet inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import EncodedPrompts, ModelFamily, TextEncoder
from .loading import is_sdxl
from .sd import token_ids


class StableDiffusionXL(ModelFamily):
    name = "sdxl"

    def matches(self, pipe: Any) -> bool:
        return hasattr(pipe, "unet") and is_sdxl(pipe)

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        return [TextEncoder("text_encoder", pipe.text_encoder, pipe.tokenizer),
                TextEncoder("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2)]

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device,
                       max_sequence_length: int | None = None) -> EncodedPrompts:
        """As ``StableDiffusionXLPipeline.encode_prompt`` encodes them (no clip skip), so training sees
        what sampling does: each encoder's penultimate hidden states side by side, and the pooled
        projection of the encoder that has one (the second)."""
        hidden, pooled = [], None
        for encoder in encoders:
            output = encoder.module(token_ids(encoder.tokenizer, prompts, device), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError("no text encoder of this SDXL model returns a pooled projection "
                             "(text_encoder_2 should be a CLIPTextModelWithProjection).")
        return EncodedPrompts(torch.cat(hidden, dim=-1), pooled)

    def size_ids(self, original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                 target: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``[original (h, w), crop top-left (top, left), target (h, w)]`` per example: it tells the
        model how much of a photo it sees and at what size, so that sampling with the defaults
        (uncropped, original = target) asks for whole, full-size pictures."""
        rows = [[*original, *crop, *target] for original, crop in zip(original_sizes, crops, strict=True)]
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def denoiser_kwargs(self, prompts: EncodedPrompts, size_ids: torch.Tensor | None,
                        dtype: torch.dtype) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": prompts.pooled.to(dtype), "time_ids": size_ids.to(dtype)}}

    def vae_dtype(self, vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """SDXL's VAE overflows in float16, so it stays in float32 there, as in diffusers' SDXL
        scripts, unless its config says it need not (``force_upcast: false``, the fp16-fixed VAEs)."""
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return dtype
