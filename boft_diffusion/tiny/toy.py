"""The toy UNet config, declared once for the tests and the benchmarks' smoke runs."""

from __future__ import annotations

from typing import Any


def toy_unet_config(width: int = 32, cross_attention_dim: int = 32, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``diffusers.UNet2DConditionModel`` for a two-level UNet of toy width.

    It builds in milliseconds on a CPU yet holds every layer kind an adapter targets (attention
    projections at the outer level, ResNet convs at both); ``overrides`` replace single fields.
    """
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (width, 2 * width),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        **overrides,
    }
