"""Flux.1 (dev and schnell): CLIP's pooled vector and T5's states condition a transformer that
takes 2x2 patches of the latents as tokens with 3-d position ids; dev is told the guidance scale
through an embedding instead of running classifier-free guidance."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import EncodedPrompts, TextEncoder
from .dit import TransformerFamily, encoder_token_ids, t5_states

#: FluxPipeline's guidance when none is given (what dev's guidance embedding is told in training).
DEFAULT_FLUX_GUIDANCE = 3.5


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents as (b, h/2 * w/2, 4c) tokens of 2x2 patches, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_position_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(row, column) ids of each packed token in the last two of three axes (the first is text's)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class Flux(TransformerFamily):
    name = "flux"
    default_sequence_length = 512

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        return [TextEncoder("text_encoder", pipe.text_encoder, pipe.tokenizer),
                TextEncoder("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, trainable=False)]

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device,
                       max_sequence_length: int | None = None) -> EncodedPrompts:
        """As ``FluxPipeline.encode_prompt``: CLIP's pooled output and T5's states."""
        clip, t5 = encoders
        pooled = clip.module(encoder_token_ids(clip, prompts), output_hidden_states=False).pooler_output.to(device)
        return EncodedPrompts(t5_states(t5, prompts, self.sequence_length(max_sequence_length), device), pooled)

    def latent_multiple(self, pipe: Any) -> int:
        """Latents are cut into 2x2 patches."""
        return pipe.vae_scale_factor * 2

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: EncodedPrompts,
                size_ids: torch.Tensor | None, dtype: torch.dtype, guidance_scale: float | None) -> torch.Tensor:
        """As ``FluxPipeline`` calls the transformer: packed latents, timesteps in [0, 1], text ids at
        zero, and dev's guidance embedding told ``guidance_scale``."""
        batch, _, height, width = noisy.shape
        guidance = None
        if denoiser.config.guidance_embeds:
            scale = DEFAULT_FLUX_GUIDANCE if guidance_scale is None else guidance_scale
            guidance = torch.full((batch,), scale, device=noisy.device, dtype=torch.float32)
        tokens = denoiser(hidden_states=pack_latents(noisy).to(dtype), timestep=(timesteps / 1000).to(dtype),
                          guidance=guidance, pooled_projections=prompts.pooled.to(dtype),
                          encoder_hidden_states=prompts.hidden.to(dtype),
                          txt_ids=torch.zeros(prompts.hidden.shape[1], 3, device=noisy.device, dtype=dtype),
                          img_ids=image_position_ids(height, width, noisy.device, dtype), return_dict=False)[0]
        return unpack_latents(tokens, height, width)
