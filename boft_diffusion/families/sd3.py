"""Stable Diffusion 3 and 3.5 (MMDiT): two CLIP encoders and T5 side by side, the CLIP states padded
to T5's width and joined before T5's along the sequence, both CLIPs' pooled projections joined."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import EncodedPrompts, TextEncoder
from .dit import TransformerFamily, encoder_token_ids, t5_states


class StableDiffusion3(TransformerFamily):
    name = "sd3"

    def text_encoders(self, pipe: Any) -> list[TextEncoder]:
        if pipe.text_encoder_3 is None:
            raise ValueError("this SD3 pipeline has no T5 (text_encoder_3); load it with its T5 encoder to train.")
        return [TextEncoder("text_encoder", pipe.text_encoder, pipe.tokenizer),
                TextEncoder("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2),
                TextEncoder("text_encoder_3", pipe.text_encoder_3, pipe.tokenizer_3, trainable=False)]

    def encode_prompts(self, encoders: list[TextEncoder], prompts: list[str], device: torch.device,
                       max_sequence_length: int | None = None) -> EncodedPrompts:
        """As ``StableDiffusion3Pipeline.encode_prompt`` (no clip skip)."""
        states, pooled = [], []
        for clip in encoders[:2]:
            output = clip.module(encoder_token_ids(clip, prompts), output_hidden_states=True)
            pooled.append(output[0].to(device))
            states.append(output.hidden_states[-2].to(device))
        clip_states = torch.cat(states, dim=-1)
        t5 = t5_states(encoders[2], prompts, self.sequence_length(max_sequence_length), device)
        clip_states = nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return EncodedPrompts(torch.cat([clip_states, t5.to(clip_states.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def latent_multiple(self, pipe: Any) -> int:
        """Latents are cut into patches of the transformer's patch size."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: EncodedPrompts,
                size_ids: torch.Tensor | None, dtype: torch.dtype, guidance_scale: float | None) -> torch.Tensor:
        """As ``StableDiffusion3Pipeline`` calls the transformer (timesteps in [0, 1000])."""
        return denoiser(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype),
                        encoder_hidden_states=prompts.hidden.to(dtype), pooled_projections=prompts.pooled.to(dtype),
                        return_dict=False)[0]
