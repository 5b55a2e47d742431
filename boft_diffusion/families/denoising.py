"""The DDPM training objective of the UNet families: noise clean latents at random timesteps and
name what the model learns to predict (the noise, or the velocity for v-prediction models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR loss weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon prediction,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction. They cap the weight of nearly clean timesteps
    and, for v-prediction, shrink that of nearly pure noise, where the target is the data mean:
    without them a few instance images pull a small model's whole palette towards their average colour."""
    capped = torch.clamp(snr, max=gamma)
    return capped / (snr + 1) if v_prediction else capped / snr


@dataclass
class NoisedBatch:
    """Clean latents (float32), the noise and timesteps drawn for them, and the noised latents; flow
    objectives also keep each example's noise level sigma."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor | None = None


def posterior(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation for ``pixels`` (what --cache_latents keeps),
    computed in the VAE's own dtype: callers pass full-precision pixels, and autocast would run a
    float32 VAE in half precision again."""
    with torch.no_grad(), torch.autocast(device_type=pixels.device.type, enabled=False):
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    return dist.mean, dist.std


@dataclass
class DenoisingObjective:
    """A DDPM noise schedule (the pipeline's scheduler config) and the VAE's latent scale."""

    scheduler: Any  # diffusers.DDPMScheduler
    scaling_factor: float

    @classmethod
    def from_pipeline(cls, pipe: Any) -> DenoisingObjective:
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_config(pipe.scheduler.config), pipe.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def noise_posterior(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                        device: torch.device, noise_offset: float = 0.0) -> NoisedBatch:
        """A latent sample from the VAE's posterior, noised at random timesteps. Every draw comes from
        ``generator`` (on the CPU), in a fixed order, so that a resumed run replays them exactly.

        ``noise_offset`` adds ``offset * randn(b, c, 1, 1)`` to the noise (drawn after it; no draw at
        0): a per-channel shift that lets the model learn images darker or brighter on the whole than
        pure noise suggests."""
        with torch.no_grad():
            eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
            latents = ((mean + std * eps) * self.scaling_factor).float()
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator).to(device)
        return NoisedBatch(latents, noise, timesteps, self.scheduler.add_noise(latents, noise, timesteps))

    def noise_pixels(self, vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator, device: torch.device,
                     noise_offset: float = 0.0) -> NoisedBatch:
        """Encode ``pixels`` and noise a latent sample of them (see :meth:`noise_posterior`)."""
        return self.noise_posterior(*posterior(vae, pixels), generator, device, noise_offset)

    def target(self, noised: NoisedBatch) -> torch.Tensor:
        """What the denoiser learns to predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x)."""
        if self.prediction_type == "epsilon":
            return noised.noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(noised.latents, noised.noise, noised.timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction).")

    def signal_to_noise(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return alphas / (1 - alphas)

    def loss_weights(self, noised: NoisedBatch, snr_gamma: float | None) -> torch.Tensor | None:
        """Min-SNR weights of the drawn timesteps with ``snr_gamma``, else None (plain MSE)."""
        if not snr_gamma:
            return None
        return min_snr_weights(self.signal_to_noise(noised.timesteps), snr_gamma,
                               self.prediction_type == "v_prediction")
