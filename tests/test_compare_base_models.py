"""benchmarks/compare_base_models.py pairs two base models' DreamBooth runs run by run."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from compare_base_models import MEASURES, compare  # noqa: E402


def summary(subject_score: float, rng: np.random.Generator) -> dict:
    """A bench_dreambooth.py summary: one method, two subjects x two seeds, 8 samples per measure."""
    runs = [{"method": "boft-m2", "subject": subject, "seed": seed,
             "samples": {name: list(rng.uniform(0.5, 1.0, 8)) for name in MEASURES}}
            for subject in ("a", "b") for seed in (40, 41)]
    for run in runs:
        run["samples"]["subject"] = [subject_score] * 8
    base = {subject: {"instances": 0.8, "samples": {"class_prompt_fidelity": [1.0] * 8}} for subject in ("a", "b")}
    return {"args": {"eval_seed": 400}, "runs": runs, "base": base}


def test_paired_difference_shares_and_drift():
    before = summary(0.4, np.random.default_rng(0))
    after = copy.deepcopy(before)
    for run in after["runs"]:
        run["samples"]["subject"] = [0.6] * 8
        if run["subject"] == "b":
            run["samples"]["subject"] = [0.2] * 8
    entry = compare(before, after)["boft-m2"]
    assert entry["runs"] == 4
    mean, low, high = entry["paired"]["subject"]
    assert mean == pytest.approx(0.0) and low < 0 < high  # +0.2 on one subject, -0.2 on the other
    assert entry["paired"]["recontext_subject"] == pytest.approx((0.0, 0.0, 0.0))
    assert entry["after"]["shares"] == pytest.approx({"a": 0.75, "b": 0.25})
    assert entry["after"]["worst_share"] == pytest.approx(0.25)
    fidelity = np.mean([run["samples"]["class_prompt_fidelity"] for run in before["runs"]])
    assert entry["before"]["drift_points"] == pytest.approx(100 * (1.0 - fidelity))


def test_refuses_runs_that_do_not_pair():
    before = summary(0.4, np.random.default_rng(0))
    other_seed = copy.deepcopy(before)
    other_seed["args"]["eval_seed"] = 500
    with pytest.raises(SystemExit, match="eval_seed"):
        compare(before, other_seed)
    other_runs = copy.deepcopy(before)
    for run in other_runs["runs"]:
        run["seed"] += 10
    with pytest.raises(SystemExit, match="no .* run"):
        compare(before, other_runs)
