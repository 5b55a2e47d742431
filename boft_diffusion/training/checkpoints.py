"""Training checkpoints written atomically, in safetensors and JSON only (nothing is unpickled).

A checkpoint folder ``checkpoint-<step>`` holds the trainable tensors, the optimiser state,
the LR scheduler state and the trainer state. It is written under a temporary name and renamed
into place, so a run killed at any moment leaves every earlier checkpoint intact. Its completion
marker, written last, lists every file with its size: a folder counts as a checkpoint only while
that list holds. Old checkpoints are renamed to a hidden tombstone before they are deleted.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.files import atomic_folder, remove_folder, write_or_explain, write_text

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
STATE_JSON = "trainer_state.json"
COMPLETE_JSON = "checkpoint_complete.json"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file its completion marker lists, at the listed sizes."""
    marker = folder / COMPLETE_JSON
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if is_complete(p)]


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str) -> Path | None:
    """``"latest"`` -> newest complete checkpoint in ``output_dir`` (None if there is none), else a path."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / spec
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_JSON}, or files missing).")
    return path


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in data.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": data["param_groups"]}


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    trainer_state: dict[str, Any],
    extra_files: dict[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; keep at most ``total_limit`` checkpoints.

    ``extra_files`` maps a sub-folder name to a callable that writes into a given folder (for
    example the adapter in PEFT's layout, so a checkpoint can be loaded like a final adapter).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    with atomic_folder(final, fsync=True) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
        _write(tmp, TRAINABLE_FILE, partial(save_file, tensors))
        optimizer_tensors, optimizer_json = _optimizer_to_files(optimizer)
        _write(tmp, OPTIMIZER_TENSORS, partial(save_file, optimizer_tensors))
        _write(tmp, OPTIMIZER_JSON, partial(write_text, text=json.dumps(optimizer_json)))
        _write(tmp, SCHEDULER_JSON, partial(write_text, text=json.dumps(lr_scheduler.state_dict(), default=_not_serialisable)))
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        _write(tmp, STATE_JSON, partial(write_text, text=json.dumps({**trainer_state, "step": step}, indent=2)))
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write(tmp, COMPLETE_JSON, partial(write_text, text=json.dumps({"step": step, "files": sizes})))
    if total_limit is not None and total_limit > 0:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            remove_folder(old)
    return final


def _write(folder: Path, name: str, writer: Any) -> None:
    """Write ``folder/name``; a full disk raises WriteError naming the checkpoint file."""
    path = folder / name
    final_name = folder.name.removeprefix(".").rsplit(".tmp-", 1)[0]
    write_or_explain(folder.parent / final_name / name, partial(writer, str(path)))




def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"scheduler state holds {type(value).__name__}, which cannot be checkpointed as JSON.")


def load_checkpoint(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, lr_scheduler: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimiser and scheduler in place; return the trainable tensors and trainer state."""
    path = Path(path)
    trainable = load_file(str(path / TRAINABLE_FILE))
    optimizer.load_state_dict(
        _optimizer_from_files(load_file(str(path / OPTIMIZER_TENSORS)), json.loads((path / OPTIMIZER_JSON).read_text()))
    )
    lr_scheduler.load_state_dict(json.loads((path / SCHEDULER_JSON).read_text()))
    return trainable, json.loads((path / STATE_JSON).read_text())
