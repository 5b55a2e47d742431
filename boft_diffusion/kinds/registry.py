"""The adapter kinds a recipe, a baseline run or a benchmark can train, by name, each with one
configuration: ``boft`` (ours), ``lora`` and ``oft`` (PEFT's, as same-budget baselines).

Every kind answers the same questions: put adapters on a model, save them, load them back,
count what trains, and give the model's weights with the adapter merged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapters import apply_boft, disable_adapters, enable_adapters, merged_state_dict
from ..core.config import BOFTConfig
from ..core.files import load_adapter, save_adapter
from .peft_baselines import apply_lora, apply_oft, load_peft_adapter, peft_merged_state_dict, save_peft_adapter


@dataclass(frozen=True)
class AdapterSpec:
    """What to put on a model: the kind, its targets, and the kind's own size settings (BOFT's
    config, LoRA's rank, OFT's block size)."""

    kind: str
    target_modules: list[str]
    boft: BOFTConfig | None = None
    lora_rank: int | None = None
    oft_block_size: int | None = None


@dataclass(frozen=True)
class AdapterKind:
    name: str
    apply: Callable[[nn.Module, AdapterSpec], None]
    save: Callable[..., object]  # (model, folder, metadata=...)
    load: Callable[[nn.Module, str | os.PathLike], object]
    merged_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]
    #: Whether a fresh adapter must be switched off to sample the base model (a fresh BOFT with
    #: dropout or a magnitude is the identity only when disabled; a fresh LoRA or OFT is the identity).
    switch_off_for_base: bool


def _apply_boft(model: nn.Module, spec: AdapterSpec) -> None:
    apply_boft(model, spec.boft.replace(target_modules=list(spec.target_modules)))


def _apply_lora(model: nn.Module, spec: AdapterSpec) -> None:
    apply_lora(model, spec.lora_rank, list(spec.target_modules))


def _apply_oft(model: nn.Module, spec: AdapterSpec) -> None:
    apply_oft(model, spec.oft_block_size, list(spec.target_modules))


ADAPTER_KINDS: dict[str, AdapterKind] = {
    "boft": AdapterKind("boft", _apply_boft, save_adapter, load_adapter, merged_state_dict, True),
    "lora": AdapterKind("lora", _apply_lora, save_peft_adapter, load_peft_adapter, peft_merged_state_dict, False),
    "oft": AdapterKind("oft", _apply_oft, save_peft_adapter, load_peft_adapter, peft_merged_state_dict, False),
}


def adapter_kind(name: str) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {name!r}; known: {', '.join(ADAPTER_KINDS)}.")
    return ADAPTER_KINDS[name]


def set_adapters_enabled(models: Any, enabled: bool) -> None:
    """Switch BOFT adapters (and learned identifiers) on or off in every module of ``models``."""
    for module in models:
        (enable_adapters if enabled else disable_adapters)(module)
