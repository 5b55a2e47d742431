"""Real-size DreamBooth check: train_dreambooth.py on the Stable Diffusion 1.5 architecture.

No checkpoint can be downloaded here, so this builds a ``StableDiffusionPipeline`` folder from
SD 1.5's configs with random weights (UNet 860M, VAE, CLIP ViT-L/14 text encoder; the embedded
tiny model's tokenizer padded to 77 tokens) and runs the real training script on it in this
process: prior preservation with generated class images, 512 px images (64x64 latents), mixed
precision, BOFT adapters, a validation grid, the saved adapter reloaded. It prints one JSON line
per recipe with optimiser steps/s (after the first step) and peak GPU memory.

    python benchmarks/gpu_check.py --mixed_precision bf16 --max_train_steps 20
    python benchmarks/gpu_check.py --size tiny --mixed_precision no   # the same path on CPU

With ``--train_step_table DIR`` it instead times one training step of the bare UNet (the
bench_train_step.py table) for no adapter, PEFT LoRA r=8, OFT, BOFT and ours m = 1, 2, 4 (m = 2
also forced to rotate activations: the default on CUDA folds) at batch 1 and 4, eager and (no
adapter, LoRA, ours m = 2) compiled, plus unmerged and merged inference; it writes
DIR/train_step_table.md and .json after every row and skips the rows that no longer fit in
``--budget_s`` (390 s; most important rows first), so one command stays under 8 minutes:

    python benchmarks/gpu_check.py --train_step_table gpu_results     # on the GPU
    python benchmarks/gpu_check.py --train_step_table /tmp/t --size tiny --device cpu --mixed_precision no \\
        --compile_backend eager                                        # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import bench_train_step
import torch

from boft_diffusion import demo
from boft_diffusion.families.loading import load_pipeline, quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import DreamBooth, DreamBoothConfig
from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR
from boft_diffusion.tiny.toy import toy_unet_config

SD15 = {
    "unet": bench_train_step.SD15_UNET,
    "vae": dict(block_out_channels=(128, 256, 512, 512), sample_size=512),
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768),
    "max_length": 77,
}
TINY = {
    "unet": toy_unet_config(attention_head_dim=4, norm_num_groups=16, layers_per_block=2),
    "vae": dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=16, sample_size=64),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         projection_dim=32),
    "max_length": 24,
}
#: The demo recipe's keys that set up a run rather than how the adapter trains: this check sets its own.
DEMO_RUN_SETUP = ("overwrite_output_dir", "with_prior_preservation", "num_class_images", "num_validation_images")
RECIPES = {
    "attention": [],
    "attention+convs+identifier": ["--boft_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                   "--train_identifier_embedding"],
    "demo": demo.recipe_flags(leave_out=DEMO_RUN_SETUP),  # the bundled star's captioned images, batch 2
}


def build_pipeline_folder(folder: Path, sizes: dict, device: str) -> None:
    """Save a random-weight StableDiffusionPipeline with the given architecture sizes."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer", model_max_length=sizes["max_length"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sizes["unet"])
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
        "--instance_prompt", demo.INSTANCE_PROMPT, "--class_prompt", demo.CLASS_PROMPT,
        "--with_prior_preservation", "--class_data_dir", str(output.parent / f"{output.name}-class"),
        "--num_class_images", "2", "--sample_batch_size", "2", "--resolution", str(resolution),
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", "1",
        "--learning_rate", "1e-4", "--mixed_precision", args.mixed_precision,
        "--validation_prompt", demo.INSTANCE_PROMPT, "--num_validation_images", "1", "--num_inference_steps", "10",
        "--report_to", "tensorboard", "--seed", "0", *recipe,
    ]
    start = time.perf_counter()
    result = DreamBooth(DreamBoothConfig.from_flags(flags)).train()
    result["wall_seconds"] = time.perf_counter() - start
    result["validation_grid"] = (output / "validation" / "latest.png").exists()
    return result


def reload_and_sample(model: Path, adapter: Path, device: str) -> dict:
    """The saved adapter loads into a fresh pipeline and changes its output (random weights: any change)."""
    pipe = quiet_progress(load_pipeline(str(model), device=torch.device(device)))

    def sample() -> torch.Tensor:
        out = pipe(demo.INSTANCE_PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        return out.images.float()

    base = sample()
    load_outputs(pipe, adapter)
    adapted = sample()
    return {"reloaded_adapter_changes_output": float((adapted - base).abs().mean()),
            "finite": bool(torch.isfinite(adapted).all())}


# The train-step table ------------------------------------------------------------------------------
ALL_METHODS = ["none", "peft_lora", "peft_oft", "peft_boft", "boft_m1", "boft_m2", "boft_m2_rotate", "boft_m4"]
KEY_METHODS = ["none", "peft_lora", "boft_m2"]  # the acceptance ratios need these
#: Seconds a row must still have before the budget runs out to be started.
ROW_RESERVE = {False: 30.0, True: 150.0}


def table_rows(batches: tuple[int, int]) -> list[tuple[str, int, bool]]:
    """(method, batch, compiled) in order of importance, so a run cut short keeps what matters."""
    first, second = batches
    rest = [m for m in ALL_METHODS if m not in KEY_METHODS]
    return ([(m, first, False) for m in ALL_METHODS] + [("inference", first, False)]
            + [(m, first, True) for m in KEY_METHODS] + [(m, second, False) for m in KEY_METHODS]
            + [(m, second, False) for m in rest] + [(m, second, True) for m in KEY_METHODS])


def step_settings(args: argparse.Namespace, method: str, batch: int, compiled: bool) -> argparse.Namespace:
    tiny = args.size == "tiny"
    return argparse.Namespace(
        method=method, batch=batch, compile=compiled, compile_backend=args.compile_backend, device=args.device,
        dtype={"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[args.mixed_precision], unet=args.size,
        latent=8 if tiny else 64, steps=2 if tiny else 20, warmup=1 if tiny else 3, threads=torch.get_num_threads(),
        count_ops=False,
    )


def run_row(settings: argparse.Namespace) -> dict:
    if settings.method == "inference":
        return bench_train_step.run_inference(settings)
    return bench_train_step.run_method(settings)


def environment(args: argparse.Namespace) -> dict:
    import diffusers
    import peft

    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "size": args.size, "mixed_precision": args.mixed_precision, "compile_backend": args.compile_backend,
            "date": time.strftime("%Y-%m-%d")}


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def markdown_table(env: dict, rows: list[dict]) -> str:
    """The rows as markdown, ratios against no adapter at the same batch (eager and same compile mode)."""
    steps = {(r["method"], r["batch"], r["compiled"]): r.get("step_s") for r in rows}
    lines = [f"Train step of the UNet ({env['size']}), {env['mixed_precision']}, {env['device']}; torch {env['torch']}, "
             f"diffusers {env['diffusers']}, peft {env['peft']}, {env['date']}; compile backend {env['compile_backend']}.",
             "", "| method | batch | compiled | step (s) | vs no adapter, same batch and mode | vs eager no adapter "
             "| peak memory (GiB) | depth m ran |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["method"] != "inference"):
        label = bench_train_step.LABELS[r["method"]]
        if "error" in r or "skipped" in r:
            lines.append(f"| {label} | {r['batch']} | {r['compiled']} | {r.get('error') or r['skipped']} | | | | |")
            continue
        same = steps.get(("none", r["batch"], r["compiled"]))
        eager = steps.get(("none", r["batch"], False))
        memory = r.get("peak_cuda_gib", r.get("peak_rss_gib", 0.0))
        depth = ",".join(map(str, r.get("m_ran", []))) or "-"
        lines.append(f"| {label} | {r['batch']} | {r['compiled']} | {r['step_s']:.4f} | {ratio(r['step_s'], same)} "
                     f"| {ratio(r['step_s'], eager)} | {memory:.2f} | {depth} |")
    for r in (r for r in rows if r["method"] == "inference"):
        if "base_s" not in r:
            lines += ["", f"Inference: {r.get('error') or r.get('skipped')}"]
            continue
        lines += ["", f"Inference forward, batch {r['batch']}: base {r['base_s']:.4f} s, ours m=2 unmerged "
                  f"{ratio(r['unmerged_s'], r['base_s'])}, merged {ratio(r['merged_s'], r['base_s'])}."]
    return "\n".join(lines) + "\n"


def train_step_table(args: argparse.Namespace, folder: Path) -> None:
    """Run the rows that fit in the budget, writing the table after each."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    rows: list[dict] = []
    for method, batch, compiled in table_rows((1, 4)):
        row = {"method": method, "batch": batch, "compiled": compiled}
        left = args.budget_s - (time.perf_counter() - start)
        if left < ROW_RESERVE[compiled]:
            row["skipped"] = f"skipped: {left:.0f} s of the budget left"
        else:
            try:
                row.update(run_row(step_settings(args, method, batch, compiled)))
            except Exception as error:  # one failing method must not cost the others' numbers
                row["error"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            finally:
                torch._dynamo.reset()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        row["method"] = method  # run_inference reports its own name
        rows.append(row)
        print(json.dumps(row), flush=True)
        (folder / "train_step_table.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (folder / "train_step_table.md").write_text(markdown_table(env, rows))
    print(markdown_table(env, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--max_train_steps", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--workdir", help="keep files here instead of a temporary folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train_step_table", type=Path, metavar="DIR", help="time the train-step table into DIR")
    parser.add_argument("--budget_s", type=float, default=390.0, help="time for the whole train-step table")
    parser.add_argument("--compile_backend", default="inductor", help="eager: check the compiled path cheaply on CPU")
    args = parser.parse_args()

    if args.train_step_table:
        train_step_table(args, args.train_step_table)
        return
    device = args.device
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
