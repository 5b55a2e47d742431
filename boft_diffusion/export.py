"""``python -m boft_diffusion.export ADAPTER_DIR --format {lycoris,diff,lora,peft-lora,merged}
[--rank R | --energy 0.99] --output PATH``: an adapter for tools that do not read our folders.

- ``lycoris``: LyCORIS BOFT (``oft_blocks``, ``rescale``, ``alpha``), small and exact, for adapters
  trained with ``--boft_side output``; ComfyUI and A1111 read it natively, LyCORIS itself when the
  adapter has the full-butterfly geometry (``--boft_full_butterfly``).
- ``diff``: the exact weight difference ``W' - W`` per adapted module (LyCORIS "full").
- ``lora``: that difference by truncated SVD, as a kohya LoRA; prints how much of it is lost.
- ``peft-lora``: the same LoRA in diffusers/PEFT naming, for ``pipe.load_lora_weights(folder)``.
- ``merged``: a diffusers folder with the adapter folded in.

A learned identifier embedding is written beside the output as ``<word>.safetensors``, a
textual-inversion file whose token is ``<word>`` (diffusers refuses a token already in the
vocabulary); A1111 and ComfyUI name it after the file, so there the prompt keeps ``word``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .exports.layouts import format_report
from .exports.writers import AdaptedPipeline, check_rank_choice
from .families.loading import load_pipeline
from .outputs.export_formats import FORMATS, ExportResult, adapted_pipeline, export_format
from .outputs.read import load_outputs


def _base_model_of(folder: Path) -> str:
    data = json.loads((folder / "adapter_config.json").read_text())
    return data.get("base_model_name_or_path") or "tiny"


def load_for_export(adapter_dir: str | os.PathLike, base_model: str | None = None) -> AdaptedPipeline:
    """Load the adapter's base model (its ``base_model_name_or_path`` unless given) on the CPU in
    float32, and the adapter folder (UNet, text encoder, identifier embedding) into it."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder: adapter_config.json not found.")
    pipe = load_pipeline(base_model or _base_model_of(folder), dtype=torch.float32, device="cpu")
    try:
        models = load_outputs(pipe, folder).models
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from error
    return adapted_pipeline(pipe, models)


def _check_request(adapter_dir: Path, fmt: str, output: Path, rank: int | None, energy: float | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist.")
    check_rank_choice(rank, energy)
    if fmt in ("lycoris", "diff", "merged") and (rank is not None or energy is not None):
        raise ValueError(f"--rank and --energy apply to the LoRA formats only, not to {fmt!r}.")
    if fmt == "peft-lora" and output.suffix == ".safetensors":
        raise ValueError(f"{output}: a peft-lora export is a folder (diffusers loads it with load_lora_weights(folder)).")
    if fmt == "merged" and output.suffix in (".safetensors", ".ckpt"):
        raise ValueError(f"{output}: diffusers cannot write a single-file Stable Diffusion checkpoint; give a "
                         "folder, or export --format diff / lora and apply it to the base checkpoint in your UI.")
    if fmt in ("lycoris", "diff", "lora") and output.suffix != ".safetensors":
        raise ValueError(f"{output}: a {fmt} export is one file; name it *.safetensors.")


def export_adapter(adapter_dir: str | os.PathLike, fmt: str, output: str | os.PathLike, rank: int | None = None,
                   energy: float | None = None, base_model: str | None = None) -> ExportResult:
    """Export an adapter folder (UNet, text encoder, identifier) as ``fmt`` to ``output``.

    ``output`` is a file for ``diff`` and ``lora``, a folder for ``peft-lora`` and ``merged``;
    identifier embeddings go beside the file or into the folder (folded in for ``merged``).
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    _check_request(adapter_dir, fmt, output, rank, energy)
    return export_format(load_for_export(adapter_dir, base_model), adapter_dir, fmt, output, rank, energy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m boft_diffusion.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="A train_dreambooth.py output folder (or any adapter folder).")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True,
                        help="A .safetensors file for lycoris, diff and lora, a folder for peft-lora and merged.")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, help="LoRA rank of every module (capped at its full rank).")
    choice.add_argument("--energy", type=float,
                        help="Per module, the smallest rank keeping this fraction of ||dW||^2 (default 0.99).")
    parser.add_argument("--base_model", help="Base model (default: the adapter's base_model_name_or_path).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_adapter(args.adapter_dir, args.format, args.output, args.rank, args.energy, args.base_model)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.report is not None:
        print(format_report(result.report))
    if result.dropped_biases:
        print(f"warning: LoRA cannot carry trained biases; left out for {len(result.dropped_biases)} modules "
              f"(use --format diff or merged to keep them): {', '.join(result.dropped_biases[:5])}", file=sys.stderr)
    for path in result.paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
