"""Bootstrap intervals and hyperspherical energy, the two numbers the BOFT-vs-LoRA benchmark adds."""

import numpy as np
import pytest
import torch

from boft_diffusion.evaluation.energy import energy_change, hyperspherical_energy
from boft_diffusion.evaluation.statistics import bootstrap_ci, paired_bootstrap_ci


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


def test_pairing_removes_what_two_methods_share():
    rng = np.random.default_rng(1)
    hardness = [rng.uniform(0, 1, 48) for _ in range(9)]  # per subject/seed and sampling seed, shared
    baseline = [h + rng.normal(0, 0.05, 48) for h in hardness]
    better = [h + 0.1 + rng.normal(0, 0.05, 48) for h in hardness]
    mean, low, high = paired_bootstrap_ci(better, baseline)
    assert mean == pytest.approx(np.mean([b.mean() - a.mean() for a, b in zip(baseline, better, strict=True)]))
    assert 0 < low < mean < high, "a shift of 0.1 must show once the shared hardness is paired away"
    # Pairing runs but not samples leaves the sampling seeds' shared hardness in the interval.
    _, loose_low, loose_high = bootstrap_ci([b - a.mean() for a, b in zip(baseline, better, strict=True)])
    assert high - low < (loose_high - loose_low) / 3
    assert paired_bootstrap_ci(baseline, baseline) == pytest.approx((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="run 1 has 47 samples"):
        paired_bootstrap_ci([baseline[0], baseline[1][:47]], baseline[:2])
    with pytest.raises(ValueError, match="2 runs against 3"):
        paired_bootstrap_ci(baseline[:2], baseline[:3])


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
