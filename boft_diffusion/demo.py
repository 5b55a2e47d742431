"""`make demo`: BOFT DreamBooth on the embedded tiny model, then base vs adapter, scored.

Trains an adapter on the bundled striped star ("a photo of sks ohwx star") with prior preservation,
scores the base model and the adapter on the same seeds (subject fidelity, re-contextualisation,
language drift), and writes beside scores.json two labelled grids of the scored samples: each
prompt with its score, base and adapter side by side, and one row per re-context colour.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .core.files import atomic_write, atomic_write_text
from .core.images import LabelledRow, labelled_comparison
from .evaluation.tiny_world import (
    Prompted,
    TinyWorldSamples,
    background_hits,
    compare_samples,
    instance_self_score,
    recontext_prompts,
    score_samples,
)
from .families.loading import load_pipeline, quiet_progress, tiny_defaults
from .outputs.read import load_outputs
from .outputs.write import add_model_card_scores
from .recipes.dreambooth import DreamBoothConfig, build_parser, train
from .tiny import world
from .tiny.bundled import example_subject_dir
from .tiny.subject_family import subject_by_name
from .training.cli import HelpFormatter, config_tokens, read_config_file
from .training.data import load_images

INSTANCE_PROMPT = world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt
CLASS_PROMPT = world.SUBJECTS[world.DEFAULT_SUBJECT].class_prompt
CLASS_NOUN = world.SUBJECTS[world.DEFAULT_SUBJECT].kind
MODELS = ("base", "adapter")  # the column headers of the grids, and the keys of the scores
GRID_SEEDS = 6
GUIDANCE = tiny_defaults()["guidance_scale"]  # the embedded model's sampling default


#: The demo's DreamBooth recipe, whose only copy is this --config file of train_dreambooth.py in the
#: repository's examples/ (the demo runs from a checkout: `make demo` installs the package editable).
RECIPE_FILE = Path(__file__).resolve().parent.parent / "examples" / "dreambooth_demo.toml"
#: Keys of RECIPE_FILE that training_flags sets for each subject, output folder, seed and run length;
#: the file holds them for `make demo`'s run (tests/test_config_file.py checks that the two agree).
PER_RUN_KEYS = ("output_dir", "instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir",
                "max_train_steps", "seed", "guidance_scale", "validation_prompt")


def read_recipe() -> dict[str, Any]:
    """The table of RECIPE_FILE; a missing file says where the demo looked for it and why there."""
    if not RECIPE_FILE.is_file():
        raise FileNotFoundError(f"{RECIPE_FILE} is missing: the demo reads its recipe from the repository's "
                                "examples/ folder, so run it from a checkout (`make demo` installs the package "
                                "editable).")
    return read_config_file(RECIPE_FILE)


def recipe_flags(leave_out: Collection[str] = ()) -> list[str]:
    """The subject-independent part of the recipe as train_dreambooth.py flags, less the keys
    ``leave_out`` (for a run that sets those itself)."""
    recipe = {key: value for key, value in read_recipe().items() if key not in (*PER_RUN_KEYS, *leave_out)}
    return config_tokens(build_parser(), recipe, str(RECIPE_FILE))


def training_flags(adapter_dir: Path, steps: int, seed: int, class_dir: Path,
                   subject: str = world.DEFAULT_SUBJECT, instance_dir: Path | None = None) -> list[str]:
    """The demo's DreamBooth recipe for the tiny model, as train_dreambooth.py flags, for a bundled
    subject or one of ``subject_family`` by name: the recipe file's flags, with the subject's data
    and prompts. ``instance_dir``: the subject's photos (default: the bundled folder; a generated
    subject's, from ``subject_family.write_subject``, must be given).

    Each instance image is captioned with its background (the bundled ``.txt`` sidecars), so the
    identifier learns the subject rather than the photos' backgrounds; caption dropout trains the
    plain instance prompt too. Prior loss weight 2 holds the class prompt in place against the
    convolution adapters. No random flips: they would mirror the subject's diagonal stripes.
    Validation shows the subject, the subject in a new context and the class.
    """
    chosen = subject_by_name(subject)
    instance, recontext = chosen.instance_prompt, recontext_prompts(chosen.instance_prompt, chosen.backgrounds)
    return [
        "--output_dir", str(adapter_dir),
        "--instance_data_dir", str(instance_dir or example_subject_dir(subject)), "--instance_prompt", instance,
        "--class_prompt", chosen.class_prompt, "--class_data_dir", str(class_dir),
        "--max_train_steps", str(steps), *recipe_flags(),
        "--seed", str(seed), "--guidance_scale", str(GUIDANCE),
        "--validation_prompt", instance, recontext[1][0], chosen.class_prompt,
    ]


def first_images(pairs: Prompted, prompt: str, count: int = GRID_SEEDS) -> list[Image.Image]:
    return [image for p, image in pairs if p == prompt][:count]


def background_by_colour(pairs: Prompted) -> dict[str, float]:
    """How often each re-context colour is drawn as the background, over that colour's samples."""
    return {colour: float(np.mean(background_hits([(p, im) for p, im in pairs if p == prompt])))
            for prompt, colour in recontext_prompts(INSTANCE_PROMPT)}


def overview_rows(drawn: dict[str, TinyWorldSamples], scores: dict, by_colour: dict) -> list[LabelledRow]:
    """The instance prompt, one re-context prompt and the class prompt, each with the number that scores it."""
    prompt, colour = recontext_prompts(INSTANCE_PROMPT)[1]
    return [
        LabelledRow(f'"{INSTANCE_PROMPT}"', [first_images(drawn[m].subject, INSTANCE_PROMPT) for m in MODELS],
                    [f"subject fidelity {scores[m]['subject']:.2f}" for m in MODELS]),
        LabelledRow(f'"{prompt}"', [first_images(drawn[m].recontext, prompt) for m in MODELS],
                    [f"background right {by_colour[m][colour]:.2f}" for m in MODELS]),
        LabelledRow(f'"{CLASS_PROMPT}"', [first_images(drawn[m].class_prompt, CLASS_PROMPT) for m in MODELS],
                    [f"drawn as a {CLASS_NOUN} {scores[m]['class_shape']:.2f}, subject fidelity "
                     f"{scores[m]['class_subject']:.2f}" for m in MODELS]),
    ]


def recontext_rows(drawn: dict[str, TinyWorldSamples], by_colour: dict) -> list[LabelledRow]:
    """One row per re-context colour."""
    return [LabelledRow(f'"{prompt}"', [first_images(drawn[m].recontext, prompt) for m in MODELS],
                        [f"background right {by_colour[m][colour]:.2f}" for m in MODELS])
            for prompt, colour in recontext_prompts(INSTANCE_PROMPT)]


def card_rows(scores: dict) -> list[tuple[str, str]]:
    """The adapter's scores, each beside the base model's, for the model card."""
    base, adapter = scores["base"], scores["adapter"]
    names = {"subject": f"subject fidelity, '{INSTANCE_PROMPT}' (instance images: {scores['instances']:.2f})",
             "recontext_background": "re-context: background right",
             "recontext_subject": "re-context: subject fidelity in context",
             "class_prompt_fidelity": "prompt fidelity on held-out ordinary captions (language drift)",
             "class_shape": f"'{CLASS_PROMPT}' drawn as a {CLASS_NOUN}",
             "class_subject": f"subject fidelity of '{CLASS_PROMPT}' (class leakage)"}
    return [(name, f"{adapter[key]:.2f} ({base[key]:.2f})") for key, name in names.items()]


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
    print(f"| drawn as a {CLASS_NOUN}, '{CLASS_PROMPT}' (should stay high) | {base['class_shape']:.2f} "
          f"| {adapter['class_shape']:.2f} |")
    print(f"| subject fidelity, '{CLASS_PROMPT}' (should stay low) | {base['class_subject']:.2f} "
          f"| {adapter['class_subject']:.2f} |")
    print("\n| re-context colour | base model | BOFT adapter |")
    print("|---|---|---|")
    for colour, value in scores["recontext_by_colour"]["base"].items():
        print(f"| {colour} | {value:.2f} | {scores['recontext_by_colour']['adapter'][colour]:.2f} |")
    ratio = adapter["subject"] / max(scores["instances"], 1e-6)
    print(f"\nsubject fidelity reaches {ratio:.0%} of the instance images' own score")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_train_steps", type=int, default=read_recipe()["max_train_steps"])
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
    train(DreamBoothConfig.from_flags(training_flags(adapter_dir, args.max_train_steps, args.seed,
                                                     output_dir / "class_images")))
    trained = time.time()

    pipe = quiet_progress(load_pipeline("tiny", dtype=torch.float32))
    adapter = load_outputs(pipe, adapter_dir)
    instances = [image for _, image in load_images(example_subject_dir(), 64)]
    drawn = compare_samples(adapter, INSTANCE_PROMPT, CLASS_PROMPT, num_images=args.num_images,
                            seed=args.eval_seed, guidance=GUIDANCE)
    scores = {"instances": instance_self_score(instances),
              **{m: score_samples(samples, instances) for m, samples in drawn.items()}}
    scores["recontext_by_colour"] = {m: background_by_colour(drawn[m].recontext) for m in MODELS}
    grids = {"overview": output_dir / "base_vs_adapter.png", "recontext": output_dir / "recontext_by_colour.png"}
    pictures = {grids["overview"]: labelled_comparison(overview_rows(drawn, scores, scores["recontext_by_colour"]), MODELS),
                grids["recontext"]: labelled_comparison(recontext_rows(drawn, scores["recontext_by_colour"]), MODELS)}
    atomic_write(output_dir, {path.name: partial(picture.save, format="PNG") for path, picture in pictures.items()})
    scores["grids"] = {name: str(path) for name, path in grids.items()}
    scores["train_seconds"] = round(trained - start, 1)
    scores["total_seconds"] = round(time.time() - start, 1)
    atomic_write_text(output_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    add_model_card_scores(adapter_dir, card_rows(scores), f"`make demo` (boft_diffusion/demo.py): {args.num_images} "
                          f"samples per measure from sampling seed {args.eval_seed}, guidance {GUIDANCE}; the base "
                          f"model's values in parentheses.")
    print_scores(scores)
    print(f"\ngrids (the first {GRID_SEEDS} of the scored samples per prompt, base and adapter on the same seeds): "
          f"{grids['overview']}, {grids['recontext']}")
    print(f"scores: {output_dir / 'scores.json'}")
    print(f"adapter: {adapter_dir}; trained in {scores['train_seconds']} s, demo total {scores['total_seconds']} s")
    return scores


if __name__ == "__main__":
    main()
