"""Score an adapter folder: tiny-world measures, or CLIP-T / CLIP-I / DINO on real checkpoints.

    python -m boft_diffusion.evaluation --adapter outputs/dreambooth
    python -m boft_diffusion.evaluation --pretrained_model_name_or_path sd15/ --adapter out/ \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --clip_model openai/clip-vit-base-patch32 --dino_model facebook/dino-vits16
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_write_text, read_adapter_config
from ..core.images import open_image
from ..families.loading import TINY_ALIASES, default_guidance, load_pipeline, quiet_progress
from ..outputs.read import load_outputs, read_control_info
from ..tiny import world
from ..tiny.bundled import example_subject_dir
from ..training.cli import HelpFormatter
from ..training.data import load_images
from .image_metrics import clip_scores, dino_score, edge_agreement
from .sampling import Sampler, base_sampler, control_sampler, sample
from .tiny_world import compare_tiny_world, tiny_control_scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    args = parse_args(argv)
    info = read_control_info(args.adapter)
    if info is not None:
        report = control_report(args, info)
    else:
        report = dreambooth_report(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        atomic_write_text(args.output_json, text + "\n")
    return report


def control_report(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """Base (no control) against the control adapter: tiny-world IoU, or edge agreement on a data folder."""
    base_model = args.pretrained_model_name_or_path or "tiny"
    args.guidance_scale = default_guidance(base_model, args.guidance_scale)
    pipe = quiet_progress(load_pipeline(base_model, dtype=torch.float32))
    base = base_sampler(pipe, args.num_inference_steps, args.guidance_scale)
    scorers = {}
    if str(base_model) in TINY_ALIASES and not args.control_data_dir:
        scorers["tiny_world"] = lambda fn: tiny_control_scores(fn, args.num_images, args.seed)
    if args.control_data_dir:
        scorers["edges"] = lambda fn: folder_edge_agreement(fn, args.control_data_dir, args.num_images, args.seed)
    report: dict[str, Any] = {"base_model": str(base_model), "adapter": str(args.adapter), "mode": info["mode"]}
    for name, scorer in scorers.items():
        report[name] = {"base": scorer(base)}
    adapted = control_sampler(load_outputs(pipe, args.adapter), args.conditioning_scale, args.num_inference_steps,
                              args.guidance_scale)
    for name, scorer in scorers.items():
        report[name]["adapter"] = scorer(adapted)
    return report


def folder_edge_agreement(sample_fn: Sampler, folder: str | os.PathLike, num_images: int, seed: int) -> dict[str, float]:
    """Edge agreement between conditioning edge maps of a data folder and samples conditioned on them."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    scores = []
    for i, row in enumerate(rows[:num_images]):
        condition = open_image(folder / row["conditioning_file_name"])
        edge_map = open_image(folder / row.get("edges_file_name", row["conditioning_file_name"]))
        scores.append(edge_agreement(sample_fn(condition, row.get("text") or "", seed + i), edge_map))
    return {"edge_agreement": float(np.mean(scores)), "n": len(scores)}


def dreambooth_report(args: argparse.Namespace) -> dict[str, Any]:
    config = read_adapter_config(args.adapter)
    base = args.pretrained_model_name_or_path or config.base_model_name_or_path or "tiny"
    subject = world.SUBJECTS[world.DEFAULT_SUBJECT]
    instance_prompt = args.instance_prompt or config.metadata.get("instance_prompt") or subject.instance_prompt
    class_prompt = args.class_prompt or config.metadata.get("class_prompt") or subject.class_prompt
    args.guidance_scale = default_guidance(base, args.guidance_scale)
    pipe = quiet_progress(load_pipeline(base, dtype=torch.float32))
    adapter = load_outputs(pipe, args.adapter)
    instance_dir = args.instance_data_dir or example_subject_dir()
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    instances = [image for _, image in load_images(instance_dir, resolution)]
    settings = dict(num_images=args.num_images, seed=args.seed, steps=args.num_inference_steps, guidance=args.guidance_scale)
    report: dict[str, Any] = {"base_model": str(base), "adapter": str(args.adapter), "instance_prompt": instance_prompt}
    if str(base) in TINY_ALIASES:
        report["tiny_world"] = compare_tiny_world(adapter, instances, instance_prompt, class_prompt, **settings)
    if args.clip_model or args.dino_model:
        generated = sample(pipe, [instance_prompt] * args.num_images, args.seed, args.num_inference_steps, args.guidance_scale)
        if args.clip_model:
            report.update(clip_scores(args.clip_model, generated, instance_prompt, instances))
        if args.dino_model:
            report["dino"] = dino_score(args.dino_model, generated, instances)
    return report

