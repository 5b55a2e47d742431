"""Safe installation of uploaded adapters: zips checked for path traversal, size, file count,
compression ratio and file types before anything is written, and extracted under a byte budget;
only JSON and safetensors are read, safetensors headers verified. The uploads folder is capped:
the oldest uploads not in use are evicted."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..core.files import CONFIG_NAME, TEMPORARY_NAME, WEIGHTS_NAME, adapter_name_from, atomic_folder
from ..outputs.write import CONTROL_INFO
from .errors import StudioError

ALLOWED_UPLOAD_SUFFIXES = {".json", ".safetensors", ".md", ".png"}
#: How a refusal names ALLOWED_UPLOAD_SUFFIXES.
ADAPTER_FILES = "JSON, safetensors (and README/PNG)"
UPLOADS_FOLDER = "uploads"
CHUNK = 2**20


@dataclass
class UploadQuota:
    """Limits of one upload and of the uploads folder (bytes are uncompressed sizes); the values
    come from the studio's Limits."""

    max_bytes: int
    max_files: int
    max_ratio: float
    max_folder_bytes: int


def checked_upload(paths: list[str | Path] | None, quota: UploadQuota, nothing: str) -> list[Path]:
    """The uploaded files, refused (``nothing`` says why) when there are none or when together they
    exceed the quota's bytes, before anything is read or written."""
    paths = [Path(p) for p in paths or []]
    if not paths:
        raise StudioError(nothing)
    total = sum(p.stat().st_size for p in paths)
    if total > quota.max_bytes:
        raise StudioError(f"upload of {total} bytes exceeds the {quota.max_bytes}-byte limit.")
    return paths


def install_upload(paths: list[str | Path], adapters_dir: Path, quota: UploadQuota,
                   in_use: Collection[Path] = ()) -> str:
    """Install an uploaded adapter (a zip of its folder, or its json + safetensors pair) under
    ``adapters_dir/uploads``; returns its folder relative to ``adapters_dir``.

    Nothing is written before the upload passes the quota, and extraction stops at the byte
    budget whatever the zip's headers claim. Afterwards the oldest uploads not in ``in_use`` are
    evicted until the folder fits its cap.
    """
    paths = checked_upload(paths, quota, "nothing was uploaded.")
    target_root = adapters_dir / UPLOADS_FOLDER
    is_zip = len(paths) == 1 and paths[0].suffix == ".zip"
    name = adapter_name_from(paths[0].stem if is_zip else next((p.parent.name for p in paths if p.suffix == ".json"),
                                                               "adapter"))
    final = _free_name(_ensure_dir(target_root), name)
    with atomic_folder(final) as staging:
        if is_zip:
            extract_zip(paths[0], staging, quota, ALLOWED_UPLOAD_SUFFIXES, ADAPTER_FILES)
        else:
            _copy_pair(paths, staging)
        _check_contents(staging)
    evict_uploads(target_root, quota.max_folder_bytes, keep={final, *in_use})
    return str(final.relative_to(adapters_dir))


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_name(root: Path, name: str) -> Path:
    final, suffix = root / name, 1
    while final.exists():
        suffix += 1
        final = root / f"{name}-{suffix}"
    return final


def _copy_pair(paths: list[Path], staging: Path) -> None:
    for path in paths:
        if path.suffix not in (".json", ".safetensors"):
            raise StudioError(f"{path.name}: only adapter_config.json and .safetensors files are accepted.")
        shutil.copyfile(path, staging / (CONFIG_NAME if path.suffix == ".json" else WEIGHTS_NAME))


def _check_contents(staging: Path) -> None:
    if not (staging / CONFIG_NAME).is_file() and not (staging / CONTROL_INFO).is_file():
        raise StudioError("the upload holds no adapter_config.json.")
    for path in staging.rglob("*"):
        relative = path.relative_to(staging)
        if path.suffix == ".safetensors":
            _check_safetensors(path, relative)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_bytes())
            except (ValueError, RecursionError) as error:
                raise StudioError(f"{relative} is not valid JSON.") from error


def extract_zip(path: Path, staging: Path, quota: UploadQuota, allowed: Collection[str], what: str) -> None:
    """Extract the zip ``path`` into ``staging`` after the quota, path and file-type checks (suffixes
    ``allowed``, named ``what`` in the refusal), stopping at the quota's byte budget."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise StudioError(f"{path.name} is not a zip file.") from error
    try:
        members = _checked_members(archive, path.stat().st_size, quota, allowed, what)
        _write_members(archive, members, staging, quota.max_bytes)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError) as error:
        raise StudioError(f"{path.name} could not be read: {error}") from error
    finally:
        archive.close()


def _checked_members(archive: zipfile.ZipFile, zip_size: int, quota: UploadQuota, allowed: Collection[str],
                     what: str) -> dict[str, zipfile.ZipInfo]:
    """Members by relative path, after the quota and path checks on the zip's directory alone."""
    infos = archive.infolist()
    if len(infos) > quota.max_files:
        raise StudioError(f"the zip holds {len(infos)} entries; at most {quota.max_files} are accepted.")
    infos = [i for i in infos if not i.is_dir() and not _is_temporary(i.filename)]
    expanded = sum(i.file_size for i in infos)
    if expanded > quota.max_bytes:
        raise StudioError(f"the zip expands to {expanded} bytes, beyond the {quota.max_bytes}-byte upload limit.")
    if expanded > quota.max_ratio * max(zip_size, 1):
        raise StudioError(f"the zip expands {expanded / max(zip_size, 1):.0f} times its size; at most "
                          f"{quota.max_ratio:g} times is accepted.")
    prefix = _common_folder([i.filename for i in infos])
    members = {}
    for info in infos:
        parts = info.filename.replace("\\", "/").split("/")
        if ":" in info.filename or any(part in ("", ".", "..") for part in parts):
            raise StudioError(f"unsafe path in zip: {info.filename!r}.")
        relative = info.filename[len(prefix):]
        if Path(relative).suffix.lower() not in allowed:
            raise StudioError(f"{info.filename}: only {what} files are accepted.")
        members[relative] = info
    return members


def _write_members(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], staging: Path, budget: int) -> None:
    """Copy members out in chunks, stopping at the budget or at a member longer than its header says."""
    written = 0
    root = staging.resolve()
    for relative, info in members.items():
        destination = (staging / relative).resolve()
        if root not in destination.parents:
            raise StudioError(f"unsafe path in upload: {relative!r}.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        member_bytes = 0
        with archive.open(info) as source, open(destination, "wb") as target:
            while chunk := source.read(CHUNK):
                member_bytes += len(chunk)
                written += len(chunk)
                if member_bytes > info.file_size or written > budget:
                    raise StudioError(f"{info.filename} expands beyond what the zip declares or the upload limit.")
                target.write(chunk)


def _is_temporary(filename: str) -> bool:
    """Temporaries a killed training run left in its folder: skipped, not refused."""
    return any(TEMPORARY_NAME.match(part) for part in filename.replace("\\", "/").split("/"))


def _common_folder(names: list[str]) -> str:
    """The single top folder every zip member shares (zips of a folder), or ''."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return next(iter(tops)) + "/"
    return ""


def _check_safetensors(path: Path, relative: Path) -> None:
    """Open the header only: proves the file is safetensors without reading (or unpickling) data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise StudioError(f"{relative} is not a valid safetensors file ({error}).") from error


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def evict_uploads(root: Path, max_bytes: int, keep: Collection[Path]) -> list[Path]:
    """Delete the oldest uploads (by modification time) that hold nothing of ``keep`` (adapter folders
    or files in use) until ``root`` holds at most ``max_bytes``; returns the deleted folders."""
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
    sizes = {folder: folder_bytes(folder) for folder in folders}
    total = sum(sizes.values())
    kept = {Path(p).resolve() for p in keep}
    evicted = []
    for folder in folders:
        if total <= max_bytes:
            break
        resolved = folder.resolve()
        if any(path == resolved or resolved in path.parents for path in kept):
            continue
        shutil.rmtree(folder)
        total -= sizes[folder]
        evicted.append(folder)
    return evicted
