"""Score a DreamBooth adapter: tiny-world measures, or CLIP-T / CLIP-I / DINO on real checkpoints.

    python -m boft_diffusion.eval --adapter outputs/dreambooth
    python -m boft_diffusion.eval --pretrained_model_name_or_path sd15/ --adapter out/ \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --clip_model openai/clip-vit-base-patch32 --dino_model facebook/dino-vits16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .model import disable_adapters, enable_adapters


def sample(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float | None, batch_size: int = 16):
    """One image per prompt, image ``i`` seeded with ``seed + i`` whatever the batch size."""
    images = []
    extra = {} if guidance is None else {"guidance_scale": guidance}
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images += pipe(chunk, num_inference_steps=steps, generator=generators, **extra).images
    return images


# Tiny world --------------------------------------------------------------------------------------
def recontext_prompts(instance_prompt: str) -> list[tuple[str, str]]:
    """("<instance prompt> on a <colour> background", colour) for colours unlike the subject."""
    from .tiny import world

    colours = [c for c in world.COLORS if c not in world.SUBJECT_STRIPE_COLORS]
    return [(f"{instance_prompt} on {'an' if c[0] in 'aeiou' else 'a'} {c} background", c) for c in colours]


def class_captions(n: int, seed: int) -> list[str]:
    """World captions of solid shapes (stars and others), to check for language drift."""
    from .tiny import world

    return [world.caption(scene) for scene in world.training_scenes(n, seed)]


def tiny_world_scores(
    pipe, instance_images: Sequence[Image.Image], instance_prompt: str, class_prompt: str,
    num_images: int = 16, seed: int = 0, steps: int = 25, guidance: float | None = None,
) -> dict[str, float]:
    """Measures of the pipeline as it is (adapter on or off), all in [0, 1].

    subject: subject fidelity of instance-prompt samples; recontext_background: how often
    "<instance prompt> on a <colour> background" gets that background; class_prompt_fidelity:
    prompt fidelity on ordinary captions; class_subject: subject fidelity of class-prompt
    samples (should stay low: the class must not turn into the subject).
    """
    from .tiny import metrics

    profile = metrics.SubjectProfile(instance_images)
    subject = [metrics.subject_fidelity(im, profile) for im in sample(pipe, [instance_prompt] * num_images, seed, steps, guidance)]
    recontext = recontext_prompts(instance_prompt)
    prompts = [recontext[i % len(recontext)] for i in range(num_images)]
    backgrounds = sample(pipe, [p for p, _ in prompts], seed + 1000, steps, guidance)
    recontext_hits = [metrics.prompt_fidelity(im, p)["background"] for im, (p, _) in zip(backgrounds, prompts, strict=True)]
    captions = class_captions(num_images, seed + 2000)
    fidelity = [metrics.prompt_fidelity(im, c)["mean"] for im, c in zip(sample(pipe, captions, seed + 2000, steps, guidance), captions, strict=True)]
    class_subject = [metrics.subject_fidelity(im, profile) for im in sample(pipe, [class_prompt] * num_images, seed + 3000, steps, guidance)]
    return {
        "subject": float(np.mean(subject)),
        "recontext_background": float(np.mean(recontext_hits)),
        "class_prompt_fidelity": float(np.mean(fidelity)),
        "class_subject": float(np.mean(class_subject)),
    }


def instance_self_score(instance_images: Sequence[Image.Image]) -> float:
    """Subject fidelity of each instance image against a profile of the others (leave one out)."""
    from .tiny import metrics

    images = list(instance_images)
    if len(images) < 3:
        return float(np.mean([metrics.subject_fidelity(im, images) for im in images]))
    scores = [metrics.subject_fidelity(im, images[:i] + images[i + 1 :]) for i, im in enumerate(images)]
    return float(np.mean(scores))


def compare_tiny_world(pipe, model, instance_images, instance_prompt: str, class_prompt: str, **kwargs) -> dict[str, Any]:
    """The same measures with the adapter disabled (base) and enabled, plus the instance images' own score."""
    disable_adapters(model)
    base = tiny_world_scores(pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    enable_adapters(model)
    adapted = tiny_world_scores(pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    return {"instances": instance_self_score(instance_images), "base": base, "adapter": adapted}


# Real checkpoints ----------------------------------------------------------------------------------
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def clip_scores(model_path: str, images, prompt: str, instance_images) -> dict[str, float]:
    """CLIP-T (image-prompt cosine) and CLIP-I (generated-instance image cosine)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    with torch.no_grad():
        generated = _normalise(model.get_image_features(**processor(images=list(images), return_tensors="pt")))
        reference = _normalise(model.get_image_features(**processor(images=list(instance_images), return_tensors="pt")))
        text_inputs = processor(text=[prompt.replace(" sks", "")], return_tensors="pt", padding=True)
        text = _normalise(model.get_text_features(**text_inputs))
    return {"clip_t": float((generated @ text.T).mean()), "clip_i": float((generated @ reference.T).mean())}


def dino_score(model_path: str, images, instance_images) -> float:
    """Mean cosine between the DINO CLS embeddings of generated and instance images."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    with torch.no_grad():
        def embed(batch):
            return _normalise(model(**processor(images=list(batch), return_tensors="pt")).last_hidden_state[:, 0])

        return float((embed(images) @ embed(instance_images).T).mean())


# Command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="Base model (default: the adapter's base_model_name_or_path, else the tiny model).")
    parser.add_argument("--adapter", required=True, help="Adapter folder (ours or PEFT's).")
    parser.add_argument("--instance_data_dir", default=None)
    parser.add_argument("--instance_prompt", default=None, help="Default: the adapter's metadata.")
    parser.add_argument("--class_prompt", default=None)
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--clip_model", default=None, help="CLIP model id or path for CLIP-T / CLIP-I.")
    parser.add_argument("--dino_model", default=None, help="DINO ViT id or path for the DINO score.")
    parser.add_argument("--output_json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .data import load_images
    from .dreambooth import default_instance_dir
    from .loading import TINY_ALIASES, load_pipeline
    from .model import load_adapter, read_adapter_config

    args = parse_args(argv)
    config = read_adapter_config(args.adapter)
    base = args.pretrained_model_name_or_path or config.base_model_name_or_path or "tiny"
    instance_prompt = args.instance_prompt or config.metadata.get("instance_prompt") or "a photo of sks star"
    class_prompt = args.class_prompt or config.metadata.get("class_prompt") or "a photo of star"
    pipe = load_pipeline(base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_adapter(pipe.unet, args.adapter)
    instance_dir = args.instance_data_dir or default_instance_dir()
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    instances = [image for _, image in load_images(instance_dir, resolution)]
    settings = dict(num_images=args.num_images, seed=args.seed, steps=args.num_inference_steps, guidance=args.guidance_scale)
    report: dict[str, Any] = {"base_model": str(base), "adapter": str(args.adapter), "instance_prompt": instance_prompt}
    if str(base) in TINY_ALIASES:
        report["tiny_world"] = compare_tiny_world(pipe, pipe.unet, instances, instance_prompt, class_prompt, **settings)
    if args.clip_model or args.dino_model:
        generated = sample(pipe, [instance_prompt] * args.num_images, args.seed, args.num_inference_steps, args.guidance_scale)
        if args.clip_model:
            report.update(clip_scores(args.clip_model, generated, instance_prompt, instances))
        if args.dino_model:
            report["dino"] = dino_score(args.dino_model, generated, instances)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
