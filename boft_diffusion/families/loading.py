"""Loading Stable Diffusion pipelines: the embedded tiny model, local folders,
single-file checkpoints and (cached) Hugging Face Hub ids. SD 1.x / 2.x load as
``StableDiffusionPipeline``, SDXL as ``StableDiffusionXLPipeline``, told apart by the model
itself (no flag)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..tiny.bundled import EMBEDDED_MODEL_DIR

#: Names accepted for the embedded model.
TINY_ALIASES = ("tiny", "embedded", "tiny-sd")

_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
SDXL_PIPELINE = "StableDiffusionXLPipeline"


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
    pipeline class, a second text encoder, or a UNet conditioned on pooled text and sizes."""
    return (spec.get("_class_name") == SDXL_PIPELINE or "text_encoder_2" in spec
            or (unet_config or {}).get("addition_embed_type") == "text_time")


def is_sdxl(pipe: Any) -> bool:
    """Whether a loaded pipeline is SDXL (two text encoders, pooled embeddings, size conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None or \
        getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def _folder_is_sdxl(path: Path) -> bool:
    spec = json.loads((path / "model_index.json").read_text())
    unet_config = path / "unet" / "config.json"
    return is_sdxl_spec(spec, json.loads(unet_config.read_text()) if unet_config.is_file() else None)


def _file_is_sdxl(path: Path) -> bool:
    """An SDXL single-file checkpoint holds the second text encoder under ``conditioner.embedders.1``."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())


def check_pipeline_folder(path: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` naming ``path`` and what is missing if it is
    not a complete diffusers Stable Diffusion folder."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        spec = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{str(index)!r} is corrupt (not valid JSON): {e}") from e
    missing = []
    unet_config = path / "unet" / "config.json"
    try:
        unet_spec = json.loads(unet_config.read_text()) if unet_config.is_file() else None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{str(unet_config)!r} is corrupt (not valid JSON): {e}") from e
    components = _REQUIRED_COMPONENTS + (_SDXL_COMPONENTS if is_sdxl_spec(spec, unet_spec) else ())
    for comp in components:
        if comp not in spec:
            missing.append(f"{comp} (not listed in model_index.json)")
            continue
        sub = path / comp
        if not sub.is_dir():
            missing.append(f"{comp}/")
            continue
        if comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if not (sub / "config.json").is_file():
                missing.append(f"{comp}/config.json")
            if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
                missing.append(f"{comp}/ weights (*.safetensors)")
        elif comp == "scheduler" and not (sub / "scheduler_config.json").is_file():
            missing.append("scheduler/scheduler_config.json")
        elif comp in ("tokenizer", "tokenizer_2") and not any(
            (sub / f).is_file() for f in ("vocab.json", "tokenizer.json")
        ):
            missing.append(f"{comp}/vocab.json")
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


def _pipeline_class(sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def _loader_kwargs(sdxl: bool, dtype, kwargs: dict[str, Any]) -> dict[str, Any]:
    """SD pipelines drop the safety checker; SDXL ones have none and need no watermarker."""
    common: dict[str, Any] = dict(dtype=dtype, add_watermarker=False) if sdxl else \
        dict(dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return {**common, **kwargs}


def _hub_is_sdxl(name: str, offline: bool, kwargs: dict[str, Any]) -> bool:
    """From the hub repository's ``model_index.json`` (cached, or fetched when online); SD when unknown."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(name, "model_index.json", revision=kwargs.get("revision"), local_files_only=offline)
        spec = json.loads(Path(index).read_text())
    except Exception:  # the loader below reports what is wrong with the id
        return False
    return isinstance(spec, dict) and is_sdxl_spec(spec)


def load_pipeline(name_or_path: str | os.PathLike = "tiny", dtype=None, device=None, **kwargs):
    """Load a :class:`diffusers.StableDiffusionPipeline`, or a
    :class:`diffusers.StableDiffusionXLPipeline` when the model is SDXL (see :func:`is_sdxl_spec`).

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
        sdxl = _folder_is_sdxl(path)
        try:
            pipe = _pipeline_class(sdxl).from_pretrained(str(path), local_files_only=True,
                                                         **_loader_kwargs(sdxl, dt, kwargs))
        except Exception as e:  # corrupt weights, bad configs, ...
            raise ModelLoadError(f"could not load the pipeline folder {str(path)!r}: {type(e).__name__}: {e}") from e
    elif name.lower().endswith((".safetensors", ".ckpt")):
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {name!r} does not exist")
        try:
            sdxl = _file_is_sdxl(path)
            kw = _loader_kwargs(sdxl, dt, dict(kwargs, local_files_only=True) if _offline() else kwargs)
            pipe = _pipeline_class(sdxl).from_single_file(str(path), **kw)
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
        sdxl = _hub_is_sdxl(name, offline, kwargs)
        try:
            pipe = _pipeline_class(sdxl).from_pretrained(name, local_files_only=offline, **_loader_kwargs(sdxl, dt, kwargs))
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
           "is_sdxl", "is_sdxl_spec"]
