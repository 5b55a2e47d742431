"""The export formats, written from a pipeline with an adapter loaded: what
``python -m boft_diffusion.export`` writes after loading the base model, and what the app writes
from the model it serves. Which formats a model family takes is decided here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..exports.layouts import KOHYA_PREFIXES, KOHYA_PREFIXES_FLUX, KOHYA_PREFIXES_SD3, KOHYA_PREFIXES_SDXL, LoraReport
from ..exports.writers import (
    AdaptedPipeline,
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
from ..families import family_of

FORMATS = ("lycoris", "diff", "lora", "peft-lora", "merged")


#: kohya's prefix of each pipeline component an adapter can train, by model family.
KOHYA_PREFIXES_BY_FAMILY = {"sd": KOHYA_PREFIXES, "sdxl": KOHYA_PREFIXES_SDXL, "flux": KOHYA_PREFIXES_FLUX,
                            "sd3": KOHYA_PREFIXES_SD3}
#: The families whose denoiser is a transformer, exported under their own checkpoints' key names.
TRANSFORMER_FAMILIES = ("flux", "sd3")


def kohya_prefixes(pipe) -> dict[str, str]:
    """kohya's prefix of each component of ``pipe`` an adapter can train."""
    return KOHYA_PREFIXES_BY_FAMILY[family_of(pipe).name]


def adapted_pipeline(pipe, models: list) -> AdaptedPipeline:
    """``pipe`` with an adapter loaded into ``models``: the components to export, under kohya's prefixes."""
    prefixes = kohya_prefixes(pipe)
    components = {name: getattr(pipe, name) for name in prefixes if getattr(pipe, name, None) in models}
    return AdaptedPipeline(pipe, components, dict(prefixes))


@dataclass
class ExportResult:
    paths: list[Path]
    report: LoraReport | None = None
    dropped_biases: list[str] = field(default_factory=list)


def export_transformer_adapter(adapted: AdaptedPipeline, family: str, adapter_dir: Path, fmt: str, output: Path,
                               rank: int | None, energy: float | None) -> ExportResult:
    """Flux.1 and SD3: merged folders, diffusers LoRA folders (``FluxPipeline.load_lora_weights``;
    full rank, so exact, unless --rank or --energy asks for less) and the transformer's diff under
    ComfyUI's own key names."""
    if fmt not in ("merged", "peft-lora", "diff"):
        raise ValueError(f"{adapter_dir} is a {family} adapter: export it as merged, peft-lora or diff (the "
                         f"{fmt} format writes kohya's UNet key layouts).")
    if fmt == "diff":
        if set(adapted.components) != {"transformer"} or identifier_vectors(adapted):
            raise ValueError(f"{adapter_dir} trained text-encoder parts, which a {family} diff does not carry yet: "
                             "export --format peft-lora or merged.")
        return ExportResult([export_native_diff(adapted, output, family)])
    deltas = {component: module_deltas(adapted, component) for component in adapted.components}
    factors = lora_factors(deltas, rank, 1.0 if rank is None and energy is None else energy)
    result = ExportResult([export_lora(adapted, output, factors, "peft")], lora_report(adapted, factors),
                          dropped_biases(deltas))
    result.paths += export_identifiers(adapted, output)
    return result


def export_format(adapted: AdaptedPipeline, adapter_dir: Path, fmt: str, output: Path, rank: int | None = None,
                  energy: float | None = None) -> ExportResult:
    """Write the adapter loaded in ``adapted`` as ``fmt`` to ``output`` (a file for lycoris, diff and
    lora, a folder for peft-lora and merged); ``adapter_dir`` names it in errors. Identifier
    embeddings go beside the file or into the folder (folded in for ``merged``)."""
    if fmt == "merged":
        return ExportResult([export_merged_pipeline(adapted.pipe, output)])
    family = family_of(adapted.pipe).name
    if family in TRANSFORMER_FAMILIES:
        return export_transformer_adapter(adapted, family, adapter_dir, fmt, output, rank, energy)
    if fmt == "lycoris":
        if family == "sdxl" and identifier_vectors(adapted):
            raise ValueError(f"{adapter_dir} has learned identifier embeddings on SDXL, whose two-encoder "
                             "textual-inversion files are not written yet: export --format merged.")
        return ExportResult([export_lycoris(adapted, output), *export_identifiers(adapted, output.parent)])
    if family == "sdxl":
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


