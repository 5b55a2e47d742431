"""`make demo`: BOFT DreamBooth on the embedded tiny model, then base vs adapter, scored.

Trains an adapter on the bundled striped star ("a photo of sks star") with prior preservation,
samples the base model and the adapter with the same seeds into a side-by-side grid, and prints
the tiny-world scores (subject fidelity, re-contextualisation, language drift).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .evaluation.sampling import sample
from .evaluation.tiny_world import compare_tiny_world, recontext_prompts
from .models.bundled import example_subject_dir
from .models.images import image_grid
from .models.pipelines import load_pipeline, tiny_defaults
from .outputs.read import TrainedAdapter, load_outputs
from .recipes.dreambooth import build_parser, run
from .tiny import world
from .training.data import load_images

INSTANCE_PROMPT = world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt
CLASS_PROMPT = world.SUBJECTS[world.DEFAULT_SUBJECT].class_prompt
GUIDANCE = tiny_defaults()["guidance_scale"]  # the embedded model's sampling default


def training_flags(adapter_dir: Path, steps: int, seed: int, class_dir: Path,
                   subject: str = world.DEFAULT_SUBJECT) -> list[str]:
    """The demo's DreamBooth recipe for the tiny model, as train_dreambooth.py flags, for one of
    the bundled subjects.

    BOFT on the UNet's attention and ResNet convolutions, plus the identifier's embedding. Prior
    loss weight 2 holds the class prompt in place against the convolution adapters. No random
    flips: they would mirror the subject's diagonal stripes. Validation shows the subject, the
    subject in a new context and the class.
    """
    bundled = world.SUBJECTS[subject]
    instance, recontext = bundled.instance_prompt, recontext_prompts(bundled.instance_prompt, bundled.backgrounds)
    return [
        "--output_dir", str(adapter_dir), "--overwrite_output_dir",
        "--instance_data_dir", str(example_subject_dir(subject)), "--instance_prompt", instance,
        "--with_prior_preservation", "--class_prompt", bundled.class_prompt,
        "--class_data_dir", str(class_dir), "--num_class_images", "40",
        "--max_train_steps", str(steps), "--train_batch_size", "2",
        "--boft_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
        "--train_identifier_embedding", "--identifier_learning_rate", "5e-3", "--prior_loss_weight", "2",
        "--learning_rate", "2e-3", "--snr_gamma", "5",
        "--seed", str(seed), "--guidance_scale", str(GUIDANCE),
        "--validation_prompt", instance, recontext[1][0], bundled.class_prompt,
        "--num_validation_images", "4",
    ]


def comparison_grid(adapter: TrainedAdapter, prompts: list[str], seeds: int, path: Path) -> None:
    """Rows: each prompt with the base model, then with the adapter; same seeds in each column."""
    rows = []
    for prompt in prompts:
        for enabled in (False, True):
            adapter.switch(enabled)
            rows.append(sample(adapter.pipe, [prompt] * seeds, 0, 25, GUIDANCE))
    image_grid(rows).resize((64 * seeds * 2, 64 * len(rows) * 2)).save(path)


def print_scores(scores: dict) -> None:
    base, adapter = scores["base"], scores["adapter"]
    print("\n| measure | base model | BOFT adapter |")
    print("|---|---|---|")
    print(f"| subject fidelity, '{INSTANCE_PROMPT}' (instance images: {scores['instances']:.2f}) "
          f"| {base['subject']:.2f} | {adapter['subject']:.2f} |")
    print(f"| background right, '{INSTANCE_PROMPT} on a <colour> background' "
          f"| {base['recontext_background']:.2f} | {adapter['recontext_background']:.2f} |")
    print(f"| prompt fidelity, ordinary captions | {base['class_prompt_fidelity']:.2f} "
          f"| {adapter['class_prompt_fidelity']:.2f} |")
    print(f"| subject fidelity, '{CLASS_PROMPT}' (should stay low) | {base['class_subject']:.2f} "
          f"| {adapter['class_subject']:.2f} |")
    ratio = adapter["subject"] / max(scores["instances"], 1e-6)
    print(f"\nsubject fidelity reaches {ratio:.0%} of the instance images' own score")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--num_images", type=int, default=48,
                        help="Samples per measure (48: eight per re-context colour).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--eval_seed", type=int, default=100,
                        help="First sampling seed of the scores (kept apart from --seed, so that training runs "
                             "with different seeds are scored on the same noise).")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    start = time.time()
    adapter_dir = output_dir / "adapter"
    run(build_parser().parse_args(training_flags(adapter_dir, args.max_train_steps, args.seed,
                                                 output_dir / "class_images")))
    trained = time.time()

    pipe = load_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_outputs(pipe, adapter_dir)
    prompts = [INSTANCE_PROMPT, recontext_prompts(INSTANCE_PROMPT)[1][0], CLASS_PROMPT]
    grid_path = output_dir / "base_vs_adapter.png"
    comparison_grid(adapter, prompts, 6, grid_path)
    instances = [image for _, image in load_images(example_subject_dir(), 64)]
    scores = compare_tiny_world(adapter, instances, INSTANCE_PROMPT, CLASS_PROMPT,
                                num_images=args.num_images, seed=args.eval_seed, guidance=GUIDANCE)
    scores["train_seconds"] = round(trained - start, 1)
    scores["total_seconds"] = round(time.time() - start, 1)
    (output_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print_scores(scores)
    print(f"grid (rows: base, adapter for each prompt): {grid_path}")
    print(f"adapter: {adapter_dir}; trained in {scores['train_seconds']} s, demo total {scores['total_seconds']} s")
    return scores


if __name__ == "__main__":
    main()
