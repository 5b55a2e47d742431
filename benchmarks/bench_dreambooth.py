"""DreamBooth on the embedded tiny model: BOFT against PEFT LoRA with a similar parameter budget.

Trains both with the demo's recipe (same steps, data, prior preservation), once per training seed,
then scores the base model and each adapter with the tiny-world measures on the same sampling
seeds. Prints a markdown table, with the mean over training seeds when there are several.

    python benchmarks/bench_dreambooth.py --seeds 0 1 2 --num_images 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from boft_diffusion import count_trainable_parameters, load_adapter, load_pipeline
from boft_diffusion.core.identifier import identifier_embedding
from boft_diffusion.demo import CLASS_PROMPT, GUIDANCE, INSTANCE_PROMPT, training_flags
from boft_diffusion.evaluation.tiny_world import instance_self_score, tiny_world_scores
from boft_diffusion.models.bundled import example_subject_dir
from boft_diffusion.models.lora import load_lora
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import build_parser, run
from boft_diffusion.training.data import load_images


def scores_for(adapter_dir: Path | None, kind: str, instances, num_images: int, seed: int) -> tuple[dict, int]:
    """Tiny-world scores of the base model with this adapter (UNet and text-encoder parts, learned
    identifier embedding), and its size."""
    pipe = load_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    params = 0
    for model in (pipe.unet, pipe.text_encoder):
        model.requires_grad_(False)  # count only what the adapter adds
    if adapter_dir is not None:
        models = load_outputs(pipe, adapter_dir, load=load_adapter if kind == "boft" else load_lora).models
        params = sum(count_trainable_parameters(m) if kind == "boft" else
                     sum(p.numel() for n, p in m.named_parameters() if "lora_" in n) for m in models)
        identifier = identifier_embedding(pipe.text_encoder)
        params += identifier.identifier_vectors.numel() if identifier is not None else 0
    scores = tiny_world_scores(pipe, instances, INSTANCE_PROMPT, CLASS_PROMPT, num_images=num_images, seed=seed,
                              guidance=GUIDANCE)  # the demo's guidance, so that the numbers compare with it
    return scores, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_dreambooth")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--lora_rank", type=int, default=6, help="6 matches the demo recipe's BOFT budget.")
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Training seeds, one run of each adapter per seed.")
    parser.add_argument("--eval_seed", type=int, default=100, help="First sampling seed of every score.")
    args = parser.parse_args()
    out = Path(args.output_dir)
    instances = [image for _, image in load_images(example_subject_dir(), 64)]
    rows = {"base model": scores_for(None, "base", instances, args.num_images, args.eval_seed) + (0.0,)}
    labels = {"boft": "BOFT m=2, b=8", "lora": f"PEFT LoRA r={args.lora_rank}"}
    runs: dict[str, list[tuple[dict, int, float]]] = {label: [] for label in labels.values()}
    for seed in args.seeds:
        for kind, label in labels.items():
            flags = training_flags(out / f"{kind}-seed{seed}", args.max_train_steps, seed, class_dir=out / "class_images")
            flags += ["--adapter_type", kind, "--lora_rank", str(args.lora_rank), "--report_to", "none"]
            start = time.time()
            run(build_parser().parse_args(flags))
            seconds = time.time() - start
            row = scores_for(out / f"{kind}-seed{seed}", kind, instances, args.num_images, args.eval_seed) + (seconds,)
            rows[f"{label}, seed {seed}"] = row
            runs[label].append(row)
    if len(args.seeds) > 1:
        for label, done in runs.items():
            mean = {key: sum(r[0][key] for r in done) / len(done) for key in done[0][0]}
            rows[f"{label}, mean of {len(done)} seeds"] = (mean, done[0][1], sum(r[2] for r in done) / len(done))
    print(f"\nTiny-world DreamBooth, {args.max_train_steps} steps, {args.num_images} samples per measure "
          f"from sampling seed {args.eval_seed}; "
          f"instance images' own subject fidelity {instance_self_score(instances):.2f}.\n")
    print("| adapter | trainable params | train time (s) | subject fidelity | background right (re-context) "
          "| prompt fidelity (class captions) | class prompt subject fidelity |")
    print("|---|---|---|---|---|---|---|")
    for label, (s, params, seconds) in rows.items():
        print(f"| {label} | {params:,} | {seconds:.0f} | {s['subject']:.2f} | {s['recontext_background']:.2f} "
              f"| {s['class_prompt_fidelity']:.2f} | {s['class_subject']:.2f} |")
    (out / "results.json").write_text(json.dumps({k: v[0] | {"params": v[1]} for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
