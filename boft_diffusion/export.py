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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .exports.layouts import (
    KOHYA_PREFIXES,
    KOHYA_PREFIXES_DIT,
    KOHYA_PREFIXES_SD3,
    KOHYA_PREFIXES_SDXL,
    LoraReport,
    format_report,
)
from .exports.writers import (
    AdaptedPipeline,
    check_rank_choice,
    dropped_biases,
    export_diff,
    export_identifiers,
    export_lora,
    export_lycoris,
    export_merged_pipeline,
    export_native_diff,
    identifier_vectors,
    lora_factors,
    lora_report,
    module_deltas,
)
from .families.loading import is_sdxl, load_pipeline
from .outputs.read import load_outputs

FORMATS = ("lycoris", "diff", "lora", "peft-lora", "merged")


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
    prefixes = kohya_prefixes(pipe)
    base_biases = {name: {key: value.clone() for key, value in getattr(pipe, name).state_dict().items()
                          if key.endswith(".bias")} for name in prefixes}
    try:
        models = load_outputs(pipe, folder).models
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from error
    components = {name: getattr(pipe, name) for name in prefixes if getattr(pipe, name) in models}
    return AdaptedPipeline(pipe, components, base_biases, dict(prefixes))


def kohya_prefixes(pipe) -> dict[str, str]:
    """kohya's prefix of each pipeline component an adapter can train."""
    if is_transformer(pipe):
        return KOHYA_PREFIXES_DIT if getattr(pipe, "text_encoder_3", None) is None else KOHYA_PREFIXES_SD3
    return KOHYA_PREFIXES_SDXL if is_sdxl(pipe) else KOHYA_PREFIXES


def is_transformer(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None


@dataclass
class ExportResult:
    paths: list[Path]
    report: LoraReport | None = None
    dropped_biases: list[str] = field(default_factory=list)


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
    adapted = load_for_export(adapter_dir, base_model)
    if fmt == "merged":
        return ExportResult([export_merged_pipeline(adapted.pipe, output)])
    if is_transformer(adapted.pipe):
        return export_transformer_adapter(adapted, adapter_dir, fmt, output, rank, energy)
    if fmt == "lycoris":
        if is_sdxl(adapted.pipe) and identifier_vectors(adapted):
            raise ValueError(f"{adapter_dir} has learned identifier embeddings on SDXL, whose two-encoder "
                             "textual-inversion files are not written yet: export --format merged.")
        return ExportResult([export_lycoris(adapted, output), *export_identifiers(adapted, output.parent)])
    if is_sdxl(adapted.pipe):
        raise ValueError(f"{adapter_dir} is an SDXL adapter: only --format merged exports it so far (the diff and "
                         "LoRA formats write SD 1.x / 2.x key layouts, which have no second text encoder).")
    embeddings_dir = output if fmt == "peft-lora" else output.parent
    clash = [word for word in identifier_vectors(adapted) if embeddings_dir / f"{word}.safetensors" == output]
    if clash:
        raise ValueError(f"{output}: the identifier embedding {clash[0]!r} is written to that name; choose another output.")
    result = ExportResult([])
    if fmt == "diff":
        result.paths.append(export_diff(adapted, output))
    else:
        deltas = {component: module_deltas(adapted, component) for component in adapted.components}
        factors = lora_factors(deltas, rank, energy)
        result.paths.append(export_lora(adapted, output, factors, "kohya" if fmt == "lora" else "peft"))
        result.report = lora_report(adapted, factors)
        result.dropped_biases = dropped_biases(deltas)
    result.paths += export_identifiers(adapted, embeddings_dir)
    return result


def export_transformer_adapter(adapted: AdaptedPipeline, adapter_dir: Path, fmt: str, output: Path,
                               rank: int | None, energy: float | None) -> ExportResult:
    """Flux.1 and SD3: merged folders, diffusers LoRA folders (``FluxPipeline.load_lora_weights``;
    full rank, so exact, unless --rank or --energy asks for less) and the transformer's diff under
    ComfyUI's own key names."""
    family = type(adapted.pipe).__name__
    if fmt not in ("merged", "peft-lora", "diff"):
        raise ValueError(f"{adapter_dir} is a {family} adapter: export it as merged, peft-lora or diff (the "
                         f"{fmt} format writes kohya's UNet key layouts).")
    if fmt == "diff":
        if set(adapted.components) != {"transformer"} or identifier_vectors(adapted):
            raise ValueError(f"{adapter_dir} trained text-encoder parts, which a {family} diff does not carry yet: "
                             "export --format peft-lora or merged.")
        return ExportResult([export_native_diff(adapted, output)])
    deltas = {component: module_deltas(adapted, component) for component in adapted.components}
    factors = lora_factors(deltas, rank, 1.0 if rank is None and energy is None else energy)
    result = ExportResult([export_lora(adapted, output, factors, "peft")], lora_report(adapted, factors),
                          dropped_biases(deltas))
    result.paths += export_identifiers(adapted, output)
    return result


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
