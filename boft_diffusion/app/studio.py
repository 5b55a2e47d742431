"""The logic behind app.py: one loaded base pipeline, cached adapters, safe uploads, generation.

Kept free of Gradio so it can be tested function by function. Adapters are loaded once and
switched by name; an unmerged adapter samples through a cached folded weight, so switching
adapter or strength never reloads the base model and never touches its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from ..core.adapters import adapter_configs, delete_adapter, disable_adapters, enable_adapters
from ..core.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_name_from,
    atomic_write,
    count_file_parameters,
    is_lycoris_file,
    is_lycoris_path,
    read_adapter_config,
)
from ..core.identifier import remove_identifier_embeddings
from ..families.loading import load_pipeline, quiet_progress
from ..outputs.export_formats import adapted_pipeline, export_format
from ..outputs.read import TrainedAdapter, denoiser_of, load_outputs, read_control_info, text_encoders
from ..outputs.write import CONTROL_INFO, CONTROLNET_FOLDER, TEXT_ENCODER_2_FOLDER, TEXT_ENCODER_FOLDER
from .errors import StudioError
from .training_runs import RUNS_FOLDER
from .uploads import UPLOADS_FOLDER, UploadQuota, install_upload

logger = logging.getLogger("boft_diffusion")

NO_ADAPTER = "(none: base model)"
#: Formats the app exports an adapter in (python -m boft_diffusion.export's, less the merged model):
#: kohya LoRA keeping 99 % of the change, the exact weight difference, diffusers' LoRA folder, LyCORIS BOFT.
EXPORT_FORMATS = ("lora", "diff", "peft-lora", "lycoris")
MODEL_SCHEDULER = "Model default"
SCHEDULERS = {
    MODEL_SCHEDULER: None,
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler ancestral": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
}

MB = 2**20


def _limit(default: float, help: str) -> Any:
    """A Limits field carrying the help text of the app.py flag derived from it."""
    return field(default=default, metadata={"help": help})


@dataclass
class Limits:
    """What one request and one upload may ask for: declared here only, app.py derives its flags
    (defaults and help) from these fields, with sizes in MB there (``--max_upload_mb``)."""

    max_size: int = _limit(768, "Largest width/height accepted.")
    max_steps: int = _limit(100, "Most sampling steps of one request.")
    max_images: int = _limit(4, "Most images of one request.")
    max_upload_bytes: int = _limit(512 * MB, "Largest upload, uncompressed.")
    max_upload_files: int = _limit(200, "Most entries in an uploaded zip.")
    max_upload_ratio: float = _limit(100.0, "Largest uncompressed / compressed size of an uploaded zip.")
    max_uploads_folder_bytes: int = _limit(
        4096 * MB, "Cap of adapters_dir/uploads; the oldest uploads not in use are evicted beyond it.")

    def upload_quota(self) -> UploadQuota:
        return UploadQuota(self.max_upload_bytes, self.max_upload_files, self.max_upload_ratio,
                           self.max_uploads_folder_bytes)


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


#: An absolute path inside an error message (POSIX or Windows), hidden from public visitors.
SERVER_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/][^\s'\"]*")


class Studio:
    """State of the app: the base pipeline, adapters by name, and generation.

    ``offered_models`` (a public app) restricts the base model to that list, and error messages
    then never show server paths; None (loopback) accepts any name or path.
    """

    def __init__(self, model: str = "tiny", adapters_dir: str | Path = "outputs", limits: Limits | None = None,
                 offered_models: list[str] | None = None) -> None:
        self.adapters_dir = Path(adapters_dir).resolve()
        self.limits = limits or Limits()
        self.offered_models = None if offered_models is None else list(dict.fromkeys([model, *offered_models]))
        self.model_name = model
        self._pipe = None
        self._loaded: dict[str, TrainedAdapter] = {}  # by adapter key
        self.lock = threading.Lock()

    # model -----------------------------------------------------------------------------------------
    @property
    def pipe(self):
        return self._pipe if self._pipe is not None else self._load()

    def _load(self):
        self._pipe = quiet_progress(load_pipeline(self.model_name, dtype=torch.float32))
        self._model_scheduler = self._pipe.scheduler
        return self._pipe

    @property
    def public(self) -> bool:
        return self.offered_models is not None

    def set_model(self, name_or_path: str) -> str:
        """Switch base model (reloads only when it changes); loaded adapters are dropped. A public
        app switches only among the offered models."""
        name_or_path = (name_or_path or "tiny").strip()
        if self.public and name_or_path not in self.offered_models:
            raise StudioError(f"choose one of the offered models: {', '.join(self.offered_models)}.")
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
                logger.warning("could not load model %r: %s", name_or_path, error)
                reason = "see the server log" if self.public else str(error)
                raise StudioError(f"could not load model {name_or_path!r}: {reason}") from error
        return f"model: {self.model_name}"

    def public_message(self, error: Exception) -> str:
        """The message a visitor sees: in a public app, server paths are replaced by a placeholder."""
        return self.public_text(str(error))

    def public_text(self, text: str) -> str:
        """``text`` as a visitor may see it (a log line, a status): in a public app, without server paths."""
        if not self.public:
            return text
        return SERVER_PATH.sub("<server path>", text.replace(str(self.adapters_dir), "<adapters>"))

    # adapters ----------------------------------------------------------------------------------------
    def list_adapters(self) -> list[str]:
        """Adapter folders under adapters_dir (a config or control file) and LyCORIS BOFT files
        (``--format lycoris`` exports, SimpleTuner's), as relative names."""
        if not self.adapters_dir.is_dir():
            return [NO_ADAPTER]
        found = set()
        for marker in (CONFIG_NAME, CONTROL_INFO):
            for path in self.adapters_dir.rglob(marker):
                folder = path.parent
                if any(part.startswith((".", "checkpoint-")) for part in folder.relative_to(self.adapters_dir).parts):
                    continue
                if folder.name in (CONTROLNET_FOLDER, TEXT_ENCODER_FOLDER) and (folder.parent / CONTROL_INFO).exists():
                    continue
                if folder.name in (TEXT_ENCODER_FOLDER, TEXT_ENCODER_2_FOLDER) and (folder.parent / CONFIG_NAME).exists():
                    continue
                found.add(str(folder.relative_to(self.adapters_dir)) if folder != self.adapters_dir else ".")
        for path in self.adapters_dir.rglob("*.safetensors"):
            relative = path.relative_to(self.adapters_dir)
            if any(part.startswith((".", "checkpoint-")) for part in relative.parts) or \
                    (path.parent / CONFIG_NAME).exists() or not is_lycoris_file(path):
                continue
            found.add(str(relative))
        return [NO_ADAPTER, *sorted(found)]

    def resolve(self, name: str) -> Path:
        """The folder (or LyCORIS BOFT file) of adapter ``name``; never a path outside adapters_dir."""
        path = (self.adapters_dir / name).resolve()
        if path != self.adapters_dir and self.adapters_dir not in path.parents:
            raise StudioError(f"adapter {name!r} is outside the adapters folder.")
        if not (path.is_dir() or (is_lycoris_path(path) and is_lycoris_file(path))):
            raise StudioError(f"adapter {name!r} not found in the adapters folder.")
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
        if is_lycoris_path(folder):  # a LyCORIS file names no base model
            return {"adapter": name, "control": None, "base_model": None, "format": "lycoris"}
        control = read_control_info(folder)
        config_folder = folder if (folder / CONFIG_NAME).is_file() else folder / CONTROLNET_FOLDER
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

    def adapter_card(self, name: str) -> str:
        """The adapter folder's model card (README.md) as Markdown for the page, without its front matter
        and pictures (their paths are relative to the folder); '' when there is none."""
        if not name or name == NO_ADAPTER:
            return ""
        card = self.resolve(name) / "README.md"
        if not card.is_file():
            return ""
        text = card.read_text(encoding="utf-8", errors="replace")[:20_000]
        if text.startswith("---\n") and "\n---\n" in text[4:]:
            text = text[4:].split("\n---\n", 1)[1]
        return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))

    def loaded_folders(self) -> list[Path]:
        """Folders of the adapters loaded now: never evicted from under the pipeline."""
        return [adapter.folder for adapter in self._loaded.values()]

    def _models(self) -> list[Any]:
        return [denoiser_of(self.pipe), *text_encoders(self.pipe)]

    def _key(self, name: str) -> str:
        """A distinct adapter name per folder (folder names may collide once sanitised)."""
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        return f"a_{adapter_name_from(name)}_{digest}"

    def _activate(self, name: str, strength: float) -> TrainedAdapter | None:
        """Load (once) and activate adapter ``name`` at ``strength``; None is the base model."""
        if name == NO_ADAPTER:
            for model in self._models():
                disable_adapters(model)
            for text_encoder in text_encoders(self.pipe):
                remove_identifier_embeddings(text_encoder)
            return None
        key = self._key(name)
        if key not in self._loaded:
            self._loaded[key] = self._load_adapter(name, key)
        adapter = self._loaded[key]
        adapter.activate(strength)
        return adapter

    def _load_adapter(self, name: str, key: str) -> TrainedAdapter:
        """Load a folder (UNet adapter, text-encoder adapter, learned identifier, control parts);
        undo everything on failure."""
        folder = self.resolve(name)
        try:
            return load_outputs(self.pipe, folder, adapter_name=key, untrusted=self._is_upload(folder))
        except Exception as error:
            for model in self._models():
                if key in adapter_configs(model):
                    delete_adapter(model, key)
            if isinstance(error, StudioError):
                raise
            raise StudioError(f"could not load adapter {name!r}: {error}") from error

    # uploads ----------------------------------------------------------------------------------------------
    def _is_upload(self, folder: Path) -> bool:
        """Uploads and visitors' training runs: loaded as untrusted."""
        parents = folder.resolve().parents
        return (self.adapters_dir / UPLOADS_FOLDER) in parents or (self.adapters_dir / RUNS_FOLDER) in parents

    def import_upload(self, paths: list[str | Path]) -> str:
        """Install an uploaded adapter (see ``uploads.install_upload``); returns its name. Uploads
        whose adapters are loaded are never evicted."""
        with self.lock:
            return install_upload(paths, self.adapters_dir, self.limits.upload_quota(), self.loaded_folders())

    # generation --------------------------------------------------------------------------------------------
    def clamp(self, request: GenerationRequest) -> GenerationRequest:
        """Every number of the request checked (finite, of the right kind) and clamped to the limits."""
        limits = self.limits

        def size(value: int) -> int:
            return max(8, min(limits.max_size, value // 8 * 8))

        request.width = size(_whole(request.width, "width"))
        request.height = size(_whole(request.height, "height"))
        request.steps = max(1, min(limits.max_steps, _whole(request.steps, "steps")))
        request.num_images = max(1, min(limits.max_images, _whole(request.num_images, "number of images")))
        request.seed = _whole(request.seed, "seed") % 2**32
        request.strength = max(0.0, min(1.5, _finite(request.strength, "adapter strength")))
        request.guidance_scale = max(0.0, min(30.0, _finite(request.guidance_scale, "guidance scale")))
        request.control_strength = max(0.0, min(2.0, _finite(request.control_strength, "control strength")))
        return request

    def export(self, name: str, folder: Path, title: str, fmt: str) -> Path:
        """Adapter ``name`` in export format ``fmt`` (see :data:`EXPORT_FORMATS`), zipped into
        ``folder`` as ``<title>-<fmt>.zip`` with its identifier embeddings. Written from the model this
        app serves, under its lock, so no second copy of the model is loaded and exports run one at a time."""
        if fmt not in EXPORT_FORMATS:
            raise StudioError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
        stem = f"{title}-{fmt}"
        with self.lock, tempfile.TemporaryDirectory() as scratch:
            adapter = self._activate(name, 1.0)
            output = Path(scratch) / stem / (stem if fmt == "peft-lora" else f"{stem}.safetensors")
            output.parent.mkdir()
            try:
                export_format(adapted_pipeline(self.pipe, adapter.models), Path(name), fmt, output)
            except ValueError as error:
                raise StudioError(f"cannot export {name!r} as {fmt}: {error}") from error
            finally:
                for model in self._models():
                    enable_adapters(model)
            files = sorted(p for p in output.parent.rglob("*") if p.is_file())

            def write(tmp: str) -> None:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                    for path in files:
                        archive.write(path, path.relative_to(output.parent.parent).as_posix())

            atomic_write(folder, {f"{stem}.zip": write})
        return folder / f"{stem}.zip"

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
                adapter = self._activate(request.adapter if adapted else NO_ADAPTER, request.strength)
                for i in range(request.num_images):
                    seed = request.seed + i
                    image = self._sample(adapter, request, seed, total, len(results), progress)
                    label = "adapter" if adapted else "base"
                    results.append((image, self._parameters(request, seed, label)))
            for model in self._models():
                enable_adapters(model)
        return results

    def _sample(self, adapter: TrainedAdapter | None, request: GenerationRequest, seed: int, total: int, done: int,
                progress: Callable[[float, str], None] | None) -> Image.Image:
        kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                      num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      width=request.width, height=request.height,
                      generator=torch.Generator().manual_seed(seed))
        if progress is not None:
            def step_callback(_pipe, step, _t, callback_kwargs):
                progress((done + (step + 1) / request.steps) / total, f"image {done + 1}/{total}")
                return callback_kwargs

            kwargs["callback_on_step_end"] = step_callback
        if adapter is None:
            with torch.no_grad():
                return self.pipe(**kwargs).images[0]
        if adapter.control is not None and request.control_image is None:
            raise StudioError("this adapter carries control: upload a control image.")
        return adapter.sample(request.control_image, (request.width, request.height), request.control_strength,
                              **kwargs)

    def _parameters(self, request: GenerationRequest, seed: int, label: str) -> str:
        values = {k: v for k, v in asdict(request).items() if k not in ("control_image",)}
        values.update(seed=seed, model=self.model_name, rendered=label)
        if label == "base":
            values["adapter"] = NO_ADAPTER
        return json.dumps(values)


def _finite(value: Any, what: str) -> float:
    """``value`` as a finite float, or a StudioError naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise StudioError(f"{what} must be a finite number, got {value!r}.")
    return number


def _whole(value: Any, what: str) -> int:
    """``value`` as an int (whole floats accepted, as a number box sends them), or a StudioError."""
    number = _finite(value, what)
    if number != int(number):
        raise StudioError(f"{what} must be a whole number, got {value!r}.")
    return int(number)


def png_with_parameters(image: Image.Image, parameters: str) -> bytes:
    """PNG bytes whose text chunk ``parameters`` holds the generation settings."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


__all__ = ["Studio", "StudioError", "GenerationRequest", "Limits", "NO_ADAPTER", "SCHEDULERS", "png_with_parameters"]
