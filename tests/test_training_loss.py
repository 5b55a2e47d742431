"""The training losses as pure functions, checked by hand; targets per prediction type; the optimiser's groups."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from boft_diffusion.families.denoising import DenoisingObjective, NoisedBatch, min_snr_weights
from boft_diffusion.recipes.dreambooth import DreamBoothConfig
from boft_diffusion.training.losses import denoising_loss, dreambooth_loss
from boft_diffusion.training.trainer import TrainingError, make_lr_scheduler, make_optimizer


def objective(kind: str) -> DenoisingObjective:
    return DenoisingObjective(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                            prediction_type=kind), 0.18)


def test_plain_loss_is_mse_and_targets_follow_the_prediction_type():
    gen = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    timesteps = torch.tensor([0, 300, 700, 999])
    batch = NoisedBatch(latents, noise, timesteps, latents)
    eps, v = objective("epsilon"), objective("v_prediction")
    assert torch.equal(eps.target(batch), noise)
    assert torch.allclose(v.target(batch), v.scheduler.get_velocity(latents, noise, timesteps))
    assert torch.allclose(denoising_loss(prediction, noise), F.mse_loss(prediction, noise))
    with pytest.raises(ValueError, match="sample"):
        objective("sample").target(batch)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_caps_clean_and_noisy_ends(kind):
    timesteps = torch.tensor([1, 500, 998])
    snr = objective(kind).signal_to_noise(timesteps)
    alphas = objective(kind).scheduler.alphas_cumprod[timesteps]
    assert torch.allclose(snr, alphas / (1 - alphas))
    weights = min_snr_weights(snr, 5.0, kind == "v_prediction").tolist()
    expected = [min(s, 5.0) / (s + 1 if kind == "v_prediction" else s) for s in snr.tolist()]
    assert weights == pytest.approx(expected, rel=1e-6)
    assert weights[0] < 1.0  # nearly clean latents no longer dominate
    if kind == "v_prediction":
        assert weights[2] < 0.01  # nor does pure noise, whose v-target is the data itself


def test_dreambooth_loss_with_prior_and_min_snr_matches_a_hand_computation():
    """Two instance examples and one class example, Min-SNR weights 0.5 / 1 / 0.25, prior weight 2:
    per-example MSEs 1, 4 and 9 give instance (0.5 * 1 + 1 * 4) / 2 = 2.25, prior 0.25 * 9 = 2.25,
    and a total of 2.25 + 2 * 2.25 = 6.75."""
    target = torch.zeros(3, 4, 2, 2)
    prediction = torch.stack([torch.full((4, 2, 2), value) for value in (1.0, 2.0, 3.0)])
    weights = torch.tensor([0.5, 1.0, 0.25])
    instance = denoising_loss(prediction[:2], target[:2], weights[:2])
    prior = denoising_loss(prediction[2:], target[2:], weights[2:])
    loss, logs = dreambooth_loss([(instance, 2)], [(prior, 1)], prior_loss_weight=2.0)
    assert loss.item() == pytest.approx(6.75)
    assert logs == pytest.approx({"instance_loss": 2.25, "prior_loss": 2.25})
    # parts of different sizes pool by example count: (2.25 * 2 + 9 * 1) / 3 for the instance term
    loss, _ = dreambooth_loss([(instance, 2), (torch.tensor(9.0), 1)], [(prior, 1)], prior_loss_weight=0.0)
    assert loss.item() == pytest.approx(4.5)
    # without class images the loss is the instance term alone, and nothing else is logged
    assert dreambooth_loss([(instance, 2)], [], prior_loss_weight=2.0) == (instance, {})


def test_make_optimizer_gives_named_parameters_their_own_rate(tmp_path):
    config = DreamBoothConfig.from_flags(["--output_dir", str(tmp_path), "--gradient_accumulation_steps", "2",
                                          "--train_batch_size", "3", "--learning_rate", "1e-3", "--scale_lr"])
    params = {"unet.up.to_q.boft_skew.default": nn.Parameter(torch.zeros(2)),
              "text_encoder.token_embedding.identifier.vectors": nn.Parameter(torch.zeros(3))}
    optimizer = make_optimizer(config.run.trainer, params, 1, {"identifier.vectors": 5e-3})
    groups = sorted((g["lr"], [p.numel() for p in g["params"]]) for g in optimizer.param_groups)
    assert [sizes for _, sizes in groups] == [[2], [3]]
    assert [lr for lr, _ in groups] == pytest.approx([6e-3, 3e-2])


def test_a_head_start_holds_the_other_groups_then_runs_their_schedule_over_the_steps_left(tmp_path):
    config = DreamBoothConfig.from_flags(["--output_dir", str(tmp_path), "--learning_rate", "1e-3",
                                          "--lr_scheduler", "cosine"])
    params = {"unet.up.to_q.boft_skew.default": nn.Parameter(torch.zeros(2)),
              "text_encoder.token_embedding.identifier.vectors": nn.Parameter(torch.zeros(3))}
    optimizer = make_optimizer(config.run.trainer, params, 1, {"identifier.vectors": 1e-3}, ("identifier.vectors",))
    # one rate, yet two groups: the head start must be scheduled apart
    assert sorted(g["head_start"] for g in optimizer.param_groups) == [False, True]
    scheduler = make_lr_scheduler(config.run.trainer, optimizer, max_steps=10, head_start_steps=4)
    rates = {True: [], False: []}
    for _ in range(10):
        for group in optimizer.param_groups:
            rates[group["head_start"]].append(group["lr"])
        optimizer.step()
        scheduler.step()
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps)) for steps in (10, 6) for step in range(steps)]
    assert rates[True] == pytest.approx(cosine[:10])
    assert rates[False] == pytest.approx([0.0] * 4 + cosine[10:])
    with pytest.raises(TrainingError, match="a head start of 10 steps leaves no step of the 10"):
        make_lr_scheduler(config.run.trainer, optimizer, max_steps=10, head_start_steps=10)


def test_a_head_start_keeps_the_polynomial_schedules_floor_a_rate(tmp_path):
    from diffusers.optimization import get_scheduler

    config = DreamBoothConfig.from_flags(["--output_dir", str(tmp_path), "--learning_rate", "1e-3",
                                          "--lr_scheduler", "polynomial"])
    params = {"text_encoder.identifier.vectors": nn.Parameter(torch.zeros(3)), "unet.boft_skew": nn.Parameter(torch.zeros(2))}
    optimizer = make_optimizer(config.run.trainer, params, 1, head_start=("identifier.vectors",))
    reference = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    expected = get_scheduler("polynomial", reference, num_warmup_steps=0, num_training_steps=10)
    scheduler = make_lr_scheduler(config.run.trainer, optimizer, max_steps=10, head_start_steps=4)
    for _ in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        reference.step()
        expected.step()


def test_pixel_weight_gives_a_weighted_mean_per_example():
    gen = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(denoising_loss(prediction, target, pixel_weights=ones), denoising_loss(prediction, target))
    left = torch.zeros(2, 1, 8, 8)
    left[..., :4] = 1.0
    changed = prediction.clone()
    changed[..., 4:] += 100.0  # errors where the weight is zero do not count
    expected = ((prediction - target) ** 2)[..., :4].mean()
    assert torch.allclose(denoising_loss(changed, target, pixel_weights=left), expected)
    # squared error 1 on the left half (weight 1), 4 on the right half (weight 0.1): (1 + 0.4) / 1.1
    halves = target.clone()
    halves[..., :4] += 1.0
    halves[..., 4:] += 2.0
    assert torch.allclose(denoising_loss(halves, target, pixel_weights=0.1 + 0.9 * left), torch.tensor(1.4 / 1.1))
