"""Adapter files: PEFT's BOFT layout (``adapter_config.json``, ``adapter_model.safetensors``), the
learned identifier file, and the atomic writes (of a file, of a folder) every output of this library
goes through.

Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    matches_target,
    require_adapter,
    set_adapter,
    wrapper_class,
)
from .butterfly import BlockGeometry, resolve_geometry
from .config import BOFTConfig
from .identifier import identifier_embedding, install_identifier_embeddings, token_ids
from .layers import (
    ADAPTER_NAME_PATTERN,
    SHIFTABLE_BIAS_MODULES,
    BiasShift,
    BOFTLayer,
    check_adapter_name,
    rotated_dim,
)
from .lycoris import PEFT_PREFIX, PREFIXES, peft_layout

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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
            tensors[f"{PEFT_PREFIX}{name}.base_layer.bias"] = _trained_bias(layer, adapter_name)
            adapted_biases.add(name)
    if config.bias == "all":
        for name, _ in model.named_parameters():
            module_name = name[: -len(".bias")].removesuffix(".base_layer") if name.endswith(".bias") else None
            if module_name is not None and module_name not in adapted_biases:
                # a layer wrapped only for another adapter is written under its plain name
                tensors[f"{PEFT_PREFIX}{module_name}.bias"] = _trained_bias(model.get_submodule(module_name), adapter_name)
    return tensors


def _trained_bias(module: nn.Module, adapter_name: str) -> torch.Tensor:
    """The module's bias as adapter ``adapter_name`` sees it: the base bias plus the adapter's shift."""
    bias = module.bias.detach().float().cpu()
    shift = BiasShift.of(module)
    if shift is not None and adapter_name in shift.deltas:
        bias = bias + shift.deltas[adapter_name]
    return bias.contiguous()


#: Names of the temporaries atomic writes leave when killed: ``.<name>.<pid>.<random>.tmp`` (a file),
#: ``.<name>.tmp-<pid>`` (a folder) and ``.<name>.trash-<pid>`` (a folder being deleted).
TEMPORARY_NAME = re.compile(r"^\..+?\.(?:(?P<file_pid>\d+)\.[^.]+\.tmp|tmp-(?P<folder_pid>\d+)|trash-(?P<trash_pid>\d+))$")


class WriteError(OSError):
    """A file could not be written (disk full, permissions); names the file, replaced nothing."""

    def __init__(self, path: str | os.PathLike, error: BaseException) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        super().__init__(getattr(error, "errno", None), f"could not write {path}: {reason}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def write_or_explain(path: str | os.PathLike, writer: Callable[[], object]) -> None:
    """Run ``writer`` (which writes ``path``), turning an OSError or a safetensors I/O error into a WriteError."""
    try:
        writer()
    except WriteError:
        raise
    except (OSError, SafetensorError) as error:
        raise WriteError(path, error) from error


def _readable_by_others(path: str) -> None:
    """mkstemp creates files 0600; give the final file the mode a plain open() would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(folder: str | os.PathLike, files: dict[str, Callable[[str], object]]) -> Path:
    """Write each file of ``folder`` through ``writer(temporary_path)`` and rename it into place,
    so that an interrupted write leaves the previous file intact. A failed write raises
    WriteError naming the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for filename, writer in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            write_or_explain(folder / filename, lambda writer=writer, tmp=tmp: writer(tmp))
            _readable_by_others(tmp)
            os.replace(tmp, folder / filename)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace the text file ``path`` (UTF-8) as ``atomic_write`` does: readers see the old text or the new."""
    path = Path(path)
    atomic_write(path.parent, {path.name: functools.partial(write_text, text=text)})
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """A writer for :func:`atomic_write`: ``text`` to ``path`` in UTF-8."""
    Path(path).write_text(text, encoding="utf-8")


def remove_folder(folder: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway never leaves it half deleted under its own name:
    rename it to a hidden tombstone first (``remove_stale_temporaries`` finishes a killed delete)."""
    tombstone = _tombstone(folder)
    os.rename(folder, tombstone)
    shutil.rmtree(tombstone)


def _tombstone(folder: str | os.PathLike) -> Path:
    """The hidden name a folder is moved to before it is deleted (``remove_stale_temporaries`` knows it)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.trash-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of atomic writes under ``folder`` whose process is gone (killed runs);
    returns what was removed. Those of live processes (a concurrent writer) are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(".*"), key=lambda p: len(p.parts)):
        match = TEMPORARY_NAME.match(path.name)
        if match is None or not path.exists():
            continue
        pid = int(next(value for value in match.groupdict().values() if value is not None))
        if _process_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to fill; a block that ends without error
    renames it to ``final`` (replacing any folder there), one that fails removes it. Readers see
    the whole folder or none of it; ``fsync`` flushes its files to disk before the rename. A folder
    being replaced is moved aside and deleted only once the new one has its name, so a kill while
    deleting it leaves the new folder whole, not the old one half deleted."""
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
        tombstone = _tombstone(final)
        replacing = final.exists()
        if replacing:
            os.rename(final, tombstone)
        os.rename(tmp, final)
        if replacing:
            shutil.rmtree(tombstone)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object, with one clear ValueError for anything else (bad JSON,
    nesting too deep to parse, another type)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise ValueError(f"{path} is nested too deeply to be a configuration file.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return data


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
    data = read_json_object(config_file)
    try:
        return BOFTConfig.from_peft_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from error


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found (only safetensors adapter files are read).")
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from error


def _split_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.a.b.boft_R`` -> (``a.b``, ``boft_R``); a plain bias -> (``a.b``, ``bias``)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    for suffix in (".boft_R", ".boft_s", ".base_layer.bias", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, ""


@dataclass
class _AdapterFile:
    """An adapter file sorted by module: BOFT tensors of the modules it adapts, and trained biases."""

    boft: dict[str, dict[str, torch.Tensor]]
    biases: dict[str, torch.Tensor]


def _sort_tensors(tensors: dict[str, torch.Tensor], config: BOFTConfig) -> _AdapterFile:
    """Apply the loading rule: a file holds only what its config declares for the modules it names.

    ``boft_R`` / ``boft_s`` of modules its ``target_modules`` name; the biases of those modules
    when ``bias`` is "boft_only" or "all"; any module's bias when ``bias`` is "all". Every
    tensor must be finite floating point. Anything else is refused before a weight is touched.
    """
    sorted_file = _AdapterFile({}, {})
    layer_biases = []
    for key, tensor in tensors.items():
        module_name, kind = _split_peft_key(key)
        if not kind or not module_name:
            raise ValueError(f"adapter file holds {key!r}, which is no BOFT tensor or bias.")
        if kind in ("boft_R", "boft_s") and not matches_target(module_name, config.target_modules):
            raise ValueError(f"adapter file holds {key!r}, but its config's target_modules "
                             f"{config.target_modules!r} do not name {module_name!r}.")
        if kind == "base_layer.bias" and config.bias == "none":
            raise ValueError(f"adapter file holds the bias {key!r}, but its config says bias='none'.")
        if kind == "bias" and config.bias != "all":
            raise ValueError(f"adapter file holds the bias {key!r} of a module it does not adapt, but its "
                             f"config says bias={config.bias!r} (only 'all' trains those).")
        if not tensor.is_floating_point():
            raise ValueError(f"adapter file: {key!r} holds {tensor.dtype} values, not floating point.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter file: {key!r} holds NaN or infinite values.")
        if kind in ("boft_R", "boft_s"):
            sorted_file.boft.setdefault(module_name, {})[kind] = tensor
        else:
            sorted_file.biases[module_name] = tensor
            if kind == "base_layer.bias":
                layer_biases.append(module_name)
    if not sorted_file.boft:
        raise ValueError("adapter file holds no boft_R tensors.")
    for name in layer_biases:
        if name not in sorted_file.boft:
            raise ValueError(f"adapter file holds {name}.base_layer.bias but no boft_R for {name!r}.")
    return sorted_file


def _base_module(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, BOFTLayer) else module


def _check_boft_tensors(module_name: str, module: nn.Module | None, parts: dict[str, torch.Tensor],
                        side: str = "input") -> BlockGeometry:
    """The geometry the file's tensors give this module on ``side``, checked against its shapes."""
    if module is None or wrapper_class(module) is None:
        raise ValueError(
            f"adapter module {module_name!r} does not exist in this model as a Linear or Conv2d; "
            "the adapter was made for another model."
        )
    if "boft_R" not in parts:
        raise ValueError(f"adapter file has no boft_R for module {module_name!r}.")
    base = _base_module(module)
    boft_r = parts["boft_R"]
    dim, out = rotated_dim(base, side), base.weight.shape[0]
    if boft_r.dim() != 4 or boft_r.shape[2] != boft_r.shape[3] or boft_r.shape[1] * boft_r.shape[2] != dim:
        raise ValueError(
            f"{module_name}: adapter boft_R has shape {list(boft_r.shape)} but the module's rotated ({side} side) "
            f"dimension is {dim} (expected [m, N, b, b] with N * b = {dim}); the adapter was made for another model."
        )
    m, _, b, _ = boft_r.shape
    try:
        geometry = resolve_geometry(dim, b, 0, m, module_name)
    except ValueError as error:
        raise ValueError(f"adapter file: {error}") from error
    boft_s = parts.get("boft_s")
    if boft_s is not None and boft_s.numel() != out:
        raise ValueError(
            f"{module_name}: adapter boft_s has shape {list(boft_s.shape)} but the module has {out} outputs."
        )
    return geometry


def _check_bias(module_name: str, module: nn.Module | None, bias: torch.Tensor) -> None:
    base = None if module is None else _base_module(module)
    if base is None or getattr(base, "bias", None) is None or not isinstance(base, SHIFTABLE_BIAS_MODULES):
        raise ValueError(f"adapter bias {module_name}.bias does not match a bias of this model.")
    if bias.shape != base.bias.shape:
        raise ValueError(f"{module_name}: adapter bias has shape {list(bias.shape)}, module bias "
                         f"{list(base.bias.shape)}.")


def load_adapter_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: BOFTConfig, adapter_name: str
) -> None:
    """Create adapter ``adapter_name`` from PEFT-layout tensors; the model is unchanged on error.

    The butterfly depth of each module is read from its ``boft_R`` shape, never from the config.
    Trained biases become a shift owned by the adapter: the base weights are never written.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it or choose another name.")
    adapter_file = _sort_tensors(tensors, config)
    modules = dict(model.named_modules())
    geometries = {name: _check_boft_tensors(name, modules.get(name), parts, config.side)
                  for name, parts in adapter_file.boft.items()}
    for name, bias in adapter_file.biases.items():
        _check_bias(name, modules.get(name), bias)

    depths = {g.n_factors for g in geometries.values()}
    if depths != {config.n_butterfly_factor} and not config.full_butterfly:
        warnings.warn(
            f"adapter config says n_butterfly_factor={config.n_butterfly_factor} but its tensors hold "
            f"{sorted(depths)} factors; using the tensors' depth.",
            stacklevel=3,
        )
        config = config.replace(n_butterfly_factor=max(depths))
    add_adapter_layers(model, adapter_name, config, geometries)
    for module_name, parts in adapter_file.boft.items():
        model.get_submodule(module_name).load_peft_tensors(adapter_name, parts["boft_R"], parts.get("boft_s"))
    for module_name, bias in adapter_file.biases.items():
        module = model.get_submodule(module_name)
        BiasShift.ensure(module).add(adapter_name, bias.float() - module.bias.detach().float().cpu())
    adapter_configs(model)[adapter_name] = config


def adapter_name_from(text: str) -> str:
    """A valid adapter name made from free text (a folder or file name)."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "adapter"
    return name if ADAPTER_NAME_PATTERN.match(name) else f"adapter_{name}"


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Load an adapter folder saved by us or by PEFT's BOFT, or a LyCORIS BOFT ``.safetensors`` file
    (``oft_blocks``, as SimpleTuner and LyCORIS train them, or our ``--format lycoris`` export: its
    keys that name modules of ``model``), make it active and return its name.

    Reads JSON and safetensors only. A file for another model (missing module, wrong shape)
    raises ValueError naming the module and both shapes, and leaves the model unchanged.
    """
    folder = Path(path)
    if is_lycoris_path(folder):
        return load_lycoris_adapter(model, folder, adapter_name)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist.")
    config = read_adapter_config(folder)
    tensors = _read_tensors(folder)
    name = adapter_name or ("default" if "default" not in adapter_configs(model) else adapter_name_from(folder.resolve().name))
    load_adapter_state_dict(model, tensors, config, name)
    set_adapter(model, name)
    return name



def is_lycoris_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with LyCORIS BOFT keys (reads its header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(key.endswith(".oft_blocks") for key in handle.keys())
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one
        return False


def is_lycoris_path(path: str | os.PathLike) -> bool:
    """Whether an adapter path is a single file (a LyCORIS BOFT ``.safetensors``), not a folder."""
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file()


def read_lycoris_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LyCORIS BOFT safetensors file; any other file is an error naming it."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if not any(key.endswith(".oft_blocks") for key in tensors):
        raise ValueError(f"{path} holds no LyCORIS BOFT tensors (<module>.oft_blocks).")
    return tensors


def free_adapter_name(models: Iterable[nn.Module], source: str | os.PathLike) -> str:
    """"default" if none of ``models`` has an adapter of that name, else one made from ``source``."""
    taken = {name for model in models for name in adapter_configs(model)}
    return "default" if "default" not in taken else adapter_name_from(Path(source).stem or Path(source).name)


def install_lycoris_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, source: Path,
                            prefixes: Iterable[str] = PREFIXES) -> None:
    """Adapter ``adapter_name`` from the LyCORIS BOFT tensors that name modules of ``model`` (under
    one of ``prefixes``), as an output-side adapter (see ``lycoris.peft_layout``); none is an error."""
    peft, fields = peft_layout(model, tensors, prefixes)
    if not peft:
        raise ValueError(f"no oft_blocks key of {source} names a module of this {type(model).__name__} (keys look "
                         f"like {sorted(tensors)[0]!r}); the file was made for another model or component.")
    load_adapter_state_dict(model, peft, BOFTConfig(**fields, metadata={"format": "lycoris", "file": source.name}),
                            adapter_name)


def load_lycoris_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                         prefixes: Iterable[str] = PREFIXES) -> str:
    """Load the LyCORIS BOFT keys of the file ``path`` that name modules of ``model`` as an
    output-side adapter, make it active and return its name."""
    path = Path(path)
    name = adapter_name or free_adapter_name([model], path)
    install_lycoris_tensors(model, read_lycoris_file(path), name, path, prefixes)
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
        if not vector.is_floating_point() or not torch.isfinite(vector).all():
            raise ValueError(f"{path}: the vector for {word!r} holds NaN, infinite or non-float values.")
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
