"""One reader for every folder the training scripts write: UNet adapter, text encoder adapter,
learned identifier, light control encoder or ControlNet.

``load_outputs`` puts a folder on a pipeline and returns a ``TrainedAdapter`` that switches,
scales and samples all of its parts as one; the app, the evaluation, the demo and the
benchmarks use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..control.networks import (
    CONTROLNET,
    LIGHT,
    Control,
    ControlEncoder,
    check_controlnet_config,
    check_finite,
    controlnet_from_unet,
)
from ..core.adapters import (
    adapter_configs,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    set_adapter,
    set_adapter_strength,
)
from ..core.files import (
    CONFIG_NAME,
    free_adapter_name,
    install_identifier_embeddings,
    install_lycoris_tensors,
    is_lycoris_path,
    load_adapter,
    read_identifier_embeddings,
    read_json_object,
    read_lycoris_file,
)
from ..core.identifier import remove_identifier_embeddings
from ..core.lycoris import COMPONENT_PREFIXES, lycoris_modules, modules_named_by
from ..families import family_of
from ..families.loading import is_sdxl
from .write import (
    CONTROL_INFO,
    CONTROLNET_CONFIG,
    CONTROLNET_FOLDER,
    CONTROLNET_TRAINABLE,
    TEXT_ENCODER_2_FOLDER,
    TEXT_ENCODER_FOLDER,
)


def read_control_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``control.json`` of a control folder, or None for any other folder."""
    path = Path(folder) / CONTROL_INFO
    if not path.is_file():
        return None
    info = read_json_object(path)
    if info.get("mode") not in (LIGHT, CONTROLNET):
        raise ValueError(f"{path}: mode must be {LIGHT!r} or {CONTROLNET!r}, got {info.get('mode')!r}.")
    return info


@dataclass
class TrainedAdapter:
    """The parts of one output folder on a pipeline.

    ``models`` are the pipeline's models that hold them (UNet, text encoders); ``identifier`` the
    learned identifier vectors by word; ``identifier_2`` those of SDXL's second text encoder;
    ``control`` the light encoder or ControlNet, if any.
    """

    pipe: Any
    folder: Path
    adapter_name: str | None
    models: list[nn.Module]
    identifier: dict[str, torch.Tensor] | None = None
    control: Control | None = None
    identifier_2: dict[str, torch.Tensor] | None = None

    def switch(self, enabled: bool) -> None:
        """Turn every part on (the adapted pipeline) or off (the base model)."""
        for model in self.models:
            (enable_adapters if enabled else disable_adapters)(model)

    def activate(self, strength: float = 1.0) -> None:
        """Make this folder's adapters the pipeline's active ones at ``strength``, switching off
        adapters of other folders loaded beside it (a text encoder holds one identifier at a time)."""
        pipe = self.pipe
        for model in (denoiser_of(pipe), *text_encoders(pipe)):
            if self.adapter_name in adapter_configs(model):
                enable_adapters(model)
                set_adapter(model, self.adapter_name)
                set_adapter_strength(model, strength)
            else:
                disable_adapters(model)
        for (text_encoder, tokenizer), identifier in zip(text_pairs(pipe), (self.identifier, self.identifier_2),
                                                         strict=False):
            if identifier:
                install_identifier_embeddings(text_encoder, tokenizer, identifier).strength = strength
            else:
                remove_identifier_embeddings(text_encoder)
        controlnet = self.control.controlnet if self.control is not None else None
        if controlnet is not None:
            for name in adapter_configs(controlnet):
                set_adapter_strength(controlnet, strength, name)

    def sample(self, condition: Image.Image | None = None, size: tuple[int, int] | None = None,
               control_scale: float = 1.0, **pipe_kwargs: Any) -> Image.Image:
        """One image; a control folder needs ``condition``, resized to ``size`` (default: the model's)."""
        if self.control is None:
            with torch.no_grad():
                return self.pipe(**pipe_kwargs).images[0]
        if condition is None:
            raise ValueError(f"{self.folder} carries control: a control image is needed.")
        if size is None:
            resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            size = (resolution, resolution)
        return self.control.sample(self.pipe, condition, size, control_scale, **pipe_kwargs)


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's UNet or transformer, whichever its family trains."""
    return family_of(pipe).denoiser(pipe)


def text_pairs(pipe) -> list[tuple[nn.Module, Any]]:
    """The pipeline's text encoders with their tokenizers: one, or SDXL's two."""
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    return pairs


def text_encoders(pipe) -> list[nn.Module]:
    return [encoder for encoder, _ in text_pairs(pipe)]


def load_outputs(pipe, folder: str | os.PathLike, adapter_name: str | None = None,
                 load: Callable[..., object] = load_adapter, untrusted: bool = False) -> TrainedAdapter:
    """Load a train_dreambooth.py or train_controlnet.py output folder onto ``pipe``.

    ``load`` reads one adapter folder into a model (BOFT by default; the LoRA baseline's loader
    for its folders). A folder for another model raises ValueError naming the part. An
    ``untrusted`` folder (an upload) may only name a ControlNet inside itself, whose config must
    describe a copy of the pipeline's UNet.
    """
    folder = Path(folder)
    if is_lycoris_path(folder):
        return load_lycoris_outputs(pipe, folder, adapter_name)
    pairs = text_pairs(pipe)
    if len(pairs) == 1 and (folder / TEXT_ENCODER_2_FOLDER).is_dir():
        raise ValueError(f"{folder} was trained on SDXL ({TEXT_ENCODER_2_FOLDER}/ holds the second text encoder's "
                         "parts); this model has one text encoder.")

    def load_into(model: nn.Module, path: Path) -> str | None:
        loaded = load(model, path) if adapter_name is None else load(model, path, adapter_name=adapter_name)
        return loaded if isinstance(loaded, str) else adapter_name

    name = None
    models: list[nn.Module] = []
    control = None
    info = read_control_info(folder)
    if info is not None:
        control = _load_control(pipe, folder, info, untrusted)
    if info is None or (folder / CONFIG_NAME).is_file():
        denoiser = denoiser_of(pipe)
        name = load_into(denoiser, folder)
        models.append(denoiser)
    identifiers = []
    # (adapter folder, identifier folder) of each text encoder; the first's identifier sits at the root
    places = [(folder / TEXT_ENCODER_FOLDER, folder), (folder / TEXT_ENCODER_2_FOLDER,) * 2]
    for (text_encoder, tokenizer), (adapter_folder, identifier_folder) in zip(pairs, places, strict=False):
        if (adapter_folder / CONFIG_NAME).is_file():
            load_into(text_encoder, adapter_folder)
            models.append(text_encoder)
        identifier = read_identifier_embeddings(identifier_folder, text_encoder, tokenizer)
        if identifier:
            install_identifier_embeddings(text_encoder, tokenizer, identifier)
            if text_encoder not in models:
                models.append(text_encoder)
        identifiers.append(identifier)
    return TrainedAdapter(pipe, folder, name, models, identifiers[0], control,
                          identifiers[1] if len(identifiers) > 1 else None)


def load_lycoris_outputs(pipe, path: Path, adapter_name: str | None = None) -> TrainedAdapter:
    """A LyCORIS BOFT file (kohya keys, e.g. trained by SimpleTuner or exported by us) onto the
    pipeline's UNet and text encoders, each component from its own key prefixes; a key that names
    no module of the pipeline is an error naming it."""
    tensors = read_lycoris_file(path)
    components = {name: getattr(pipe, name) for name in COMPONENT_PREFIXES if getattr(pipe, name, None) is not None}
    groups = lycoris_modules(tensors)
    named = {name: modules_named_by(model, groups, COMPONENT_PREFIXES[name]) for name, model in components.items()}
    unknown = sorted(set(groups) - {key for keys in named.values() for key in keys})
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} key(s) name no module of this pipeline ({unknown[0]!r}); "
                         "the file was made for another model.")
    targets = {name: components[name] for name in components if any("oft_blocks" in groups[k] for k in named[name])}
    adapter_name = adapter_name or free_adapter_name(targets.values(), path)
    loaded: list[nn.Module] = []
    try:
        for name, model in targets.items():
            install_lycoris_tensors(model, tensors, adapter_name, path, COMPONENT_PREFIXES[name])
            loaded.append(model)
            set_adapter(model, adapter_name)
    except Exception:
        for model in loaded:
            delete_adapter(model, adapter_name)
        raise
    return TrainedAdapter(pipe, path, adapter_name, loaded)


def _load_control(pipe, folder: Path, info: dict[str, Any], untrusted: bool) -> Control:
    """The light encoder, or the ControlNet with its adapter and fully trained parts."""
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{folder} carries control, which conditions SD and SDXL UNets; this "
                         f"{type(pipe).__name__} has none.")
    if info["mode"] == LIGHT:
        encoder = ControlEncoder.load(folder, pipe.unet.conv_in.out_channels, pipe.vae_scale_factor)
        return Control(LIGHT, encoder=encoder.to(pipe.unet.device))
    if is_sdxl(pipe):
        raise ValueError(f"{folder} holds a ControlNet, which boft-diffusion trains and samples on SD 1.x / 2.x "
                         "only; this is an SDXL model.")
    source = info.get("controlnet_source")
    if source:
        from diffusers import ControlNetModel

        if untrusted:
            source = _controlnet_inside(folder, source, pipe.unet.config)
        controlnet = ControlNetModel.from_pretrained(source, local_files_only=untrusted)
    else:
        controlnet = controlnet_from_unet(pipe.unet, pipe.vae_scale_factor)
    config = read_json_object(folder / CONTROLNET_CONFIG)
    if untrusted:
        check_controlnet_config(config, pipe.unet.config, folder / CONTROLNET_CONFIG)
    if config.get("block_out_channels") and list(config["block_out_channels"]) != list(controlnet.config.block_out_channels):
        raise ValueError(f"{folder} was trained for another UNet (block_out_channels {config['block_out_channels']}).")
    tensors = load_file(str(folder / CONTROLNET_TRAINABLE))
    check_finite(tensors, folder / CONTROLNET_TRAINABLE)
    _, unexpected = controlnet.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{folder / CONTROLNET_TRAINABLE} holds tensors this ControlNet lacks: {unexpected[:3]}")
    load_adapter(controlnet, folder / CONTROLNET_FOLDER)
    controlnet.to(pipe.unet.device, pipe.unet.dtype)
    return Control.for_controlnet(pipe, controlnet)


def _controlnet_inside(folder: Path, source: Any, unet_config: Any) -> str:
    """The ControlNet folder an untrusted control folder names, which must lie inside it (never
    a server path or a hub id), with a config that copies this UNet."""
    root = folder.resolve()
    path = (root / source).resolve() if isinstance(source, str) else None
    if path is None or root not in path.parents or not (path / "config.json").is_file():
        raise ValueError(f"{folder / CONTROL_INFO}: controlnet_source must name a ControlNet folder inside the "
                         "uploaded folder.")
    check_controlnet_config(read_json_object(path / "config.json"), unet_config, path / "config.json")
    return str(path)
