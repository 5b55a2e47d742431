"""Safe installation of uploaded adapters: zips checked for path traversal, size and file types
before anything is written; only JSON and safetensors are read, safetensors headers verified."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors import safe_open

from ..core.files import CONFIG_NAME, WEIGHTS_NAME, adapter_name_from, atomic_folder
from ..outputs.write import CONTROL_INFO
from .errors import StudioError

ALLOWED_UPLOAD_SUFFIXES = {".json", ".safetensors", ".md", ".png"}


def install_upload(paths: list[str | Path], adapters_dir: Path, max_bytes: int) -> str:
    """Install an uploaded adapter (a zip of its folder, or its json + safetensors pair) under
    ``adapters_dir/uploads``; returns its folder relative to ``adapters_dir``.

    Zips are checked for path traversal, total size and file types before anything is
    written; only JSON and safetensors are read, and the safetensors header is verified.
    """
    paths = [Path(p) for p in paths or []]
    if not paths:
        raise StudioError("nothing was uploaded.")
    total = sum(p.stat().st_size for p in paths)
    if total > max_bytes:
        raise StudioError(f"upload of {total} bytes exceeds the {max_bytes}-byte limit.")
    target_root = adapters_dir / "uploads"
    if len(paths) == 1 and paths[0].suffix == ".zip":
        name = adapter_name_from(paths[0].stem)
        files = _read_zip(paths[0], max_bytes)
    else:
        name = adapter_name_from(next((p.parent.name for p in paths if p.suffix == ".json"), "adapter"))
        files = {}
        for p in paths:
            if p.suffix not in (".json", ".safetensors"):
                raise StudioError(f"{p.name}: only adapter_config.json and .safetensors files are accepted.")
            files[CONFIG_NAME if p.suffix == ".json" else WEIGHTS_NAME] = p.read_bytes()
    if CONFIG_NAME not in files and CONTROL_INFO not in files:
        raise StudioError("the upload holds no adapter_config.json.")
    final = _ensure_dir(target_root) / name
    suffix = 1
    while final.exists():
        suffix += 1
        final = target_root / f"{name}-{suffix}"
    with atomic_folder(final) as staging:
        for relative, data in files.items():
            destination = (staging / relative).resolve()
            if staging.resolve() not in destination.parents:
                raise StudioError(f"unsafe path in upload: {relative!r}.")
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
            if destination.suffix == ".safetensors":
                _check_safetensors(destination)
            elif destination.suffix == ".json":
                try:
                    json.loads(data)
                except ValueError as error:
                    raise StudioError(f"{relative} is not valid JSON.") from error
    return str(final.relative_to(adapters_dir))


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_zip(path: Path, max_bytes: int) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise StudioError(f"{path.name} is not a zip file.") from error
    try:
        return _read_members(archive, max_bytes)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as error:
        raise StudioError(f"{path.name} could not be read: {error}") from error
    finally:
        archive.close()


def _read_members(archive: zipfile.ZipFile, max_bytes: int) -> dict[str, bytes]:
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if sum(i.file_size for i in infos) > max_bytes:
        raise StudioError("the zip expands beyond the upload size limit.")
    names = [i.filename for i in infos]
    prefix = _common_folder(names)
    files = {}
    for info in infos:
        parts = info.filename.replace("\\", "/").split("/")
        if ":" in info.filename or any(part in ("", ".", "..") for part in parts):
            raise StudioError(f"unsafe path in zip: {info.filename!r}.")
        relative = info.filename[len(prefix):]
        if Path(relative).suffix not in ALLOWED_UPLOAD_SUFFIXES:
            raise StudioError(f"{info.filename}: only JSON, safetensors (and README/PNG) files are accepted.")
        files[relative] = archive.read(info)
    return files


def _common_folder(names: list[str]) -> str:
    """The single top folder every zip member shares (zips of a folder), or ''."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return next(iter(tops)) + "/"
    return ""


def _check_safetensors(path: Path) -> None:
    """Open the header only: proves the file is safetensors without reading (or unpickling) data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise StudioError(f"{path.name} is not a valid safetensors file ({error}).") from error
