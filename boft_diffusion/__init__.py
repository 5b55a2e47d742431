"""Orthogonal Butterfly (BOFT) finetuning for diffusers models, with PEFT-compatible files."""

from .core import __version__ as __version__
from .core.adapters import (
    active_adapter,
    adapter_configs,
    apply_boft,
    compile_adapted,
    count_trainable_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    merge_adapter,
    set_adapter,
    set_adapter_strength,
    set_batched_rotations,
    set_training_fold,
    unmerge_adapter,
)
from .core.config import BOFTConfig
from .core.files import load_adapter, save_adapter
from .core.quantize import dequantize_linears, quantize_linears
from .families.loading import load_pipeline

__all__ = [
    "BOFTConfig",
    "active_adapter",
    "adapter_configs",
    "apply_boft",
    "compile_adapted",
    "count_trainable_parameters",
    "delete_adapter",
    "dequantize_linears",
    "disable_adapters",
    "enable_adapters",
    "load_adapter",
    "load_pipeline",
    "merge_adapter",
    "quantize_linears",
    "save_adapter",
    "set_adapter",
    "set_adapter_strength",
    "set_batched_rotations",
    "set_training_fold",
    "unmerge_adapter",
]
