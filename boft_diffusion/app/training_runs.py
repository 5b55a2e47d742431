"""Training from the browser: a visitor's images become a DreamBooth run of ``train_dreambooth.py``
(the same flags, recipe and loop as the command line), run one at a time in a worker process and
watched through the trainer's ``progress.json``.

Each run lives in ``adapters_dir/.runs/<id>`` (hidden from the adapter list): ``run.json`` (its
record), ``instance/`` (the images re-encoded as PNG, with ``.txt`` captions), ``adapter/`` (the
output folder: checkpoints, validation grids, progress) and ``train.log``. A run id is 128 random
bits and the only handle on a run: a visitor reaches the runs whose ids their page (or link) holds,
and nothing else. Class images depend only on the base model and the class prompt's sampling, so
runs that would draw the same ones share a ``class-<hash>`` folder. A server restart resumes a run
it left running from its latest checkpoint (or marks it failed); the runs folder is capped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.files import TEMPORARY_NAME, adapter_name_from, atomic_folder, atomic_write, atomic_write_text, write_text
from ..tiny.bundled import CHECKOUT_DIR
from ..training.checkpoints import list_checkpoints
from ..training.cli import read_config_file
from ..training.trainer import FLAGS_JSON, PROGRESS_JSON
from .errors import StudioError
from .uploads import ALLOWED_UPLOAD_SUFFIXES, UploadQuota, checked_upload, evict_uploads, extract_zip

logger = logging.getLogger("boft_diffusion")

MB = 2**20
RUNS_FOLDER = ".runs"
RUN_JSON = "run.json"
LOG_NAME = "train.log"
INSTANCE_FOLDER = "instance"
ADAPTER_FOLDER = "adapter"
#: The command-line script every run goes through: one training path for the app and the terminal.
TRAIN_SCRIPT = CHECKOUT_DIR / "train_dreambooth.py"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
CAPTION_SUFFIX = ".txt"
MIN_IMAGES = 3
MAX_CAPTION_CHARS = 300
MAX_WORDS = 3
WORD = re.compile(r"^[A-Za-z0-9]{1,24}$")
#: A run the server left running this many times (it died each time) is marked failed, not resumed again.
MAX_ATTEMPTS = 3
#: Validation grids and checkpoints per run: every tenth of the run.
REPORTS_PER_RUN = 10


def _limit(default: float, help: str) -> Any:
    """A TrainingLimits field carrying the help text of the app.py flag derived from it."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingLimits:
    """What visitors' training may take: declared here only, app.py derives its flags from these fields."""

    max_train_images: int = _limit(30, "Most instance images of one training run (at least 3 are needed).")
    max_train_image_side: int = _limit(4096, "Largest width/height of an instance image.")
    max_train_steps: int = _limit(1000, "Most optimiser steps of one training run.")
    max_train_minutes: int = _limit(60, "Longest training run (queue time excluded); stopped beyond it, its last "
                                        "checkpoint kept.")
    max_queued_runs: int = _limit(8, "Most training runs waiting in the queue.")
    max_runs_folder_bytes: int = _limit(
        8192 * MB, "Cap of adapters_dir/.runs; the oldest finished runs not in use are evicted beyond it.")


@dataclass(frozen=True)
class Preset:
    """A training recipe the Train tab offers: a train_dreambooth.py --config file."""

    label: str
    config_file: Path

    def defaults(self) -> tuple[int, float]:
        """The recipe's steps and learning rate, shown editable in the page."""
        values = read_config_file(self.config_file)
        return int(values["max_train_steps"]), float(values["learning_rate"])


#: The Train tab's presets: the demo's recipe (`make demo`) for the embedded model, a default for real ones.
PRESETS = {
    "demo": Preset("demo recipe (embedded tiny model)", CHECKOUT_DIR / "examples" / "dreambooth_demo.toml"),
    "real": Preset("real checkpoint (SD 1.5 class)", CHECKOUT_DIR / "examples" / "dreambooth_app_real.toml"),
}


def default_preset(model: str) -> str:
    """The demo recipe for the embedded model, the real-checkpoint default otherwise."""
    return "demo" if model == "tiny" else "real"


def subject_prompts(identifier: str, class_noun: str) -> tuple[str, str]:
    """The instance and class prompts of ``identifier`` words and a ``class_noun``: "a photo of sks
    ohwx star", "a photo of star". Words are letters and digits only, so a prompt can never read as
    a flag or reach outside its file."""
    words, nouns = str(identifier or "").split(), str(class_noun or "").split()
    for name, given in (("identifier", words), ("class noun", nouns)):
        if not 1 <= len(given) <= MAX_WORDS or not all(WORD.match(w) for w in given):
            raise StudioError(f"the {name} must be 1 to {MAX_WORDS} words of letters and digits (at most 24 each), "
                              f"got {' '.join(given)[:80]!r}.")
    if {w.lower() for w in words} & {n.lower() for n in nouns}:
        raise StudioError("the identifier words must differ from the class noun: they name what is new.")
    return f"a photo of {' '.join(words)} {' '.join(nouns)}", f"a photo of {' '.join(nouns)}"


def clean_caption(text: Any, name: str) -> str:
    """A caption as one line, bounded; refuses a longer one naming its image."""
    caption = " ".join(str(text or "").split())
    if len(caption) > MAX_CAPTION_CHARS:
        raise StudioError(f"the caption of {name} is longer than {MAX_CAPTION_CHARS} characters.")
    return caption


def collect_images(paths: list[str | Path], folder: Path, quota: UploadQuota, limits: TrainingLimits) -> dict[str, str]:
    """Check uploaded images (files or zips, with optional ``.txt`` sidecar captions) and write each,
    decoded and re-encoded as PNG, into ``folder``; returns {image name: caption ('' for none)}.

    Zips pass the adapter uploads' checks (size, entry count, ratio, paths); an image is decoded only
    after its header shows a PNG, JPEG or WebP within the side limit, so nothing unbounded is read.
    """
    paths = checked_upload(paths, quota, "no images were uploaded.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".images-", dir=folder.parent) as raw:
        sources = _unpack(paths, Path(raw), quota)
        images = sorted((p for p in sources if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
        if not MIN_IMAGES <= len(images) <= limits.max_train_images:
            raise StudioError(f"{len(images)} images uploaded; {MIN_IMAGES} to {limits.max_train_images} are needed.")
        captions: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for source in images:
            name = _free_image_name(source.stem, captions)
            _reencode(source, folder / name, limits.max_train_image_side)
            sidecar = source.with_suffix(CAPTION_SUFFIX)
            captions[name] = _read_caption(sidecar, source.name) if sidecar.is_file() else ""
    return captions


def _unpack(paths: list[Path], raw: Path, quota: UploadQuota) -> list[Path]:
    """Every uploaded file: loose files side by side (so a caption sits beside its image), each zip
    extracted into a folder of its own."""
    loose = raw / "files"
    loose.mkdir()
    for number, path in enumerate(paths):
        if path.suffix.lower() == ".zip":
            extract_zip(path, raw / f"zip-{number:03d}", quota, IMAGE_SUFFIXES | {CAPTION_SUFFIX},
                        "PNG, JPEG, WebP and .txt caption")
        elif path.suffix.lower() in IMAGE_SUFFIXES | {CAPTION_SUFFIX}:
            if (loose / path.name).exists():
                raise StudioError(f"{path.name} was uploaded twice.")
            shutil.copyfile(path, loose / path.name)
        else:
            raise StudioError(f"{path.name}: upload PNG, JPEG or WebP images, .txt captions or a zip of them.")
    return [p for p in raw.rglob("*") if p.is_file() and not p.is_symlink()]


def _free_image_name(stem: str, taken: Collection[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64] or "image"
    name, number = f"{base}.png", 1
    while name in taken:
        number += 1
        name = f"{base}-{number}.png"
    return name


def _reencode(source: Path, target: Path, max_side: int) -> None:
    try:
        with Image.open(source) as image:
            if image.format not in IMAGE_FORMATS:
                raise StudioError(f"{source.name} is not a PNG, JPEG or WebP image.")
            if max(image.size) > max_side:
                raise StudioError(f"{source.name} is {image.width}x{image.height}; at most {max_side} pixels a side "
                                  "are accepted.")
            image.load()
            picture = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGBA")
            atomic_write(target.parent, {target.name: lambda tmp: picture.save(tmp, format="PNG")})
    except StudioError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise StudioError(f"{source.name} cannot be read as an image ({error}).") from error


def _read_caption(path: Path, image: str) -> str:
    if path.stat().st_size > 4 * MAX_CAPTION_CHARS:
        raise StudioError(f"the caption file of {image} is longer than {MAX_CAPTION_CHARS} characters.")
    try:
        return clean_caption(path.read_bytes().decode("utf-8"), image)
    except UnicodeDecodeError as error:
        raise StudioError(f"the caption file of {image} is not UTF-8 text.") from error


@dataclass
class TrainingRequest:
    """What the Train button sends."""

    files: list[str | Path]
    captions: dict[str, str]
    identifier: str
    class_noun: str
    preset: str
    steps: Any
    learning_rate: Any
    model: str


def training_flags(preset: Preset, model: str, run_dir: Path, instance_prompt: str, class_prompt: str, steps: int,
                   learning_rate: float, class_dir: Path) -> list[str]:
    """The train_dreambooth.py flags of a run: the preset's --config file, with the run's model, data,
    prompts, steps and learning rate, and checkpoints and validation grids every tenth of the run
    (flags that never change the trained adapter)."""
    every = str(max(2, steps // REPORTS_PER_RUN))
    return [
        "--config", str(preset.config_file), "--pretrained_model_name_or_path", model,
        "--output_dir", str(run_dir / ADAPTER_FOLDER), "--instance_data_dir", str(run_dir / INSTANCE_FOLDER),
        "--instance_prompt", instance_prompt, "--class_prompt", class_prompt, "--class_data_dir", str(class_dir),
        "--max_train_steps", str(steps), "--learning_rate", repr(learning_rate),
        "--checkpointing_steps", every, "--checkpoints_total_limit", "2", "--validation_steps", every,
        "--validation_prompt", instance_prompt, class_prompt, "--report_to", "none",
    ]


def class_images_folder(preset: Preset, model: str, class_prompt: str, run_id: str) -> str:
    """The name of a run's class image folder. Class images follow from the model, the class prompt and
    the preset's sampling settings (count, seed, steps, guidance), so runs agreeing on those draw the
    same pictures and share one folder; a preset drawing them from the captions gets one per run."""
    if read_config_file(preset.config_file).get("class_prompts_from_captions"):
        return f"class-{run_id}"
    facts = json.dumps([model, class_prompt, hashlib.sha256(preset.config_file.read_bytes()).hexdigest()])
    return f"class-{hashlib.sha256(facts.encode()).hexdigest()[:24]}"


class TrainingRuns:
    """The run queue and its worker: submit, watch, cancel, and the adapters of finished runs.

    Every method that touches a run takes the ids the caller's page holds (``owned``) and refuses any
    other id, so one visitor never reads or cancels another's run.
    """

    def __init__(self, adapters_dir: str | Path, limits: TrainingLimits, quota: UploadQuota, enabled: bool = True,
                 in_use: Callable[[], Collection[Path]] = tuple, poll_seconds: float = 0.5) -> None:
        self.adapters_dir = Path(adapters_dir).resolve()
        self.root = self.adapters_dir / RUNS_FOLDER
        self.limits, self.quota, self.enabled = limits, quota, enabled
        self.in_use = in_use
        self.poll_seconds = poll_seconds
        self._wake = threading.Condition()
        self._process: subprocess.Popen | None = None
        self._current: str | None = None
        self._started = self._stop_requested = 0.0
        self._stopping: str | None = None  # why the current worker is being stopped (cancel, time limit)
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="training-runs", daemon=True)
        self._thread.start()

    # records -------------------------------------------------------------------------------------
    def _folder(self, run_id: str) -> Path:
        return self.root / run_id

    def _read(self, run_id: str) -> dict[str, Any]:
        return json.loads((self._folder(run_id) / RUN_JSON).read_text())

    def _write(self, record: dict[str, Any]) -> None:
        atomic_write_text(self._folder(record["id"]) / RUN_JSON, json.dumps(record, indent=1))

    def _records(self) -> list[dict[str, Any]]:
        records = []
        for folder in self.root.iterdir():
            if RUN_ID.match(folder.name) and (folder / RUN_JSON).is_file():
                try:
                    records.append(self._read(folder.name))
                except ValueError:
                    continue  # unreadable: left for eviction
        return records

    def _queued(self) -> list[dict[str, Any]]:
        """Queued runs in order: runs a restart interrupted first, then by submission time."""
        return sorted((r for r in self._records() if r["status"] == "queued"),
                      key=lambda r: (not r.get("resume", False), r["created"]))

    def _owned(self, run_id: Any, owned: Collection[str]) -> dict[str, Any]:
        """The record of ``run_id`` if the caller's page holds it; one refusal for every other id."""
        if not isinstance(run_id, str) or run_id not in owned or not RUN_ID.match(run_id) or \
                not (self._folder(run_id) / RUN_JSON).is_file():
            raise StudioError("no such run in this page: a run is reached only from the page (or link) that "
                              "started it.")
        return self._read(run_id)

    def reconnect(self, run_id: Any) -> str | None:
        """``run_id`` if it names an existing run (a link or reloaded page), else None."""
        if isinstance(run_id, str) and RUN_ID.match(run_id) and (self._folder(run_id) / RUN_JSON).is_file():
            return run_id
        return None

    # submitting ------------------------------------------------------------------------------------
    def submit(self, request: TrainingRequest) -> str:
        """Check the request, store its images and queue it; returns the new run's id."""
        if not self.enabled:
            raise StudioError("training is off on a public address (--share or a non-loopback --host); the "
                              "operator may turn it on with --allow_training.")
        preset = PRESETS.get(request.preset)
        if preset is None:
            raise StudioError(f"unknown preset {request.preset!r}; choose one of {', '.join(PRESETS)}.")
        steps, learning_rate = self._numbers(request.steps, request.learning_rate)
        instance_prompt, class_prompt = subject_prompts(request.identifier, request.class_noun)
        with self._wake:
            if len(self._queued()) >= self.limits.max_queued_runs:
                raise StudioError(f"the training queue is full ({self.limits.max_queued_runs} runs waiting); "
                                  "try again later.")
        run_id = secrets.token_hex(16)
        folder = self._folder(run_id)
        class_dir = class_images_folder(preset, request.model, class_prompt, run_id)
        folder.mkdir()
        try:
            self._store_images(request, folder)
        except BaseException:
            shutil.rmtree(folder)
            raise
        record = {"id": run_id, "status": "queued", "created": time.time(), "model": request.model,
                  "preset": request.preset, "steps": steps, "learning_rate": learning_rate,
                  "instance_prompt": instance_prompt, "class_prompt": class_prompt, "class_dir": class_dir,
                  "seconds": 0.0, "attempts": 0, "resume": False, "pid": None, "message": ""}
        with self._wake:
            self._write(record)
            self._wake.notify_all()
        return run_id

    def _numbers(self, steps: Any, learning_rate: Any) -> tuple[int, float]:
        try:
            steps_number, rate = float(steps), float(learning_rate)
        except (TypeError, ValueError) as error:
            raise StudioError(f"steps and learning rate must be numbers, got {steps!r} and {learning_rate!r}.") from error
        if not math.isfinite(steps_number) or steps_number != int(steps_number) or \
                not 1 <= steps_number <= self.limits.max_train_steps:
            raise StudioError(f"steps must be a whole number from 1 to {self.limits.max_train_steps}, got {steps!r}.")
        if not math.isfinite(rate) or not 0 < rate <= 1:
            raise StudioError(f"the learning rate must be a number in (0, 1], got {learning_rate!r}.")
        return int(steps_number), rate

    def _store_images(self, request: TrainingRequest, folder: Path) -> None:
        with atomic_folder(folder / INSTANCE_FOLDER) as staging:
            found = collect_images(request.files, staging, self.quota, self.limits)
            for name, caption in found.items():
                caption = clean_caption((request.captions or {}).get(name, caption), name)
                if caption:
                    write_text(staging / Path(name).with_suffix(CAPTION_SUFFIX), caption)

    # watching ----------------------------------------------------------------------------------------
    def status(self, run_id: Any, owned: Collection[str]) -> dict[str, Any]:
        """A run's state for its page: status, queue position, step, loss, time left, the latest
        validation grid, the adapter to sample (finished, or the last checkpoint's) and the log's tail."""
        with self._wake:
            record = self._owned(run_id, owned)
            queued = [r["id"] for r in self._queued()]
            ahead = (1 if self._current else 0) + (queued.index(run_id) if run_id in queued else 0)
        folder = self._folder(run_id)
        progress = _read_progress(folder / ADAPTER_FOLDER / PROGRESS_JSON)
        step, max_steps = progress.get("step", 0), progress.get("max_steps", record["steps"])
        done_here = step - progress.get("first_step", 0)
        seconds_left = None
        if record["status"] == "running" and done_here > 0 and isinstance(progress.get("seconds"), (int, float)):
            seconds_left = round(progress["seconds"] / done_here * (max_steps - step))
        validation = progress.get("validation")
        image = folder / ADAPTER_FOLDER / validation if isinstance(validation, str) else None
        if image is not None and (folder not in image.resolve().parents or not image.is_file()):
            image = None
        adapter = self._adapter(record)
        return {"id": run_id, "status": record["status"], "position": ahead + 1 if record["status"] == "queued" else None,
                "step": step, "max_steps": max_steps, "loss": progress.get("loss"), "seconds_left": seconds_left,
                "validation_image": image, "adapter": adapter, "message": record["message"],
                "log": _tail(folder / LOG_NAME)}

    def _adapter(self, record: dict[str, Any]) -> str | None:
        """The run's adapter as the studio names it: the finished folder, or after a cancel, stop or failure
        the last checkpoint's; None while there is none."""
        output = self._folder(record["id"]) / ADAPTER_FOLDER
        if record["status"] == "finished":
            folder = output
        elif record["status"] in ("cancelled", "failed") and list_checkpoints(output):
            folder = list_checkpoints(output)[-1] / ADAPTER_FOLDER
        else:
            return None
        return str(folder.relative_to(self.adapters_dir))

    def adapters(self, owned: Collection[str]) -> list[tuple[str, str]]:
        """The adapters of the caller's runs as (label, studio name), newest run first; a stopped run's
        label names the checkpoint it offers."""
        found = []
        for run_id in owned:
            try:
                record = self._owned(run_id, owned)
            except StudioError:
                continue
            if (adapter := self._adapter(record)) is not None:
                stopped = "" if record["status"] == "finished" else f" ({Path(adapter).parent.name})"
                found.append((record["created"], f"trained: run {run_id[:8]}{stopped}", adapter))
        return [(label, adapter) for _, label, adapter in sorted(found, reverse=True)]

    def model_card(self, run_id: Any, owned: Collection[str]) -> str:
        """The README.md of the run's adapter ('' before there is one)."""
        adapter = self._adapter(self._owned(run_id, owned))
        card = self.adapters_dir / adapter / "README.md" if adapter else None
        return card.read_text(encoding="utf-8", errors="replace") if card and card.is_file() else ""

    def download(self, run_id: Any, owned: Collection[str]) -> Path:
        """A zip of the run's adapter (the files an adapter upload accepts, so it can be uploaded again),
        written atomically beside the run."""
        record = self._owned(run_id, owned)
        adapter = self._adapter(record)
        if adapter is None:
            raise StudioError("the run has no adapter yet.")
        source = self.adapters_dir / adapter
        name = _title(record)
        members = [p for p in sorted(source.rglob("*")) if p.is_file() and _shipped(p.relative_to(source))]

        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in members:
                    archive.write(path, f"{name}/{path.relative_to(source).as_posix()}")

        atomic_write(self._folder(run_id), {f"{name}.zip": write})
        return self._folder(run_id) / f"{name}.zip"

    def export_target(self, run_id: Any, owned: Collection[str]) -> tuple[str, Path, str]:
        """The run's adapter (studio name), the folder its exports go to (the run's own, so the runs
        folder's cap bounds them) and the title its files are named after (the zip download's)."""
        record = self._owned(run_id, owned)
        adapter = self._adapter(record)
        if adapter is None:
            raise StudioError("the run has no adapter yet.")
        return adapter, self._folder(run_id), _title(record)

    def cancel(self, run_id: Any, owned: Collection[str]) -> None:
        """Take a queued run off the queue, or stop a running one (its last checkpoint stays)."""
        with self._wake:
            record = self._owned(run_id, owned)
            if record["status"] == "queued":
                record.update(status="cancelled", message="cancelled before it started.")
                self._write(record)
            elif record["status"] == "running" and self._current == run_id and self._stopping is None:
                self._stop(CANCELLED)
            self._wake.notify_all()

    def _stop(self, why: str) -> None:
        """Ask the worker to stop (SIGTERM; SIGKILL after GRACE_SECONDS): checkpoints are atomic, so the
        last complete one survives either."""
        self._stopping, self._stop_requested = why, time.monotonic()
        self._process.terminate()

    # the worker --------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart: a run the last server left running is resumed from its latest checkpoint
        (its worker, if still alive, is stopped first), unless it already finished or died too often."""
        for record in self._records():
            if record["status"] != "running":
                continue
            _stop_orphan(record.get("pid"), self._folder(record["id"]))
            output = self._folder(record["id"]) / ADAPTER_FOLDER
            if _read_progress(output / PROGRESS_JSON).get("finished") and (output / FLAGS_JSON).is_file():
                record.update(status="finished", message="")
            elif record["attempts"] >= MAX_ATTEMPTS:
                record.update(status="failed", message=f"the server stopped during this run {MAX_ATTEMPTS} times; "
                                                       "see the log.")
            else:
                record.update(status="queued", resume=True, message="resuming from the last checkpoint after a "
                                                                    "server restart.")
            record["pid"] = None
            self._write(record)

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
                try:
                    if self._current is None:
                        self._start_next()
                    else:
                        self._check_current()
                except (OSError, ValueError) as error:  # a full disk, a record gone bad: the queue goes on
                    logger.exception("training queue: %s", error)
                self._wake.wait(self.poll_seconds)

    def _start_next(self) -> None:
        queued = self._queued()
        if not queued:
            return
        record = queued[0]
        folder = self._folder(record["id"])
        self._evict(keep={folder, self.root / record["class_dir"]})
        flags = training_flags(PRESETS[record["preset"]], record["model"], folder, record["instance_prompt"],
                               record["class_prompt"], record["steps"], record["learning_rate"],
                               self.root / record["class_dir"])
        if record["resume"]:
            flags += ["--resume_from_checkpoint", "latest"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            with open(folder / LOG_NAME, "ab") as log:
                self._process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *flags], stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=CHECKOUT_DIR)
        except OSError as error:
            record.update(status="failed", message=f"the training worker could not start: {error}")
            self._write(record)
            return
        self._current, self._started, self._stopping = record["id"], time.monotonic(), None
        record.update(status="running", attempts=record["attempts"] + 1, pid=self._process.pid)
        self._write(record)

    def _check_current(self) -> None:
        record = self._read(self._current)
        elapsed = time.monotonic() - self._started
        returncode = self._process.poll()
        if returncode is None:
            if self._stopping is None and record["seconds"] + elapsed > self.limits.max_train_minutes * 60:
                self._stop(f"stopped at the {self.limits.max_train_minutes}-minute limit.")
            elif self._stopping is not None and time.monotonic() - self._stop_requested > GRACE_SECONDS:
                self._process.kill()
            return
        checkpoints = list_checkpoints(self._folder(self._current) / ADAPTER_FOLDER)
        kept = f" The last checkpoint ({checkpoints[-1].name}) is kept and can be sampled." if checkpoints else ""
        if returncode == 0:
            record.update(status="finished", message="")
        elif self._stopping == CANCELLED:
            record.update(status="cancelled", message=CANCELLED + kept)
        elif self._stopping is not None:
            record.update(status="failed", message=self._stopping + kept)
        else:
            record.update(status="failed", message=f"training failed: {_error_line(self._folder(self._current)).rstrip('.')}." + kept)
        record.update(seconds=record["seconds"] + elapsed, pid=None)
        self._write(record)
        self._current, self._process, self._stopping = None, None, None
        self._wake.notify_all()

    def _evict(self, keep: Collection[Path]) -> None:
        """Keep the runs folder under its cap: the oldest finished runs and unused class images go first,
        never a queued or running run nor an adapter the studio has loaded."""
        active = {self._folder(r["id"]) for r in self._records() if r["status"] in ("queued", "running")}
        evict_uploads(self.root, self.limits.max_runs_folder_bytes, keep={*keep, *active, *self.in_use()})

    def wait_idle(self, timeout: float) -> bool:
        """Whether the queue emptied within ``timeout`` seconds (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._current is not None or self._queued():
                if time.monotonic() > deadline:
                    return False
                self._wake.wait(self.poll_seconds)
        return True

    def close(self) -> None:
        """Stop the queue and kill the worker as a dying server would: the run stays 'running', so the
        next server resumes it from its last checkpoint."""
        with self._wake:
            self._closed = True
            if self._process is not None:
                self._process.kill()
                self._process.wait()
            self._wake.notify_all()
        self._thread.join(timeout=10)


#: How long a stopped worker may take to exit on SIGTERM before it is killed.
GRACE_SECONDS = 10.0
CANCELLED = "cancelled."


def _title(record: dict[str, Any]) -> str:
    """What a run's downloads are named after: its subject and the start of its id."""
    return adapter_name_from(record["instance_prompt"].removeprefix("a photo of ")) + f"-{record['id'][:8]}"


def _stop_orphan(pid: Any, folder: Path) -> None:
    """Kill a worker a killed server left behind (its command line names the run's folder)."""
    if not isinstance(pid, int):
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return
    if str(folder) in command:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def _shipped(relative: Path) -> bool:
    """Whether a file of the adapter folder goes into its download: what an upload accepts, without
    checkpoints, temporaries, the server-side flags and progress, or older validation grids."""
    parts = relative.parts
    if any(part.startswith("checkpoint-") or TEMPORARY_NAME.match(part) or part.startswith(".") for part in parts):
        return False
    if relative.name in (FLAGS_JSON, PROGRESS_JSON) or (parts[0] == "validation" and relative.name != "latest.png"):
        return False
    return relative.suffix in ALLOWED_UPLOAD_SUFFIXES


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tail(path: Path, size: int = 4000, lines: int = 12) -> str:
    """The last lines of a log, bounded whatever its length; of a progress bar redrawn with carriage
    returns only its last state."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join([line for line in shown if line][-lines:])


def _error_line(folder: Path) -> str:
    """The worker's ``error: ...`` line (train_dreambooth.py's way of reporting), else its last line."""
    lines = [line for line in _tail(folder / LOG_NAME).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output; see the log."])[-1].removeprefix("error: ")


def describe(status: dict[str, Any]) -> str:
    """A run's status as the page's Markdown line."""
    state = status["status"]
    if state == "queued":
        text = f"**queued**: position {status['position']} in the queue"
    elif state == "running" and not status["step"]:
        text = "**preparing**: loading the model and drawing class images"
    elif state == "running":
        left = status["seconds_left"]
        eta = f", about {left // 60} min {left % 60} s left" if left is not None else ""
        loss = f", loss {status['loss']:.4f}" if isinstance(status["loss"], (int, float)) else ""
        text = f"**training**: step {status['step']} of {status['max_steps']}{loss}{eta}"
    else:
        text = f"**{state}** at step {status['step']} of {status['max_steps']}"
    message = f". {status['message']}" if status["message"] else ""
    return f"run `{status['id'][:8]}`: {text}{message}"


__all__ = ["PRESETS", "TrainingLimits", "TrainingRequest", "TrainingRuns", "collect_images", "describe",
           "subject_prompts", "training_flags"]
