"""Exporting an adapter for tools that do not read BOFT: exact weight differences (LyCORIS
"full"), LoRA by truncated SVD in kohya or diffusers naming, textual-inversion files for learned
identifiers, and a merged diffusers folder. The command line is ``python -m boft_diffusion.export``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.adapters import (
    active_adapter,
    adapter_configs,
    base_state_dict,
    bias_shifts,
    boft_layers,
    has_adapters,
    merged_state_dict,
)
from ..core.butterfly import skew_from_params
from ..core.files import atomic_folder, atomic_write
from ..core.identifier import identifier_embedding
from ..core.lycoris import checkpoint_prefix, kohya_names
from .layouts import (
    KOHYA_PREFIXES,
    Delta,
    LoraReport,
    LowRank,
    approximation_report,
    diff_state_dict,
    kohya_lora_state_dict,
    low_rank,
    lycoris_boft_state_dict,
    peft_lora_state_dict,
    textual_inversion_state_dict,
)
from .native_keys import native_deltas

PEFT_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


# Writing files atomically ------------------------------------------------------------------------
def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    atomic_write(path.parent, {path.name: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata})})
    return path


def export_merged_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """Save ``pipe`` with every adapted component's active adapter (and learned identifier
    embeddings) merged into plain modules.

    The result loads with ``StableDiffusionPipeline.from_pretrained`` and no boft-diffusion code;
    the adapters in ``pipe`` itself are left untouched. The folder is written under a temporary
    name and renamed into place, so an interrupted export leaves no half-written model.
    """
    components = dict(pipe.components)
    for key, module in pipe.components.items():
        if module is None or not hasattr(module, "state_dict") or not has_adapters(module):
            continue
        config = module.config
        plain = type(module).from_config(config) if hasattr(type(module), "from_config") else type(module)(config)
        plain.load_state_dict(merged_state_dict(module))
        components[key] = plain.to(device=module.device, dtype=module.dtype)
    with atomic_folder(folder) as staging:
        type(pipe)(**components).save_pretrained(staging, safe_serialization=True)
    return Path(folder)


# The adapter to export ---------------------------------------------------------------------------
@dataclass
class AdaptedPipeline:
    """A base pipeline with an adapter folder loaded: the components it adapts, and their kohya prefixes."""

    pipe: object
    components: dict[str, nn.Module]
    prefixes: dict[str, str] = field(default_factory=lambda: dict(KOHYA_PREFIXES))


def module_deltas(adapted: AdaptedPipeline, component: str) -> dict[str, Delta]:
    """Per module of ``component``: the adapted weight's change, and the bias's when it trained."""
    model = adapted.components[component]
    merged = merged_state_dict(model)
    base = base_state_dict(model)
    adapted_modules = {name for name, layer in boft_layers(model) if layer.live_adapter() is not None}
    deltas: dict[str, Delta] = {}
    for key, value in merged.items():
        module, _, kind = key.rpartition(".")
        if kind == "weight" and module in adapted_modules:
            deltas.setdefault(module, Delta()).weight = value - base[key]
        elif kind == "bias" and not torch.equal(value, base[key]):
            deltas.setdefault(module, Delta()).bias = value - base[key]
    return deltas


def _kohya_keys(adapted: AdaptedPipeline, component: str, modules) -> dict[str, str]:
    """Module name -> kohya key, named after the original checkpoint's module path."""
    model = adapted.components[component]
    path = checkpoint_prefix(model)
    all_modules = (path + key.rpartition(".")[0] for key in base_state_dict(model))
    keys = kohya_names(adapted.prefixes[component], [path + name for name in modules], all_modules)
    return {name: keys[path + name] for name in modules}


def identifier_vectors(adapted: AdaptedPipeline) -> dict[str, torch.Tensor]:
    """The learned identifier vectors by word (empty without any)."""
    layer = identifier_embedding(adapted.pipe.text_encoder)
    if layer is None or layer.adapters_disabled:
        return {}
    return {word: layer.identifier_vectors[i].detach() for i, word in enumerate(layer.words)}


# Formats -----------------------------------------------------------------------------------------
def export_diff(adapted: AdaptedPipeline, output: str | os.PathLike) -> Path:
    """One safetensors of exact weight (and trained bias) differences under kohya keys."""
    tensors = {}
    for component in adapted.components:
        deltas = module_deltas(adapted, component)
        keys = _kohya_keys(adapted, component, deltas)
        tensors.update(diff_state_dict({keys[name]: delta for name, delta in deltas.items()}))
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}
    return _write_safetensors(tensors, Path(output), metadata)


def export_native_diff(adapted: AdaptedPipeline, output: str | os.PathLike, family: str) -> Path:
    """The transformer's exact weight differences under ComfyUI's keys for ``family`` (``flux`` or
    ``sd3``: the original checkpoints' layouts, fused projections stacked), which ComfyUI adds to the
    model by key."""
    model = adapted.components["transformer"]
    deltas = native_deltas(family, model, module_deltas(adapted, "transformer"))
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}
    return _write_safetensors(diff_state_dict(deltas), Path(output), metadata)


def export_lycoris(adapted: AdaptedPipeline, output: str | os.PathLike) -> Path:
    """One safetensors of LyCORIS BOFT tensors (``oft_blocks``, ``rescale``, ``alpha``) under kohya
    keys, exact for output-side adapters at their current strength; trained biases go in as
    ``diff_b``. Input-side adapters have no such form and are refused."""
    tensors = {}
    for component, model in adapted.components.items():
        layers = {name: layer for name, layer in boft_layers(model) if layer.live_adapter() is not None}
        input_side = [name for name, layer in layers.items() if not layer.rotates_output(layer.active_adapter)]
        if input_side:
            raise ValueError(f"{component}.{input_side[0]} rotates the input side (W R^T), which LyCORIS, ComfyUI and "
                             "A1111 cannot express exactly (they rotate the output side): export it with --format "
                             "diff (exact, the size of the weights) or lora (small, approximate), or train with "
                             "--boft_side output.")
        keys = _kohya_keys(adapted, component, layers)
        for name, layer in layers.items():
            adapter = layer.active_adapter
            spec = layer.specs[adapter]
            if spec.neumann_terms:
                raise ValueError(f"{component}.{name} builds its blocks with a {spec.neumann_terms}-term Neumann "
                                 "series; LyCORIS, ComfyUI and A1111 apply the exact Cayley transform, so the file "
                                 "would not be this adapter: export --format diff.")
            if spec.geometry.block_size % 2:
                raise ValueError(f"{component}.{name} has block size {spec.geometry.block_size}: LyCORIS's butterfly "
                                 "pairs rows in halves of a block, so it needs an even block size.")
            skew = skew_from_params(layer.boft_skew[adapter].detach().float() * spec.strength,
                                    spec.geometry.block_size)
            scale = layer.magnitude(adapter)
            tensors.update(lycoris_boft_state_dict(keys[name], skew, None if scale is None else scale.detach(),
                                                   layer.weight.dim()))
        # trained biases are the adapters' live bias shifts: no need to merge every weight to find them
        biases = {name: shift.live_delta() for name, _, shift in bias_shifts(model)}
        biases = {name: delta for name, delta in biases.items() if delta is not None and delta.any()}
        tensors.update(diff_state_dict({key: Delta(bias=biases[name])
                                        for name, key in _kohya_keys(adapted, component, biases).items()}))
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "boft"})}
    return _write_safetensors(tensors, Path(output), metadata)


def check_rank_choice(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise ValueError("give either a rank or an energy fraction, not both.")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}.")


def lora_factors(deltas: dict[str, dict[str, Delta]], rank: int | None = None, energy: float | None = None
                 ) -> dict[str, dict[str, LowRank]]:
    """Per component and module (as ``module_deltas`` gives them): the truncated SVD of the weight
    difference (``energy`` 0.99 when neither is given). Bias changes have no LoRA form."""
    check_rank_choice(rank, energy)
    if rank is None and energy is None:
        energy = 0.99
    return {component: {name: low_rank(delta.weight, rank, energy) for name, delta in by_module.items()
                        if delta.weight is not None and delta.weight.any()}
            for component, by_module in deltas.items()}


def dropped_biases(deltas: dict[str, dict[str, Delta]]) -> list[str]:
    """Modules whose trained bias a LoRA file cannot carry."""
    return [f"{component}.{name}" for component, by_module in deltas.items()
            for name, delta in by_module.items() if delta.bias is not None]


def export_lora(adapted: AdaptedPipeline, output: str | os.PathLike, factors: dict[str, dict[str, LowRank]],
                naming: str = "kohya") -> Path:
    """Write ``factors`` as one kohya LoRA file (``naming="kohya"``) or, for ``"peft"``, as
    diffusers' ``pytorch_lora_weights.safetensors`` in the folder ``output``. Text-encoder modules
    keep the ``text_model.`` path of the checkpoints, which diffusers reads with either transformers."""
    output = Path(output)
    if naming == "peft":
        named = {f"{component}.{checkpoint_prefix(adapted.components[component])}{name}": factor
                 for component, by_module in factors.items() for name, factor in by_module.items()}
        return _write_safetensors(peft_lora_state_dict(named), output / PEFT_LORA_WEIGHTS, {})
    named = {}
    for component, by_module in factors.items():
        keys = _kohya_keys(adapted, component, by_module)
        named.update({keys[name]: factor for name, factor in by_module.items()})
    ranks = [factor.rank for factor in named.values()] or [0]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                "ss_network_alpha": str(max(ranks))}
    return _write_safetensors(kohya_lora_state_dict(named), output, metadata)


def export_identifiers(adapted: AdaptedPipeline, folder: str | os.PathLike) -> list[Path]:
    """``<folder>/<word>.safetensors`` per learned identifier, holding token ``<word>``."""
    return [_write_safetensors(textual_inversion_state_dict(f"<{word}>", vector), Path(folder) / f"{word}.safetensors", {})
            for word, vector in identifier_vectors(adapted).items()]


# How much a LoRA loses -----------------------------------------------------------------------------
def _fixed_unet_input(adapted: AdaptedPipeline) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded noise at t = 500 and the adapter's instance prompt encoded by the adapted text encoder."""
    pipe, unet = adapted.pipe, adapted.pipe.unet
    size = min(unet.config.sample_size, 32)
    sample = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    prompt = adapter_configs(unet)[active_adapter(unet)].metadata.get("instance_prompt") or "a photo"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return sample, torch.tensor([500]), pipe.text_encoder(ids)[0]


def unet_output_errors(adapted: AdaptedPipeline, unet_factors: dict[str, LowRank]) -> tuple[float, float]:
    """||y_lora - y_boft|| over ||y_boft|| and over ||y_boft - y_base||, on a fixed input."""
    unet = adapted.pipe.unet
    plain = type(unet).from_config(unet.config).eval()
    base = base_state_dict(unet)
    lora = dict(base)
    for name, factor in unet_factors.items():
        lora[f"{name}.weight"] = base[f"{name}.weight"] + factor.product()
    with torch.no_grad():
        sample, timestep, context = _fixed_unet_input(adapted)
        y_boft = unet(sample, timestep, encoder_hidden_states=context).sample
        plain.load_state_dict(base)
        y_base = plain(sample, timestep, encoder_hidden_states=context).sample
        plain.load_state_dict(lora)
        y_lora = plain(sample, timestep, encoder_hidden_states=context).sample
    error = float((y_lora - y_boft).norm())
    return error / float(y_boft.norm()), error / max(float((y_boft - y_base).norm()), 1e-12)


def lora_report(adapted: AdaptedPipeline, factors: dict[str, dict[str, LowRank]]) -> LoraReport:
    report = approximation_report(factors)
    if "unet" in factors:
        report.output_error, report.output_error_of_effect = unet_output_errors(adapted, factors["unet"])
    return report
