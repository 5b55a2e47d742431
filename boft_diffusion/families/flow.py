"""The rectified-flow objective of the transformer families (Flux.1, SD3): clean latents and noise
mixed along a straight line, ``noisy = (1 - sigma) x + sigma noise``, and the velocity
``noise - x`` as the target, with the timestep densities and loss weightings of diffusers' SD3 and
Flux training scripts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .denoising import NoisedBatch, posterior

#: --weighting_scheme: how timesteps are drawn (logit_normal, mode) or how their losses are weighted
#: (sigma_sqrt, cosmap); "none" draws uniformly and weighs equally.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass
class TimestepDensity:
    """The --weighting_scheme and its parameters (--logit_mean, --logit_std, --mode_scale)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` points in [0, 1) from the scheme's density, all drawn from ``generator``."""
        if self.weighting_scheme == "logit_normal":
            return torch.sigmoid(torch.randn(count, generator=generator) * self.logit_std + self.logit_mean)
        u = torch.rand(count, generator=generator)
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Per-example loss weights of the schemes that weigh (SD3 paper, section 3.1), else None."""
        if self.weighting_scheme == "sigma_sqrt":
            return sigmas.float() ** -2.0
        if self.weighting_scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return None


@dataclass
class FlowMatchingObjective:
    """A flow-matching schedule (the pipeline's scheduler config, its shift included) and the VAE's
    latent shift and scale."""

    scheduler: Any  # diffusers.FlowMatchEulerDiscreteScheduler
    scaling_factor: float
    shift_factor: float
    density: TimestepDensity
    prediction_type = "flow"

    @classmethod
    def from_pipeline(cls, pipe: Any, density: TimestepDensity) -> FlowMatchingObjective:
        from diffusers import FlowMatchEulerDiscreteScheduler

        vae = pipe.vae.config
        return cls(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), vae.scaling_factor,
                   vae.shift_factor or 0.0, density)

    def noise_posterior(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                        device: torch.device, noise_offset: float = 0.0) -> NoisedBatch:
        """A latent sample from the VAE's posterior, shifted and scaled as the pipeline unscales it,
        moved towards noise by a sigma drawn from the timestep density. Draws come from ``generator``
        in a fixed order (latent sample, noise, offset, timesteps), so a resumed run replays them."""
        with torch.no_grad():
            eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
            latents = ((mean + std * eps - self.shift_factor) * self.scaling_factor).float()
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(device)
        count = self.scheduler.config.num_train_timesteps
        indices = (self.density.draw(len(latents), generator) * count).long().clamp(max=count - 1)
        timesteps = self.scheduler.timesteps[indices].to(device)
        sigmas = self.scheduler.sigmas[indices].to(device, torch.float32)
        mix = sigmas.view(-1, *[1] * (latents.ndim - 1))
        return NoisedBatch(latents, noise, timesteps, (1 - mix) * latents + mix * noise, sigmas)

    def noise_pixels(self, vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator, device: torch.device,
                     noise_offset: float = 0.0) -> NoisedBatch:
        """Encode ``pixels`` and noise a latent sample of them (see :meth:`noise_posterior`)."""
        return self.noise_posterior(*posterior(vae, pixels), generator, device, noise_offset)

    def target(self, noised: NoisedBatch) -> torch.Tensor:
        """The velocity along the straight path from the latents to the noise."""
        return noised.noise - noised.latents

    def loss_weights(self, noised: NoisedBatch, snr_gamma: float | None) -> torch.Tensor | None:
        """The weighting scheme's weights (the recipe refuses --snr_gamma for flow models)."""
        return self.density.loss_weights(noised.sigmas)
