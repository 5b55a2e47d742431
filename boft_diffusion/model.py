"""Injecting adapters into a model, managing several of them, and PEFT-compatible files."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .butterfly import BlockGeometry, resolve_geometry
from .config import BOFTConfig
from .layers import ADAPTER_NAME_PATTERN, BOFTConv2d, BOFTLayer, BOFTLinear, IdentifierEmbedding

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_CONFIGS_ATTR = "_boft_configs"
_ACTIVE_ATTR = "_boft_active_adapter"

__all__ = [
    "apply_boft",
    "save_adapter",
    "load_adapter",
    "set_adapter",
    "set_adapter_strength",
    "disable_adapters",
    "enable_adapters",
    "merge_adapter",
    "unmerge_adapter",
    "delete_adapter",
    "count_trainable_parameters",
    "adapter_configs",
    "active_adapter",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "boft_layers",
    "merged_state_dict",
    "base_state_dict",
]


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


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrapper_class(module: nn.Module) -> type[BOFTLayer] | None:
    if isinstance(module, BOFTLayer):
        return type(module)
    if isinstance(module, nn.Linear):
        return BOFTLinear
    if isinstance(module, nn.Conv2d):
        return BOFTConv2d
    return None


def _rotated_dim(module: nn.Module) -> int:
    return module.weight[0].numel()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _wrap(model: nn.Module, name: str) -> BOFTLayer:
    module = model.get_submodule(name)
    if isinstance(module, BOFTLayer):
        return module
    layer = _wrapper_class(module)(module, name)
    _set_submodule(model, name, layer)
    return layer


def _find_targets(model: nn.Module, config: BOFTConfig) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name or name.endswith("base_layer"):
            continue
        if not _matches(name, config.target_modules):
            continue
        if _wrapper_class(module) is None:
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
    geometries = {
        name: resolve_geometry(
            _rotated_dim(module), config.block_size, config.block_num, config.n_butterfly_factor, name
        )
        for name, module in targets
    }
    _add_adapter_layers(model, adapter_name, config, geometries)
    configs[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_PATTERN.match(name):
        raise ValueError(f"invalid adapter name {name!r}: start with a letter or '_', then letters, digits, '_' or '-'.")


def _add_adapter_layers(
    model: nn.Module, adapter_name: str, config: BOFTConfig, geometries: dict[str, BlockGeometry]
) -> None:
    for name, geometry in geometries.items():
        layer = _wrap(model, name)
        layer.add_adapter(adapter_name, geometry, config.dropout, config.cayley_neumann_terms, config.scale)


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


def _require_adapter(model: nn.Module, name: str) -> BOFTConfig:
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}.")
    return configs[name]


def _is_merged(model: nn.Module) -> bool:
    return any(layer.merged is not None for _, layer in boft_layers(model))


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter (re-merging if the model was merged) and the trainable one."""
    config = _require_adapter(model, name)
    was_merged = _is_merged(model)
    if was_merged:
        unmerge_adapter(model)
    for _, layer in boft_layers(model):
        layer.active_adapter = name if name in layer.specs else None
    setattr(model, _ACTIVE_ATTR, name)
    _mark_trainable(model, name, config.bias)
    if was_merged:
        merge_adapter(model)


def set_adapter_strength(model: nn.Module, alpha: float, adapter_name: str | None = None) -> None:
    """Scale an adapter: blocks ``Cayley(alpha * S)`` and magnitude ``s**alpha``.

    ``alpha = 0`` gives the base model, ``1`` the trained adapter, values above 1 extrapolate.
    A merged model is re-merged at the new strength.
    """
    if not (alpha >= 0.0 and alpha < float("inf")):
        raise ValueError(f"adapter strength must be a finite number >= 0, got {alpha}.")
    name = adapter_name or active_adapter(model)
    if name is None:
        raise ValueError("the model has no active adapter.")
    _require_adapter(model, name)
    remerge = any(layer.merged is not None and layer.merged[0] == name for _, layer in boft_layers(model))
    if remerge:
        unmerge_adapter(model)
    for _, layer in boft_layers(model):
        if name in layer.specs:
            layer.specs[name].strength = float(alpha)
    if remerge:
        merge_adapter(model)


def _switchable(model: nn.Module) -> Iterator[nn.Module]:
    """Adapted layers and learned identifier embeddings: what disabling an adapter turns off."""
    return (m for m in model.modules() if isinstance(m, (BOFTLayer, IdentifierEmbedding)))


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
    any base weight is written.
    """
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


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in boft_layers(model):
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters go back to their plain base module."""
    _require_adapter(model, name)
    for module_name, layer in list(boft_layers(model)):
        if name not in layer.specs:
            continue
        layer.delete_adapter(name)
        if not layer.specs:
            _set_submodule(model, module_name, layer.base_layer)
    del adapter_configs(model)[name]
    if active_adapter(model) == name:
        setattr(model, _ACTIVE_ATTR, None)
        model.requires_grad_(False)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_file_parameters(path: str | os.PathLike) -> int | None:
    """Trainable parameters stored in a safetensors file: b(b-1)/2 per BOFT block, every other tensor in full."""
    path = Path(path)
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            if key.endswith("boft_R"):
                m, n, b, _ = shape
                total += m * n * b * (b - 1) // 2
            else:
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict (original key names, no adapter tensors) with the active
    adapter folded into the weights: loadable by the unadapted model class."""
    folded = {}
    with torch.no_grad():
        for name, layer in boft_layers(model):
            if layer.live_adapter() is not None:
                folded[f"{name}.base_layer.weight"] = layer.folded_weight(layer.active_adapter)
        for name, module in model.named_modules():
            if isinstance(module, IdentifierEmbedding) and not module.adapters_disabled:
                folded[f"{name}.base_layer.weight"] = module.folded_weight()
    return {key.replace(".base_layer.", "."): folded.get(key, value)
            for key, value in model.state_dict().items() if not _is_adapter_key(key)}


def _is_adapter_key(key: str) -> bool:
    return ".boft_skew." in key or ".boft_s." in key or key.endswith("." + IdentifierEmbedding.PARAMETER_SUFFIX)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict without any adapter (it must not be merged)."""
    if _is_merged(model):
        raise ValueError("the model has a merged adapter; unmerge_adapter it first.")
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not _is_adapter_key(k)}


# State dicts and files ---------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` in PEFT's key names and shapes (CPU, float32, contiguous)."""
    config = _require_adapter(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    adapted_biases = set()
    for name, layer in boft_layers(model):
        if adapter_name not in layer.specs:
            continue
        boft_r, boft_s = layer.peft_tensors(adapter_name)
        tensors[f"{PEFT_PREFIX}{name}.boft_R"] = boft_r.cpu()
        tensors[f"{PEFT_PREFIX}{name}.boft_s"] = boft_s.cpu()
        if config.bias != "none" and layer.bias is not None:
            tensors[f"{PEFT_PREFIX}{name}.base_layer.bias"] = layer.bias.detach().float().cpu().contiguous()
            adapted_biases.add(f"{name}.base_layer.bias")
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias") and name not in adapted_biases:
                # a layer wrapped only for another adapter is written under its plain name
                tensors[f"{PEFT_PREFIX}{name.replace('.base_layer.', '.')}"] = param.detach().float().cpu().contiguous()
    return tensors


def _atomic_write(folder: Path, files: dict[str, Any]) -> None:
    """Write each file to a temporary name in ``folder`` and rename it into place."""
    folder.mkdir(parents=True, exist_ok=True)
    for filename, writer in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, folder / filename)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout) to ``path``.

    ``metadata`` (training prompt, steps, ...) is stored with the config under ``boft_diffusion``.
    Files are replaced atomically: an interrupted save leaves the previous adapter intact.
    """
    config = _require_adapter(model, adapter_name)
    if metadata:
        config = config.replace(metadata={**config.metadata, **metadata})
    tensors = adapter_state_dict(model, adapter_name)
    config_json = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True)
    folder = Path(path)

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(config_json + "\n")

    def write_weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": "pt"})

    _atomic_write(folder, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})
    return folder


def read_adapter_config(path: str | os.PathLike) -> BOFTConfig:
    """The BOFTConfig of an adapter folder, with a clear error if it is missing or malformed."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not an adapter folder.")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} does not hold a JSON object.")
    return BOFTConfig.from_peft_dict(data)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found (only safetensors adapter files are read).")
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from error


def _split_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.a.b.boft_R`` -> (``a.b``, ``boft_R``)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    for suffix in (".boft_R", ".boft_s", ".base_layer.bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, ""


def load_adapter_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: BOFTConfig, adapter_name: str
) -> None:
    """Create adapter ``adapter_name`` from PEFT-layout tensors; the model is unchanged on error.

    The butterfly depth of each module is read from its ``boft_R`` shape, never from the config.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it or choose another name.")
    modules = dict(model.named_modules())
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    plain_biases: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module_name, kind = _split_peft_key(key)
        if kind:
            per_module.setdefault(module_name, {})[kind] = tensor
        elif key.endswith(".bias"):
            plain_biases[module_name[: -len(".bias")]] = tensor
        else:
            raise ValueError(f"adapter file holds an unexpected tensor {key!r}.")
    if not per_module:
        raise ValueError("adapter file holds no boft_R tensors.")

    geometries: dict[str, BlockGeometry] = {}
    for module_name, parts in per_module.items():
        module = modules.get(module_name)
        if module is None or _wrapper_class(module) is None:
            raise ValueError(
                f"adapter module {module_name!r} does not exist in this model as a Linear or Conv2d; "
                "the adapter was made for another model."
            )
        if "boft_R" not in parts:
            raise ValueError(f"adapter file has no boft_R for module {module_name!r}.")
        base = module.base_layer if isinstance(module, BOFTLayer) else module
        boft_r = parts["boft_R"]
        dim, out = _rotated_dim(base), base.weight.shape[0]
        if boft_r.dim() != 4 or boft_r.shape[2] != boft_r.shape[3] or boft_r.shape[1] * boft_r.shape[2] != dim:
            raise ValueError(
                f"{module_name}: adapter boft_R has shape {list(boft_r.shape)} but the module's rotated "
                f"dimension is {dim} (expected [m, N, b, b] with N * b = {dim}); the adapter was made for another model."
            )
        m, n, b, _ = boft_r.shape
        try:
            geometries[module_name] = resolve_geometry(dim, b, 0, m, module_name)
        except ValueError as error:
            raise ValueError(f"adapter file: {error}") from error
        boft_s = parts.get("boft_s")
        if boft_s is not None and boft_s.numel() != out:
            raise ValueError(
                f"{module_name}: adapter boft_s has shape {list(boft_s.shape)} but the module has {out} outputs."
            )
        bias = parts.get("base_layer.bias")
        if bias is not None and (base.bias is None or bias.shape != base.bias.shape):
            expected = None if base.bias is None else list(base.bias.shape)
            raise ValueError(f"{module_name}: adapter bias has shape {list(bias.shape)}, module bias {expected}.")
    params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}
    for name, bias in plain_biases.items():
        target = params.get(f"{name}.bias")
        if target is None or target.shape != bias.shape:
            raise ValueError(f"adapter bias {name}.bias does not match a bias of this model.")

    depths = {g.n_factors for g in geometries.values()}
    if depths != {config.n_butterfly_factor}:
        warnings.warn(
            f"adapter config says n_butterfly_factor={config.n_butterfly_factor} but its tensors hold "
            f"{sorted(depths)} factors; using the tensors' depth.",
            stacklevel=3,
        )
        config = config.replace(n_butterfly_factor=max(depths))
    _add_adapter_layers(model, adapter_name, config, geometries)
    for module_name, parts in per_module.items():
        layer = model.get_submodule(module_name)
        layer.load_peft_tensors(adapter_name, parts["boft_R"], parts.get("boft_s"))
        if "base_layer.bias" in parts:
            with torch.no_grad():
                layer.bias.copy_(parts["base_layer.bias"])
    with torch.no_grad():
        for name, bias in plain_biases.items():
            params[f"{name}.bias"].copy_(bias)
    adapter_configs(model)[adapter_name] = config


def adapter_name_from(text: str) -> str:
    """A valid adapter name made from free text (a folder or file name)."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "adapter"
    return name if ADAPTER_NAME_PATTERN.match(name) else f"adapter_{name}"


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Load an adapter folder saved by us or by PEFT's BOFT, make it active and return its name.

    Reads JSON and safetensors only. A file for another model (missing module, wrong shape)
    raises ValueError naming the module and both shapes, and leaves the model unchanged.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist.")
    config = read_adapter_config(folder)
    tensors = _read_tensors(folder)
    name = adapter_name or ("default" if "default" not in adapter_configs(model) else adapter_name_from(folder.resolve().name))
    load_adapter_state_dict(model, tensors, config, name)
    set_adapter(model, name)
    return name

