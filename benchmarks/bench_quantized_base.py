"""Memory of the denoiser with its frozen Linear weights quantised (``--base_quantization``), and how far
the quantised model's output moves: the embedded tiny UNet and the SD 1.5 UNet built from its config
with random weights (no download).

For each method the UNet's parameters and buffers are counted before and after
``quantize_linears`` (convolutions, norms and biases stay float32), and one forward (8x8 latents for
SD 1.5, the tiny model's native 16x16) is compared with the float model's: mean |difference| over
mean |output|. An adapter on the quantised base is exact for the dequantised weights
(tests/test_quantized_base.py), so this error is all the quantisation costs the forward.

    python benchmarks/bench_quantized_base.py --output_json benchmarks/results/current/quantized_base.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import build_unet  # noqa: E402

import boft_diffusion as bd  # noqa: E402
from boft_diffusion.core.quantize import QUANTIZATIONS, quantize_linears, storage_bytes  # noqa: E402


def load_unet(size: str) -> tuple[nn.Module, int]:
    """The frozen float32 UNet and its latent side for the comparison forward."""
    if size == "tiny":
        return bd.load_pipeline("tiny", dtype=torch.float32).unet.requires_grad_(False).eval(), 16
    return build_unet("cpu", torch.float32, "sd15").requires_grad_(False).eval(), 8


def measure(size: str) -> dict:
    unet, latent = load_unet(size)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, latent, latent, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        reference = unet(sample, 10, context).sample
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    row = {"parameters": sum(p.numel() for p in unet.parameters()), "linear_layers": len(linears),
           "linear_weight_share": sum(m.weight.numel() for m in linears) / sum(p.numel() for p in unet.parameters()),
           "float32_mib": storage_bytes(unet) / 2**20}
    for method in QUANTIZATIONS[1:]:
        quantized = copy.deepcopy(unet)
        quantize_linears(quantized, method)
        with torch.no_grad():
            out = quantized(sample, 10, context).sample
        row[method] = {"mib": storage_bytes(quantized) / 2**20, "ratio": storage_bytes(quantized) / storage_bytes(unet),
                       "output_error": ((out - reference).abs().mean() / reference.abs().mean()).item()}
        del quantized
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = {size: measure(size) for size in args.sizes}
    methods = QUANTIZATIONS[1:]
    print("| UNet | float32 | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for size, row in results.items():
        cells = [f"{row[m]['mib']:.1f} MiB ({row[m]['ratio']:.2f}x, error {row[m]['output_error']:.2%})" for m in methods]
        print(f"| {size} ({row['linear_weight_share']:.0%} of weights in Linear) | {row['float32_mib']:.1f} MiB | "
              + " | ".join(cells) + " |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
