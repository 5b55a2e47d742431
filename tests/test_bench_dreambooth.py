"""benchmarks/bench_dreambooth.py scores a finished run again without training it, and only then."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_dreambooth import (  # noqa: E402
    BASE_MODEL_FILE,
    PAIRED_MEASURES,
    bench_setup,
    claim_for_model,
    class_image_flags,
    finished_run,
    instances_of,
    main,
    merge_summaries,
    objective,
    output_identity,
    pick,
    print_paired,
    print_per_subject,
    run_flags,
    subject_prompt,
    write_subjects,
)

from boft_diffusion.core.files import WEIGHTS_NAME  # noqa: E402
from boft_diffusion.demo import GUIDANCE, training_flags  # noqa: E402
from boft_diffusion.recipes.dreambooth import DreamBoothConfig  # noqa: E402
from boft_diffusion.tiny import subject_family  # noqa: E402
from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR  # noqa: E402
from boft_diffusion.training.data import load_images  # noqa: E402
from boft_diffusion.training.trainer import FLAGS_JSON, flags_as_json  # noqa: E402


def flags_of(run_dir: Path, seed: int = 10):
    return DreamBoothConfig.from_flags(training_flags(run_dir, 300, seed, run_dir.parent / "class_images"))


def test_a_run_is_reused_only_when_finished_with_the_same_flags(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flags = flags_of(run_dir)
    (run_dir / FLAGS_JSON).write_text(json.dumps(flags_as_json(flags.run.trainer.hparams), indent=2))
    assert not finished_run(run_dir, flags), "no adapter file: the run did not finish"
    (run_dir / WEIGHTS_NAME).write_bytes(b"")
    assert finished_run(run_dir, flags)
    assert not finished_run(run_dir, flags_of(run_dir, seed=11)), "another seed must train again"
    (run_dir / FLAGS_JSON).unlink()
    assert not finished_run(run_dir, flags), "without its flags a folder cannot be trusted to match"


def summary(guidance: float | None, method: str, lr_scale: float = 1.0) -> dict:
    args = {"seeds": [10], "num_images": 4, "eval_seed": 100, "curve_images": 0, "methods": [method]}
    if guidance is not None:
        args["guidance_scale"] = guidance
    return {"args": args, "base": {"sks_star": {"samples": {"subject": [0.0]}}},
            "chosen": {method: {"variant": "", "lr_scale": lr_scale, "steps": 300}},
            "runs": [{"method": method, "subject": "sks_star", "seed": 10, "lr_scale": lr_scale}]}


@pytest.mark.parametrize("flags, culprit", [
    (["--phases", "tune", "--tune_steps", "300", "450"], "--tune_steps 300 450"),
    (["--paired_against", "boft-m1 at lr x3, 300 steps"], "--paired_against boft-m1 at lr x3"),
    (["--phases", "tune", "--tune_steps", "0", "150"], "--tune_steps 0 150"),
    (["--report_seeds", "40"], "--report_seeds"),
])
def test_flags_that_cannot_run_are_refused_before_any_work(tmp_path, monkeypatch, capsys, flags, culprit):
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["bench_dreambooth.py", "--output_dir", str(out), *flags])
    with pytest.raises(SystemExit):
        main()
    assert culprit in capsys.readouterr().err
    assert not out.exists()


def test_summaries_scored_at_other_guidances_are_not_merged():
    merged = merge_summaries([summary(None, "lora"), summary(GUIDANCE, "boft-m2")], ["lora", "boft-m2"])
    assert merged["args"]["methods"] == ["lora", "boft-m2"], "a summary from before the flag was scored at the model's guidance"
    with pytest.raises(SystemExit, match="guidance"):
        merge_summaries([summary(GUIDANCE, "lora"), summary(GUIDANCE / 2, "boft-m2")], ["lora", "boft-m2"])


def test_a_method_confirmed_at_two_points_is_kept_once_per_point():
    summaries = [summary(GUIDANCE, "boft-m1"), summary(GUIDANCE, "lora"), summary(GUIDANCE, "boft-m1", lr_scale=3.0)]
    merged = merge_summaries(summaries, ["boft-m1"])
    names = ["boft-m1 at lr x1, 300 steps", "boft-m1 at lr x3, 300 steps"]
    assert merged["args"]["methods"] == names and list(merged["chosen"]) == names, "lora was not asked for"
    assert [(r["method"], r["lr_scale"]) for r in merged["runs"]] == list(zip(names, [1.0, 3.0], strict=True))
    with pytest.raises(SystemExit, match="boft-m1 at lr x1, 300 steps appears in more than one summary"):
        merge_summaries([summary(GUIDANCE, "boft-m1"), summary(GUIDANCE, "boft-m1")], ["boft-m1"])


def test_a_confirmation_on_fewer_seeds_is_reported_with_the_same_seeds_of_a_longer_one():
    longer = summary(GUIDANCE, "lora")
    longer["args"]["seeds"] = [10, 11]
    longer["runs"].append({**longer["runs"][0], "seed": 11})
    shorter = summary(GUIDANCE, "boft-m1")
    with pytest.raises(SystemExit, match="seeds"):
        merge_summaries([longer, shorter], ["lora", "boft-m1"])
    merged = merge_summaries([longer, shorter], ["lora", "boft-m1"], seeds=[10])
    assert [(r["method"], r["seed"]) for r in merged["runs"]] == [("lora", 10), ("boft-m1", 10)]
    assert merged["args"]["seeds"] == [10]
    with pytest.raises(SystemExit, match="boft-m1 has no run at seed 11"):
        merge_summaries([longer, shorter], ["lora", "boft-m1"], seeds=[11])
    longer["runs"].pop()
    with pytest.raises(SystemExit, match="lora has no run at seed 11"):
        merge_summaries([longer], ["lora"], seeds=[11])


def test_one_point_of_a_method_is_paired_against_another(capsys):
    summaries = [summary(GUIDANCE, "boft-m1"), summary(GUIDANCE, "boft-m1", lr_scale=3.0)]
    for part, value in zip(summaries, (0.25, 0.75), strict=True):
        part["runs"][0]["samples"] = {measure: [value, value] for measure in PAIRED_MEASURES}
    print_paired(merge_summaries(summaries, ["boft-m1"]), "boft-m1 at lr x1, 300 steps")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| boft-m1")]
    assert rows == ["| boft-m1 at lr x3, 300 steps | 1 | " + " | ".join(["+0.50 [+0.50, +0.50]"] * 4) + " |"]


def test_a_held_out_subject_trains_on_its_written_photos_and_is_scored_on_the_same(tmp_path):
    name = subject_family.resolve("evaluation:1")[0]
    write_subjects(tmp_path, ["sks_star", name])
    assert not (tmp_path / "subjects" / "sks_star").exists(), "bundled subjects train on their shipped folder"
    job = {"output_dir": str(tmp_path), "model": "tiny", "subject_prompts": "identifier", "phase": "confirm", "subject": name, "method": "boft-m2",
           "variant": "", "variant_index": 0, "lr_scale": 1.0, "steps": 10, "seed": 10, "checkpoint_every": 0}
    flags = run_flags(job)
    config = DreamBoothConfig.from_flags(flags)
    folder = Path(config.subject.instance_data_dir)
    assert folder == tmp_path / "subjects" / name
    subject = subject_family.subject_by_name(name)
    assert config.subject.instance_prompt == subject.instance_prompt and config.prior.class_prompt == subject.class_prompt
    written = [np.asarray(image) for _, image in load_images(folder, 64)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(written, instances_of(name), strict=True))
    assert flags[flags.index("--learning_rate") + 1] == "0.002", "lr x1 is BASE_LEARNING_RATE, not the recipe's rate"
    tripled = run_flags({**job, "lr_scale": 3.0})
    assert tripled[tripled.index("--learning_rate") + 1] == "0.006"


@pytest.mark.parametrize("name, described", [
    ("sks_star", "a photo of sks ohwx orange star with purple stripes"),
    ("hexagon_stripes_vertical_purple_orange", "a photo of sks ohwx purple hexagon with orange vertical stripes"),
    ("cross_ring_green_blue", "a photo of sks ohwx green cross with a blue ring"),
])
def test_a_described_subject_trains_and_is_captioned_with_its_colours_and_pattern_and_the_identifier_alone_learns(
        tmp_path, name, described):
    write_subjects(tmp_path, [name], "described")
    job = {"output_dir": str(tmp_path), "model": "tiny", "subject_prompts": "described", "phase": "tune",
           "subject": name, "method": "boft-m1", "variant": "", "variant_index": 0, "lr_scale": 3.0, "steps": 10,
           "seed": 0, "checkpoint_every": 0}
    config = DreamBoothConfig.from_flags(run_flags(job))
    subject = subject_family.subject_by_name(name)
    assert subject_prompt(name, "described") == described, "the world's own caption words"
    assert config.subject.instance_prompt == described and config.identifier == ["sks", "ohwx"]
    folder = Path(config.subject.instance_data_dir)
    assert folder == tmp_path / "subjects_described" / name
    captions = [path.read_text().strip() for path in sorted(folder.glob("*.txt"))]
    assert len(captions) == 5 and all(c.startswith(described + " on ") for c in captions)
    written = [np.asarray(image) for _, image in load_images(folder, 64)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(written, instances_of(name), strict=True))
    plain = DreamBoothConfig.from_flags(run_flags({**job, "subject_prompts": "identifier"}))
    assert plain.subject.instance_prompt == subject.instance_prompt and plain.identifier == ["sks", "ohwx"]
    assert plain.prior.class_data_dir == config.prior.class_data_dir, "the class prompt, and its images, are one"


def test_a_candidate_base_model_trains_draws_the_class_images_and_is_never_mistaken_for_another(tmp_path):
    candidate = str(tmp_path / "candidate_model")
    job = {"output_dir": str(tmp_path), "model": candidate, "subject_prompts": "identifier", "phase": "confirm",
           "subject": "sks_star",
           "method": "boft-m1", "variant": "", "variant_index": 0, "lr_scale": 3.0, "steps": 10, "seed": 40,
           "checkpoint_every": 0}
    config = DreamBoothConfig.from_flags(run_flags(job))
    assert config.run.model.pretrained_model_name_or_path == candidate
    class_config = DreamBoothConfig.from_flags(class_image_flags(job))
    assert class_config.run.model.pretrained_model_name_or_path == candidate
    assert class_config.prior.class_data_dir == config.prior.class_data_dir

    run_dir = Path(config.run.trainer.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / WEIGHTS_NAME).write_bytes(b"")
    (run_dir / FLAGS_JSON).write_text(json.dumps(flags_as_json(config.run.trainer.hparams)))
    assert finished_run(run_dir, config)
    on_the_embedded_model = DreamBoothConfig.from_flags(run_flags({**job, "model": "tiny"}))
    assert not finished_run(run_dir, on_the_embedded_model), "a run on another base model must train again"


def refusal(out: Path, model: str, monkeypatch, capsys) -> str:
    """The error bench_dreambooth.py gives for ``--output_dir out`` with ``model``."""
    monkeypatch.setattr(sys, "argv", ["bench_dreambooth.py", "--output_dir", str(out), "--subjects", "sks_star",
                                      "--pretrained_model_name_or_path", model])
    with pytest.raises(SystemExit):
        main()
    return capsys.readouterr().err


def test_an_output_folder_of_one_base_model_is_refused_to_another(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    for same in ("tiny", "embedded", str(EMBEDDED_MODEL_DIR)):
        claim_for_model(out, output_identity(same), argparse.ArgumentParser())
    assert bench_setup(out) == (str(EMBEDDED_MODEL_DIR.resolve()), "identifier")
    candidate = tmp_path / "candidate"
    shutil.copytree(EMBEDDED_MODEL_DIR, candidate)
    assert "holds runs of the base model in" in refusal(out, str(candidate), monkeypatch, capsys)
    assert sorted(p.name for p in out.iterdir()) == [BASE_MODEL_FILE], "nothing was written for the other model"

    retrained = tmp_path / "bench_candidate"
    claim_for_model(retrained, output_identity(str(candidate)), argparse.ArgumentParser())
    weights = next((candidate / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert "UNet sha256" in refusal(retrained, str(candidate), monkeypatch, capsys), "retrained in the same folder"


def test_described_prompts_the_tokenizer_would_cut_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["bench_dreambooth.py", "--output_dir", str(out), "--subject_prompts", "described",
                                      "--subjects", "evaluation:12"])
    with pytest.raises(SystemExit):
        main()
    error = capsys.readouterr().err
    assert "longer than the model's tokenizer takes" in error and "horizontal stripes on a" in error
    assert not out.exists(), "a refused run claims no folder"


def test_a_mistyped_model_claims_nothing_and_an_unmarked_folder_is_the_embedded_models(tmp_path, monkeypatch, capsys):
    fresh = tmp_path / "fresh"
    assert "not a tiny-world pipeline folder" in refusal(fresh, str(tmp_path / "typo"), monkeypatch, capsys)
    assert not fresh.exists()
    old = tmp_path / "old"
    (old / "sks_star" / "class_images-seed10").mkdir(parents=True)
    candidate = tmp_path / "candidate"
    shutil.copytree(EMBEDDED_MODEL_DIR, candidate)
    assert "holds runs of the base model in" in refusal(old, str(candidate), monkeypatch, capsys)
    monkeypatch.setattr(sys, "argv", ["bench_dreambooth.py", "--output_dir", str(old), "--subjects", "sks_star",
                                      "--subject_prompts", "described"])
    with pytest.raises(SystemExit):
        main()
    assert "--subject_prompts identifier; this run asks for" in capsys.readouterr().err
    claim_for_model(old, output_identity("tiny"), argparse.ArgumentParser())
    logged_only = tmp_path / "logged_only"
    logged_only.mkdir()
    (logged_only / "log.txt").write_text("a benchmark's log, written before it started\n")
    claim_for_model(logged_only, output_identity(str(candidate)), argparse.ArgumentParser())
    assert bench_setup(logged_only) == (str(candidate.resolve()), "identifier")
    assert bench_setup(old) == (str(EMBEDDED_MODEL_DIR.resolve()), "identifier")


def scores(subject: float) -> dict[str, list[float]]:
    """Samples whose only varying measure is subject fidelity (in and out of context)."""
    return {"subject": [subject], "recontext_subject": [subject], "recontext_background": [1.0],
            "class_prompt_fidelity": [0.9], "class_shape": [0.9], "class_subject": [0.0]}


def test_picks_average_each_tuning_subjects_objective_against_its_own_base():
    bases = {"easy": {"samples": scores(0.0), "instances": 1.0}, "hard": {"samples": scores(0.0), "instances": 0.25}}
    fidelity = {1.0: {"easy": 0.9, "hard": 0.1}, 2.0: {"easy": 0.5, "hard": 0.4}}
    tuned = [{"method": "lora", "variant": "", "lr_scale": scale, "steps": 150, "checkpoints": {},
              "subject": subject, "seed": 0, "samples": scores(value)}
             for scale, by_subject in fidelity.items() for subject, value in by_subject.items()]
    picked = pick(tuned, bases, ["lora"])
    assert picked["chosen"]["lora"]["lr_scale"] == 2.0, \
        "0.4 of the hard subject's 0.25 outweighs 0.1; against one shared base lr x1 would win"
    assert len(picked["objective_grid"]["lora"]) == 2
    same_base = {name: bases["easy"] for name in bases}
    assert pick(tuned, same_base, ["lora"])["chosen"]["lora"]["lr_scale"] == 1.0


def test_the_objective_grid_keeps_each_tuning_seeds_mean():
    base = {"samples": scores(0.0), "instances": 1.0}
    tuned = [{"method": "boft-m1", "variant": "", "lr_scale": 1.0, "steps": 300, "subject": subject, "seed": seed,
              "checkpoints": {"150": scores(value / 2)}, "samples": scores(value)}
             for (subject, seed), value in {("a", 0): 0.8, ("b", 0): 0.4, ("a", 1): 0.2, ("b", 1): 0.2}.items()]
    grid = {point["steps"]: point for point in pick(tuned, {"a": base, "b": base}, ["boft-m1"])["objective_grid"]["boft-m1"]}
    assert set(grid) == {150, 300}
    for steps, point in grid.items():
        ran = {seed: [objective(r["samples"] if steps == 300 else r["checkpoints"]["150"], base)
                      for r in tuned if r["seed"] == seed] for seed in (0, 1)}
        assert point["objective_by_seed"] == {seed: pytest.approx(np.mean(o)) for seed, o in ran.items()}
        assert point["objective"] == pytest.approx(np.mean([o for values in ran.values() for o in values]))
    assert grid[300]["objective_by_seed"][0] > grid[300]["objective_by_seed"][1]
    assert grid[150]["objective_by_seed"][0] < grid[300]["objective_by_seed"][0]


def test_each_subject_is_reported_as_a_share_of_its_own_instance_score(capsys):
    runs = [{"method": "lora", "subject": subject, "seed": seed, "samples": {"subject": [value, value]}}
            for subject, values in {"easy": (0.8, 0.6), "hard": (0.2, 0.2)}.items()
            for seed, value in enumerate(values)]
    summary = {"args": {"methods": ["lora"]}, "runs": runs,
               "base": {"easy": {"instances": 1.0}, "hard": {"instances": 0.5}, "unrun": {"instances": 1.0}}}
    print_per_subject(summary)
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "| 0.70 (0.70) |" in rows["easy"] and "| 0.20 (0.40) |" in rows["hard"] and "unrun" not in rows
    assert rows["mean share / worst subject's share"].endswith("| 0.55 / 0.40 |")
