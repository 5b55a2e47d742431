"""Train-step time and peak memory of BOFT against the base model, PEFT LoRA, OFT and BOFT.

Builds the Stable Diffusion 1.5 UNet architecture from its config with random weights (no
download), adapts the attention projections, and runs each method in its own process so that
peak resident memory is per method. Prints a markdown table of ratios to the no-adapter step.

    python benchmarks/bench_train_step.py                       # this machine's CPU settings
    python benchmarks/bench_train_step.py --device cuda --latent 64 --batch 4 --dtype bf16
    python benchmarks/bench_train_step.py --count_ops           # operator calls per step (torch.profiler)

``--count_ops`` is a proxy for the GPU cost of small adapters, which is the number of kernels
they launch rather than their arithmetic: it counts the aten operator calls of one training step
(forward, backward, optimiser) for no adapter, PEFT LoRA and ours with the batched rotation
build, with each layer building its own, and with the batched training fold (the CUDA default),
and the calls of the Cayley part alone for 32 and 128 adapted layers.
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

from boft_diffusion.tiny.toy import toy_unet_config

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
OP_METHODS = {
    "none": "no adapter (inputs require grad)",
    "peft_lora": "PEFT LoRA r=8",
    "boft_m2_per_layer": "ours block 8, m=2, each layer builds its own blocks",
    "boft_m2": "ours block 8, m=2, batched build",
    "boft_m2_fold": "ours block 8, m=2, batched build, training fold (the CUDA default)",
}
#: Ours m=2 on a forced training path; plain "boft_m2" takes the device's default (fold on CUDA, rotate on CPU).
MODES = {
    "boft_m2_fold": "ours block 8, m=2, training fold (the CUDA default)",
    "boft_m2_rotate": "ours block 8, m=2, rotating activations (the CPU default)",
}
LABELS = {**METHODS, **MODES}
#: Operators that launch no kernel: views, allocations, no-op conversions.
NO_KERNEL_OPS = {"aten::" + name for name in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "alias", "detach", "split", "split_with_sizes",
    "narrow", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "unbind", "view_as",
    "numpy_T", "mT", "mH", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "resize_", "resolve_conj", "resolve_neg", "to")}
#: Matrix products: never leaves (each calls resolve_conj on its operands), so counted on their own.
GEMM_OPS = {"aten::" + name for name in ("mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot")}

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
#: The same block types at toy widths (every width a multiple of 64, so that m = 4 fits): smoke tests.
TINY_UNET = toy_unet_config(width=64, cross_attention_dim=64, norm_num_groups=16)
UNETS = {"sd15": SD15_UNET, "tiny": TINY_UNET}


def build_unet(device: str, dtype: torch.dtype, size: str = "sd15"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialising 860M weights on the GPU takes seconds, not a minute
        unet = UNet2DConditionModel(**UNETS[size])
    return unet.to(dtype=dtype)


def unet_inputs(args, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, timestep, text context and a regression target for ``args.batch`` examples."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 4, args.latent, args.latent)
    sample = torch.randn(shape, generator=gen).to(args.device, dtype)
    context = torch.randn(args.batch, 77, UNETS[args.unet]["cross_attention_dim"], generator=gen).to(args.device, dtype)
    target = torch.randn(shape, generator=gen).to(args.device, dtype)
    return sample, torch.tensor([500] * args.batch, device=args.device), context, target


def adapt(unet, method: str) -> dict:
    """Attach the method's adapter; return facts about it (e.g. the depth PEFT really used)."""
    info: dict = {}
    if method == "none":
        unet.requires_grad_(False)
    elif method in ("peft_lora", "peft_oft"):
        # the baselines as every recipe and benchmark trains them (kinds/registry.py): LoRA r=8, OFT
        # block 8 with the exact Cayley transform
        from boft_diffusion.kinds.registry import AdapterSpec, adapter_kind

        kind = method.removeprefix("peft_")
        unet.requires_grad_(False)
        adapter_kind(kind).apply(unet, AdapterSpec(kind, list(ATTENTION), lora_rank=8, oft_block_size=8))
    elif method == "peft_boft":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = peft.get_peft_model(unet, peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                                            target_modules=ATTENTION))
        shapes = {m.boft_R["default"].shape[0] for m in unet.modules() if hasattr(m, "boft_R") and "default" in m.boft_R}
        info["m_requested"] = 2
        info["m_ran"] = sorted(shapes)
    else:
        import boft_diffusion as bd

        m = int(method.split("_")[1].removeprefix("m"))
        bd.apply_boft(unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=m, target_modules=ATTENTION))
        bd.set_batched_rotations(unet, not method.endswith("_per_layer"))
        if method.endswith(("_fold", "_rotate")):
            bd.set_training_fold(unet, method.rsplit("_", 1)[1])
        info["m_ran"] = [m]
    return unet, info


def count_ops(run) -> dict[str, int]:
    """aten operator calls made by ``run()``: all (every level of the dispatcher), "kernels":
    leaf calls (no aten call inside) that do work, a proxy for kernel launches on a GPU, of them
    "optimizer" those of the optimiser step, and "gemms": matrix products, which the leaf rule
    misses (add them to the kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    kernels = [event for event in events if event.name not in NO_KERNEL_OPS
               and not any(child.name.startswith("aten::") for child in event.cpu_children)]
    return {"ops": len(events), "kernels": len(kernels), "optimizer": sum(map(in_optimizer_step, kernels)),
            "gemms": sum(event.name in GEMM_OPS for event in events),
            "solves": sum(event.name == "aten::linalg_solve_ex" for event in events)}


def in_optimizer_step(event) -> bool:
    """Whether a profiled call ran inside ``optimizer.step()``: on a CPU AdamW loops over the
    parameters (about 10 kernels each), on CUDA its default foreach path updates them all at once."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def cayley_part_ops(targets: list[str], batched: bool) -> dict[str, int]:
    """Operator calls of building every layer's blocks and back-propagating into the skew parameters."""
    import boft_diffusion as bd
    from boft_diffusion.core.adapters import boft_layers
    from boft_diffusion.core.layers import RotationBank

    unet = build_unet("cpu", torch.float32)
    bd.apply_boft(unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=targets))
    layers = [layer for _, layer in boft_layers(unet.train())]
    bank = RotationBank(layers)

    def build_and_backward() -> None:
        for layer in layers:  # as after zero_grad(set_to_none=True): no accumulation into old gradients
            layer.boft_skew["default"].grad = None
        if batched:
            bank.lend()
            blocks = [layer.lent_blocks for layer in layers]
            bank.reclaim()
        else:
            blocks = [layer.rotation_blocks("default") for layer in layers]
        torch.autograd.backward(blocks, ones)

    ones = [torch.ones(layer.specs["default"].geometry.n_factors, layer.specs["default"].geometry.block_num, 8, 8)
            for layer in layers]
    build_and_backward()
    return {"layers": len(layers), **count_ops(build_and_backward)}


def run_method(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    unet = build_unet(args.device, dtype, args.unet)
    unet, info = adapt(unet, args.method)
    if args.device == "cuda":  # the float32 initialisation is not part of a training step
        torch.cuda.reset_peak_memory_stats()
    unet.train()
    if args.compile:  # every method alike: the forward compiled, hooks (ours) left eager around it
        from boft_diffusion import compile_adapted

        compile_adapted(unet, backend=args.compile_backend)
    params = [p for p in unet.parameters() if p.requires_grad]
    # Adapter weights live in float32 even when the model runs in half precision.
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    sample, timestep, context, target = unet_inputs(args, dtype)
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
    if args.count_ops:
        layers = sum(isinstance(getattr(m, "base_layer", None), torch.nn.Module) for m in unet.modules())
        return {"method": args.method, "adapted_layers": layers, **count_ops(step)}
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
    unet = build_unet(args.device, dtype, args.unet).eval()
    sample, timestep, context, _ = unet_inputs(args, dtype)

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
    parser.add_argument("--methods", nargs="+", choices=[*dict.fromkeys([*LABELS, *OP_METHODS]), "inference", "cayley"],
                        help="default: every method and inference (with --count_ops: "
                        "no adapter, LoRA, ours per-layer, batched and folding, and the Cayley part alone); "
                        "boft_m2_fold and boft_m2_rotate force our training path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--count_ops", action="store_true", help="count operator calls instead of timing")
    parser.add_argument("--unet", default="sd15", choices=list(UNETS), help="tiny: toy widths, for smoke tests")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward of every method")
    parser.add_argument("--compile_backend", default="inductor")
    args = parser.parse_args()

    if args.method:
        print("RESULT " + json.dumps(run_one(args)))
        return

    default = list(OP_METHODS) + ["cayley"] if args.count_ops else list(METHODS) + ["inference"]
    results = {}
    for method in args.methods or default:
        command = [sys.executable, __file__, "--method", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("method", "methods", "count_ops", "compile")
        ] + [f"--{flag}" for flag in ("count_ops", "compile") if getattr(args, flag)]
        output = subprocess.run(command, capture_output=True, text=True)
        line = next((row for row in output.stdout.splitlines() if row.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} failed:\n{output.stderr[-2000:]}", file=sys.stderr)
            continue
        results[method] = json.loads(line[len("RESULT ") :])
        print(f"# {method}: {results[method]}", file=sys.stderr)
    if args.count_ops:
        print_op_tables(results, args)
    else:
        print_table(results, args)


def run_one(args) -> dict:
    if args.method == "inference":
        return run_inference(args)
    if args.method == "cayley":
        return {size: {mode: cayley_part_ops(targets, mode == "batched") for mode in ("per_layer", "batched")}
                for size, targets in (("small", ["to_q"]), ("full", ATTENTION))}
    return run_method(args)


def print_op_tables(results: dict, args) -> None:
    print(f"\naten operator calls in one training step (forward, backward, AdamW) of the SD 1.5 UNet architecture, "
          f"{args.latent}x{args.latent} latents, batch {args.batch}, {args.dtype}, {args.device}; attention adapted. "
          "Kernels: leaf calls that are not views, allocations or no-op conversions; matrix products (GEMMs: mm, "
          "bmm, addmm, ...) are not leaves and are counted apart.\n")
    base = results.get("none")
    print("| method | adapted layers | operator calls | added vs no adapter | added per adapted layer "
          "| kernels added | kernels added per layer | of them AdamW's, per layer | GEMMs added per layer "
          "| Cayley solves |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, label in OP_METHODS.items():
        r = results.get(method)
        if not r or not base:
            continue
        added, kernels, layers = r["ops"] - base["ops"], r["kernels"] - base["kernels"], r["adapted_layers"]
        gemms, optimizer = r["gemms"] - base["gemms"], r["optimizer"] - base["optimizer"]
        per_layer = (f"{added / layers:.1f} | {kernels:,} | {kernels / layers:.1f} | {optimizer / layers:.1f} "
                     f"| {gemms / layers:.1f}" if layers else f"- | {kernels:,} | - | - | -")
        print(f"| {label} | {layers} | {r['ops']:,} | {added:,} | {per_layer} | {r['solves']} |")
    cayley = results.get("cayley")
    if cayley:
        print("\nThe Cayley part alone (every layer's blocks built, then back-propagated to the skew parameters):\n")
        print("| adapted layers | each layer builds its own: calls (kernels), solves | batched: calls (kernels), solves |")
        print("|---|---|---|")
        for size in cayley.values():
            cells = [f"{c['ops']:,} ({c['kernels']:,}), {c['solves']}" for c in (size["per_layer"], size["batched"])]
            print(f"| {size['per_layer']['layers']} | {cells[0]} | {cells[1]} |")


def print_table(results: dict, args) -> None:
    print(f"\nSD 1.5 UNet architecture, random weights, {args.latent}x{args.latent} latents, batch {args.batch}, "
          f"{args.dtype}, {args.device}, {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up.\n")
    base = results.get("none", {}).get("step_s")
    memory = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    print(f"| method | train step (s) | vs no adapter | {memory} (GiB) | trainable params | depth m ran |")
    print("|---|---|---|---|---|---|")
    for method, label in LABELS.items():
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
