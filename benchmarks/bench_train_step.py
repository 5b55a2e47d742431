"""Train-step time and peak memory of BOFT against the base model, PEFT LoRA, OFT and BOFT.

Builds the Stable Diffusion 1.5 UNet architecture from its config with random weights (no
download), adapts the attention projections, and runs each method in its own process so that
peak resident memory is per method. Prints a markdown table of ratios to the no-adapter step.

    python benchmarks/bench_train_step.py                       # this machine's CPU settings
    python benchmarks/bench_train_step.py --device cuda --latent 64 --batch 4 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
METHODS = {
    "none": "no adapter (inputs require grad)",
    "peft_lora": "PEFT LoRA r=8",
    "peft_oft": "PEFT OFT block 8",
    "peft_boft": "PEFT BOFT block 8",
    "boft_m1": "ours block 8, m=1",
    "boft_m2": "ours block 8, m=2",
    "boft_m4": "ours block 8, m=4",
}

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build_unet(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialising 860M weights on the GPU takes seconds, not a minute
        unet = UNet2DConditionModel(**SD15_UNET)
    return unet.to(dtype=dtype)


def adapt(unet, method: str) -> dict:
    """Attach the method's adapter; return facts about it (e.g. the depth PEFT really used)."""
    info: dict = {}
    if method == "none":
        unet.requires_grad_(False)
    elif method.startswith("peft_"):
        import peft

        configs = {
            "peft_lora": lambda: peft.LoraConfig(r=8, lora_alpha=8, target_modules=ATTENTION),
            "peft_oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=ATTENTION),
            "peft_boft": lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=ATTENTION),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = peft.get_peft_model(unet, configs[method]())
        if method == "peft_boft":
            shapes = {m.boft_R["default"].shape[0] for m in unet.modules() if hasattr(m, "boft_R") and "default" in m.boft_R}
            info["m_requested"] = 2
            info["m_ran"] = sorted(shapes)
    else:
        import boft_diffusion as bd

        m = int(method.rsplit("m", 1)[1])
        bd.apply_boft(unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=m, target_modules=ATTENTION))
        info["m_ran"] = [m]
    return unet, info


def run_method(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    unet = build_unet(args.device, dtype)
    unet, info = adapt(unet, args.method)
    if args.device == "cuda":  # the float32 initialisation is not part of a training step
        torch.cuda.reset_peak_memory_stats()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    # Adapter weights live in float32 even when the model runs in half precision.
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, args.latent, args.latent)
    sample = torch.randn(shape, generator=gen).to(args.device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=gen).to(args.device, dtype)
    target = torch.randn(shape, generator=gen).to(args.device, dtype)
    timestep = torch.tensor([500] * args.batch, device=args.device)
    if args.method == "none":
        sample.requires_grad_(True)

    def step() -> float:
        sync(args.device)
        start = time.perf_counter()
        out = unet(sample, timestep, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sample.grad = None
        sync(args.device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    result = {
        "method": args.method,
        "step_s": statistics.median(times),
        "trainable": sum(p.numel() for p in params),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **info,
    }
    if args.device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_inference(args) -> dict:
    """Forward time of the base model, our unmerged (folded) adapter and our merged adapter."""
    import boft_diffusion as bd
    from boft_diffusion.core.adapters import boft_layers

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    unet = build_unet(args.device, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(args.device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=gen).to(args.device, dtype)
    timestep = torch.tensor([500] * args.batch, device=args.device)

    @torch.no_grad()
    def forward_time() -> float:
        times = []
        for _ in range(args.warmup + args.steps):
            sync(args.device)
            start = time.perf_counter()
            unet(sample, timestep, encoder_hidden_states=context)
            sync(args.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[args.warmup :])

    base = forward_time()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=ATTENTION))
    with torch.no_grad():
        for _, layer in boft_layers(unet):
            layer.boft_skew["default"].normal_(0, 0.01)
    unmerged = forward_time()
    bd.merge_adapter(unet)
    merged = forward_time()
    bd.disable_adapters(unet)  # unmerges: the base again, timed last as well to cancel warm-up drift
    base_again = forward_time()
    return {"method": "inference", "base_s": (base + base_again) / 2, "unmerged_s": unmerged, "merged_s": merged}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="run one method in this process and print JSON")
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + ["inference"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    if args.method:
        result = run_inference(args) if args.method == "inference" else run_method(args)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--method", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("method", "methods")
        ]
        output = subprocess.run(command, capture_output=True, text=True)
        line = next((row for row in output.stdout.splitlines() if row.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} failed:\n{output.stderr[-2000:]}", file=sys.stderr)
            continue
        results[method] = json.loads(line[len("RESULT ") :])
        print(f"# {method}: {results[method]}", file=sys.stderr)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print(f"\nSD 1.5 UNet architecture, random weights, {args.latent}x{args.latent} latents, batch {args.batch}, "
          f"{args.dtype}, {args.device}, {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up.\n")
    base = results.get("none", {}).get("step_s")
    memory = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    print(f"| method | train step (s) | vs no adapter | {memory} (GiB) | trainable params | depth m ran |")
    print("|---|---|---|---|---|---|")
    for method, label in METHODS.items():
        r = results.get(method)
        if not r:
            continue
        ratio = f"{r['step_s'] / base:.2f}x" if base else "-"
        depth = ",".join(map(str, r.get("m_ran", []))) or "-"
        if "m_requested" in r:
            depth += f" (asked {r['m_requested']})"
        mem = r.get("peak_cuda_gib", r["peak_rss_gib"])
        print(f"| {label} | {r['step_s']:.3f} | {ratio} | {mem:.2f} | {r['trainable']:,} | {depth} |")
    inference = results.get("inference")
    if inference:
        b = inference["base_s"]
        print("\n| inference forward | time (s) | vs base |\n|---|---|---|")
        for key, label in (("base_s", "base model"), ("unmerged_s", "ours m=2, unmerged (cached fold)"),
                           ("merged_s", "ours m=2, merged")):
            print(f"| {label} | {inference[key]:.3f} | {inference[key] / b:.2f}x |")


if __name__ == "__main__":
    main()
