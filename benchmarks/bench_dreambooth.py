"""DreamBooth on the embedded tiny model: BOFT (m = 1, 2, 4) against PEFT LoRA and PEFT OFT.

Every (subject, training seed, method) is trained with the demo's recipe (same steps, data, prior
preservation, learned identifier); only the adapter differs, LoRA and OFT sized to BOFT m = 2's
parameter budget. Each run is scored on the same sampling seeds with the tiny-world measures
(per sample, so that means come with 95 % bootstrap intervals over subject x seed x sample), the
hyperspherical-energy change of the adapted layers, and, at every checkpoint, subject fidelity
against language drift (the fidelity-vs-drift curve, drawn as a PNG).

    python benchmarks/bench_dreambooth.py --subjects all --seeds 10 11 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from boft_diffusion import load_adapter, load_pipeline
from boft_diffusion.core.adapters import base_state_dict, merged_state_dict
from boft_diffusion.core.files import WEIGHTS_NAME, count_file_parameters
from boft_diffusion.demo import GUIDANCE, training_flags
from boft_diffusion.evaluation.energy import energy_change
from boft_diffusion.evaluation.statistics import bootstrap_ci
from boft_diffusion.evaluation.tiny_world import instance_self_score, sample_scores, tiny_world_samples
from boft_diffusion.models.bundled import example_subject_dir
from boft_diffusion.models.peft_baselines import load_peft_adapter
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import build_parser, run
from boft_diffusion.tiny import world
from boft_diffusion.training.data import load_images

#: train_dreambooth.py flags of each method; LoRA r=6 and OFT b=16 match BOFT m=2's budget.
METHODS = {
    "boft-m1": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "1"],
    "boft-m2": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "2"],
    "boft-m4": ["--adapter_type", "boft", "--boft_n_butterfly_factor", "4"],
    "lora": ["--adapter_type", "lora", "--lora_rank", "6"],
    "oft": ["--adapter_type", "oft", "--oft_block_size", "16"],
}
MEASURES = ("subject", "recontext_background", "recontext_subject", "class_prompt_fidelity", "class_subject",
            "class_shape")


def fresh_pipeline():
    pipe = load_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peft_merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a PEFT-adapted model with the adapter folded in, under the plain key names."""
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
    return {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items()
            if "lora_" not in k and "oft_" not in k}


def measure(pipe, subject: world.Subject, instances, num_images: int, args) -> dict[str, list[float]]:
    """Per-sample tiny-world measures of the pipeline as it is, re-context on the subject's backgrounds."""
    drawn = tiny_world_samples(pipe, subject.instance_prompt, subject.class_prompt, num_images, args.eval_seed,
                               guidance=GUIDANCE, backgrounds=subject.backgrounds)
    return sample_scores(drawn, instances)


def score_folder(folder: Path, method: str, subject: world.Subject, instances, args) -> dict:
    """Per-sample tiny-world measures of one output folder, and its hyperspherical-energy change."""
    pipe = fresh_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    boft = method.startswith("boft")
    load_outputs(pipe, folder, load=load_adapter if boft else load_peft_adapter)
    samples = measure(pipe, subject, instances, args.num_images, args)
    after = merged_state_dict(pipe.unet) if boft else peft_merged_weights(pipe.unet)
    if boft:
        assert base_state_dict(pipe.unet).keys() == after.keys()
    changed = {k: before[k] for k in before if k.endswith("weight") and before[k].dim() > 1
               and not torch.equal(before[k], after[k])}
    params = sum(count_file_parameters(folder / name) or 0 for name in (WEIGHTS_NAME, "learned_embeds.safetensors"))
    return {"samples": samples, "energy_change": energy_change(changed, {k: after[k] for k in changed}),
            "adapted_weights": len(changed), "params": params}


def curve_points(run_dir: Path, method: str, subject: world.Subject, instances, args, base_drift: float) -> list:
    """(step, subject fidelity, drift) at every checkpoint and at the end, on fewer samples."""
    folders = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    points = []
    for folder in [*(f / "adapter" for f in folders), run_dir]:
        pipe = fresh_pipeline()
        load_outputs(pipe, folder, load=load_adapter if method.startswith("boft") else load_peft_adapter)
        samples = measure(pipe, subject, instances, args.curve_images, args)
        step = int(folder.parent.name.split("-")[1]) if folder != run_dir else args.max_train_steps
        points.append((step, float(np.mean(samples["subject"])),
                       base_drift - float(np.mean(samples["class_prompt_fidelity"]))))
    return points


def train(subject: str, seed: int, method: str, args) -> tuple[Path, float]:
    out = Path(args.output_dir)
    run_dir = out / subject / f"{method}-seed{seed}"
    flags = training_flags(run_dir, args.max_train_steps, seed, out / subject / "class_images", subject)
    flags += [*METHODS[method], "--report_to", "none", "--checkpointing_steps", str(args.max_train_steps // 3)]
    start = time.time()
    run(build_parser().parse_args(flags))
    return run_dir, time.time() - start


def draw_curves(curves: dict[str, list[list[tuple]]], path: Path) -> None:
    """Subject fidelity (y) against language drift (x), one line per method through its mean point
    at each checkpoint step, drawn with Pillow."""
    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    means = {m: np.mean(np.array(runs, dtype=float), axis=0) for m, runs in curves.items()}
    xs = np.concatenate([p[:, 2] for p in means.values()])
    x_lo, x_hi = min(0.0, xs.min()), max(0.05, xs.max())

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_lo) / (x_hi - x_lo) * (width - 2 * margin), height - margin - y * (height - 2 * margin))

    draw.line([at(x_lo, 0), at(x_hi, 0)], fill="black")
    draw.line([at(x_lo, 0), at(x_lo, 1)], fill="black")
    draw.text((width / 2 - 120, height - 30), "language drift (base - adapted prompt fidelity)", fill="black")
    draw.text((5, 20), "subject fidelity", fill="black")
    for tick in (0.0, 0.5, 1.0):
        draw.text((margin - 30, at(x_lo, tick)[1] - 6), f"{tick:.1f}", fill="black")
    for tick in np.linspace(x_lo, x_hi, 5):
        draw.text((at(tick, 0)[0] - 12, height - margin + 5), f"{tick:.2f}", fill="black")
    colours = ["#d62728", "#ff7f0e", "#8c564b", "#1f77b4", "#2ca02c"]
    for i, (method, points) in enumerate(means.items()):
        xy = [at(p[2], p[1]) for p in points]
        draw.line(xy, fill=colours[i % len(colours)], width=2)
        for (x, y), p in zip(xy, points, strict=True):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[i % len(colours)])
            draw.text((x + 4, y - 12), f"{int(p[0])}", fill=colours[i % len(colours)])
        draw.text((width - 150, 20 + 16 * i), method, fill=colours[i % len(colours)])
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_dreambooth")
    parser.add_argument("--subjects", nargs="+", default=[world.DEFAULT_SUBJECT],
                        help=f"Bundled subjects, or 'all' ({', '.join(world.SUBJECTS)}).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12], help="Training seeds.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--num_images", type=int, default=48, help="Samples per measure and run.")
    parser.add_argument("--curve_images", type=int, default=16, help="Samples per measure at each checkpoint.")
    parser.add_argument("--eval_seed", type=int, default=100, help="First sampling seed of every score.")
    parser.add_argument("--curve_png", default="docs/dreambooth_fidelity_vs_drift.png")
    args = parser.parse_args()
    subjects = list(world.SUBJECTS) if args.subjects == ["all"] else args.subjects
    results: dict = {"args": vars(args), "base": {}, "runs": []}
    curves: dict[str, list] = {m: [] for m in args.methods}
    for name in subjects:
        subject = world.SUBJECTS[name]
        instances = [image for _, image in load_images(example_subject_dir(name), 64)]
        base = measure(fresh_pipeline(), subject, instances, args.num_images, args)
        results["base"][name] = {"samples": base, "instances": instance_self_score(instances)}
        for seed in args.seeds:
            for method in args.methods:
                run_dir, seconds = train(name, seed, method, args)
                scored = score_folder(run_dir, method, subject, instances, args)
                points = curve_points(run_dir, method, subject, instances, args,
                                      float(np.mean(base["class_prompt_fidelity"])))
                curves[method].append(points)
                results["runs"].append({"subject": name, "seed": seed, "method": method, "train_seconds": seconds,
                                        "curve": points, **scored})
                (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, subjects, args)
    draw_curves(curves, Path(args.curve_png))
    print(f"\ncurve: {args.curve_png}; per-sample results: {Path(args.output_dir) / 'results.json'}")


def print_table(results: dict, subjects: list[str], args) -> None:
    def cell(runs: list[list[float]]) -> str:
        mean, low, high = bootstrap_ci(runs)
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]"

    instances = np.mean([results["base"][s]["instances"] for s in subjects])
    print(f"\nTiny-world DreamBooth: subjects {', '.join(subjects)}; training seeds {args.seeds}; "
          f"{args.max_train_steps} steps; {args.num_images} samples per measure from sampling seed {args.eval_seed}; "
          f"mean [95 % bootstrap interval over subject x seed x sample]; instance images' own score {instances:.2f}.\n")
    print("| method | params | " + " | ".join(MEASURES) + " | energy change | train s |")
    print("|---" * (len(MEASURES) + 4) + "|")
    print("| base model | 0 | " + " | ".join(cell([results["base"][s]["samples"][m] for s in subjects])
                                           for m in MEASURES) + " | 0 | - |")
    for method in args.methods:
        runs = [r for r in results["runs"] if r["method"] == method]
        print(f"| {method} | {runs[0]['params']:,} | " + " | ".join(cell([r["samples"][m] for r in runs]) for m in MEASURES)
              + f" | {np.mean([r['energy_change'] for r in runs]):.2e} | {np.mean([r['train_seconds'] for r in runs]):.0f} |")


if __name__ == "__main__":
    main()
