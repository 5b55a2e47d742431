"""DreamBooth on the embedded tiny model: BOFT (m = 1, 2, 4) against PEFT LoRA and PEFT OFT.

Every (subject, training seed, method) is trained with the demo's recipe (same data, captions,
prior preservation, learned identifier); only the adapter, its learning rate and its step count
differ, LoRA and OFT sized to BOFT m = 2's parameter budget. Tuning gives every method the same
grid (``--lr_scales`` times ``BASE_LEARNING_RATE``, each scored at every one of ``--tune_steps``) on
``--tune_seeds`` of every one of ``--tune_subjects`` and picks by one objective declared below,
averaged over them; confirmation trains each method at its pick on fresh seeds of every subject,
and only confirmation runs are reported. Each is scored on the same sampling seeds with the
tiny-world measures (per sample, so that means come with 95 % bootstrap intervals over subject x
seed x sample), the hyperspherical-energy change of the adapted layers, and, at every checkpoint,
subject fidelity against language drift (the fidelity-vs-drift curve, drawn as a PNG).

    python benchmarks/bench_dreambooth.py --phases tune --workers 15 --output_dir runs/db
    python benchmarks/bench_dreambooth.py --phases confirm --tuning runs/db/tuning.json \
        --subjects all --seeds 10 11 12 --workers 15 --output_dir runs/db

Subjects are the bundled three or any of ``boft_diffusion/tiny/subject_family.py`` (patterned
shapes split into tuning and evaluation subjects): ``--subjects evaluation:12`` confirms on the
first 12 evaluation subjects, ``--tune_subjects tuning:4`` tunes on the first four tuning
subjects. Their photos are written to ``<output_dir>/subjects/`` before any run starts.

``--pretrained_model_name_or_path`` trains and scores on another tiny-world model instead (a
candidate folder from ``scripts/pretrain_tiny_sd.py``); ``--subject_prompts described`` names the
subject's colours and pattern in every caption and prompt beside the identifier (its photos are
written to ``<output_dir>/subjects_described/``). ``<output_dir>/base_model.json`` records both, and
an output folder is refused to any other model or prompting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shlex
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import CLIPTokenizer

from boft_diffusion import load_pipeline
from boft_diffusion.core.adapters import base_state_dict
from boft_diffusion.core.files import WEIGHTS_NAME, atomic_write_text, count_file_parameters
from boft_diffusion.demo import GUIDANCE, training_flags
from boft_diffusion.evaluation.energy import energy_change
from boft_diffusion.evaluation.statistics import bootstrap_ci, paired_bootstrap_ci
from boft_diffusion.evaluation.tiny_world import instance_self_score, sample_scores, tiny_world_samples
from boft_diffusion.families.loading import TINY_ALIASES, quiet_progress
from boft_diffusion.kinds.registry import AdapterKind, adapter_kind
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, ensure_class_images, train
from boft_diffusion.tiny import subject_family, world
from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR, example_subject_dir
from boft_diffusion.training.data import load_images
from boft_diffusion.training.trainer import FLAGS_JSON, flags_as_json

#: train_dreambooth.py flags of each method; LoRA r=6 and OFT b=16 match BOFT m=2's budget. m = 4
#: needs block size 4 on the tiny UNet's 32-wide layers (8 * 2**3 > 32). boft-m2-output is the
#: BOFT m=2 (the recipe until 2026-12-07) with the rotation on each weight's output side (LyCORIS's
#: convention).
METHODS = {
    "boft-m1": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "1"],
    "boft-m2": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "2"],
    "boft-m2-output": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "2", "--boft_side", "output"],
    "boft-m4": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "4", "--boft_block_size", "4"],
    "lora": ["--adapter_type", "lora", "--lora_rank", "6"],
    "oft": ["--adapter_type", "oft", "--oft_block_size", "16"],
}
#: The rate ``--lr_scales`` multiply: the recipe's until 2026-12-07 (BOFT m=2's pick on the bundled
#: star), fixed here rather than read from the recipe file so that every stored tuning and summary
#: file keeps its meaning; the recipe's rate today, 6e-3, is lr x3.
BASE_LEARNING_RATE = 2e-3
MEASURES = ("subject", "recontext_background", "recontext_subject", "class_prompt_fidelity", "class_subject",
            "class_shape")
#: How prompts name the subject (``subject_prompt``).
SUBJECT_PROMPTS = ("identifier", "described")
#: The base model and subject prompts an output folder's runs were made with (``claim_for_model``).
BASE_MODEL_FILE = "base_model.json"
#: The measures compared pair by pair between methods (class leakage and class shape sit at their
#: ideal for every method, so their differences say nothing).
PAIRED_MEASURES = ("subject", "recontext_subject", "recontext_background", "class_prompt_fidelity")


def fresh_pipeline(model: str = "tiny"):
    return quiet_progress(load_pipeline(model, dtype=torch.float32))


def instances_of(name: str) -> list[Image.Image]:
    """A subject's photos: the bundled folder's, or a generated subject's rendered as
    ``subject_family.write_subject`` writes them (the same pixels)."""
    if name in world.SUBJECTS:
        return [image for _, image in load_images(example_subject_dir(name), 64)]
    return [world.render(scene) for scene in subject_family.instance_scenes(subject_family.subject_by_name(name))]


def subject_prompt(name: str, style: str = "identifier") -> str:
    """A subject's instance prompt in one of ``SUBJECT_PROMPTS``: the identifier and the class noun
    ("a photo of sks ohwx hexagon"), or those with the subject's colours and pattern in words
    ("a photo of sks ohwx purple hexagon with orange vertical stripes", in the world's caption
    words), which leaves the identifier only what the words cannot say."""
    subject = subject_family.subject_by_name(name)
    if style == "identifier":
        return subject.instance_prompt
    pattern = world.pattern_phrase(world.subject_scene(subject.backgrounds[0], subject=subject).shape)
    return " ".join(["a photo of", subject.identifier, subject.color, subject.kind, *pattern])


def prompts_cut_by(model_folder: str, names: list[str], style: str) -> list[str]:
    """The subjects' prompts (re-context ones are the longest) that the tokenizer of the pipeline in
    ``model_folder`` would cut: a cut caption loses its background, which the identifier would then learn."""
    tokenizer = CLIPTokenizer.from_pretrained(Path(model_folder) / "tokenizer")
    prompts = [world.on_background(subject_prompt(name, style), colour) for name in names
               for colour in [*world.COLORS, *subject_family.subject_by_name(name).backgrounds]]
    return [p for p in dict.fromkeys(prompts) if len(tokenizer(p).input_ids) > tokenizer.model_max_length]


def instance_dir(out: Path, name: str, style: str = "identifier") -> Path:
    """Where a run reads a subject's photos: the bundled folder, or the one ``write_subjects`` made
    (described subjects' captions describe them, so every described subject has one)."""
    if style == "described":
        return out / "subjects_described" / name
    return example_subject_dir(name) if name in world.SUBJECTS else out / "subjects" / name


def write_subjects(out: Path, names: list[str], style: str = "identifier") -> None:
    """The photo folders of ``names`` (but the bundled subjects' own, unless described), written once
    before any worker starts (two workers writing one folder would race)."""
    for name in names:
        if style == "described" or name not in world.SUBJECTS:
            subject_family.write_subject(subject_family.subject_by_name(name), instance_dir(out, name, style).parent,
                                         instance_prompt=subject_prompt(name, style))


def measure(pipe, name: str, num_images: int, eval_seed: int, guidance: float = GUIDANCE,
            instance_prompt: str | None = None) -> dict[str, list[float]]:
    """Per-sample tiny-world measures of the pipeline as it is, re-context on the subject's backgrounds."""
    subject = subject_family.subject_by_name(name)
    drawn = tiny_world_samples(pipe, instance_prompt or subject.instance_prompt, subject.class_prompt, num_images,
                               eval_seed, guidance=guidance, backgrounds=subject.backgrounds)
    return sample_scores(drawn, instances_of(name))


def measure_job(pipe, job: dict, num_images: int) -> dict[str, list[float]]:
    """``measure`` of a job's subject with its sampling seeds, guidance and subject prompts."""
    return measure(pipe, job["subject"], num_images, job["eval_seed"], job["guidance"],
                   subject_prompt(job["subject"], job["subject_prompts"]))


def kind_of(method: str) -> AdapterKind:
    """The adapter kind a method trains ("boft-m2-output" -> boft)."""
    return adapter_kind(method.split("-")[0])


def loader(method: str):
    return kind_of(method).load


def score_folder(folder: Path, job: dict) -> dict:
    """Per-sample tiny-world measures of one run's output folder, and its hyperspherical-energy change."""
    method = job["method"]
    pipe = fresh_pipeline(job["model"])
    before = {k: v.detach().cpu().clone() for k, v in pipe.unet.state_dict().items()}
    boft = method.startswith("boft")
    load_outputs(pipe, folder, load=loader(method))
    samples = measure_job(pipe, job, job["num_images"])
    after = kind_of(method).merged_state_dict(pipe.unet)
    if boft:
        assert base_state_dict(pipe.unet).keys() == after.keys()
    after = {k: v.detach().cpu() for k, v in after.items()}
    changed = {k: before[k] for k in before if k.endswith("weight") and before[k].dim() > 1
               and not torch.equal(before[k], after[k])}
    params = sum(count_file_parameters(folder / f) or 0 for f in (WEIGHTS_NAME, "learned_embeds.safetensors"))
    return {"samples": samples, "energy_change": energy_change(changed, {k: after[k] for k in changed}),
            "adapted_weights": len(changed), "params": params}


def checkpoint_samples(run_dir: Path, job: dict, num_images: int) -> dict[int, dict[str, list[float]]]:
    """Per-sample measures of the adapter at every checkpoint of a run, by step."""
    folders = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    scored = {}
    for folder in folders:
        pipe = fresh_pipeline(job["model"])
        load_outputs(pipe, folder / "adapter", load=loader(job["method"]))
        scored[int(folder.name.split("-")[1])] = measure_job(pipe, job, num_images)
    return scored


def run_curve(run: dict, base_samples: dict[str, list[float]]) -> list[tuple[int, float, float]]:
    """(step, subject fidelity, drift) at each checkpoint of a run and at its end. Drift is the base
    model's prompt fidelity minus the adapter's on the same captions and sampling seeds: checkpoints
    score only the first ``--curve_images`` seeds (the end scores all ``--num_images``), so the base
    model's scores are cut to the same prefix."""
    points = sorted((int(step), samples) for step, samples in run["checkpoints"].items())  # str keys in JSON
    base_fidelity = base_samples["class_prompt_fidelity"]
    curve = []
    for step, samples in [*points, (run["steps"], run["samples"])]:
        fidelity = samples["class_prompt_fidelity"]
        if len(fidelity) > len(base_fidelity):
            raise ValueError(f"step {step} of a {run['method']} run scored {len(fidelity)} samples, the base model "
                             f"only {len(base_fidelity)}: --curve_images must not exceed --num_images")
        drift = np.mean(base_fidelity[:len(fidelity)]) - np.mean(fidelity)
        curve.append((step, float(np.mean(samples["subject"])), float(drift)))
    return curve


def class_dir(out: Path, name: str, seed: int, variant: str = "") -> Path:
    """Class images are shared by the runs of a (subject, seed), except captioned ones."""
    captioned = "captioned_" if "--class_prompts_from_captions" in shlex.split(variant) else ""
    return out / name / f"{captioned}class_images-seed{seed}"


def model_flags(job: dict) -> list[str]:
    return ["--pretrained_model_name_or_path", job["model"]]


def prompt_flags(job: dict) -> list[str]:
    """A described subject's prompt, with its identifier named (the prompt's words the class prompt
    lacks would count its colours and pattern as identifier too)."""
    if job["subject_prompts"] == "identifier":
        return []
    subject = subject_family.subject_by_name(job["subject"])
    return ["--instance_prompt", subject_prompt(job["subject"], "described"),
            "--identifier_token", *subject.identifier.split()]


def run_flags(job: dict) -> list[str]:
    out = Path(job["output_dir"])
    run_dir = out / job["phase"] / job["subject"] / f"{job['method']}-v{job['variant_index']}-lr{job['lr_scale']}-{job['steps']}steps-seed{job['seed']}"
    flags = training_flags(run_dir, job["steps"], job["seed"], class_dir(out, job["subject"], job["seed"], job["variant"]),
                           job["subject"], instance_dir(out, job["subject"], job["subject_prompts"]))
    flags[flags.index("--learning_rate") + 1] = f"{BASE_LEARNING_RATE * job['lr_scale']:g}"
    checkpoints = ["--checkpointing_steps", str(job["checkpoint_every"])] if job["checkpoint_every"] else []
    return [*flags, *model_flags(job), *prompt_flags(job), *shlex.split(job["variant"]), *METHODS[job["method"]],
            "--report_to", "none", *checkpoints]


def class_image_flags(job: dict) -> list[str]:
    """Flags whose config draws the class images of a job's (subject, seed) with the job's model."""
    out = Path(job["output_dir"])
    return [*training_flags(out / "unused", 1, job["seed"], class_dir(out, job["subject"], job["seed"]), job["subject"],
                            instance_dir(out, job["subject"], job["subject_prompts"])), *model_flags(job),
            *prompt_flags(job)]


def finished_run(run_dir: Path, config: DreamBoothConfig) -> bool:
    """Whether ``run_dir`` holds the finished adapter of a run with exactly these flags, so that
    scoring it again (at another guidance, or after a killed benchmark) needs no training."""
    recorded = run_dir / FLAGS_JSON
    if not (run_dir / WEIGHTS_NAME).is_file() or not recorded.is_file():
        return False
    return json.loads(recorded.read_text()) == flags_as_json(config.run.trainer.hparams)


def execute(job: dict) -> dict:
    """One unit of work in a worker process: class images of a (subject, seed), the base model's
    measures of a subject, or one training run and its scores."""
    start = time.time()
    if job["kind"] == "class_images":
        config = DreamBoothConfig.from_flags(class_image_flags(job))
        from accelerate import PartialState
        ensure_class_images(fresh_pipeline(job["model"]), config, PartialState())
        return {**job, "seconds": time.time() - start}
    if job["kind"] == "base":
        instances = instances_of(job["subject"])
        return {**job, "samples": measure_job(fresh_pipeline(job["model"]), job, job["num_images"]),
                "instances": instance_self_score(instances), "seconds": time.time() - start}
    config = DreamBoothConfig.from_flags(run_flags(job))
    run_dir = Path(config.run.trainer.output_dir)
    reused = finished_run(run_dir, config)
    if not reused:
        train(config)
    trained = None if reused else time.time() - start
    scored = score_folder(run_dir, job)
    at_checkpoints = checkpoint_samples(run_dir, job, job["checkpoint_images"]) if job["checkpoint_every"] else {}
    return {**job, **scored, "checkpoints": at_checkpoints, "train_seconds": trained,
            "seconds": time.time() - start}


def start_worker(threads: int, benchmark_pid: int | None = None) -> None:
    """Threads and logging of the process that runs jobs; a pool worker (``benchmark_pid`` given)
    also ends with the benchmark."""
    torch.set_num_threads(threads)
    logging.getLogger("boft_diffusion").setLevel(logging.WARNING)
    if benchmark_pid is not None:
        threading.Thread(target=exit_with_parent, args=(benchmark_pid,), daemon=True).start()


def exit_with_parent(parent: int) -> None:
    """End this worker once the benchmark that started it is gone: a killed benchmark never shuts
    its pool down, and its workers would otherwise train on, unseen."""
    while os.getppid() == parent:
        time.sleep(5)
    os._exit(1)


def run_all(jobs: list[dict], pool, workers: int, deadline: float, log: Path, done: list[dict]) -> list[dict]:
    """Run ``jobs`` in order (in the pool, or here when there is none), starting none after
    ``deadline`` (a time.time()), appending each result to ``done`` and rewriting the results
    file as they come in. Results come back in the order of ``jobs``."""
    results: dict[int, dict] = {}
    running: dict = {}
    queue = list(enumerate(jobs))
    while queue or running:
        while queue and len(running) < max(1, workers) and time.time() < deadline:
            index, job = queue.pop(0)
            if pool:
                running[pool.submit(execute, job)] = index
            else:
                results[index] = execute(job)
                report_job(results[index], log, done)
        if not running:
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            index = running.pop(future)
            if future.exception() is not None:
                print(f"job failed: {jobs[index]}: {future.exception()!r}", flush=True)
                continue
            results[index] = future.result()
            report_job(results[index], log, done)
    skipped = len(jobs) - len(results)
    if skipped:
        print(f"deadline reached: {skipped} of {len(jobs)} jobs not started", flush=True)
    return [results[i] for i in sorted(results)]


def report_job(result: dict, log: Path, done: list[dict]) -> None:
    done.append(result)
    log.write_text(json.dumps(done, indent=1))
    print(f"{result['kind']} {result.get('phase', '')} {result['subject']} seed {result.get('seed', '-')} "
          f"{result.get('method', '')} {result.get('variant', '')} lr x{result.get('lr_scale', '')}: "
          f"{result['seconds']:.0f} s", flush=True)


def objective_parts(samples: dict[str, list[float]], base: dict) -> dict[str, float]:
    """The issue's measures as the objective reads them, each scaled so that 1 is the ideal (subject
    measures against the instance images' own score, prompt fidelity and class shape against the
    base model, capped at 1, class leakage counted against)."""
    s = {m: float(np.mean(v)) for m, v in samples.items()}
    b = {m: float(np.mean(v)) for m, v in base["samples"].items()}
    return {
        "subject_share": s["subject"] / base["instances"],
        "in_context_share": s["recontext_subject"] / base["instances"],
        "background_right": s["recontext_background"],
        "prompt_fidelity_kept": min(1.0, s["class_prompt_fidelity"] / b["class_prompt_fidelity"]),
        "class_shape_kept": min(1.0, s["class_shape"] / max(b["class_shape"], 1e-6)),
        "no_class_leakage": 1.0 - s["class_subject"],
    }


def objective(samples: dict[str, list[float]], base: dict) -> float:
    """The tuning objective, fixed before any run: the mean of ``objective_parts``."""
    return float(np.mean(list(objective_parts(samples, base).values())))


def pick(tuned: list[dict], bases: dict[str, dict], methods: list[str]) -> dict:
    """Each method's grid point (flag variant, learning-rate scale, steps) with the best mean
    objective over the tuning subjects and seeds (each run against its own subject's base model
    measures, in ``bases``), and the whole grid's objectives, also per tuning seed (a point that
    wins on one seed only is noise)."""
    grid: dict[str, dict[tuple, dict[int, list[float]]]] = {m: {} for m in methods}
    for record in tuned:
        points = {**record["checkpoints"], record["steps"]: record["samples"]}
        for step, samples in points.items():
            key = (record["variant"], record["lr_scale"], int(step))  # checkpoint steps are strings in JSON
            by_seed = grid[record["method"]].setdefault(key, {})
            by_seed.setdefault(record["seed"], []).append(objective(samples, bases[record["subject"]]))
    chosen, table = {}, {}
    for m in methods:
        means = {key: float(np.mean([o for values in by_seed.values() for o in values]))
                 for key, by_seed in grid[m].items()}
        (variant, scale, step), best = max(means.items(), key=lambda item: item[1])
        chosen[m] = {"variant": variant, "lr_scale": scale, "steps": step, "objective": best}
        table[m] = [{"variant": v, "lr_scale": lr, "steps": st, "objective": o,
                     "objective_by_seed": {seed: float(np.mean(values)) for seed, values in grid[m][v, lr, st].items()}}
                    for (v, lr, st), o in means.items()]
    return {"chosen": chosen, "objective_grid": table}


def draw_curves(means: dict[str, np.ndarray], path: Path) -> None:
    """Subject fidelity (y) against language drift (x), one line per method through its mean
    (step, subject fidelity, drift) at each checkpoint, drawn with Pillow."""
    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = np.concatenate([p[:, 2] for p in means.values()])
    low, high = min(0.0, xs.min()), max(0.05, xs.max())
    tick_step = next(step for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if (high - low) / step <= 6)
    x_lo, x_hi = np.floor(low / tick_step) * tick_step, np.ceil(high / tick_step) * tick_step

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_lo) / (x_hi - x_lo) * (width - 2 * margin), height - margin - y * (height - 2 * margin))

    draw.line([at(x_lo, 0), at(x_hi, 0)], fill="black")
    draw.line([at(x_lo, 0), at(x_lo, 1)], fill="black")
    draw.text((width / 2 - 120, height - 30), "language drift (base - adapted prompt fidelity)", fill="black")
    draw.text((5, 20), "subject fidelity", fill="black")
    for tick in (0.0, 0.5, 1.0):
        draw.text((margin - 30, at(x_lo, tick)[1] - 6), f"{tick:.1f}", fill="black")
    for tick in np.arange(x_lo, x_hi + tick_step / 2, tick_step):
        draw.text((at(tick, 0)[0] - 12, height - margin + 5), f"{tick:.2f}", fill="black")
    draw.line([at(0, 0), at(0, 1)], fill="#bbbbbb")
    draw.text((at(0, 1)[0] + 3, at(0, 1)[1]), "base", fill="#888888")
    colours = ["#d62728", "#ff7f0e", "#8c564b", "#1f77b4", "#2ca02c", "#9467bd", "#17becf"]
    for i, (method, points) in enumerate(means.items()):
        xy = [at(p[2], p[1]) for p in points]
        draw.line(xy, fill=colours[i % len(colours)], width=2)
        for (x, y), p in zip(xy, points, strict=True):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[i % len(colours)])
            draw.text((x + 4, y - 12), f"{int(p[0])}", fill=colours[i % len(colours)])
        draw.text((width - 150, 20 + 16 * i), method, fill=colours[i % len(colours)])
    image.save(path)


def subjects_run(summary: dict, subjects) -> list[str]:
    """``subjects`` that have runs in ``summary``, in order."""
    return [s for s in subjects if any(r["subject"] == s for r in summary["runs"])]


def describe_point(chosen: dict) -> str:
    """A tuned point as the tables print it: its flag variant, learning-rate scale and steps."""
    variant = f"{chosen['variant'].strip()}, " if chosen["variant"] else ""
    return f"{variant}lr x{chosen['lr_scale']:g}, {chosen['steps']} steps"


def print_table(summary: dict, subjects: list[str], args) -> None:
    def cell(runs: list[list[float]]) -> str:
        mean, low, high = bootstrap_ci(runs)
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]"

    runs = summary["runs"]
    subjects = subjects_run(summary, subjects)
    seeds = sorted({r["seed"] for r in runs})
    instances = np.mean([summary["base"][s]["instances"] for s in subjects])
    print(f"\nTiny-world DreamBooth on {summary['device']}: subjects {', '.join(subjects)}; training seeds "
          f"{seeds}; {len(runs) // len(args['methods'])} runs per method; {args['num_images']} samples per measure "
          f"from sampling seed {args['eval_seed']}, guidance {sampling_guidance(args):g}; mean [95 % bootstrap "
          f"interval over subject x seed x sample]; instance images' own score {instances:.2f}.\n")
    print("| method | tuned point | params | " + " | ".join(MEASURES) + " | worst run's subject | energy change "
          "| train s |")
    print("|---" * (len(MEASURES) + 6) + "|")
    print("| base model | - | 0 | " + " | ".join(cell([summary["base"][s]["samples"][m] for s in subjects])
                                               for m in MEASURES) + " | - | 0 | - |")
    for method in args["methods"]:
        mine = [r for r in runs if r["method"] == method]
        worst = min(np.mean(r["samples"]["subject"]) for r in mine)
        cells = " | ".join(cell([r["samples"][m] for r in mine]) for m in MEASURES)
        trained = [r["train_seconds"] for r in mine if r["train_seconds"] is not None]
        print(f"| {method} | {describe_point(summary['chosen'][method])} | {mine[0]['params']:,} | "
              f"{cells} | {worst:.2f} | {np.mean([r['energy_change'] for r in mine]):.2e} "
              f"| {f'{np.mean(trained):.0f}' if trained else '-'} |")


def print_paired(summary: dict, baseline: str) -> None:
    """Each method minus ``baseline`` on the same (subject, seed) runs and sampling seeds."""
    runs = {(r["method"], r["subject"], r["seed"]): r["samples"] for r in summary["runs"]}
    print(f"\nPaired differences against {baseline} (same subject, seed and sampling seeds; mean [95 % "
          "bootstrap interval over runs and samples]):\n")
    print("| method | runs | " + " | ".join(PAIRED_MEASURES) + " |")
    print("|---" * (len(PAIRED_MEASURES) + 2) + "|")
    for method in summary["args"]["methods"]:
        if method == baseline:
            continue
        pairs = [(samples, runs[(baseline, subject, seed)]) for (m, subject, seed), samples in runs.items()
                 if m == method and (baseline, subject, seed) in runs]
        if not pairs:
            continue
        cells = []
        for name in PAIRED_MEASURES:
            mean, low, high = paired_bootstrap_ci([a[name] for a, _ in pairs], [b[name] for _, b in pairs])
            cells.append(f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]")
        print(f"| {method} | {len(pairs)} | " + " | ".join(cells) + " |")


def subject_means(runs: list[dict]) -> dict[str, float]:
    """Each subject's subject fidelity among ``runs``, mean over its runs (seeds) of each run's mean."""
    return {subject: float(np.mean([np.mean(r["samples"]["subject"]) for r in runs if r["subject"] == subject]))
            for subject in dict.fromkeys(r["subject"] for r in runs)}


def print_per_subject(summary: dict) -> None:
    """Each subject's subject fidelity per method, mean over its seeds, as a share of its instance
    images' own score: held-out subjects differ in how well they can be drawn at all, so their
    raw scores are not comparable."""
    methods = summary["args"]["methods"]
    subjects = subjects_run(summary, summary["base"])
    shares = {m: {} for m in methods}
    print("\nSubject fidelity per subject, mean over seeds (share of the instance images' own score):\n")
    print("| subject | instances | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 2) + "|")
    means = {m: subject_means([r for r in summary["runs"] if r["method"] == m]) for m in methods}
    for subject in subjects:
        instances = summary["base"][subject]["instances"]
        cells = []
        for m in methods:
            fidelity = means[m].get(subject, float("nan"))
            shares[m][subject] = fidelity / instances
            cells.append(f"{fidelity:.2f} ({shares[m][subject]:.2f})" if subject in means[m] else "-")
        print(f"| {subject} | {instances:.2f} | " + " | ".join(cells) + " |")
    print("| mean share / worst subject's share | | " + " | ".join(
        f"{np.nanmean(list(shares[m].values())):.2f} / {np.nanmin(list(shares[m].values())):.2f}" for m in methods) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_dreambooth")
    parser.add_argument("--pretrained_model_name_or_path", default="tiny",
                        help="The base model every run trains on and is scored with (a tiny-world model: the "
                             "embedded one, or a candidate from scripts/pretrain_tiny_sd.py). Class images are "
                             "that model's: an --output_dir used with one model (base_model.json) is refused to "
                             "another.")
    parser.add_argument("--subject_prompts", default="identifier", choices=SUBJECT_PROMPTS,
                        help="How every prompt names the subject, in training captions and in sampling: by "
                             "its identifier and class noun (the recipe), or described too (its colours and "
                             "pattern in words). Runs of each live in their own --output_dir.")
    parser.add_argument("--phases", nargs="+", default=["tune", "confirm"], choices=["tune", "pick", "confirm"],
                        help="pick: redo tuning.json from the tuning runs finished so far (after a killed tune).")
    parser.add_argument("--tuning", default=None,
                        help="tuning.json of an earlier tune phase (default: the output folder's).")
    parser.add_argument("--subjects", nargs="+", default=["all"],
                        help=f"Subjects of the confirmation: 'all' (the bundled {', '.join(world.SUBJECTS)}), "
                             "'evaluation:N' (the first N held-out subjects of subject_family), or names.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12], help="Confirmation training seeds.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tune_seeds", type=int, nargs="+", default=[0, 1, 2], help="Tuning training seeds.")
    parser.add_argument("--tune_subjects", nargs="+", default=[world.DEFAULT_SUBJECT],
                        help="Subjects the picks are made on: bundled ones or subject_family's tuning split "
                             "('tuning:4': its first four). The objective is averaged over them.")
    parser.add_argument("--lr_scales", type=float, nargs="+", default=[1.0, 2.0],
                        help="Learning rates tried per method, as multiples of BASE_LEARNING_RATE (2e-3).")
    parser.add_argument("--tune_steps", type=int, nargs="+", default=[150, 300],
                        help="Step counts tried per method (one run to the largest, scored at each).")
    parser.add_argument("--tune_variants", nargs="+", default=[""],
                        help="Flag sets tried per method on top of the recipe, each one string "
                             "(default: the recipe as it is).")
    parser.add_argument("--num_images", type=int, default=48, help="Samples per measure and confirmation run.")
    parser.add_argument("--tune_images", type=int, default=16, help="Samples per measure and tuning point.")
    parser.add_argument("--curve_images", type=int, default=16,
                        help="Samples per measure at each curve checkpoint (0: no curve).")
    parser.add_argument("--eval_seed", type=int, default=100, help="First sampling seed of every score.")
    parser.add_argument("--guidance_scale", type=float, default=GUIDANCE,
                        help="Classifier-free guidance of every score (class images keep the model's default). "
                             "Runs already finished in --output_dir with the same flags are scored, not trained.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Runs at a time, each in its own process (15 on a 16-core GPU machine, with CUDA "
                             "MPS running so that their kernels share the GPU).")
    parser.add_argument("--tune_deadline_s", type=float, default=float("inf"),
                        help="Start no tuning run after this many seconds of the tune phase.")
    parser.add_argument("--confirm_deadline_s", type=float, default=float("inf"),
                        help="Start no confirmation run after this many seconds of the confirm phase.")
    parser.add_argument("--curve_png", default="docs/dreambooth_fidelity_vs_drift.png")
    parser.add_argument("--report", nargs="+", default=None, help="Print the table and draw the curve of "
                        "earlier runs' summary.json files (several: one table of their methods; --methods picks "
                        "among them) instead of training.")
    parser.add_argument("--paired_against", default="lora",
                        help="The method every other one is compared with, run by run and sample by sample; with "
                             "--report, also a method kept once per point (\"boft-m1 at lr x3, 300 steps\").")
    parser.add_argument("--report_seeds", type=int, nargs="+", default=None,
                        help="With --report, only the runs of these training seeds (each summary must have them).")
    args = parser.parse_args()
    if args.report_seeds and not args.report:
        parser.error("--report_seeds: only with --report")
    if args.report:
        summary = merge_summaries([json.loads(Path(f).read_text()) for f in args.report], args.methods,
                                  args.report_seeds)
        if not summary["runs"]:
            parser.error(f"--report: no runs of {' '.join(args.methods)} in these summaries")
        split = [m for m in summary["args"]["methods"] if m.startswith(f"{args.paired_against} at ")]
        if split:
            parser.error(f"--paired_against {args.paired_against}: it ran at several points ({'; '.join(split)}); "
                         "pair against another method")
        report(summary, args.curve_png, args.paired_against)
        return
    if args.paired_against not in METHODS:
        parser.error(f"--paired_against {args.paired_against}: not one of {', '.join(METHODS)} (a method at one "
                     "point of several is named only with --report)")
    tune_steps = f"--tune_steps {' '.join(map(str, args.tune_steps))}"
    if min(args.tune_steps) < 1:
        parser.error(f"{tune_steps}: step counts must be positive")
    if "tune" in args.phases and any(s % min(args.tune_steps) for s in args.tune_steps):
        parser.error(f"{tune_steps}: each must be a multiple of the smallest (they are checkpoints of one run of "
                     "the largest)")
    subjects = [name for spec in args.subjects for name in subject_family.resolve(spec)]
    args.tune_subjects = [name for spec in args.tune_subjects for name in subject_family.resolve(spec)]
    held_out = [s for s in args.tune_subjects if s not in world.SUBJECTS and subject_family.split_of(s) == "evaluation"]
    if "tune" in args.phases and held_out:
        parser.error(f"--tune_subjects {' '.join(held_out)}: evaluation subjects; tune on tuning subjects")
    out = Path(args.output_dir)
    try:
        identity = output_identity(args.pretrained_model_name_or_path, args.subject_prompts)
    except ValueError as err:
        parser.error(f"--pretrained_model_name_or_path: {err}")
    cut = prompts_cut_by(identity["folder"], [*subjects, *args.tune_subjects], args.subject_prompts)
    if cut:
        parser.error(f"--subject_prompts {args.subject_prompts}: {len(cut)} prompts are longer than the model's "
                     f"tokenizer takes, e.g. {cut[0]!r}; leave those subjects out")
    claim_for_model(out, identity, parser)
    write_subjects(out, [*subjects, *args.tune_subjects], args.subject_prompts)
    common = {"output_dir": str(out), "model": args.pretrained_model_name_or_path,
              "subject_prompts": args.subject_prompts, "eval_seed": args.eval_seed, "guidance": args.guidance_scale}
    pool = None
    if args.workers > 1:
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=start_worker,
                                   initargs=(max(1, (os.cpu_count() or 1) // args.workers), os.getpid()))
    else:
        start_worker(torch.get_num_threads())
    try:
        if "tune" in args.phases:
            tune(args, common, pool, out)
        if "pick" in args.phases:
            runs = json.loads((out / "tuning_runs.json").read_text())
            write_picks(args, out, [r for r in runs if r["kind"] == "train"],
                        {r["subject"]: r for r in runs if r["kind"] == "base"})
        if "confirm" in args.phases:
            confirm(args, subjects, common, pool, out)
    finally:
        if pool:
            pool.shutdown()


def model_identity(model: str) -> dict[str, str]:
    """What makes two base models one: the folder (the embedded model under any of its names) and the
    bytes of its UNet, so that a candidate retrained into the same folder counts as another model."""
    folder = EMBEDDED_MODEL_DIR if model in TINY_ALIASES else Path(model)
    weights = sorted((folder / "unet").glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{model!r} is not a tiny-world pipeline folder (no unet/*.safetensors in it)")
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return {"folder": str(folder.resolve()), "unet_sha256": digest.hexdigest()}


def holds_runs(out: Path) -> bool:
    """Whether ``out`` holds what a bench run leaves: run logs, run folders or class images."""
    made = [out / "tuning_runs.json", out / "confirmation_runs.json", out / "tune", out / "confirm"]
    return any(path.exists() for path in made) or any(out.glob("*/class_images-seed*"))


def output_identity(model: str, subject_prompts: str = "identifier") -> dict[str, str]:
    """What an output folder's runs share: the base model (``model_identity``) and the subject prompts."""
    return {**model_identity(model), "subject_prompts": subject_prompts}


def claim_for_model(out: Path, identity: dict[str, str], parser: argparse.ArgumentParser) -> None:
    """Mark ``out`` as holding the class images, base measures and runs of one ``output_identity``
    (base model and way of prompting the subject), and refuse it to any other: class images and
    finished runs are reused by folder, so another model would train on the first one's prior without
    a word, and described runs would be scored beside their base model's identifier-only measures. A
    folder from before the mark was made on the embedded model with the identifier."""
    marker = out / BASE_MODEL_FILE
    if marker.is_file():
        claimed = {"subject_prompts": "identifier", **json.loads(marker.read_text())}
    elif holds_runs(out):
        claimed = output_identity("tiny")
    else:
        claimed = identity
    if claimed != identity:
        def said(facts: dict) -> str:
            return (f"the base model in {facts['folder']} (UNet sha256 {facts['unet_sha256'][:12]}), "
                    f"--subject_prompts {facts['subject_prompts']}")
        parser.error(f"--output_dir {out} holds runs of {said(claimed)}; this run asks for {said(identity)}: "
                     "give each its own --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(identity, indent=1) + "\n")


def bench_setup(out: Path) -> tuple[str, str]:
    """The base model folder and the subject prompts of an output folder's runs (the embedded model
    and the identifier where unmarked)."""
    marker = out / BASE_MODEL_FILE
    if not marker.is_file():
        return "tiny", "identifier"
    facts = json.loads(marker.read_text())
    return facts["folder"], facts.get("subject_prompts", "identifier")


def base_and_class_images(subjects: list[str], seeds: list[int], num_images: int, common: dict, pool, workers: int,
                          log: Path, done: list[dict]) -> dict[str, dict]:
    """The base model's measures of each subject, and the class images of each (subject, seed), made
    once before the runs that share them start."""
    prepare = [{**common, "kind": "base", "subject": s, "num_images": num_images} for s in subjects]
    prepare += [{**common, "kind": "class_images", "subject": s, "seed": seed} for s in subjects for seed in seeds]
    return {r["subject"]: r for r in run_all(prepare, pool, workers, float("inf"), log, done) if r["kind"] == "base"}


def tune(args, common: dict, pool, out: Path) -> None:
    """Every method on the same grid of learning rates and step counts, on every tuning subject;
    tuning.json holds the picks. Runs go seed by seed, so a deadline leaves every method with the
    same (subject, seed) runs."""
    start = time.time()
    done: list[dict] = []
    log = out / "tuning_runs.json"
    bases = base_and_class_images(args.tune_subjects, args.tune_seeds, args.tune_images, common, pool, args.workers,
                                  log, done)
    steps = max(args.tune_steps)
    every = min(args.tune_steps) if len(args.tune_steps) > 1 else 0
    jobs = [{**common, "kind": "train", "phase": "tune", "subject": subject, "seed": seed, "method": m,
             "variant": variant, "variant_index": i, "lr_scale": scale, "steps": steps,
             "num_images": args.tune_images, "checkpoint_every": every, "checkpoint_images": args.tune_images}
            for seed in args.tune_seeds for subject in args.tune_subjects for m in args.methods
            for i, variant in enumerate(args.tune_variants)
            for scale in args.lr_scales]
    tuned = run_all(jobs, pool, args.workers, start + args.tune_deadline_s, log, done)
    if not tuned:
        raise SystemExit("no tuning run finished before --tune_deadline_s")
    write_picks(args, out, tuned, bases)


def write_picks(args, out: Path, tuned: list[dict], bases: dict[str, dict]) -> None:
    picked = pick(tuned, bases, args.methods)
    (out / "tuning.json").write_text(json.dumps({"args": vars(args), **picked}, indent=1))
    for m, grid in picked["objective_grid"].items():
        for point in grid:
            print(f"tuning {m}: {point}", flush=True)
        print(f"picked for {m}: {picked['chosen'][m]}", flush=True)


def confirm(args, subjects: list[str], common: dict, pool, out: Path) -> None:
    """Each method at its tuned point on fresh seeds of every subject: the reported table and curve.
    Runs go seed by seed, so a deadline leaves every method with the same (subject, seed) runs."""
    start = time.time()
    tuning = json.loads(Path(args.tuning or out / "tuning.json").read_text())
    chosen, variants = tuning["chosen"], tuning["args"]["tune_variants"]
    done: list[dict] = []
    log = out / "confirmation_runs.json"
    base = base_and_class_images(subjects, args.seeds, args.num_images, common, pool, args.workers, log, done)
    jobs = [{**common, "kind": "train", "phase": "confirm", "subject": s, "seed": seed, "method": m,
             "variant": chosen[m]["variant"], "variant_index": variants.index(chosen[m]["variant"]),
             "lr_scale": chosen[m]["lr_scale"], "steps": chosen[m]["steps"], "num_images": args.num_images,
             "checkpoint_every": chosen[m]["steps"] // 3 if args.curve_images else 0,
             "checkpoint_images": args.curve_images}
            for seed in args.seeds for s in subjects for m in args.methods]
    runs = run_all(jobs, pool, args.workers, start + args.confirm_deadline_s, log, done)
    if not runs:
        raise SystemExit("no confirmation run finished before --confirm_deadline_s")
    summary = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "chosen": chosen, "base": base, "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary, args.curve_png, args.paired_against)
    print(f"\nper-sample results: {out / 'summary.json'}")


def sampling_guidance(args: dict) -> float:
    """The guidance a summary was scored at (summaries from before --guidance_scale used the model's)."""
    return args.get("guidance_scale", GUIDANCE)


def merge_summaries(summaries: list[dict], methods: list[str], seeds: list[int] | None = None) -> dict:
    """One summary of ``methods``' confirmations run separately, which must share subjects, seeds and
    sampling (so their base-model scores agree). A method confirmed at different points in different
    summaries (another learning rate, say) is kept once per point, each named with its point. With
    ``seeds``, each summary is first cut to the runs of those training seeds, so that a confirmation
    on fewer seeds pairs with the same seeds of a longer one."""
    if seeds is not None:
        summaries = [cut_to_seeds(summary, seeds, methods) for summary in summaries]
    first = summaries[0]
    summaries_with = Counter(m for summary in summaries for m in summary["args"]["methods"] if m in methods)
    merged = {**first, "args": {**first["args"], "methods": []}, "chosen": {}, "runs": []}
    for summary in summaries:
        for key in ("seeds", "num_images", "eval_seed", "curve_images"):
            if summary["args"][key] != first["args"][key]:
                raise SystemExit(f"--report: the summaries differ in {key}: {summary['args'][key]} "
                                 f"against {first['args'][key]}")
        if sampling_guidance(summary["args"]) != sampling_guidance(first["args"]):
            raise SystemExit(f"--report: the summaries were scored at guidance {sampling_guidance(summary['args'])} "
                             f"and {sampling_guidance(first['args'])}")
        if any(summary["base"].get(s, {}).get("samples") != first["base"][s]["samples"] for s in first["base"]):
            raise SystemExit("--report: the summaries' base-model scores differ; they were not sampled alike")
        for method in [m for m in summary["args"]["methods"] if m in methods]:
            point = summary["chosen"][method]
            name = method if summaries_with[method] == 1 else f"{method} at {describe_point(point)}"
            if name in merged["chosen"]:
                raise SystemExit(f"--report: {name} appears in more than one summary")
            merged["args"]["methods"].append(name)
            merged["chosen"][name] = point
            merged["runs"] += [{**r, "method": name} for r in summary["runs"] if r["method"] == method]
    return merged


def cut_to_seeds(summary: dict, seeds: list[int], methods: list[str]) -> dict:
    """``summary`` with the runs of ``seeds`` alone; each of its ``methods`` must have runs at each of
    them (a confirmation stopped by its deadline may lack some)."""
    for method in [m for m in summary["args"]["methods"] if m in methods]:
        ran = {r["seed"] for r in summary["runs"] if r["method"] == method}
        missing = sorted(set(seeds) - ran)
        if missing:
            raise SystemExit(f"--report_seeds: {method} has no run at seed {', '.join(map(str, missing))} in a "
                             f"summary of seeds {summary['args']['seeds']}")
    return {**summary, "args": {**summary["args"], "seeds": sorted(seeds)},
            "runs": [r for r in summary["runs"] if r["seed"] in seeds]}


def report(summary: dict, curve_png: str, paired_against: str) -> None:
    """The table, the paired differences and the curve of a finished run, from its summary.json."""
    args = summary["args"]
    print_table(summary, list(summary["base"]), args)
    if len(summary["base"]) > 1:
        print_per_subject(summary)
    if paired_against in args["methods"]:
        print_paired(summary, paired_against)
    else:
        print(f"\nNo paired differences: --paired_against {paired_against} is not among the methods.")
    if args["curve_images"]:
        base = {name: scores["samples"] for name, scores in summary["base"].items()}
        means = {}
        print("\nFidelity-vs-drift curve, mean over runs at each checkpoint (step: subject fidelity, drift):\n")
        for method in args["methods"]:
            mine = [r for r in summary["runs"] if r["method"] == method]
            means[method] = np.mean(np.array([run_curve(r, base[r["subject"]]) for r in mine], dtype=float), axis=0)
            _, low, high = paired_bootstrap_ci([base[r["subject"]]["class_prompt_fidelity"] for r in mine],
                                               [r["samples"]["class_prompt_fidelity"] for r in mine])
            print(f"{method}: " + "; ".join(f"{int(step)}: {subject:.2f}, {drift:+.3f}"
                                            for step, subject, drift in means[method])
                  + f" (final drift's interval [{low:+.3f}, {high:+.3f}])")
        draw_curves(means, Path(curve_png))


if __name__ == "__main__":
    main()
