"""The diffusion side of training: prompts to embeddings, images to noised latents, the
denoising target and the loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .trainer import TrainingError


def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    return text_encoder(_token_ids(tokenizer, prompts, device))[0]


def encode_prompts_sdxl(tokenizers, text_encoders, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as ``StableDiffusionXLPipeline.encode_prompt`` encodes them (no clip skip), so that
    training sees what sampling does: each encoder's penultimate hidden states side by side, and
    the pooled projection of the encoder that has one (the second)."""
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        output = text_encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    if pooled is None:
        raise TrainingError("no text encoder of this SDXL model returns a pooled projection "
                            "(text_encoder_2 should be a CLIPTextModelWithProjection).")
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                 target_size: tuple[int, int], device) -> torch.Tensor:
    """SDXL's size conditioning per example, ``[original (h, w), crop top-left (top, left), target
    (h, w)]``: it tells the model how much of a photo it sees and at what size, so that sampling
    with the defaults (uncropped, original = target) asks for whole, full-size pictures."""
    rows = [[*original, *crop, *target_size] for original, crop in zip(original_sizes, crops, strict=True)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


@dataclass
class NoisedBatch:
    """Clean latents (float32), the noise and timesteps drawn for them, and the noised latents."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def vae_dtype(vae, dtype: torch.dtype, sdxl: bool) -> torch.dtype:
    """The dtype to keep the frozen VAE in under mixed precision ``dtype``. SDXL's VAE overflows
    in float16, so it stays in float32 there, as in diffusers' SDXL scripts, unless its config
    says it need not (``force_upcast: false``, the fp16-fixed VAEs)."""
    if dtype == torch.float16 and sdxl and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


@contextmanager
def vae_decodes_in_own_dtype(vae) -> Iterator[None]:
    """While a pipeline samples inside the trainer's autocast, decode its latents in the VAE's own
    dtype: the pipeline hands over the UNet's half-precision latents, and autocast would run even a
    float32 VAE in half precision, where SDXL's overflows."""
    decode = vae.decode

    def own_dtype_decode(latents: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = own_dtype_decode
    try:
        yield
    finally:
        del vae.decode


def posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation for ``pixels`` (what --cache_latents keeps),
    computed in the VAE's own dtype: callers pass full-precision pixels, and autocast would run a
    float32 VAE in half precision again."""
    with torch.no_grad(), torch.autocast(device_type=pixels.device.type, enabled=False):
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    return dist.mean, dist.std


def noised_latents(vae, scheduler, pixels: torch.Tensor, generator: torch.Generator, device,
                   noise_offset: float = 0.0) -> NoisedBatch:
    """Encode ``pixels`` and noise a latent sample of them (see :func:`noise_posterior`)."""
    mean, std = posterior(vae, pixels)
    return noise_posterior(mean, std, vae.config.scaling_factor, scheduler, generator, device, noise_offset)


def noise_posterior(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, scheduler,
                    generator: torch.Generator, device, noise_offset: float = 0.0) -> NoisedBatch:
    """A latent sample from the VAE's posterior, noised at random timesteps. Every draw comes from
    ``generator`` (on the CPU), in a fixed order, so that a resumed run replays them exactly.

    ``noise_offset`` adds ``offset * randn(b, c, 1, 1)`` to the noise (drawn after it; no draw at
    0): a per-channel shift that lets the model learn images darker or brighter on the whole than
    pure noise suggests."""
    with torch.no_grad():
        eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
        latents = ((mean + std * eps) * scaling_factor).float()
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
    return NoisedBatch(latents, noise, timesteps, scheduler.add_noise(latents, noise, timesteps))


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction).")


def denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, snr_gamma: float | None,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example MSE, averaged; with ``snr_gamma`` weighted by Min-SNR (Hang et al. 2023).

    Min-SNR caps the weight of nearly clean timesteps and, for v-prediction, shrinks that of
    nearly pure noise, where the target is the data mean: without it a few instance images
    pull the whole palette of a small model towards their average colour. ``pixel_weight``
    (broadcastable to the prediction) turns each example's MSE into a weighted mean, e.g. to
    learn less of a subject's background."""
    error = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, prediction.ndim))
    if pixel_weight is None:
        per_example = error.mean(dim=dims)
    else:
        weight = pixel_weight.float().expand_as(error)
        per_example = (error * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)
    if not snr_gamma:
        return per_example.mean()
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    capped = torch.clamp(snr, max=snr_gamma)
    weight = capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr
    return (per_example * weight).mean()
