"""PEFT LoRA as a same-budget baseline for the DreamBooth comparison (needs the `peft` package)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..core.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("--adapter_type lora needs the peft package: pip install peft") from error
    return peft


def apply_lora(model: nn.Module, rank: int, target_modules: list[str]) -> None:
    """Inject LoRA layers (B = 0, so the model starts unchanged); only they train."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=target_modules)
    peft.inject_adapter_in_model(config, model)
    model._boft_lora_config = config


def save_lora(model: nn.Module, folder: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """PEFT's LoRA layout: adapter_config.json and adapter_model.safetensors."""
    peft = _peft()
    state = {k: v.detach().float().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    config = model._boft_lora_config.to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["peft_type"] = "LORA"
    config["boft_diffusion"] = metadata or {}
    atomic_write(folder, {
        WEIGHTS_NAME: lambda tmp: save_file(state, tmp),
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)),
    })


def load_lora(model: nn.Module, folder: str | os.PathLike) -> None:
    peft = _peft()
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    apply_lora(model, int(config["r"]), list(config["target_modules"]))
    result = peft.set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS_NAME)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: LoRA tensors this model lacks: {result.unexpected_keys[:3]}")
