"""Injecting adapters into a model and their lifecycle: several named adapters, strength,
enable/disable, merge, delete.

The lifecycle covers every adapter module of a model: BOFT layers and learned identifier
embeddings alike, so switching or scaling an adapter switches or scales all of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, get_args

import torch
from torch import nn

from .butterfly import BlockGeometry, full_butterfly_geometry, resolve_geometry
from .config import BOFTConfig
from .identifier import IdentifierEmbedding
from .layers import (
    BiasShift,
    BOFTConv2d,
    BOFTLayer,
    BOFTLinear,
    RotationBank,
    TrainingFold,
    check_adapter_name,
    rotated_dim,
)
from .modules import set_submodule
from .quantize import refuse_quantized

_CONFIGS_ATTR = "_boft_configs"
_ACTIVE_ATTR = "_boft_active_adapter"
_BANK_ATTR = "_boft_rotation_bank"
_BATCHED_ATTR = "_boft_batched_rotations"
_FOLD_ATTR = "_boft_training_fold"


# Finding and wrapping modules ------------------------------------------------------------------
def boft_layers(model: nn.Module) -> Iterator[tuple[str, BOFTLayer]]:
    """Every adapted layer with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, BOFTLayer):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, BOFTConfig]:
    """The adapters on ``model`` by name (empty for a model without any)."""
    configs = getattr(model, _CONFIGS_ATTR, None)
    if configs is None:
        configs = {}
        setattr(model, _CONFIGS_ATTR, configs)
    return configs


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, _ACTIVE_ATTR, None)


def bias_shifts(model: nn.Module) -> Iterator[tuple[str, nn.Module, BiasShift]]:
    """Every module carrying adapters' trained biases, with its path and its shift."""
    for name, module in model.named_modules():
        shift = BiasShift.of(module)
        if shift is not None:
            yield name, module, shift


def matches_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list of module-name suffixes, or one regular expression on the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def wrapper_class(module: nn.Module) -> type[BOFTLayer] | None:
    if isinstance(module, BOFTLayer):
        return type(module)
    if isinstance(module, nn.Linear):
        return BOFTLinear
    if isinstance(module, nn.Conv2d):
        return BOFTConv2d
    return None


def _wrap(model: nn.Module, name: str) -> BOFTLayer:
    module = model.get_submodule(name)
    if isinstance(module, BOFTLayer):
        return module
    layer = wrapper_class(module)(module, name)
    set_submodule(model, name, layer)
    shift = BiasShift.of(module)
    if shift is not None:
        shift.move(module, layer)
    return layer


def _find_targets(model: nn.Module, config: BOFTConfig) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name or name.endswith("base_layer"):
            continue
        if not matches_target(name, config.target_modules):
            continue
        if wrapper_class(module) is None:
            raise ValueError(
                f"{name}: target module is a {type(module).__name__}; BOFT adapts nn.Linear and nn.Conv2d only."
            )
        found.append((name, module))
    if not found:
        sample = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:8]
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no Linear or Conv2d module; "
            f"module names look like: {sample}"
        )
    return found


# Adapter lifecycle ------------------------------------------------------------------------------
def apply_boft(model: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to every target module, make it active and the only trainable part.

    All module geometries are checked before the model is touched, so an invalid configuration
    raises ValueError and leaves the model unchanged.
    """
    configs = adapter_configs(model)
    check_adapter_name(adapter_name)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it or choose another name.")
    targets = _find_targets(model, config)
    geometries = {name: _geometry(module, config, name) for name, module in targets}
    add_adapter_layers(model, adapter_name, config, geometries)
    configs[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def _geometry(module: nn.Module, config: BOFTConfig, name: str) -> BlockGeometry:
    dim = rotated_dim(module, config.side)
    if config.full_butterfly:
        if not config.block_size:
            raise ValueError("full_butterfly derives each layer's block number: give a block_size, not a block_num.")
        return full_butterfly_geometry(dim, config.block_size, name)
    return resolve_geometry(dim, config.block_size, config.block_num, config.n_butterfly_factor, name)


def add_adapter_layers(
    model: nn.Module, adapter_name: str, config: BOFTConfig, geometries: dict[str, BlockGeometry]
) -> None:
    for name, geometry in geometries.items():
        layer = _wrap(model, name)
        layer.add_adapter(adapter_name, geometry, config.dropout, config.cayley_neumann_terms, config.scale,
                          config.side)
    install_rotation_bank(model)


# Building all layers' rotations together -------------------------------------------------------
def install_rotation_bank(model: nn.Module) -> None:
    """Make every forward of ``model`` build its adapted layers' rotations in one batched call.

    A forward pre-hook lends each layer its blocks (or its folded inference weight) and a forward
    hook takes them back, so each forward builds once: in training every micro-batch of gradient
    accumulation gets its own graph and dropout draw, and adapter switches, strength changes,
    enable/disable and merges between forwards are seen by the next one. Installing again (new
    layers) only makes the next forward look the layers up anew.
    """
    if _BATCHED_ATTR not in model.__dict__:
        model.register_forward_pre_hook(_lend_rotations)
        model.register_forward_hook(_reclaim_rotations, always_call=True)
        setattr(model, _BATCHED_ATTR, True)
    setattr(model, _BANK_ATTR, None)


def set_batched_rotations(model: nn.Module, enabled: bool) -> None:
    """Switch the batched build off (every layer builds its own blocks, as a layer called alone
    does) or back on; for comparisons and debugging, the numbers are the same."""
    _reclaim_rotations(model, (), None)
    setattr(model, _BATCHED_ATTR, enabled)


def set_training_fold(model: nn.Module, mode: TrainingFold) -> None:
    """Training folds rotations into all Linear weights at once ("fold": fewest kernels, for launch-bound
    GPUs) or rotates activations ("rotate": fewest FLOPs, for CPUs); "auto" (default) folds on CUDA only."""
    if mode not in get_args(TrainingFold):
        raise ValueError(f"training fold mode must be one of {get_args(TrainingFold)}, got {mode!r}.")
    setattr(model, _FOLD_ATTR, mode)
    bank = getattr(model, _BANK_ATTR, None)
    if bank is not None:
        bank.training_fold = mode


def _rotation_bank(model: nn.Module) -> RotationBank:
    bank = getattr(model, _BANK_ATTR, None)
    if bank is None:
        checkpointable = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        bank = RotationBank((layer for _, layer in boft_layers(model)), checkpointable, getattr(model, _FOLD_ATTR, "auto"))
        setattr(model, _BANK_ATTR, bank)
    return bank


# The hooks run eagerly around a compiled forward: a graph cannot check version counters.
@torch.compiler.disable
def _lend_rotations(model: nn.Module, args: tuple) -> None:
    if getattr(model, _BATCHED_ATTR, False):
        _rotation_bank(model).lend()


@torch.compiler.disable
def _reclaim_rotations(model: nn.Module, args: tuple, output: object) -> None:
    bank = getattr(model, _BANK_ATTR, None)
    if bank is not None:
        bank.reclaim()


def compile_adapted(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` ``model.forward`` in place (options as for ``torch.compile``).

    Compiling the forward rather than the module keeps the batched-rotation hooks outside the
    graph, so the graph holds no break at all; the adapted layers themselves compile without breaks
    either way (``torch.compile(model)`` works too, with a break before and after the forward).
    """
    model.forward = torch.compile(model.forward, **options)
    return model


def _mark_trainable(model: nn.Module, adapter_name: str, bias: str) -> None:
    model.requires_grad_(False)
    for _, layer in boft_layers(model):
        for name, param in list(layer.boft_skew.items()) + list(layer.boft_s.items()):
            param.requires_grad_(name == adapter_name)
        if bias == "boft_only" and adapter_name in layer.specs and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)


def require_adapter(model: nn.Module, name: str) -> BOFTConfig:
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}.")
    return configs[name]


def _is_merged(model: nn.Module) -> bool:
    return any(layer.merged is not None for _, layer in boft_layers(model)) or any(
        embedding.merged_rows is not None for embedding in identifier_embeddings(model))


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter (re-merging if the model was merged) and the trainable one."""
    config = require_adapter(model, name)
    was_merged = _is_merged(model)
    if was_merged:
        unmerge_adapter(model)
    for _, layer in boft_layers(model):
        layer.active_adapter = name if name in layer.specs else None
    for _, _, shift in bias_shifts(model):
        shift.active_adapter = name if name in shift.deltas else None
    setattr(model, _ACTIVE_ATTR, name)
    _mark_trainable(model, name, config.bias)
    if was_merged:
        merge_adapter(model)


def set_adapter_strength(model: nn.Module, alpha: float, adapter_name: str | None = None) -> None:
    """Scale an adapter: blocks ``Cayley(alpha * S)``, magnitude ``s**alpha`` and identifier rows
    ``e + alpha * (learned - e)``.

    ``alpha = 0`` gives the base model, ``1`` the trained adapter, values above 1 extrapolate.
    A merged model is re-merged at the new strength.
    """
    if not (alpha >= 0.0 and alpha < float("inf")):
        raise ValueError(f"adapter strength must be a finite number >= 0, got {alpha}.")
    name = adapter_name or active_adapter(model)
    if name is None and next(identifier_embeddings(model), None) is None:
        raise ValueError("the model has no active adapter.")
    if name is not None:
        require_adapter(model, name)
    remerge = _is_merged(model)
    if remerge:
        unmerge_adapter(model)
    for _, layer in boft_layers(model):
        if name in layer.specs:
            layer.specs[name].strength = float(alpha)
    for _, _, shift in bias_shifts(model):
        if name in shift.strengths:
            shift.strengths[name] = float(alpha)
    for embedding in identifier_embeddings(model):
        embedding.strength = float(alpha)
    if remerge:
        merge_adapter(model)


def identifier_embeddings(model: nn.Module) -> Iterator[IdentifierEmbedding]:
    return (m for m in model.modules() if isinstance(m, IdentifierEmbedding))


def _switchable(model: nn.Module) -> Iterator[Any]:
    """Adapted layers, learned identifier embeddings and bias shifts: the adapter parts of the lifecycle."""
    for module in model.modules():
        if isinstance(module, (BOFTLayer, IdentifierEmbedding)):
            yield module
        shift = BiasShift.of(module)
        if shift is not None:
            yield shift


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds adapted layers or learned identifier embeddings."""
    return next(_switchable(model), None) is not None


def disable_adapters(model: nn.Module) -> None:
    """Run the base model (unmerging first if needed) until ``enable_adapters``."""
    unmerge_adapter(model)
    for module in _switchable(model):
        module.adapters_disabled = True


def enable_adapters(model: nn.Module) -> None:
    for module in _switchable(model):
        module.adapters_disabled = False


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    """Fold the active adapter into the base weights so inference costs exactly the base model.

    With ``safe_merge`` every merged weight is computed and checked for non-finite values before
    any base weight is written. A quantised base is refused (see ``refuse_quantized``).
    """
    refuse_quantized(model, "merge the adapter")
    layers = [layer for _, layer in boft_layers(model) if layer.live_adapter() is not None]
    if safe_merge:
        with torch.no_grad():
            for layer in layers:
                if not torch.isfinite(layer.folded_weight(layer.active_adapter)).all():
                    raise ValueError(
                        f"{layer.module_name}: merging adapter {layer.active_adapter!r} gives non-finite "
                        "weights; nothing was merged."
                    )
    for layer in layers:
        layer.merge()
    for embedding in identifier_embeddings(model):
        if not embedding.adapters_disabled:
            embedding.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for module in _switchable(model):
        module.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters go back to their plain base module."""
    require_adapter(model, name)
    for _, module, shift in list(bias_shifts(model)):
        shift.remove(name)
        if not shift.deltas:
            shift.detach(module)
    for module_name, layer in list(boft_layers(model)):
        if name not in layer.specs:
            continue
        layer.delete_adapter(name)
        if not layer.specs:
            set_submodule(model, module_name, layer.base_layer)
            shift = BiasShift.of(layer)
            if shift is not None:
                shift.move(layer, layer.base_layer)
    if _BATCHED_ATTR in model.__dict__:
        setattr(model, _BANK_ATTR, None)
    del adapter_configs(model)[name]
    if active_adapter(model) == name:
        setattr(model, _ACTIVE_ATTR, None)
        model.requires_grad_(False)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict (original key names, no adapter tensors) with the active
    adapter folded into the weights: loadable by the unadapted model class."""
    refuse_quantized(model, "write a merged state dict")
    folded = {}
    with torch.no_grad():
        for name, layer in boft_layers(model):
            if layer.live_adapter() is not None:
                folded[f"{name}.base_layer.weight"] = layer.folded_weight(layer.active_adapter)
        for name, module in model.named_modules():
            if isinstance(module, IdentifierEmbedding) and not module.adapters_disabled:
                folded[f"{name}.base_layer.weight"] = module.folded_weight()
        for name, module, shift in bias_shifts(model):
            delta = shift.live_delta()
            if delta is not None:
                key = f"{name}.base_layer.bias" if isinstance(module, BOFTLayer) else f"{name}.bias"
                folded[key] = (module.bias.float() + delta.to(module.bias.device)).to(module.bias.dtype)
    return {key.replace(".base_layer.", "."): folded.get(key, value)
            for key, value in model.state_dict().items() if not is_adapter_key(key)}


def is_adapter_key(key: str) -> bool:
    return ".boft_skew." in key or ".boft_s." in key or key.endswith("." + IdentifierEmbedding.PARAMETER_SUFFIX)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict without any adapter (it must not be merged)."""
    if _is_merged(model):
        raise ValueError("the model has a merged adapter; unmerge_adapter it first.")
    refuse_quantized(model, "write the base state dict")
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter_key(k)}


