"""File sizes of an adapter's exports at Stable Diffusion 1.5's shapes: the LyCORIS BOFT file
(``--format lycoris``) against the full weight difference (``--format diff``) and our own folder.

Builds the SD 1.5 UNet from its config with random weights (no download), puts an output-side
adapter on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) with random
rotations, and writes the files the exporter writes for it, under kohya keys:

    python benchmarks/export_sizes.py                       # b = 8, m = 2 and the full butterfly at b = 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import build_unet  # noqa: E402

import boft_diffusion as bd  # noqa: E402
from boft_diffusion.core.adapters import boft_layers, merged_state_dict  # noqa: E402
from boft_diffusion.core.butterfly import skew_from_params  # noqa: E402
from boft_diffusion.core.lycoris import kohya_name  # noqa: E402
from boft_diffusion.exports.layouts import (  # noqa: E402
    Delta,  # noqa: E402
    diff_state_dict,
    lycoris_boft_state_dict,
)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
SETTINGS = {"b8_m2": dict(block_size=8, n_butterfly_factor=2), "b10_full": dict(block_size=10, full_butterfly=True)}


def sizes(setting: str, folder: Path) -> dict:
    unet = build_unet("cpu", torch.float32)
    base = {key: value.clone() for key, value in unet.state_dict().items()}
    bd.apply_boft(unet, bd.BOFTConfig(target_modules=ATTENTION, side="output", **SETTINGS[setting]))
    layers = dict(boft_layers(unet))
    with torch.no_grad():
        for layer in layers.values():
            layer.boft_skew["default"].normal_(0, 0.02)
    lycoris, deltas = {}, {}
    merged = merged_state_dict(unet)
    for name, layer in layers.items():
        key = kohya_name("lora_unet", name)
        skew = skew_from_params(layer.boft_skew["default"].detach(), layer.specs["default"].geometry.block_size)
        lycoris.update(lycoris_boft_state_dict(key, skew, layer.boft_s["default"].detach(), layer.weight.dim()))
        deltas[key] = Delta(weight=merged[f"{name}.weight"] - base[f"{name}.weight"])
    files = {"lycoris": folder / f"{setting}_lycoris.safetensors", "diff": folder / f"{setting}_diff.safetensors"}
    save_file(lycoris, files["lycoris"])
    save_file(diff_state_dict(deltas), files["diff"])
    bd.save_adapter(unet, folder / f"{setting}_adapter")
    ours = sum(p.stat().st_size for p in (folder / f"{setting}_adapter").iterdir())
    depths = sorted({layer.specs["default"].geometry.n_factors for layer in layers.values()})
    return {"modules": len(layers), "depths": depths, "lycoris_mb": files["lycoris"].stat().st_size / 1e6,
            "diff_mb": files["diff"].stat().st_size / 1e6, "adapter_folder_mb": ours / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {setting: sizes(setting, Path(scratch)) for setting in args.settings}
    print("| adapter (SD 1.5 attention, output side) | modules | depth m | lycoris file | diff file | our folder |")
    print("|---|---|---|---|---|---|")
    for setting, row in results.items():
        print(f"| {setting} | {row['modules']} | {', '.join(map(str, row['depths']))} | {row['lycoris_mb']:.1f} MB "
              f"| {row['diff_mb']:.1f} MB | {row['adapter_folder_mb']:.1f} MB |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
