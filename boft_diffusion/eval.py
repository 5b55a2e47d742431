"""Score a DreamBooth adapter: tiny-world measures, or CLIP-T / CLIP-I / DINO on real checkpoints.

    python -m boft_diffusion.eval --adapter outputs/dreambooth
    python -m boft_diffusion.eval --pretrained_model_name_or_path sd15/ --adapter out/ \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --clip_model openai/clip-vit-base-patch32 --dino_model facebook/dino-vits16
"""

from __future__ import annotations

import argparse
import json
import os
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
    from .tiny.evaluate import generate

    return generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance, batch_size)


# Tiny world --------------------------------------------------------------------------------------
def recontext_prompts(instance_prompt: str) -> list[tuple[str, str]]:
    """("<instance prompt> on a <colour> background", colour) for colours unlike the subject."""
    from .tiny import world

    colours = list(world.SUBJECTS[world.DEFAULT_SUBJECT].backgrounds)
    return [(f"{instance_prompt} on {'an' if c[0] in 'aeiou' else 'a'} {c} background", c) for c in colours]


def class_captions(n: int, seed: int) -> list[str]:
    """World captions of solid shapes (stars and others), to check for language drift."""
    from .tiny import world

    return [world.caption(scene) for scene in world.training_scenes(n, seed, p_striped=0.0)]


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


def switch_adapters(models: Sequence[torch.nn.Module], enabled: bool) -> None:
    """Turn the adapters of every model on (adapted pipeline) or off (the base model)."""
    for model in models:
        (enable_adapters if enabled else disable_adapters)(model)


def compare_tiny_world(pipe, models: Sequence[torch.nn.Module], instance_images, instance_prompt: str,
                       class_prompt: str, **kwargs) -> dict[str, Any]:
    """The same measures with the adapters disabled (base) and enabled, plus the instance images' own score."""
    switch_adapters(models, enabled=False)
    base = tiny_world_scores(pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    switch_adapters(models, enabled=True)
    adapted = tiny_world_scores(pipe, instance_images, instance_prompt, class_prompt, **kwargs)
    return {"instances": instance_self_score(instance_images), "base": base, "adapter": adapted}


# Control ------------------------------------------------------------------------------------------------
def control_sampler(pipe, folder: str | os.PathLike, scale: float = 1.0, steps: int = 25, guidance: float | None = None):
    """``sample(condition_image, prompt, seed) -> image`` for a control folder from train_controlnet.py."""
    from .control import condition_tensor, light_control, load_control

    kind, handle = load_control(pipe, folder)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    extra = {} if guidance is None else {"guidance_scale": guidance}

    def run(condition: Image.Image, prompt: str, seed: int) -> Image.Image:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if kind == "light":
                with light_control(pipe.unet, handle, condition_tensor(condition, (resolution, resolution)), scale):
                    return pipe(prompt, num_inference_steps=steps, generator=generator, **extra).images[0]
            return handle(prompt, image=condition.convert("RGB").resize((resolution, resolution)),
                          num_inference_steps=steps, generator=generator,
                          controlnet_conditioning_scale=scale, **extra).images[0]

    return run


def tiny_control_scores(sample_fn, num_images: int = 32, seed: int = 0) -> dict[str, float]:
    """Mask IoU against held-out control maps, and colour fidelity of the same samples.

    The maps place held-out (colour, shape, background) combinations anywhere, at
    any size, and the prompts do not say where: only the control can place the shape."""
    from .tiny import metrics, world

    scenes = world.free_placement_scenes(num_images, seed=seed + 4242, held_out=True)
    ious, background, colour = [], [], []
    for i, scene in enumerate(scenes):
        mask = world.render_mask(scene)
        image = sample_fn(mask.convert("RGB"), world.caption(scene), seed + i)
        ious.append(metrics.control_fidelity(image, mask))
        fidelity = metrics.prompt_fidelity(image, scene)
        background.append(fidelity["background"])
        colour.append(fidelity["shape_color"])
    return {"control_iou": float(np.mean(ious)), "background": float(np.mean(background)),
            "shape_color": float(np.mean(colour))}


def edges(image: Image.Image, threshold: float = 0.2) -> np.ndarray:
    """Binary edge map: Sobel gradient magnitude above ``threshold`` of its maximum."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[1:-1, 2:] - padded[1:-1, :-2]) * 2 + padded[:-2, 2:] - padded[:-2, :-2] + padded[2:, 2:] - padded[2:, :-2]
    gy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) * 2 + padded[2:, :-2] - padded[:-2, :-2] + padded[2:, 2:] - padded[:-2, 2:]
    magnitude = np.hypot(gx, gy)
    return magnitude > threshold * max(float(magnitude.max()), 1e-6)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def edge_agreement(image: Image.Image, condition_edges: Image.Image) -> float:
    """F1 between the generated image's edges and a conditioning edge map, with 1-pixel tolerance."""
    generated = edges(image)
    reference = np.asarray(condition_edges.convert("L").resize(image.size)) > 127
    if not generated.any() and not reference.any():
        return 1.0
    precision = (generated & _dilate(reference)).sum() / max(generated.sum(), 1)
    recall = (reference & _dilate(generated)).sum() / max(reference.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-9))


def face_landmark_error(image: Image.Image, reference_landmarks: np.ndarray) -> float | None:
    """Mean landmark distance (pixels) with the optional face-alignment package; None without it."""
    try:
        import face_alignment
    except ImportError:
        print("face-alignment is not installed: skipping the landmark error (pip install face-alignment).")
        return None
    aligner = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device="cpu")
    found = aligner.get_landmarks(np.asarray(image.convert("RGB")))
    if not found:
        return float("inf")
    return float(np.linalg.norm(found[0] - reference_landmarks, axis=-1).mean())


# Real checkpoints ----------------------------------------------------------------------------------
def _normalise(x) -> torch.Tensor:
    """Unit vectors; accepts transformers >= 5's output objects (projected features in pooler_output)."""
    if not isinstance(x, torch.Tensor):
        x = x.pooler_output
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
    parser.add_argument("--control_data_dir", default=None,
                        help="Control folders: metadata.jsonl with conditioning_file_name (and edges_file_name) "
                             "to score edge agreement on real data.")
    parser.add_argument("--conditioning_scale", type=float, default=1.0)
    parser.add_argument("--output_json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .control import read_control_info
    args = parse_args(argv)
    info = read_control_info(args.adapter)
    if info is not None:
        report = control_report(args, info)
    else:
        report = dreambooth_report(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    return report


def control_report(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """Base (no control) against the control adapter: tiny-world IoU, or edge agreement on a data folder."""
    from .loading import TINY_ALIASES, default_guidance, load_pipeline

    base_model = args.pretrained_model_name_or_path or "tiny"
    args.guidance_scale = default_guidance(base_model, args.guidance_scale)
    pipe = load_pipeline(base_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}

    def base(condition: Image.Image, prompt: str, seed: int) -> Image.Image:
        with torch.no_grad():
            return pipe(prompt, num_inference_steps=args.num_inference_steps,
                        generator=torch.Generator().manual_seed(seed), **extra).images[0]

    scorers = {}
    if str(base_model) in TINY_ALIASES and not args.control_data_dir:
        scorers["tiny_world"] = lambda fn: tiny_control_scores(fn, args.num_images, args.seed)
    if args.control_data_dir:
        scorers["edges"] = lambda fn: folder_edge_agreement(fn, args.control_data_dir, args.num_images, args.seed)
    report: dict[str, Any] = {"base_model": str(base_model), "adapter": str(args.adapter), "mode": info["mode"]}
    for name, scorer in scorers.items():
        report[name] = {"base": scorer(base)}
    adapted = control_sampler(pipe, args.adapter, args.conditioning_scale, args.num_inference_steps, args.guidance_scale)
    for name, scorer in scorers.items():
        report[name]["adapter"] = scorer(adapted)
    return report


def folder_edge_agreement(sample_fn, folder: str | os.PathLike, num_images: int, seed: int) -> dict[str, float]:
    """Edge agreement between conditioning edge maps of a data folder and samples conditioned on them."""
    from .data import open_image

    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    scores = []
    for i, row in enumerate(rows[:num_images]):
        condition = open_image(folder / row["conditioning_file_name"])
        edge_map = open_image(folder / row.get("edges_file_name", row["conditioning_file_name"]))
        scores.append(edge_agreement(sample_fn(condition, row.get("text") or "", seed + i), edge_map))
    return {"edge_agreement": float(np.mean(scores)), "n": len(scores)}


def dreambooth_report(args: argparse.Namespace) -> dict[str, Any]:
    from .data import load_images
    from .dreambooth import default_instance_dir, load_dreambooth_adapter
    from .loading import TINY_ALIASES, default_guidance, load_pipeline
    from .model import read_adapter_config

    config = read_adapter_config(args.adapter)
    base = args.pretrained_model_name_or_path or config.base_model_name_or_path or "tiny"
    instance_prompt = args.instance_prompt or config.metadata.get("instance_prompt") or "a photo of sks star"
    class_prompt = args.class_prompt or config.metadata.get("class_prompt") or "a photo of star"
    args.guidance_scale = default_guidance(base, args.guidance_scale)
    pipe = load_pipeline(base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    models = load_dreambooth_adapter(pipe, args.adapter)
    instance_dir = args.instance_data_dir or default_instance_dir()
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    instances = [image for _, image in load_images(instance_dir, resolution)]
    settings = dict(num_images=args.num_images, seed=args.seed, steps=args.num_inference_steps, guidance=args.guidance_scale)
    report: dict[str, Any] = {"base_model": str(base), "adapter": str(args.adapter), "instance_prompt": instance_prompt}
    if str(base) in TINY_ALIASES:
        report["tiny_world"] = compare_tiny_world(pipe, models, instances, instance_prompt, class_prompt, **settings)
    if args.clip_model or args.dino_model:
        generated = sample(pipe, [instance_prompt] * args.num_images, args.seed, args.num_inference_steps, args.guidance_scale)
        if args.clip_model:
            report.update(clip_scores(args.clip_model, generated, instance_prompt, instances))
        if args.dino_model:
            report["dino"] = dino_score(args.dino_model, generated, instances)
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
