"""The diffusion side of training: prompts to embeddings, images to noised latents, the
denoising target and the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .trainer import TrainingError


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


@dataclass
class NoisedBatch:
    """Clean latents (float32), the noise and timesteps drawn for them, and the noised latents."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def noised_latents(vae, scheduler, pixels: torch.Tensor, generator: torch.Generator, device) -> NoisedBatch:
    """Encode ``pixels`` (a latent sample from the VAE's posterior) and noise them at random
    timesteps. Every draw comes from ``generator`` (on the CPU), in a fixed order, so that a
    resumed run replays them exactly."""
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(device, dist.mean.dtype)
        latents = ((dist.mean + dist.std * eps) * vae.config.scaling_factor).float()
    noise = torch.randn(latents.shape, generator=generator).to(device)
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
