"""Sampling inside a training run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _DecodeInOwnDtype:
    """The VAE's decode with autocast off and the latents cast to the VAE's dtype."""

    def __init__(self, vae: nn.Module, decode: Any) -> None:
        self.vae, self.decode = vae, decode

    def __call__(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return self.decode(latents.to(self.vae.dtype), *args, **kwargs)


@contextmanager
def vae_decodes_in_own_dtype(vae: nn.Module) -> Iterator[None]:
    """While a pipeline samples inside the trainer's autocast, decode its latents in the VAE's own
    dtype: the pipeline hands over the UNet's half-precision latents, and autocast would run even a
    float32 VAE in half precision, where SDXL's overflows. Nested uses keep the outer one."""
    if isinstance(vae.__dict__.get("decode"), _DecodeInOwnDtype):
        yield
        return
    vae.decode = _DecodeInOwnDtype(vae, vae.decode)
    try:
        yield
    finally:
        del vae.decode
