"""Control for BOFT finetuning: the paper's light control encoder, and BOFT on a diffusers ControlNet.

Light control (BOFT paper, section on controllable generation): a small convolutional encoder
maps the conditioning image to features shaped like the UNet's ``conv_in`` output; its last
layer starts at zero, and its output is added after ``conv_in``. The UNet's attention
projections get BOFT adapters. A forward hook carries the conditioning into the UNet, so any
diffusers pipeline can sample with it inside ``with light_control(unet, encoder, image):``.

ControlNet: a ``ControlNetModel`` copied from the UNet (or loaded) whose copied blocks stay
frozen and receive BOFT adapters, while its zero convolutions and conditioning embedding train.

``Control`` samples a pipeline with either kind, so that validation, evaluation and the app share
one dispatch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.adapters import adapter_configs, base_state_dict
from ..core.files import atomic_write, read_json_object
from ..core.images import image_to_tensor, to_rgb
from ..families.loading import quiet_progress

ENCODER_CONFIG = "control_encoder_config.json"
ENCODER_FIELDS = ("out_channels", "downscale", "hidden", "in_channels")
MAX_ENCODER_HIDDEN = 1024
CONDITION_CHANNELS = 3  # conditioning images are RGB
#: Architecture fields a ControlNet copies from its UNet; an untrusted config must match them.
CONTROLNET_SHARED_FIELDS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                            "cross_attention_dim", "attention_head_dim", "num_attention_heads", "norm_num_groups",
                            "transformer_layers_per_block", "only_cross_attention", "use_linear_projection",
                            "addition_embed_type", "projection_class_embeddings_input_dim", "class_embed_type",
                            "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type", "time_embedding_type",
                            "time_embedding_dim", "mid_block_type", "flip_sin_to_cos", "freq_shift")
MAX_EMBEDDING_LEVELS = 6
ENCODER_WEIGHTS = "control_encoder.safetensors"
LIGHT, CONTROLNET = "light", "controlnet"


class ControlEncoder(nn.Module):
    """Conditioning image ``[B, 3, H, W]`` in [-1, 1] -> features ``[B, C, H/f, W/f]``.

    ``downscale`` must be a power of two (the VAE's scale factor); the output layer is zero
    initialised so that a fresh encoder leaves the UNet unchanged.
    """

    def __init__(self, out_channels: int, downscale: int = 8, hidden: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        steps = int(round(math.log2(downscale)))
        if 2**steps != downscale:
            raise ValueError(f"control encoder downscale must be a power of two, got {downscale}.")
        self.config = {"out_channels": out_channels, "downscale": downscale, "hidden": hidden, "in_channels": in_channels}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(steps):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=1, stride=2), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(condition))

    def save(self, folder: str | os.PathLike) -> None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder, {
            ENCODER_WEIGHTS: lambda tmp: save_file(tensors, tmp),
            ENCODER_CONFIG: lambda tmp: Path(tmp).write_text(json.dumps(self.config, indent=2)),
        })

    @classmethod
    def load(cls, folder: str | os.PathLike, out_channels: int, downscale: int) -> ControlEncoder:
        """Rebuild a saved encoder for a UNet with ``out_channels`` after ``conv_in`` and a VAE that
        downscales by ``downscale``; the config is checked before anything is allocated, the
        weights before they are used."""
        folder = Path(folder)
        config = read_json_object(folder / ENCODER_CONFIG)
        check_encoder_config(config, out_channels, downscale, folder / ENCODER_CONFIG)
        encoder = cls(**config)
        weights = folder / ENCODER_WEIGHTS
        tensors = load_file(str(weights))
        check_finite(tensors, weights)
        try:
            encoder.load_state_dict(tensors)
        except RuntimeError as error:
            raise ValueError(f"{weights} does not match its config: {error}") from error
        return encoder


def check_encoder_config(config: dict[str, Any], out_channels: int, downscale: int, path: Path) -> None:
    """Every number of a light control encoder config: what this model needs, and a bounded width."""
    unknown = set(config) - set(ENCODER_FIELDS)
    if unknown:
        raise ValueError(f"{path} is not a control encoder config of this library (unknown {sorted(unknown)}).")
    for key in ENCODER_FIELDS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: {key} must be an integer, got {value!r}.")
    needed = {"out_channels": out_channels, "downscale": downscale, "in_channels": CONDITION_CHANNELS}
    for key, value in needed.items():
        if config[key] != value:
            raise ValueError(f"{path}: {key} is {config[key]}, this model needs {value}.")
    if not 0 < config["hidden"] <= MAX_ENCODER_HIDDEN:
        raise ValueError(f"{path}: hidden is {config['hidden']}, it must be in [1, {MAX_ENCODER_HIDDEN}].")


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that would sample NaN or black images."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key!r} holds NaN, infinite or non-float values.")


def check_controlnet_config(config: dict[str, Any], unet_config: Any, path: Path) -> None:
    """A ControlNet config from an untrusted folder must describe a copy of this UNet, so that
    building it allocates what the UNet does and no more."""
    for key in CONTROLNET_SHARED_FIELDS:
        if key in config and key in unet_config and _as_list(config[key]) != _as_list(unet_config[key]):
            raise ValueError(f"{path}: {key} is {config[key]!r}, this model's UNet has {unet_config[key]!r}.")
    widest = max(unet_config["block_out_channels"])
    channels = config.get("conditioning_embedding_out_channels", [])
    if not (isinstance(channels, list) and len(channels) <= MAX_EMBEDDING_LEVELS and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 < c <= widest for c in channels)):
        raise ValueError(f"{path}: conditioning_embedding_out_channels must be at most {MAX_EMBEDDING_LEVELS} "
                         f"integers in [1, {widest}], got {channels!r}.")
    if config.get("conditioning_channels", CONDITION_CHANNELS) != CONDITION_CHANNELS:
        raise ValueError(f"{path}: conditioning_channels must be {CONDITION_CHANNELS}.")


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def encoder_for_unet(unet, vae_scale_factor: int) -> ControlEncoder:
    return ControlEncoder(unet.conv_in.out_channels, vae_scale_factor)


@contextlib.contextmanager
def light_control(unet, encoder: ControlEncoder, condition: torch.Tensor, scale: float = 1.0) -> Iterator[None]:
    """Add ``scale * encoder(condition)`` after ``unet.conv_in`` for every forward in the block.

    The features are repeated to the UNet's batch, so classifier-free guidance (which doubles
    the batch) and several images per prompt work unchanged.
    """

    def add_control(module, inputs, output):
        features = encoder(condition.to(output.device, torch.float32))
        if output.shape[0] % features.shape[0]:
            raise ValueError(f"{features.shape[0]} control images for a UNet batch of {output.shape[0]}.")
        features = features.repeat(output.shape[0] // features.shape[0], 1, 1, 1)
        return output + scale * features.to(output.dtype)

    handle = unet.conv_in.register_forward_hook(add_control)
    try:
        yield
    finally:
        handle.remove()


def condition_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A PIL conditioning image as a ``[1, 3, height, width]`` tensor in [-1, 1]; ``size`` is (width, height)."""
    image = to_rgb(image).resize(size, Image.BILINEAR)
    return image_to_tensor(image)[None]


# diffusers ControlNet -------------------------------------------------------------------------------
CONTROLNET_FULL_TRAIN = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def controlnet_from_unet(unet, vae_scale_factor: int = 8):
    """``ControlNetModel.from_unet`` for any VAE scale factor and attention-pooled text embeddings.

    The conditioning embedding downsamples once per factor of two of the VAE (SD: 8, three
    times; the embedded tiny model: 4, twice). diffusers' from_unet also drops
    ``addition_embed_type_num_heads``, so for ``addition_embed_type="text"`` we copy the module.
    """
    import copy

    from diffusers import ControlNetModel

    downsamples = int(round(math.log2(vae_scale_factor)))
    channels = (16, 32, 96, 256, 256)[: downsamples + 1]
    if adapter_configs(unet):
        unet = plain_copy(unet)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    if unet.config.get("addition_embed_type") == "text":
        controlnet.add_embedding = copy.deepcopy(unet.add_embedding)
        controlnet.register_to_config(addition_embed_type_num_heads=unet.config.addition_embed_type_num_heads)
    return controlnet


def plain_copy(model):
    """The same model class without adapters, holding the base weights."""
    plain = type(model).from_config(model.config)
    plain.load_state_dict(base_state_dict(model))
    return plain.to(model.device)


def controlnet_trainable_parameters(controlnet) -> dict[str, nn.Parameter]:
    """The ControlNet parts that train in full: conditioning embedding and zero convolutions."""
    return {n: p for n, p in controlnet.named_parameters() if n.startswith(CONTROLNET_FULL_TRAIN)}


@dataclass
class Control:
    """Trained control for a pipeline: the light encoder, or a ControlNet pipeline sharing the
    pipeline's components."""

    mode: str
    encoder: ControlEncoder | None = None
    controlnet_pipe: Any = None

    @classmethod
    def for_controlnet(cls, pipe, controlnet) -> Control:
        from diffusers import StableDiffusionControlNetPipeline

        components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        control_pipe = quiet_progress(StableDiffusionControlNetPipeline(**components, controlnet=controlnet))
        return cls(CONTROLNET, controlnet_pipe=control_pipe)

    @property
    def controlnet(self):
        return None if self.controlnet_pipe is None else self.controlnet_pipe.controlnet

    def sample(self, pipe, condition: Image.Image, size: tuple[int, int], scale: float = 1.0,
               **pipe_kwargs: Any) -> Image.Image:
        """One image from ``pipe`` conditioned on ``condition`` (resized to ``size``, width first)."""
        with torch.no_grad():
            if self.mode == LIGHT:
                with light_control(pipe.unet, self.encoder, condition_tensor(condition, size), scale):
                    return pipe(**pipe_kwargs).images[0]
            self.controlnet_pipe.scheduler = pipe.scheduler
            return self.controlnet_pipe(image=condition.convert("RGB").resize(size),
                                        controlnet_conditioning_scale=scale, **pipe_kwargs).images[0]
