"""The app's training runs: images checked and re-encoded, the demo preset is `make demo`'s recipe, and
real runs of train_dreambooth.py queue one at a time, cancel keeping their last checkpoint, reconnect
by id, refuse other visitors' ids and resume after a killed server."""

import io
import json
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import app
from boft_diffusion import demo
from boft_diffusion.app import training_runs
from boft_diffusion.app.errors import StudioError
from boft_diffusion.app.studio import Limits, Studio
from boft_diffusion.app.training_runs import (
    INSTANCE_FOLDER,
    Preset,
    TrainingLimits,
    TrainingRequest,
    TrainingRuns,
    class_images_folder,
    collect_images,
    subject_prompts,
    training_flags,
)
from boft_diffusion.app.uploads import install_upload
from boft_diffusion.recipes.dreambooth import DreamBoothConfig
from boft_diffusion.tiny.bundled import example_subject_dir
from boft_diffusion.training.cli import read_config_file

STAR = example_subject_dir()
QUOTA = Limits().upload_quota()


def star_files() -> list[Path]:
    return sorted(STAR.iterdir())


def test_prompts_come_from_the_words_and_refuse_anything_else():
    assert subject_prompts("sks ohwx", "star") == ("a photo of sks ohwx star", "a photo of star")
    for identifier, noun in (("", "star"), ("--output_dir /etc", "star"), ("sks", "star ../x"), ("a b c d", "star"),
                             ("star", "star")):
        with pytest.raises(StudioError):
            subject_prompts(identifier, noun)


def test_images_are_checked_reencoded_and_keep_their_sidecar_captions(tmp_path):
    captions = collect_images(star_files(), tmp_path / "images", QUOTA, TrainingLimits())
    assert list(captions) == [f"sks_star_0{i}.png" for i in range(5)]
    assert captions["sks_star_00.png"] == (STAR / "sks_star_00.txt").read_text().strip()
    for name in captions:  # lossless: the pixels the demo trains on
        assert Image.open(tmp_path / "images" / name).tobytes() == Image.open(STAR / name).tobytes()


def zip_of(members: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("members, message", [
    ({"../a.png": png(), "b.png": png(), "c.png": png()}, "unsafe path"),
    ({"a.png": png(), "b.png": png(), "evil.pkl": b"\x80\x04"}, "only PNG, JPEG, WebP and .txt"),
    ({"a.png": png(), "b.png": png()}, "2 images uploaded; 3 to"),
    ({"a.png": png(), "b.png": png(), "c.png": b"not an image"}, "c.png cannot be read"),
    ({"a.png": png(), "b.png": png(), "c.png": png((300, 8))}, "at most 256 pixels a side"),
])
def test_bad_image_uploads_are_refused_naming_the_culprit(tmp_path, members, message):
    upload = zip_of(members, tmp_path / "images.zip")
    with pytest.raises(StudioError, match=message):
        collect_images([upload], tmp_path / "images", QUOTA, TrainingLimits(max_train_image_side=256))


def test_the_demo_preset_trains_the_demos_recipe(tmp_path):
    """The Train tab's demo preset on the bundled star parses to `make demo`'s run, flag for flag, but for
    where it reads and writes and how often it reports (flags that never change the adapter)."""
    instance, cls = subject_prompts("sks ohwx", "star")
    steps, rate = training_runs.PRESETS["demo"].defaults()
    run_dir, class_dir = tmp_path / "run", tmp_path / "class"
    ours = DreamBoothConfig.from_flags(training_flags(training_runs.PRESETS["demo"], "tiny", run_dir, instance, cls,
                                                      steps, rate, class_dir))
    theirs = DreamBoothConfig.from_flags(demo.training_flags(tmp_path / "demo", steps, 0, tmp_path / "demo_class"))
    control = ours.run.trainer.run_control_flags | {"instance_data_dir", "class_data_dir"}
    assert {k: v for k, v in ours.run.trainer.hparams.items() if k not in control} == \
        {k: v for k, v in theirs.run.trainer.hparams.items() if k not in control}
    assert (instance, cls, steps, ours.run.trainer.seed) == (demo.INSTANCE_PROMPT, demo.CLASS_PROMPT, 300, 0)
    # the data: the same pictures with the same captions
    captions = collect_images(star_files(), run_dir / INSTANCE_FOLDER, QUOTA, TrainingLimits())
    assert theirs.subject.instance_data_dir == str(STAR) and ours.subject.caption_extension == ".txt"
    assert captions == {p.name: p.with_suffix(".txt").read_text().strip() for p in sorted(STAR.glob("*.png"))}


def test_the_real_checkpoint_preset_parses_with_the_runs_flags(tmp_path):
    steps, rate = training_runs.PRESETS["real"].defaults()
    instance, cls = subject_prompts("sks", "dog")
    config = DreamBoothConfig.from_flags(training_flags(training_runs.PRESETS["real"], "some/model", tmp_path, instance,
                                                        cls, steps, rate, tmp_path / "class"))
    assert (config.run.trainer.max_train_steps, config.run.trainer.optimizer.learning_rate) == (800, 3e-5)
    assert config.prior.with_prior_preservation and config.run.model.pretrained_model_name_or_path == "some/model"


def test_runs_share_class_images_only_where_they_would_draw_the_same():
    demo_preset, real = training_runs.PRESETS["demo"], training_runs.PRESETS["real"]
    shared = class_images_folder(demo_preset, "tiny", "a photo of star", "1" * 32)
    assert shared == class_images_folder(demo_preset, "tiny", "a photo of star", "2" * 32)
    assert len({shared, class_images_folder(demo_preset, "tiny", "a photo of dog", "1" * 32),
                class_images_folder(demo_preset, "other", "a photo of star", "1" * 32),
                class_images_folder(real, "tiny", "a photo of star", "1" * 32)}) == 4


def test_a_public_address_trains_only_with_allow_training():
    assert app.training_allowed(app.parse_args([]))
    assert not app.training_allowed(app.parse_args(["--host", "0.0.0.0"]))
    assert not app.training_allowed(app.parse_args(["--share"]))
    assert app.training_allowed(app.parse_args(["--host", "0.0.0.0", "--allow_training"]))


def test_a_refused_run_leaves_nothing_behind(tmp_path):
    runs = TrainingRuns(tmp_path, TrainingLimits(), QUOTA, enabled=False)
    try:
        with pytest.raises(StudioError, match="--allow_training"):
            runs.submit(request([]))
        runs.enabled = True
        with pytest.raises(StudioError, match="steps must be a whole number from 1 to 1000"):
            runs.submit(request(star_files(), steps=5000, preset="demo"))
        with pytest.raises(StudioError, match="learning rate"):
            runs.submit(request(star_files(), learning_rate=float("nan"), preset="demo"))
        with pytest.raises(StudioError, match="1 to 3 words"):
            runs.submit(request(star_files(), identifier="--seed 3", preset="demo"))
        with pytest.raises(StudioError, match="1 images uploaded"):
            runs.submit(request(star_files()[:2], preset="demo"))
        with pytest.raises(StudioError, match="unknown preset 'nope'"):
            runs.submit(request(star_files(), preset="nope"))
        assert [p.name for p in runs.root.iterdir()] == []
    finally:
        runs.close()


def test_a_restart_settles_the_runs_it_left_running(tmp_path):
    """A run the last server left running: finished if its outputs are complete, failed once it has
    stopped the server MAX_ATTEMPTS times (no worker starts for either)."""
    root = tmp_path / training_runs.RUNS_FOLDER
    records = {"a" * 32: training_runs.MAX_ATTEMPTS, "b" * 32: 1}
    for run_id, attempts in records.items():
        (root / run_id / "adapter").mkdir(parents=True)
        (root / run_id / "run.json").write_text(json.dumps({
            "id": run_id, "status": "running", "created": 1.0, "model": "tiny", "preset": "demo", "steps": 4,
            "learning_rate": 2e-3, "instance_prompt": "a photo of sks star", "class_prompt": "a photo of star",
            "class_dir": "class-x", "seconds": 1.0, "attempts": attempts, "resume": False, "pid": None,
            "message": ""}))
    (root / ("b" * 32) / "adapter" / "progress.json").write_text(json.dumps({"step": 4, "finished": True}))
    (root / ("b" * 32) / "adapter" / "training_flags.json").write_text("{}")
    runs = TrainingRuns(tmp_path, TrainingLimits(), QUOTA)
    try:
        failed, finished = runs.status("a" * 32, ["a" * 32]), runs.status("b" * 32, ["b" * 32])
        assert failed["status"] == "failed" and "3 times" in failed["message"]
        assert finished["status"] == "finished" and finished["adapter"] == f".runs/{'b' * 32}/adapter"
    finally:
        runs.close()


# Real runs of train_dreambooth.py on the embedded model ------------------------------------------------------
def quick_preset(tmp_path: Path) -> Preset:
    """The demo recipe with 2 class images and cheap validation: the same code, seconds per run."""
    values = read_config_file(training_runs.PRESETS["demo"].config_file)
    values.update(num_class_images=2, num_validation_images=1, num_inference_steps=2)
    path = tmp_path / "quick.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return Preset("quick", path)


def request(files, steps=4, **changes) -> TrainingRequest:
    values = dict(files=files, captions={}, identifier="sks ohwx", class_noun="star", preset="quick", steps=steps,
                  learning_rate=2e-3, model="tiny")
    values.update(changes)
    return TrainingRequest(**values)


def wait_for(check, timeout=240, every=0.5):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


@pytest.fixture
def runs_factory(tmp_path, monkeypatch):
    monkeypatch.setitem(training_runs.PRESETS, "quick", quick_preset(tmp_path))
    made = []

    def make(**limits):
        runs = TrainingRuns(tmp_path / "adapters", TrainingLimits(**limits), QUOTA, poll_seconds=0.2)
        made.append(runs)
        return runs

    yield make
    for runs in made:
        runs.close()


@pytest.mark.slow
def test_queue_cancel_keeps_the_checkpoint_and_visitors_see_only_their_runs(runs_factory, tmp_path):
    runs = runs_factory(max_queued_runs=1)
    first = runs.submit(request(star_files(), steps=30))
    # the worker takes the first run off the queue before the second arrives (else the queue of one is full)
    wait_for(lambda: runs.status(first, [first])["status"] == "running")
    second = runs.submit(request(star_files(), steps=3, captions={"sks_star_00.png": "a photo of sks ohwx star"}))
    with pytest.raises(StudioError, match="queue is full"):
        runs.submit(request(star_files()))
    assert runs.status(second, [second])["position"] == 2
    # another visitor: holds only its own id, so the first run is out of its reach
    for call in (runs.status, runs.cancel, runs.download, runs.model_card):
        with pytest.raises(StudioError, match="no such run"):
            call(first, [second])
    assert runs.adapters([second]) == []
    # a reload: the id from the address bar reconnects; anything else does not
    assert runs.reconnect(first) == first and runs.reconnect("../" + first) is None and runs.reconnect("0" * 32) is None

    status = wait_for(lambda: (s := runs.status(first, [first]))["step"] >= 4 and s)  # checkpoints every 3 steps
    assert status["loss"] > 0 and status["seconds_left"] is not None and status["validation_image"].is_file()
    runs.cancel(first, [first])
    cancelled = wait_for(lambda: (s := runs.status(first, [first]))["status"] == "cancelled" and s)
    assert cancelled["adapter"].endswith("/adapter") and "/checkpoint-" in cancelled["adapter"]
    assert (runs.adapters_dir / cancelled["adapter"] / "adapter_model.safetensors").is_file()
    assert "is kept" in cancelled["message"]

    finished = wait_for(lambda: (s := runs.status(second, [second]))["status"] == "finished" and s)
    assert finished["adapter"] == f".runs/{second}/adapter" and finished["step"] == 3
    assert (runs.root / second / INSTANCE_FOLDER / "sks_star_00.txt").read_text() == "a photo of sks ohwx star"
    assert runs.model_card(second, [second]).count("a photo of sks ohwx star") >= 1
    archive = runs.download(second, [second])
    names = zipfile.ZipFile(archive).namelist()
    assert not any("checkpoint-" in n or "progress" in n or "training_flags" in n for n in names)
    reinstalled = install_upload([archive], tmp_path / "elsewhere", QUOTA)  # the zip is an adapter upload
    studio = Studio("tiny", tmp_path / "elsewhere", Limits(max_steps=2))
    assert studio.adapter_info(reinstalled)["training_steps"] == 3
    checkpoint = Path(cancelled["adapter"]).parent.name
    assert runs.adapters([first, second]) == [(f"trained: run {second[:8]}", finished["adapter"]),
                                              (f"trained: run {first[:8]} ({checkpoint})", cancelled["adapter"])]


@pytest.mark.slow
def test_a_killed_server_resumes_the_run_from_its_checkpoint(runs_factory):
    runs = runs_factory()
    run_id = runs.submit(request(star_files(), steps=20))
    wait_for(lambda: runs.status(run_id, [run_id])["step"] >= 5)  # checkpoint-2 and -4 are written
    runs.close()  # the worker is killed as with the server; the record still says running
    checkpoints = sorted(p.name for p in (runs.root / run_id / "adapter").glob("checkpoint-*"))
    assert checkpoints and json.loads((runs.root / run_id / "run.json").read_text())["status"] == "running"

    restarted = runs_factory()
    finished = wait_for(lambda: (s := restarted.status(run_id, [run_id]))["status"] == "finished" and s)
    assert finished["step"] == 20
    assert f"resumed from {runs.root / run_id / 'adapter' / checkpoints[-1]} at step" in \
        (runs.root / run_id / "train.log").read_text()
    progress = json.loads((runs.root / run_id / "adapter" / "progress.json").read_text())
    assert progress["first_step"] >= int(checkpoints[-1].removeprefix("checkpoint-")) and progress["finished"]
