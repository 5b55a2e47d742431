import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tuning_breakdown import main  # noqa: E402


def log(subject_score: float, background: float, subjects=("a", "b")) -> list[dict]:
    """A tuning log: a base run per subject (instance score 0.8) and one training run per subject."""
    base = [{"kind": "base", "subject": s, "instances": 0.8,
             "samples": {"subject": [0.2, 0.2], "class_prompt_fidelity": [0.9, 0.9]}} for s in subjects]
    runs = [{"kind": "train", "subject": s, "seed": 0, "method": "boft-m1", "lr_scale": 3.0, "steps": 300,
             "variant": "", "samples": {"subject": [subject_score, subject_score], "recontext_subject": [0.4, 0.4],
                                        "recontext_background": [background, background],
                                        "class_prompt_fidelity": [0.85, 0.85], "class_subject": [0.0, 0.5]}}
            for s in subjects]
    return base + runs


def test_each_log_is_split_into_the_objectives_parts_over_the_runs_they_share(tmp_path, capsys):
    paths = [tmp_path / "recipe.json", tmp_path / "described.json"]
    paths[0].write_text(json.dumps(log(0.4, 1.0)))
    paths[1].write_text(json.dumps(log(0.6, 0.75, subjects=("a", "b", "c"))))
    means = main([str(p) for p in paths] + ["--labels", "recipe", "described"])
    assert means["recipe"]["subject_share"] == pytest.approx(0.5) and means["described"]["subject_share"] == pytest.approx(0.75)
    assert means["described"]["background_right"] == pytest.approx(0.75)
    assert means["recipe"]["prompt_fidelity_change"] == pytest.approx(-0.05)
    assert means["recipe"]["class_leakage"] == pytest.approx(0.25) and means["recipe"]["base_subject_share"] == pytest.approx(0.25)
    table = capsys.readouterr().out
    assert "| a, seed 0: share / background | 0.50 / 1.00 | 0.75 / 0.75 |" in table
    assert "c, seed 0" not in table, "a run only one log has is not compared"


def test_logs_without_a_shared_run_are_refused(tmp_path, capsys):
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    paths[0].write_text(json.dumps(log(0.4, 1.0, subjects=("a",))))
    paths[1].write_text(json.dumps(log(0.4, 1.0, subjects=("b",))))
    with pytest.raises(SystemExit):
        main([str(p) for p in paths])
    assert "share no" in capsys.readouterr().err
