"""Bootstrap intervals and hyperspherical energy, the two numbers the BOFT-vs-LoRA benchmark adds."""

import numpy as np
import pytest
import torch

from boft_diffusion.evaluation.energy import energy_change, hyperspherical_energy
from boft_diffusion.evaluation.statistics import bootstrap_ci


def test_bootstrap_interval_covers_the_mean_and_widens_with_disagreement():
    rng = np.random.default_rng(0)
    agreeing = [rng.normal(0.5, 0.1, 48) for _ in range(9)]
    mean, low, high = bootstrap_ci(agreeing)
    assert low < mean < high and mean == pytest.approx(np.mean([r.mean() for r in agreeing]))
    disagreeing = [run + shift for run, shift in zip(agreeing, np.linspace(-0.3, 0.3, 9), strict=True)]
    _, low2, high2 = bootstrap_ci(disagreeing)
    assert high2 - low2 > 2 * (high - low), "the spread between runs must widen the interval"
    assert bootstrap_ci([[0.7] * 5, [0.7] * 5]) == pytest.approx((0.7, 0.7, 0.7))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_rotating_the_inputs_keeps_hyperspherical_energy_and_a_low_rank_update_does_not():
    torch.manual_seed(0)
    weight = torch.randn(32, 24, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    scale = torch.rand(32, 1, dtype=torch.float64) + 0.5
    rotated = scale * weight @ rotation.T
    assert hyperspherical_energy(rotated) == pytest.approx(hyperspherical_energy(weight), rel=1e-9)
    low_rank = weight + 0.5 * torch.randn(32, 2, dtype=torch.float64) @ torch.randn(2, 24, dtype=torch.float64)
    assert energy_change({"w": weight}, {"w": low_rank}) > 1e-3
    assert energy_change({"w": weight}, {"w": rotated}) < 1e-9
    conv = torch.randn(8, 4, 3, 3)
    assert hyperspherical_energy(conv) > 0
