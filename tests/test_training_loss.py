import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from boft_diffusion.training.config import OptimizerConfig, TrainerConfig
from boft_diffusion.training.diffusion import denoising_loss, denoising_target
from boft_diffusion.training.trainer import TrainingError, make_optimizer


def scheduler(kind: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind)


def test_plain_loss_is_mse_and_targets_follow_the_prediction_type():
    gen = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    timesteps = torch.tensor([0, 300, 700, 999])
    eps, v = scheduler("epsilon"), scheduler("v_prediction")
    assert torch.equal(denoising_target(eps, latents, noise, timesteps), noise)
    assert torch.allclose(denoising_target(v, latents, noise, timesteps), v.get_velocity(latents, noise, timesteps))
    assert torch.allclose(denoising_loss(prediction, noise, timesteps, eps, None), F.mse_loss(prediction, noise))
    with pytest.raises(TrainingError, match="sample"):
        denoising_target(scheduler("sample"), latents, noise, timesteps)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_caps_clean_and_noisy_ends(kind):
    sched = scheduler(kind)
    target = torch.zeros(3, 4, 8, 8)
    prediction = torch.ones(3, 4, 8, 8)  # per-example MSE 1: the loss of each is its weight
    timesteps = torch.tensor([1, 500, 998])
    weights = [denoising_loss(prediction[i : i + 1], target[i : i + 1], timesteps[i : i + 1], sched, 5.0).item()
               for i in range(3)]
    snr = sched.alphas_cumprod[timesteps] / (1 - sched.alphas_cumprod[timesteps])
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if kind == "v_prediction" else snr)
    assert weights == pytest.approx(expected.tolist(), rel=1e-5)
    assert weights[0] < 1.0  # nearly clean latents no longer dominate
    if kind == "v_prediction":
        assert weights[2] < 0.01  # nor does pure noise, whose v-target is the data itself


def test_make_optimizer_gives_named_parameters_their_own_rate():
    config = TrainerConfig(output_dir="unused", gradient_accumulation_steps=2, train_batch_size=3,
                           optimizer=OptimizerConfig(learning_rate=1e-3, scale_lr=True))
    params = {"unet.up.to_q.boft_skew.default": nn.Parameter(torch.zeros(2)),
              "text_encoder.token_embedding.identifier.vectors": nn.Parameter(torch.zeros(3))}
    optimizer = make_optimizer(config, params, 1, {"identifier.vectors": 5e-3})
    groups = sorted((g["lr"], [p.numel() for p in g["params"]]) for g in optimizer.param_groups)
    assert [sizes for _, sizes in groups] == [[2], [3]]
    assert [lr for lr, _ in groups] == pytest.approx([6e-3, 3e-2])


def test_pixel_weight_gives_a_weighted_mean_per_example():
    gen = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    timesteps, eps = torch.tensor([100, 800]), scheduler("epsilon")
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(denoising_loss(prediction, target, timesteps, eps, None, ones),
                          denoising_loss(prediction, target, timesteps, eps, None))
    left = torch.zeros(2, 1, 8, 8)
    left[..., :4] = 1.0
    changed = prediction.clone()
    changed[..., 4:] += 100.0  # errors where the weight is zero do not count
    expected = ((prediction - target) ** 2)[..., :4].mean()
    assert torch.allclose(denoising_loss(changed, target, timesteps, eps, None, left), expected)
    # squared error 1 on the left half (weight 1), 4 on the right half (weight 0.1): (1 + 0.4) / 1.1
    halves = target.clone()
    halves[..., :4] += 1.0
    halves[..., 4:] += 2.0
    assert torch.allclose(denoising_loss(halves, target, timesteps, eps, None, 0.1 + 0.9 * left),
                          torch.tensor(1.4 / 1.1))
