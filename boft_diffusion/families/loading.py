"""Loading diffusion pipelines: the embedded tiny model, local folders, single-file checkpoints
and (cached) Hugging Face Hub ids. SD 1.x / 2.x load as ``StableDiffusionPipeline``, SDXL as
``StableDiffusionXLPipeline``, Flux.1 as ``FluxPipeline`` and SD 3 / 3.5 as
``StableDiffusion3Pipeline``, told apart by the model itself (no flag)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..tiny.bundled import EMBEDDED_MODEL_DIR

#: Names accepted for the embedded model.
TINY_ALIASES = ("tiny", "embedded", "tiny-sd")

#: The pipeline class of each kind of model this loader tells apart.
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
                    "sd3": "StableDiffusion3Pipeline"}
SDXL_PIPELINE = PIPELINE_CLASSES["sdxl"]
#: The denoiser class of each transformer kind (its ``config.json`` ``_class_name``).
TRANSFORMER_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
_TRANSFORMER_KINDS = {name: kind for kind, name in TRANSFORMER_CLASSES.items()}
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
_COMPONENTS = {"sd": _SD_COMPONENTS, "sdxl": (*_SD_COMPONENTS, "text_encoder_2", "tokenizer_2"),
               "flux": _FLUX_COMPONENTS, "sd3": (*_FLUX_COMPONENTS, "text_encoder_3", "tokenizer_3")}
_MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "spiece.model")
#: Key prefixes that tell a single-file checkpoint's kind (BFL's Flux blocks, SD3's MMDiT blocks,
#: SDXL's second text encoder), wherever the file nests them.
_FILE_MARKERS = (("double_blocks.", "flux"), ("joint_blocks.", "sd3"), ("conditioner.embedders.1.", "sdxl"))


class ModelLoadError(OSError):
    """A pipeline could not be loaded; the message says what and why."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _default_device(device):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(dtype, device):
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def is_sdxl_spec(spec: dict[str, Any], unet_config: dict[str, Any] | None = None) -> bool:
    """Whether a ``model_index.json`` (and the UNet's config, when known) describe SDXL: its
    pipeline class, a second text encoder beside a UNet, or a UNet conditioned on pooled text and sizes."""
    return (spec.get("_class_name") == SDXL_PIPELINE or ("text_encoder_2" in spec and "unet" in spec)
            or (unet_config or {}).get("addition_embed_type") == "text_time")


def kind_of_spec(spec: dict[str, Any], denoiser_config: dict[str, Any] | None = None) -> str:
    """``sd``, ``sdxl``, ``flux`` or ``sd3`` from a ``model_index.json`` and the denoiser's config."""
    by_class = {name: kind for kind, name in PIPELINE_CLASSES.items()}.get(spec.get("_class_name", ""))
    by_transformer = _TRANSFORMER_KINDS.get((denoiser_config or {}).get("_class_name", ""))
    if by_transformer or by_class in ("flux", "sd3"):
        return by_transformer or by_class
    return "sdxl" if is_sdxl_spec(spec, denoiser_config) else "sd"


def is_sdxl(pipe: Any) -> bool:
    """Whether a loaded pipeline is SDXL (a UNet with two text encoders, pooled embeddings, size conditioning)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and (getattr(pipe, "text_encoder_2", None) is not None
                                 or getattr(unet.config, "addition_embed_type", None) == "text_time")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{str(path)!r} is corrupt (not valid JSON): {e}") from e


def _folder_kind(path: Path) -> str:
    spec = _read_json(path / "model_index.json") or {}
    denoiser = _read_json(path / "transformer" / "config.json") or _read_json(path / "unet" / "config.json")
    return kind_of_spec(spec, denoiser)


def _file_kind(path: Path) -> str:
    """A single-file checkpoint's kind from its keys (see :data:`_FILE_MARKERS`); SD when none matches."""
    if path.suffix.lower() != ".safetensors":
        return "sd"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    for marker, kind in _FILE_MARKERS:
        if any(key.startswith(marker) or f".{marker}" in key for key in keys):
            return kind
    return "sd"


def _missing_part(path: Path, component: str) -> str | None:
    """What a listed component's folder lacks, or None."""
    sub = path / component
    if not sub.is_dir():
        return f"{component}/"
    if component in _MODEL_COMPONENTS:
        if not (sub / "config.json").is_file():
            return f"{component}/config.json"
        if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            return f"{component}/ weights (*.safetensors)"
    elif component == "scheduler" and not (sub / "scheduler_config.json").is_file():
        return "scheduler/scheduler_config.json"
    elif component.startswith("tokenizer") and not any((sub / f).is_file() for f in _TOKENIZER_FILES):
        return f"{component}/vocab.json or tokenizer.json"
    return None


def check_pipeline_folder(path: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` naming ``path`` and what is missing if it is not a complete
    diffusers folder of a model this toolkit trains (SD, SDXL, Flux.1, SD3)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing")
    spec = _read_json(index)
    missing = []
    for component in _COMPONENTS[_folder_kind(path)]:
        if component not in spec:
            missing.append(f"{component} (not listed in model_index.json)")
        elif part := _missing_part(path, component):
            missing.append(part)
    if missing:
        raise ModelLoadError(f"model folder {str(path)!r} is incomplete; missing: {', '.join(missing)}")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(name)
        or name.count("/") > 1
        or os.path.exists(name)
        or name.lower().endswith((".safetensors", ".ckpt"))
    )


def _pipeline_class(kind: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[kind])


def _loader_kwargs(kind: str, dtype, kwargs: dict[str, Any]) -> dict[str, Any]:
    """SD pipelines drop the safety checker; SDXL ones have none and need no watermarker."""
    common: dict[str, Any] = {
        "sd": dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
        "sdxl": dict(add_watermarker=False)}.get(kind, {})
    return {"dtype": dtype, **common, **kwargs}


def _hub_kind(name: str, offline: bool, kwargs: dict[str, Any]) -> str:
    """From the hub repository's ``model_index.json`` (cached, or fetched when online); SD when unknown."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(name, "model_index.json", revision=kwargs.get("revision"), local_files_only=offline)
        spec = json.loads(Path(index).read_text())
    except Exception:  # the loader below reports what is wrong with the id
        return "sd"
    return kind_of_spec(spec) if isinstance(spec, dict) else "sd"


def load_pipeline(name_or_path: str | os.PathLike = "tiny", dtype=None, device=None, **kwargs):
    """Load the diffusers pipeline of a model: ``StableDiffusionPipeline`` (SD 1.x / 2.x),
    ``StableDiffusionXLPipeline``, ``FluxPipeline`` or ``StableDiffusion3Pipeline``, told apart by
    the model itself (see :func:`kind_of_spec`; single files by their keys).

    * ``"tiny"`` -> the embedded model in :data:`EMBEDDED_MODEL_DIR`;
    * a local diffusers folder -> ``from_pretrained``;
    * a path ending in ``.safetensors`` / ``.ckpt`` -> ``from_single_file``;
    * anything else -> a Hugging Face Hub id via ``from_pretrained`` (from the
      local cache when ``HF_HUB_OFFLINE=1``).

    ``dtype`` defaults to float16 on CUDA and float32 on CPU; ``device`` to CUDA
    when available.  Extra ``kwargs`` go to the diffusers loader.  Failures raise
    :class:`ModelLoadError` with a message naming the model and the reason.
    """
    dev = _default_device(device)
    dt = _default_dtype(dtype, dev)
    name = str(name_or_path)

    if name in TINY_ALIASES:
        if not EMBEDDED_MODEL_DIR.exists():
            raise ModelLoadError(
                f"the embedded tiny model is missing: {str(EMBEDDED_MODEL_DIR)!r} does not exist "
                "(regenerate it with `python scripts/pretrain_tiny_sd.py`)"
            )
        path = EMBEDDED_MODEL_DIR
    else:
        path = Path(os.path.expanduser(name))

    if name in TINY_ALIASES or path.is_dir():
        check_pipeline_folder(path)
        kind = _folder_kind(path)
        try:
            pipe = _pipeline_class(kind).from_pretrained(str(path), local_files_only=True,
                                                         **_loader_kwargs(kind, dt, kwargs))
        except Exception as e:  # corrupt weights, bad configs, ...
            raise ModelLoadError(f"could not load the pipeline folder {str(path)!r}: {type(e).__name__}: {e}") from e
    elif name.lower().endswith((".safetensors", ".ckpt")):
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {name!r} does not exist")
        try:
            kind = _file_kind(path)
            kw = _loader_kwargs(kind, dt, dict(kwargs, local_files_only=True) if _offline() else kwargs)
            pipe = _pipeline_class(kind).from_single_file(str(path), **kw)
        except Exception as e:
            raise ModelLoadError(
                f"could not load single-file checkpoint {name!r}: {type(e).__name__}: {e}. "
                "from_single_file needs the matching model configs, which come from the Hub unless cached; "
                "on an offline machine pass config=<local diffusers folder> or convert the file first."
            ) from e
    elif _looks_like_path(name):
        raise ModelLoadError(f"model folder {name!r} does not exist")
    else:
        offline = _offline()
        kind = _hub_kind(name, offline, kwargs)
        try:
            pipe = _pipeline_class(kind).from_pretrained(name, local_files_only=offline,
                                                         **_loader_kwargs(kind, dt, kwargs))
        except Exception as e:
            why = (
                "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
                if offline
                else "it is not in the local Hugging Face cache and the Hub could not be reached (offline machine?)"
            )
            raise ModelLoadError(
                f"could not load hub model {name!r}: {why}. Download it on a connected machine "
                f"(`hf download {name}`) and copy the cache (HF_HOME), pass a local diffusers "
                f"folder or a .safetensors file instead, or use 'tiny' for the embedded model. "
                f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]"
            ) from e
    return pipe.to(dev)


def tiny_defaults() -> dict:
    """Recommended sampling settings for the embedded model (guidance scale,
    steps, rare identifier tokens), from its ``tiny_sd_meta.json``."""
    meta_path = EMBEDDED_MODEL_DIR / "tiny_sd_meta.json"
    out = {"guidance_scale": 4.0, "num_inference_steps": 25, "height": 64, "width": 64}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out["guidance_scale"] = meta.get("default_guidance_scale", out["guidance_scale"])
        out["num_inference_steps"] = meta.get("default_num_inference_steps", out["num_inference_steps"])
    return out


def default_guidance(name_or_path, guidance_scale: float | None) -> float | None:
    """The guidance scale to sample with: the one given, else the embedded model's own default,
    else None (the pipeline's default)."""
    if guidance_scale is not None:
        return guidance_scale
    return tiny_defaults()["guidance_scale"] if str(name_or_path) in TINY_ALIASES else None


def guidance_kwargs(guidance_scale: float | None) -> dict[str, Any]:
    """Pipeline keyword arguments for a guidance scale; None keeps the pipeline's default."""
    return {} if guidance_scale is None else {"guidance_scale": guidance_scale}


def quiet_progress(pipe: Any) -> Any:
    """``pipe`` with its per-call progress bar off (training, scoring and the app sample many times)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["default_guidance", "guidance_kwargs", "ModelLoadError", "load_pipeline", "check_pipeline_folder", "tiny_defaults",
           "is_sdxl", "is_sdxl_spec", "kind_of_spec"]
