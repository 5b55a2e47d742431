"""Orthogonal Butterfly (BOFT) finetuning for diffusers models, with PEFT-compatible files."""

__version__ = "0.1.0"

from .config import BOFTConfig
from .loading import load_pipeline
from .model import (
    active_adapter,
    adapter_configs,
    apply_boft,
    count_trainable_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
    set_adapter_strength,
    unmerge_adapter,
)

__all__ = [
    "BOFTConfig",
    "active_adapter",
    "adapter_configs",
    "apply_boft",
    "count_trainable_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "load_adapter",
    "load_pipeline",
    "merge_adapter",
    "save_adapter",
    "set_adapter",
    "set_adapter_strength",
    "unmerge_adapter",
]
