import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_dreambooth import objective  # noqa: E402
from tuning_breakdown import EXTRAS, breakdown, main  # noqa: E402


def log(subject_score: float, background: float, subjects=("a", "b")) -> list[dict]:
    """A tuning log: a base run per subject (instance score 0.8) and one training run per subject."""
    base = [{"kind": "base", "subject": s, "instances": 0.8,
             "samples": {"subject": [0.2, 0.2], "class_prompt_fidelity": [0.9, 0.9], "class_shape": [1.0, 0.5]}}
            for s in subjects]
    runs = [{"kind": "train", "subject": s, "seed": 0, "method": "boft-m1", "lr_scale": 3.0, "steps": 300,
             "variant": "", "samples": {"subject": [subject_score, subject_score], "recontext_subject": [0.4, 0.4],
                                        "recontext_background": [background, background],
                                        "class_prompt_fidelity": [0.85, 1.0], "class_shape": [0.5, 0.5],
                                        "class_subject": [0.0, 0.5]}}
            for s in subjects]
    return base + runs


def test_the_parts_are_the_objectives_own_and_average_to_it():
    runs = log(0.4, 0.75)
    parts = breakdown(runs)[("a", 0, "boft-m1", 3.0, 300, "")]
    assert parts["prompt_fidelity_kept"] == 1.0, "the objective caps prompt fidelity at the base model's"
    assert parts["class_shape_kept"] == pytest.approx(2 / 3) and parts["no_class_leakage"] == pytest.approx(0.75)
    six = [value for name, value in parts.items() if name not in EXTRAS]
    assert len(six) == 6 and np.mean(six) == pytest.approx(objective(runs[2]["samples"], runs[0]))
    assert parts["class_leakage"] == pytest.approx(0.25) and parts["base_subject_share"] == pytest.approx(0.25)


def test_each_log_is_compared_over_the_runs_they_share(tmp_path, capsys):
    paths = [tmp_path / "recipe.json", tmp_path / "described.json"]
    paths[0].write_text(json.dumps(log(0.4, 1.0)))
    paths[1].write_text(json.dumps(log(0.6, 0.75, subjects=("a", "b", "c"))))
    means = main([str(p) for p in paths] + ["--labels", "recipe", "described"])
    assert means["recipe"]["subject_share"] == pytest.approx(0.5) and means["described"]["subject_share"] == pytest.approx(0.75)
    assert means["described"]["background_right"] == pytest.approx(0.75)
    table = capsys.readouterr().out
    assert "| a, seed 0: share / background | 0.50 / 1.00 | 0.75 / 0.75 |" in table
    assert "c, seed 0" not in table, "a run only one log has is not compared"


@pytest.mark.parametrize("second, labels, culprit", [
    (("b",), [], "share no"),
    (("a",), ["--labels", "same", "same"], "different labels"),
])
def test_logs_that_cannot_be_compared_are_refused(tmp_path, capsys, second, labels, culprit):
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    paths[0].write_text(json.dumps(log(0.4, 1.0, subjects=("a",))))
    paths[1].write_text(json.dumps(log(0.4, 1.0, subjects=second)))
    with pytest.raises(SystemExit):
        main([str(p) for p in paths] + labels)
    assert culprit in capsys.readouterr().err
