"""A Flux-size transformer's training step on a GPU: BOFT m = 2 against PEFT LoRA of equal
parameters, at 512 and 1024 px, bf16, gradient checkpointing; then the largest square resolution
whose step fits under 24 GB and under 80 GB.

No checkpoint can be downloaded here, so the FLUX.1-dev transformer (19 double and 38 single
blocks, 3072 wide, guidance embedding) is built from its config with random weights, and the
text side is random T5 / CLIP-shaped tensors (512 tokens). Results go to OUT/bench_dit_gpu.json
after every row, so a run cut short keeps what it measured.

    python benchmarks/bench_dit_gpu.py --out gpu_results                     # on the GPU
    python benchmarks/bench_dit_gpu.py --size tiny --device cpu --dtype float32 --resolutions 64 \\
        --caps_gb --out /tmp/dit_smoke                                       # the same path on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import boft_diffusion as bd
from boft_diffusion.families.dit import DIT_TARGET_MODULES
from boft_diffusion.families.flux import image_position_ids

CONFIGS = {
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
}
TEXT_TOKENS = 512


def build(size: str, device: str, dtype: torch.dtype):
    """The transformer with random weights, made on the meta device and filled where it runs."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**CONFIGS[size])
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():
            buffer.zero_()
    model.to(dtype).requires_grad_(False)
    model.enable_gradient_checkpointing()
    return model


def adapt(model, method: str, boft_parameters: int | None) -> int:
    """BOFT b = 8, m = 2 on the default DiT targets, or PEFT LoRA with the rank that gives about
    ``boft_parameters`` trainable parameters; returns the trainable count."""
    targets = list(DIT_TARGET_MODULES)
    if method == "boft-m2":
        bd.apply_boft(model, bd.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=targets))
    else:
        from peft import LoraConfig, inject_adapter_in_model

        linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and any(name == t or name.endswith(f".{t}") for t in targets)]
        width = sum(m.in_features + m.out_features for m in linears)
        inject_adapter_in_model(LoraConfig(r=max(1, round(boft_parameters / width)), target_modules=targets), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return sum(p.numel() for p in trainable)


def step_inputs(size: str, resolution: int, device: str, dtype: torch.dtype) -> dict:
    config = CONFIGS[size]
    side = resolution // 16 if size == "flux-dev" else resolution // 8
    return dict(hidden_states=torch.randn(1, side * side, config["in_channels"], device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], device=device,
                                                  dtype=dtype),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.5, device=device),
                img_ids=image_position_ids(2 * side, 2 * side, torch.device(device), dtype),
                txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype), return_dict=False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, size: str, resolution: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    """Seconds per optimiser step after a first (warm-up) step, and the peak memory."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = step_inputs(size, resolution, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs)[0].float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"s_per_step": sum(times[1:]) / steps, "peak_gb": peak}


def largest_fitting(args, method: str, boft_parameters: int, cap_gb: float, dtype: torch.dtype) -> int | str:
    """The largest of the candidate resolutions whose step fits under ``cap_gb``."""
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    best: int | str = "none (the bf16 weights alone do not fit)"
    try:
        model = build(args.size, args.device, dtype)
        adapt(model, method, boft_parameters)
        for resolution in (512, 768, 1024, 1280, 1536, 2048):
            time_steps(model, args.size, resolution, 1, args.device, dtype)
            best = resolution
    except torch.OutOfMemoryError:
        pass
    finally:
        model = None
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="flux-dev", choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--caps_gb", type=float, nargs="*", default=[24.0, 80.0],
                        help="Memory caps for the largest-resolution search (none: skip it; CUDA only).")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"size": args.size, "dtype": args.dtype, "device": torch.cuda.get_device_name(0)
                     if args.device == "cuda" else "cpu", "rows": []}

    def record(row: dict) -> None:
        results["rows"].append(row)
        (out / "bench_dit_gpu.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)

    boft_parameters = None
    for method in ("boft-m2", "lora"):
        model = build(args.size, args.device, dtype)
        trainable = adapt(model, method, boft_parameters)
        boft_parameters = boft_parameters or trainable
        for resolution in args.resolutions:
            try:
                row = time_steps(model, args.size, resolution, args.steps, args.device, dtype)
            except torch.OutOfMemoryError:
                row = {"s_per_step": None, "peak_gb": "out of memory"}
            record({"method": method, "trainable": trainable, "resolution": resolution, **row})
        model = None
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.device == "cuda":
        for method in ("boft-m2", "lora"):
            for cap in args.caps_gb:
                record({"method": method, "cap_gb": cap,
                        "largest_resolution": largest_fitting(args, method, boft_parameters, cap, dtype)})


if __name__ == "__main__":
    main()
