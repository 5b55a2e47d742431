"""What moved a tuning objective: ``bench_dreambooth.objective_parts`` run by run (each run's end,
not its checkpoints), for one or more tuning logs (``tuning_runs.json``) of the same subjects and
seeds, with two raw extras: the class leakage and the base model's own subject share (the same
prompt, no training).

The objective is a mean of six parts, so a point can win on the subject and lose it all on the
background; this table says which. Runs pair across logs by (subject, seed, method, point):

    python benchmarks/tuning_breakdown.py runs/recipe/tuning_runs.json runs/described/tuning_runs.json \
        --labels recipe described
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_dreambooth import objective_parts

EXTRAS = ("class_leakage", "base_subject_share")


def run_parts(run: dict, base: dict) -> dict[str, float]:
    """One tuning run's objective parts and the extras."""
    return {**objective_parts(run["samples"], base),
            "class_leakage": float(np.mean(run["samples"]["class_subject"])),
            "base_subject_share": float(np.mean(base["samples"]["subject"])) / base["instances"]}


def breakdown(log: list[dict]) -> dict[tuple, dict[str, float]]:
    """A tuning log's runs by (subject, seed, method, lr scale, steps, variant), as their parts."""
    bases = {r["subject"]: r for r in log if r["kind"] == "base"}
    table = {}
    for r in log:
        if r["kind"] == "train":
            key = (r["subject"], r["seed"], r["method"], r["lr_scale"], r["steps"], r["variant"])
            if key in table:
                raise ValueError(f"run {key} is in the log twice")
            table[key] = run_parts(r, bases[r["subject"]])
    return table


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="tuning_runs.json files of bench_dreambooth.py")
    parser.add_argument("--labels", nargs="+", default=None)
    args = parser.parse_args(argv)
    labels = args.labels or [str(path) for path in args.logs]
    if len(labels) != len(args.logs) or len(set(labels)) != len(labels):
        parser.error(f"--labels: {len(args.logs)} different labels needed, got {' '.join(labels)}")
    try:
        tables = {label: breakdown(json.loads(path.read_text())) for label, path in zip(labels, args.logs, strict=True)}
    except ValueError as err:
        parser.error(str(err))
    shared = set.intersection(*(set(table) for table in tables.values()))
    if not shared:
        parser.error("the logs share no (subject, seed, method, point) run")
    print(f"| run | {' | '.join(labels)} |")
    print("|---" * (len(labels) + 1) + "|")
    for key in sorted(shared, key=lambda k: (k[1], k[0])):
        cells = [f"{t[key]['subject_share']:.2f} / {t[key]['background_right']:.2f}" for t in tables.values()]
        print(f"| {key[0]}, seed {key[1]}: share / background | {' | '.join(cells)} |")
    parts = list(next(iter(tables.values()))[next(iter(shared))])
    means = {label: {part: float(np.mean([table[key][part] for key in shared])) for part in parts}
             for label, table in tables.items()}
    for part in parts:
        print(f"| mean {part.replace('_', ' ')} | {' | '.join(f'{means[label][part]:.3f}' for label in labels)} |")
    return means


if __name__ == "__main__":
    main()
