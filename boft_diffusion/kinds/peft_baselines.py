"""PEFT LoRA and PEFT OFT as same-budget baselines for the DreamBooth comparison (need `peft`)."""

from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write

#: Substrings of the parameter names each baseline trains.
TRAINED_NAMES = {"LORA": "lora_", "OFT": "oft_"}


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("--adapter_type lora / oft needs the peft package: pip install peft") from error
    return peft


def _inject(model: nn.Module, config) -> None:
    _peft().inject_adapter_in_model(config, model)
    model._boft_peft_config = config


def apply_lora(model: nn.Module, rank: int, target_modules: list[str]) -> None:
    """Inject LoRA layers (B = 0, so the model starts unchanged); only they train."""
    _inject(model, _peft().LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=target_modules))


def apply_oft(model: nn.Module, block_size: int, target_modules: list[str]) -> None:
    """Inject PEFT's OFT (block-diagonal orthogonal, the butterfly's m = 1, with PEFT's own code) with
    the exact Cayley transform, as our BOFT uses; a fresh OFT is the identity."""
    peft = _peft()
    config = peft.OFTConfig(r=0, oft_block_size=block_size, target_modules=target_modules, init_weights=True,
                            use_cayley_neumann=False)
    _inject(model, config)
    for module in model.modules():
        if isinstance(module, peft.tuners.oft.layer.Conv2d):
            module.forward = types.MethodType(_oft_conv_forward, module)


def _oft_conv_forward(layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's unmerged OFT Conv2d rotates stride-1 unpadded patches of the input and folds them back,
    summing the overlaps, so even a fresh adapter changes a 3x3 convolution (peft 0.21.2) and training
    and sampling would see another model than the merged one. Convolve with the rotated filters
    instead: the weight PEFT's own merge writes, W R^T over each flattened filter."""
    adapters = [name for name in layer.active_adapters if name in layer.oft_R]
    if layer.disable_adapters or layer.merged or not adapters:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.get_base_layer()
    weight = base.weight
    filters = weight.reshape(weight.shape[0], -1)
    for name in adapters:
        filters = filters @ layer.get_delta_weight(name).to(weight.dtype).T
    return base._conv_forward(x, filters.reshape(weight.shape), base.bias)


def _kind(config) -> str:
    """"LORA" or "OFT" (PEFT keeps the type as an enum in memory, a string in files)."""
    return getattr(config.peft_type, "value", config.peft_type)


def peft_parameter_count(model: nn.Module) -> int:
    """Parameters the injected baseline trains."""
    marker = TRAINED_NAMES[_kind(model._boft_peft_config)]
    return sum(p.numel() for n, p in model.named_parameters() if marker in n)


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """PEFT's layout: adapter_config.json and adapter_model.safetensors."""
    peft = _peft()
    state = {k: v.detach().float().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    config = model._boft_peft_config.to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["peft_type"] = _kind(model._boft_peft_config)
    config["boft_diffusion"] = metadata or {}
    atomic_write(folder, {
        WEIGHTS_NAME: lambda tmp: save_file(state, tmp),
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)),
    })


def load_peft_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Put a LoRA or OFT folder written by :func:`save_peft_adapter` on ``model``."""
    peft = _peft()
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    kind = config.get("peft_type")
    if kind == "LORA":
        apply_lora(model, int(config["r"]), list(config["target_modules"]))
    elif kind == "OFT":
        apply_oft(model, int(config["oft_block_size"]), list(config["target_modules"]))
    else:
        raise ValueError(f"{folder / CONFIG_NAME}: peft_type {kind!r} is not a baseline this reads (LORA, OFT)")
    result = peft.set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS_NAME)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: {kind} tensors this model lacks: {result.unexpected_keys[:3]}")


def peft_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict (original key names) with the baseline merged into its
    weights, by PEFT's own merge on a copy: the model itself stays unmerged."""
    peft = _peft()
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module.merge()
    marker = TRAINED_NAMES[_kind(model._boft_peft_config)]
    return {key.replace(".base_layer.", "."): value for key, value in merged.state_dict().items() if marker not in key}
