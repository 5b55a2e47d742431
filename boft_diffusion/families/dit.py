"""What the transformer (DiT) families share: a ``transformer`` denoiser trained with rectified
flow, attention on both the image and the text stream, T5 beside CLIP, and text encoders that
leave the accelerator once prompts are cached."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, TextEncoder, module_device
from .flow import FlowMatchingObjective, TimestepDensity
from .loading import PIPELINE_CLASSES, TRANSFORMER_CLASSES
from .sd import token_ids

#: The joint-attention projections of both streams (Flux single blocks have to_q, to_k, to_v only).
DIT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def encoder_token_ids(encoder: TextEncoder, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """``prompts`` as the encoder's token ids, on the encoder's own device (it may wait on the CPU)."""
    return token_ids(encoder.tokenizer, prompts, module_device(encoder.module), max_length)


def t5_states(encoder: TextEncoder, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """T5's last hidden states, as both pipelines take them."""
    return encoder.module(encoder_token_ids(encoder, prompts, max_length))[0].to(device)


class TransformerFamily(ModelFamily):
    """A diffusers transformer pipeline trained by flow matching; subclasses encode and denoise."""

    denoiser_name = "transformer"
    default_target_modules = DIT_TARGET_MODULES
    supports_control = False
    offloads_text_encoders = True
    #: T5 tokens per prompt when --max_sequence_length is left out (the pipeline's default).
    default_sequence_length = 256

    def matches(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(pipe).__name__ == PIPELINE_CLASSES[self.name]
                or type(transformer).__name__ == TRANSFORMER_CLASSES[self.name])

    def objective(self, pipe: Any, density: TimestepDensity) -> FlowMatchingObjective:
        return FlowMatchingObjective.from_pipeline(pipe, density)

    def native_resolution(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def sequence_length(self, max_sequence_length: int | None) -> int:
        return max_sequence_length or self.default_sequence_length

    def sampling_kwargs(self, resolution: int, max_sequence_length: int | None) -> dict[str, Any]:
        """Validation at the training size and T5 length (the pipelines default to 1024 px)."""
        return {"height": resolution, "width": resolution,
                "max_sequence_length": self.sequence_length(max_sequence_length)}
