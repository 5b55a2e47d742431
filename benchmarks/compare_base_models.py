"""Did a new base model help DreamBooth? Two bench_dreambooth.py summaries, one per base model, with
the same methods, subjects, training seeds and sampling seeds, compared run by run.

Held-out subjects differ in how well they can be drawn at all, so the paired difference (same
method, subject, training seed and sampling seed; only the base model differs) is the number to
read. Drift is each model's own: its untrained class prompt fidelity minus the adapted one.

    python benchmarks/compare_base_models.py runs/v3/summary.json runs/v4/summary.json \
        --labels v3 v4 --output runs/v3_vs_v4.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_dreambooth import subject_means

from boft_diffusion.evaluation.statistics import bootstrap_ci, paired_bootstrap_ci

MEASURES = ("subject", "recontext_subject", "recontext_background", "class_prompt_fidelity")


def runs_by_key(summary: dict) -> dict[tuple, dict]:
    """A summary's runs by (method, subject, training seed)."""
    return {(r["method"], r["subject"], r["seed"]): r for r in summary["runs"]}


def method_row(runs: list[dict], base: dict) -> dict:
    """One model's means for one method: measures, shares of the instance score, drift."""
    row = {name: bootstrap_ci([r["samples"][name] for r in runs]) for name in MEASURES}
    shares = {subject: fidelity / base[subject]["instances"] for subject, fidelity in subject_means(runs).items()}
    row["mean_share"], row["worst_share"] = float(np.mean(list(shares.values()))), float(min(shares.values()))
    untrained = np.mean([np.mean(base[r["subject"]]["samples"]["class_prompt_fidelity"]) for r in runs])
    row["drift_points"] = float(100 * (untrained - row["class_prompt_fidelity"][0]))
    row["shares"] = shares
    return row


def compare(before: dict, after: dict) -> dict:
    """Per method: each model's row and the paired differences (after - before)."""
    old, new = runs_by_key(before), runs_by_key(after)
    shared = sorted(old.keys() & new.keys())
    if not shared:
        raise SystemExit("the two summaries share no (method, subject, seed) run: nothing to pair")
    for key in shared:
        if len(old[key]["samples"]["subject"]) != len(new[key]["samples"]["subject"]):
            raise SystemExit(f"run {key} has a different number of samples in the two summaries")
    if before["args"]["eval_seed"] != after["args"]["eval_seed"]:
        raise SystemExit("the two summaries sampled from different seeds (--eval_seed): samples do not pair")
    result = {}
    for method in sorted({key[0] for key in shared}):
        keys = [key for key in shared if key[0] == method]
        pairs = [(new[key]["samples"], old[key]["samples"]) for key in keys]
        result[method] = {
            "runs": len(keys),
            "before": method_row([old[key] for key in keys], before["base"]),
            "after": method_row([new[key] for key in keys], after["base"]),
            "paired": {name: paired_bootstrap_ci([a[name] for a, _ in pairs], [b[name] for _, b in pairs])
                       for name in MEASURES},
        }
    return result


def print_table(result: dict, labels: tuple[str, str]) -> None:
    print(f"| method | model | runs | {' | '.join(MEASURES)} | mean / worst share | drift (points) |")
    print("|---" * (len(MEASURES) + 5) + "|")
    for method, entry in result.items():
        for label, side in zip(labels, ("before", "after"), strict=True):
            row = entry[side]
            cells = " | ".join(f"{row[name][0]:.2f} [{row[name][1]:.2f}, {row[name][2]:.2f}]" for name in MEASURES)
            print(f"| {method} | {label} | {entry['runs']} | {cells} | {row['mean_share']:.2f} / "
                  f"{row['worst_share']:.2f} | {row['drift_points']:.1f} |")
        cells = " | ".join(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi in entry["paired"].values())
        print(f"| {method} | {labels[1]} - {labels[0]}, paired | {entry['runs']} | {cells} | | |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="summary.json of the runs on the old base model")
    parser.add_argument("after", help="summary.json of the same runs on the new base model")
    parser.add_argument("--labels", nargs=2, default=["before", "after"])
    parser.add_argument("--output", default=None, help="write the comparison here (JSON)")
    args = parser.parse_args(argv)
    result = compare(json.loads(Path(args.before).read_text()), json.loads(Path(args.after).read_text()))
    print_table(result, tuple(args.labels))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "methods": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
