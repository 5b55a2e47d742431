"""Adapter files: PEFT's BOFT layout (``adapter_config.json``, ``adapter_model.safetensors``), the
learned identifier file, and the atomic writes (of a file, of a folder) every output of this library
goes through.

Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import (
    adapter_configs,
    add_adapter_layers,
    boft_layers,
    require_adapter,
    set_adapter,
    wrapper_class,
)
from .butterfly import BlockGeometry, resolve_geometry
from .config import BOFTConfig
from .identifier import identifier_embedding, install_identifier_embeddings, token_ids
from .layers import ADAPTER_NAME_PATTERN, BOFTLayer, check_adapter_name, rotated_dim

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: The learned identifier vectors, one per word (``{"sks": tensor[hidden_size]}``): the file name
#: diffusers gives textual-inversion embeddings.
EMBEDDINGS_NAME = "learned_embeds.safetensors"


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` in PEFT's key names and shapes (CPU, float32, contiguous)."""
    config = require_adapter(model, adapter_name)
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


def atomic_write(folder: str | os.PathLike, files: dict[str, Callable[[str], object]]) -> Path:
    """Write each file of ``folder`` through ``writer(temporary_path)`` and rename it into place,
    so that an interrupted write leaves the previous file intact."""
    folder = Path(folder)
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
    return folder


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to fill; a block that ends without error
    renames it to ``final`` (replacing any folder there), one that fails removes it. Readers see
    the whole folder or none of it; ``fsync`` flushes its files to disk before the rename."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    config = require_adapter(model, adapter_name)
    if metadata:
        config = config.replace(metadata={**config.metadata, **metadata})
    tensors = adapter_state_dict(model, adapter_name)
    config_json = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True)
    folder = Path(path)

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(config_json + "\n")

    def write_weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": "pt"})

    atomic_write(folder, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})
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
        if module is None or wrapper_class(module) is None:
            raise ValueError(
                f"adapter module {module_name!r} does not exist in this model as a Linear or Conv2d; "
                "the adapter was made for another model."
            )
        if "boft_R" not in parts:
            raise ValueError(f"adapter file has no boft_R for module {module_name!r}.")
        base = module.base_layer if isinstance(module, BOFTLayer) else module
        boft_r = parts["boft_R"]
        dim, out = rotated_dim(base), base.weight.shape[0]
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
    add_adapter_layers(model, adapter_name, config, geometries)
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


def save_identifier_embeddings(text_encoder: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the learned vectors to ``folder/learned_embeds.safetensors`` atomically."""
    layer = identifier_embedding(text_encoder)
    if layer is None:
        raise ValueError("the text encoder has no learned identifier embeddings.")
    vectors = layer.identifier_vectors.detach().float().cpu()
    tensors = {word: vectors[i].contiguous() for i, word in enumerate(layer.words)}
    atomic_write(folder, {EMBEDDINGS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})})
    return Path(folder) / EMBEDDINGS_NAME


def read_identifier_embeddings(
    folder: str | os.PathLike, text_encoder: nn.Module, tokenizer
) -> dict[str, torch.Tensor] | None:
    """The vectors of ``folder/learned_embeds.safetensors`` by word, checked against this text
    encoder and tokenizer, or None without that file.

    A file for another model (vectors of another width, words this tokenizer does not hold as
    one token) or an unreadable one raises ValueError naming it.
    """
    path = Path(folder) / EMBEDDINGS_NAME
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for word, vector in tensors.items():
        if vector.shape != (width,):
            raise ValueError(f"{path}: the vector for {word!r} has shape {list(vector.shape)}, but this text "
                             f"encoder embeds tokens in {width} dimensions; it was made for another model.")
    token_ids(tokenizer, list(tensors))
    return tensors


def load_identifier_embeddings(text_encoder: nn.Module, tokenizer, folder: str | os.PathLike) -> bool:
    """Install the vectors of ``folder/learned_embeds.safetensors`` if the file exists.

    Returns whether it did. A file for another text encoder (other width, or words this
    tokenizer does not hold as one token) raises ValueError and changes nothing.
    """
    vectors = read_identifier_embeddings(folder, text_encoder, tokenizer)
    if vectors is None:
        return False
    install_identifier_embeddings(text_encoder, tokenizer, vectors)
    return True
