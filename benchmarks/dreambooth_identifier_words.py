"""DreamBooth with the subject named by other words than the bundled "sks ohwx".

The recipe of bench_dreambooth.py, with each bundled subject's captions and instance prompt
rewritten so that ``--words`` replace its identifier; the embedding of every identifier word is
learned, so N words give the subject N learned vectors. ``--words sks`` is the recipe of the
rounds before the eighth. Each (subject, seed) run is scored as bench_dreambooth.py scores it
(same sampling seeds, the rewritten instance prompt) and judged by its tuning objective; with
several runs, the means come with 95 % bootstrap intervals.

    python benchmarks/dreambooth_identifier_words.py --words sks ohwx zwx --subjects sks_star sks_diamond \\
        --seeds 0 1 2 --num_images 24 --workers 2 --output_dir runs/words
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from bench_dreambooth import MEASURES, class_dir, fresh_pipeline, instances_of, loader, measure, objective, start_worker

from boft_diffusion.demo import training_flags
from boft_diffusion.evaluation.statistics import bootstrap_ci
from boft_diffusion.evaluation.tiny_world import instance_self_score
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, train
from boft_diffusion.tiny import world
from boft_diffusion.tiny.bundled import example_subject_dir

METHOD = "boft-m1"  # the recipe's adapter, for its loader


def renamed_subject(out: Path, name: str, words: str) -> Path:
    """A copy of a bundled subject whose captions name it with ``words`` instead of its identifier."""
    folder = out / "data" / name
    if not folder.is_dir():
        shutil.copytree(example_subject_dir(name), folder)
        for caption in folder.glob("*.txt"):
            caption.write_text(caption.read_text().replace(world.SUBJECTS[name].identifier, words))
    return folder


def train_and_score(job: dict) -> dict:
    out, name, seed, words = Path(job["output_dir"]), job["subject"], job["seed"], job["words"]
    prompt = world.SUBJECTS[name].instance_prompt.replace(world.SUBJECTS[name].identifier, words)
    run_dir = out / name / f"seed{seed}"
    flags = training_flags(run_dir, 300, seed, class_dir(out, name, seed), name)
    train(DreamBoothConfig.from_flags([*flags, "--instance_data_dir", str(renamed_subject(out, name, words)),
                                       "--instance_prompt", prompt, "--report_to", "none"]))
    pipe = fresh_pipeline()
    load_outputs(pipe, run_dir, load=loader(METHOD))
    return {**job, "samples": measure(pipe, name, job["num_images"], job["eval_seed"], instance_prompt=prompt)}


def base_of(job: dict) -> dict:
    """What the objective compares with: the base model's measures and the instance images' own score."""
    return {"samples": measure(fresh_pipeline(), job["subject"], job["num_images"], job["eval_seed"]),
            "instances": instance_self_score(instances_of(job["subject"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", nargs="+", required=True, help="The identifier words, in order.")
    parser.add_argument("--subjects", nargs="+", default=list(world.SUBJECTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--num_images", type=int, default=48, help="Samples per measure and run.")
    parser.add_argument("--eval_seed", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--output_dir", default="outputs/dreambooth_identifier_words")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"output_dir": str(out), "words": " ".join(args.words), "num_images": args.num_images,
              "eval_seed": args.eval_seed}
    jobs = [{**common, "subject": name, "seed": seed} for seed in args.seeds for name in args.subjects]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                             initargs=(threads,)) as pool:
        bases = dict(zip(args.subjects, pool.map(base_of, [{**common, "subject": s} for s in args.subjects]),
                         strict=True))
        runs = list(pool.map(train_and_score, jobs))
    (out / "runs.json").write_text(json.dumps({"args": vars(args), "base": bases, "runs": runs}, indent=1))
    for r in runs:
        fraction = np.mean(r["samples"]["subject"]) / bases[r["subject"]]["instances"]
        print(f"{r['subject']} seed {r['seed']}: objective {objective(r['samples'], bases[r['subject']]):.3f}, "
              f"subject / instances {fraction:.2f}")
    for m in MEASURES:
        scale = [bases[r["subject"]]["instances"] if m in ("subject", "recontext_subject") else 1.0 for r in runs]
        mean, low, high = bootstrap_ci([np.asarray(r["samples"][m]) / k for r, k in zip(runs, scale, strict=True)])
        print(f"{m}: {mean:.2f} [{low:.2f}, {high:.2f}]")


if __name__ == "__main__":
    main()
