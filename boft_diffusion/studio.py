"""The logic behind app.py: one loaded base pipeline, cached adapters, safe uploads, generation.

Kept free of Gradio so it can be tested function by function. Adapters are loaded once and
switched by name; an unmerged adapter samples through a cached folded weight, so switching
adapter or strength never reloads the base model and never touches its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open

from .identifier import (
    install_identifier_embeddings,
    read_identifier_embeddings,
    remove_identifier_embeddings,
)
from .model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_configs,
    adapter_name_from,
    count_file_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    load_adapter,
    read_adapter_config,
    set_adapter,
    set_adapter_strength,
)

NO_ADAPTER = "(none: base model)"
MODEL_SCHEDULER = "Model default"
SCHEDULERS = {
    MODEL_SCHEDULER: None,
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
}
ALLOWED_UPLOAD_SUFFIXES = {".json", ".safetensors", ".md", ".png"}


class StudioError(ValueError):
    """A problem to show in the page; the app keeps running."""


@dataclass
class Limits:
    max_size: int = 768
    max_steps: int = 100
    max_images: int = 4
    max_upload_bytes: int = 512 * 2**20


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    adapter: str = NO_ADAPTER
    strength: float = 1.0
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str = MODEL_SCHEDULER
    width: int = 64
    height: int = 64
    num_images: int = 1
    compare_with_base: bool = False
    control_image: Image.Image | None = field(default=None, repr=False)
    control_strength: float = 1.0


def _check_safetensors(path: Path) -> None:
    """Open the header only: proves the file is safetensors without reading (or unpickling) data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise StudioError(f"{path.name} is not a valid safetensors file ({error}).") from error


class Studio:
    """State of the app: the base pipeline, adapters by name, and generation."""

    def __init__(self, model: str = "tiny", adapters_dir: str | Path = "outputs", limits: Limits | None = None) -> None:
        self.adapters_dir = Path(adapters_dir).resolve()
        self.limits = limits or Limits()
        self.model_name = model
        self._pipe = None
        # adapter key -> (kind, control handle, learned identifier vectors or None)
        self._loaded: dict[str, tuple[str, Any, dict[str, torch.Tensor] | None]] = {}
        self.lock = threading.Lock()

    # model -----------------------------------------------------------------------------------------
    @property
    def pipe(self):
        return self._pipe if self._pipe is not None else self._load()

    def _load(self):
        from .loading import load_pipeline

        self._pipe = load_pipeline(self.model_name, dtype=torch.float32)
        self._pipe.set_progress_bar_config(disable=True)
        self._model_scheduler = self._pipe.scheduler
        return self._pipe

    def set_model(self, name_or_path: str) -> str:
        """Switch base model (reloads only when it changes); loaded adapters are dropped."""
        name_or_path = (name_or_path or "tiny").strip()
        with self.lock:
            return self._set_model(name_or_path)

    def _set_model(self, name_or_path: str) -> str:
        if name_or_path != self.model_name or self._pipe is None:
            previous = self.model_name
            self.model_name, self._pipe, self._loaded = name_or_path, None, {}
            try:
                self._load()
            except Exception as error:
                self.model_name = previous
                raise StudioError(f"could not load model {name_or_path!r}: {error}") from error
        return f"model: {self.model_name}"

    # adapters ----------------------------------------------------------------------------------------
    def list_adapters(self) -> list[str]:
        """Adapter folders under adapters_dir (a config or control file), as relative names."""
        if not self.adapters_dir.is_dir():
            return [NO_ADAPTER]
        found = set()
        for marker in ("adapter_config.json", "control.json"):
            for path in self.adapters_dir.rglob(marker):
                folder = path.parent
                if any(part.startswith((".", "checkpoint-")) for part in folder.relative_to(self.adapters_dir).parts):
                    continue
                if folder.name in ("controlnet", "text_encoder") and (folder.parent / "control.json").exists():
                    continue
                if folder.name == "text_encoder" and (folder.parent / CONFIG_NAME).exists():
                    continue
                found.add(str(folder.relative_to(self.adapters_dir)) if folder != self.adapters_dir else ".")
        return [NO_ADAPTER, *sorted(found)]

    def resolve(self, name: str) -> Path:
        """The folder of adapter ``name``; never a path outside adapters_dir."""
        path = (self.adapters_dir / name).resolve()
        if path != self.adapters_dir and self.adapters_dir not in path.parents:
            raise StudioError(f"adapter {name!r} is outside the adapters folder.")
        if not path.is_dir():
            raise StudioError(f"adapter {name!r} not found under {self.adapters_dir}.")
        return path

    def adapter_info(self, name: str) -> dict[str, Any]:
        try:
            return self._adapter_info(name)
        except (ValueError, OSError, KeyError) as error:
            raise StudioError(f"adapter {name!r} cannot be read: {error}") from error

    def _adapter_info(self, name: str) -> dict[str, Any]:
        if not name or name == NO_ADAPTER:
            return {"adapter": None, "base_model": self.model_name}
        folder = self.resolve(name)
        from .control import read_control_info

        control = read_control_info(folder)
        config_folder = folder if (folder / CONFIG_NAME).is_file() else folder / "controlnet"
        info: dict[str, Any] = {"adapter": name, "control": control["mode"] if control else None}
        if (config_folder / CONFIG_NAME).is_file():
            config = read_adapter_config(config_folder)
            info.update({
                "base_model": config.base_model_name_or_path,
                "trigger_prompt": config.metadata.get("instance_prompt"),
                "training_steps": config.metadata.get("train_steps"),
                "boft": {"block_size": config.block_size, "block_num": config.block_num,
                         "n_butterfly_factor": config.n_butterfly_factor, "dropout": config.dropout,
                         "target_modules": config.target_modules, "scale": config.scale},
                "trainable_parameters": count_file_parameters(config_folder / WEIGHTS_NAME),
            })
        return info

    def _models(self) -> list[Any]:
        return [self.pipe.unet, self.pipe.text_encoder]

    def _key(self, name: str) -> str:
        """A distinct adapter name per folder (folder names may collide once sanitised)."""
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        return f"a_{adapter_name_from(name)}_{digest}"

    def _activate(self, name: str, strength: float) -> tuple[str, Any]:
        """Load (once) and activate adapter ``name`` at ``strength``; return its control kind and handle."""
        if name == NO_ADAPTER:
            for model in self._models():
                disable_adapters(model)
            remove_identifier_embeddings(self.pipe.text_encoder)
            return "none", None
        key = self._key(name)
        if key not in self._loaded:
            self._loaded[key] = self._load_adapter(name, key)
        kind, handle, identifier = self._loaded[key]
        for model in self._models():
            if key in adapter_configs(model):
                enable_adapters(model)
                set_adapter(model, key)
                set_adapter_strength(model, strength)
            else:
                disable_adapters(model)
        if identifier:
            install_identifier_embeddings(self.pipe.text_encoder, self.pipe.tokenizer, identifier).strength = strength
        else:
            remove_identifier_embeddings(self.pipe.text_encoder)
        if kind == "controlnet":
            for adapter in adapter_configs(handle.controlnet):
                set_adapter_strength(handle.controlnet, strength, adapter)
        return kind, handle

    def _load_adapter(self, name: str, key: str) -> tuple[str, Any, dict[str, torch.Tensor] | None]:
        """Load a folder (UNet adapter, text-encoder adapter, learned identifier, control parts);
        undo everything on failure."""
        folder = self.resolve(name)
        from .control import load_control, read_control_info

        try:
            for config_folder in (folder, folder / "controlnet", folder / "text_encoder"):
                if (config_folder / CONFIG_NAME).is_file() and read_adapter_config(config_folder).bias != "none":
                    raise StudioError(f"adapter {name!r} trained biases, which would change the shared base "
                                      "model for every adapter; the app serves bias='none' adapters only.")
            if read_control_info(folder):
                kind, handle = load_control(self.pipe, folder, adapter_name=key)
            else:
                load_adapter(self.pipe.unet, folder, adapter_name=key)
                kind, handle = "adapter", None
            if (folder / "text_encoder" / CONFIG_NAME).is_file():
                load_adapter(self.pipe.text_encoder, folder / "text_encoder", adapter_name=key)
            identifier = read_identifier_embeddings(folder, self.pipe.text_encoder, self.pipe.tokenizer)
            return kind, handle, identifier
        except Exception as error:
            for model in self._models():
                if key in adapter_configs(model):
                    delete_adapter(model, key)
            if isinstance(error, StudioError):
                raise
            raise StudioError(f"could not load adapter {name!r}: {error}") from error

    # uploads --------------------------------------------------------------------------------------------
    def import_upload(self, paths: list[str | Path]) -> str:
        """Install an uploaded adapter (a zip of its folder, or its json + safetensors pair).

        Zips are checked for path traversal, total size and file types before anything is
        written; only JSON and safetensors are read, and the safetensors header is verified.
        """
        paths = [Path(p) for p in paths or []]
        if not paths:
            raise StudioError("nothing was uploaded.")
        total = sum(p.stat().st_size for p in paths)
        if total > self.limits.max_upload_bytes:
            raise StudioError(f"upload of {total} bytes exceeds the {self.limits.max_upload_bytes}-byte limit.")
        target_root = self.adapters_dir / "uploads"
        if len(paths) == 1 and paths[0].suffix == ".zip":
            name = adapter_name_from(paths[0].stem)
            files = self._read_zip(paths[0])
        else:
            name = adapter_name_from(next((p.parent.name for p in paths if p.suffix == ".json"), "adapter"))
            files = {}
            for p in paths:
                if p.suffix not in (".json", ".safetensors"):
                    raise StudioError(f"{p.name}: only adapter_config.json and .safetensors files are accepted.")
                files[CONFIG_NAME if p.suffix == ".json" else WEIGHTS_NAME] = p.read_bytes()
        if CONFIG_NAME not in files and "control.json" not in files:
            raise StudioError("the upload holds no adapter_config.json.")
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self._ensure_dir(target_root)))
        try:
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
            final = target_root / name
            suffix = 1
            while final.exists():
                suffix += 1
                final = target_root / f"{name}-{suffix}"
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return str(final.relative_to(self.adapters_dir))

    def _ensure_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _read_zip(self, path: Path) -> dict[str, bytes]:
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as error:
            raise StudioError(f"{path.name} is not a zip file.") from error
        try:
            return self._read_members(archive)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as error:
            raise StudioError(f"{path.name} could not be read: {error}") from error
        finally:
            archive.close()

    def _read_members(self, archive: zipfile.ZipFile) -> dict[str, bytes]:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if sum(i.file_size for i in infos) > self.limits.max_upload_bytes:
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

    # generation --------------------------------------------------------------------------------------------
    def clamp(self, request: GenerationRequest) -> GenerationRequest:
        limits = self.limits

        def size(value: int) -> int:
            return max(8, min(limits.max_size, int(value) // 8 * 8))

        request.width, request.height = size(request.width), size(request.height)
        request.steps = max(1, min(limits.max_steps, int(request.steps)))
        request.num_images = max(1, min(limits.max_images, int(request.num_images)))
        request.strength = max(0.0, min(1.5, float(request.strength)))
        request.seed = int(request.seed) % 2**32
        return request

    def generate(self, request: GenerationRequest, progress: Callable[[float, str], None] | None = None) -> list[tuple[Image.Image, str]]:
        """Images with their caption (the generation parameters); base and adapted when comparing."""
        request = self.clamp(request)
        if request.scheduler not in SCHEDULERS:
            raise StudioError(f"unknown scheduler {request.scheduler!r}; choose one of {list(SCHEDULERS)}.")
        if not request.prompt.strip():
            raise StudioError("the prompt is empty.")
        with self.lock:
            import diffusers

            pipe = self.pipe
            chosen = SCHEDULERS[request.scheduler]
            pipe.scheduler = (self._model_scheduler if chosen is None
                              else getattr(diffusers, chosen).from_config(self._model_scheduler.config))
            runs = [False, True] if request.compare_with_base and request.adapter != NO_ADAPTER else [request.adapter != NO_ADAPTER]
            results = []
            total = len(runs) * request.num_images
            for adapted in runs:
                kind, handle = self._activate(request.adapter if adapted else NO_ADAPTER, request.strength)
                for i in range(request.num_images):
                    seed = request.seed + i
                    image = self._sample(kind, handle, request, seed, total, len(results), progress)
                    label = "adapter" if adapted else "base"
                    results.append((image, self._parameters(request, seed, label)))
            for model in self._models():
                enable_adapters(model)
        return results

    def _sample(self, kind: str, handle: Any, request: GenerationRequest, seed: int, total: int, done: int,
                progress: Callable[[float, str], None] | None) -> Image.Image:
        pipe = self.pipe
        kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                      num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      width=request.width, height=request.height,
                      generator=torch.Generator().manual_seed(seed))
        if progress is not None:
            def step_callback(_pipe, step, _t, callback_kwargs):
                progress((done + (step + 1) / request.steps) / total, f"image {done + 1}/{total}")
                return callback_kwargs

            kwargs["callback_on_step_end"] = step_callback
        with torch.no_grad():
            if kind in ("light", "controlnet") and request.control_image is None:
                raise StudioError("this adapter carries control: upload a control image.")
            if kind == "light":
                from .control import condition_tensor, light_control

                condition = condition_tensor(request.control_image, (request.width, request.height))
                with light_control(pipe.unet, handle, condition, request.control_strength):
                    return pipe(**kwargs).images[0]
            if kind == "controlnet":
                handle.scheduler = pipe.scheduler
                image = request.control_image.convert("RGB").resize((request.width, request.height))
                return handle(image=image, controlnet_conditioning_scale=request.control_strength, **kwargs).images[0]
            return pipe(**kwargs).images[0]

    def _parameters(self, request: GenerationRequest, seed: int, label: str) -> str:
        values = {k: v for k, v in asdict(request).items() if k not in ("control_image",)}
        values.update(seed=seed, model=self.model_name, rendered=label)
        if label == "base":
            values["adapter"] = NO_ADAPTER
        return json.dumps(values)


def _common_folder(names: list[str]) -> str:
    """The single top folder every zip member shares (zips of a folder), or ''."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return next(iter(tops)) + "/"
    return ""


def png_with_parameters(image: Image.Image, parameters: str) -> bytes:
    """PNG bytes whose text chunk ``parameters`` holds the generation settings."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


__all__ = ["Studio", "StudioError", "GenerationRequest", "Limits", "NO_ADAPTER", "SCHEDULERS", "png_with_parameters"]
