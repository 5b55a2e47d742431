"""Real-size DreamBooth check: train_dreambooth.py on the Stable Diffusion 1.5 architecture.

No checkpoint can be downloaded here, so this builds a ``StableDiffusionPipeline`` folder from
SD 1.5's configs with random weights (UNet 860M, VAE, CLIP ViT-L/14 text encoder; the embedded
tiny model's tokenizer padded to 77 tokens) and runs the real training script on it in this
process: prior preservation with generated class images, 512 px images (64x64 latents), mixed
precision, BOFT adapters, a validation grid, the saved adapter reloaded. It prints one JSON line
per recipe with optimiser steps/s (after the first step) and peak GPU memory.

    python benchmarks/gpu_check.py --mixed_precision bf16 --max_train_steps 20
    python benchmarks/gpu_check.py --size tiny --mixed_precision no   # the same path on CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from boft_diffusion.models.bundled import EMBEDDED_MODEL_DIR
from boft_diffusion.models.pipelines import load_pipeline
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import build_parser, run

SD15 = {
    "unet": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "vae": dict(block_out_channels=(128, 256, 512, 512), sample_size=512),
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768),
    "max_length": 77,
}
TINY = {
    "unet": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    ),
    "vae": dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=16, sample_size=64),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         projection_dim=32),
    "max_length": 24,
}
RECIPES = {
    "attention": [],
    "attention+convs+identifier": ["--boft_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                   "--train_identifier_embedding"],
}


def build_pipeline_folder(folder: Path, sizes: dict, device: str) -> None:
    """Save a random-weight StableDiffusionPipeline with the given architecture sizes."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer", model_max_length=sizes["max_length"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, **sizes["unet"])
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, latent_channels=4, **sizes["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=sizes["max_length"], hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **sizes["text_encoder"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)


def train(model: Path, output: Path, recipe: list[str], args: argparse.Namespace, resolution: int) -> dict:
    flags = [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(output),
        "--instance_prompt", "a photo of sks star", "--class_prompt", "a photo of star",
        "--with_prior_preservation", "--class_data_dir", str(output.parent / f"{output.name}-class"),
        "--num_class_images", "2", "--sample_batch_size", "2", "--resolution", str(resolution),
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", "1",
        "--learning_rate", "1e-4", "--mixed_precision", args.mixed_precision,
        "--validation_prompt", "a photo of sks star", "--num_validation_images", "1", "--num_inference_steps", "10",
        "--report_to", "tensorboard", "--seed", "0", *recipe,
    ]
    start = time.perf_counter()
    result = run(build_parser().parse_args(flags))
    result["wall_seconds"] = time.perf_counter() - start
    result["validation_grid"] = (output / "validation" / "latest.png").exists()
    return result


def reload_and_sample(model: Path, adapter: Path, device: str) -> dict:
    """The saved adapter loads into a fresh pipeline and changes its output (random weights: any change)."""
    pipe = load_pipeline(str(model), device=torch.device(device))
    pipe.set_progress_bar_config(disable=True)

    def sample() -> torch.Tensor:
        out = pipe("a photo of sks star", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        return out.images.float()

    base = sample()
    load_outputs(pipe, adapter)
    adapted = sample()
    return {"reloaded_adapter_changes_output": float((adapted - base).abs().mean()),
            "finite": bool(torch.isfinite(adapted).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--max_train_steps", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--workdir", help="keep files here instead of a temporary folder")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SD15 if args.size == "sd15" else TINY
    resolution = sizes["unet"]["sample_size"] * 8
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        model = root / "model"
        start = time.perf_counter()
        build_pipeline_folder(model, sizes, device)
        print(json.dumps({"built": args.size, "device": device, "seconds": round(time.perf_counter() - start, 1),
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None}), flush=True)
        for name in args.recipes:
            output = root / name.replace("+", "-")
            result = train(model, output, RECIPES[name], args, resolution)
            result.update(reload_and_sample(model, output, device))
            print(json.dumps({"recipe": name, "size": args.size, "mixed_precision": args.mixed_precision,
                              "resolution": resolution, **result}), flush=True)


if __name__ == "__main__":
    main()
