"""The LyCORIS layout of BOFT, which ComfyUI, A1111 and LyCORIS read: conversions both ways.

LyCORIS rotates a weight's rows: factor i regroups the rows of each chunk of 2k = 2^i b as pairs
(r, r + k) and multiplies consecutive runs of b of them by (I + Q)(I - Q)^-1 with Q = A - A^T.
Our factor i couples the same rows in blocks of another order and in-block order, with
(I - S)(I + S)^-1: each block converts exactly by a permutation and Q = -S. Keys are kohya's
module names (``lora_unet_down_blocks_0_..._to_q``), or ``lycoris_`` plus the module path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from .butterfly import butterfly_permutation


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def _kohya_owners(prefix: str, all_module_names: Iterable[str]) -> dict[str, list[str]]:
    """Kohya name -> the module names that map to it (more than one where "." -> "_" collides)."""
    owners: dict[str, list[str]] = defaultdict(list)
    for name in dict.fromkeys(all_module_names):
        owners[kohya_name(prefix, name)].append(name)
    return owners


def kohya_names(prefix: str, module_names: Iterable[str], all_module_names: Iterable[str]) -> dict[str, str]:
    """Module name -> kohya name for ``module_names``, refusing any name two modules would share.

    Replacing "." by "_" cannot be undone from the string alone ("to_out.0" has both), so the
    inverse exists only against the model's own module list: each exported name must belong to
    exactly one module of ``all_module_names``, which makes the mapping a bijection.
    """
    owners = _kohya_owners(prefix, all_module_names)
    names = {}
    for name in module_names:
        key = kohya_name(prefix, name)
        if owners.get(key) != [name]:
            raise ValueError(f"kohya key {key!r} does not name module {name!r} alone: it is shared by "
                             f"{owners.get(key) or 'no module of the model'}.")
        names[name] = key
    return names


def module_names_by_kohya(prefix: str, all_module_names: Iterable[str]) -> dict[str, str]:
    """Kohya name -> module name over every module whose kohya name is unambiguous."""
    owners = _kohya_owners(prefix, all_module_names)
    return {key: names[0] for key, names in owners.items() if len(names) == 1}


def lycoris_block_rows(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """``[N, b]``: the rows each of LyCORIS's blocks of factor ``factor`` acts on, in its order."""
    half = 2**factor * block_size // 2
    return torch.arange(dim).view(-1, 2, half).transpose(1, 2).reshape(-1, block_size)


def our_block_rows(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """``[N, b]``: the features each of our blocks of factor ``factor`` acts on, in its order
    (block ``n`` acts on ``P^T x``'s entries ``n b .. n b + b - 1``, which are ``x[inverse(perm)]``)."""
    return torch.argsort(butterfly_permutation(dim, block_size, factor)).reshape(-1, block_size)


def _block_correspondence(dim: int, block_size: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each LyCORIS block: our block on the same rows, and each of its rows' place in ours."""
    ours = our_block_rows(dim, block_size, factor).reshape(-1)
    place = torch.empty_like(ours)
    place[ours] = torch.arange(dim)
    lycoris = place[lycoris_block_rows(dim, block_size, factor)]  # [N, b] places in our order
    blocks, offsets = lycoris // block_size, lycoris % block_size
    if not (blocks == blocks[:, :1]).all():
        raise ValueError(f"factor {factor}: LyCORIS's and our butterfly couple different rows ({dim}, b={block_size}).")
    return blocks[:, 0], offsets


def lycoris_oft_blocks(skew: torch.Tensor) -> torch.Tensor:
    """``oft_blocks`` ``[m, N, b, b]`` whose LyCORIS rotation is our rotation with skew blocks
    ``skew`` ``[m, N, b, b]``: each block moved to LyCORIS's order, stored as ``A = -S'/2`` so that
    ``A - A^T = -S'`` (a skew-symmetric tensor, as LyCORIS's own training keeps it)."""
    m, count, block_size, _ = skew.shape
    out = torch.empty_like(skew)
    for factor in range(m):
        blocks, offsets = _block_correspondence(count * block_size, block_size, factor)
        moved = skew[factor][blocks[:, None, None], offsets[:, :, None], offsets[:, None, :]]
        out[factor] = -0.5 * moved
    return out


def skew_from_lycoris(oft_blocks: torch.Tensor) -> torch.Tensor:
    """Our skew blocks ``[m, N, b, b]`` of the rotation a LyCORIS ``oft_blocks`` tensor stores (the
    inverse of :func:`lycoris_oft_blocks`; ``A`` need not be skew: only ``A - A^T`` counts)."""
    m, count, block_size, _ = oft_blocks.shape
    skew = torch.empty_like(oft_blocks)
    for factor in range(m):
        blocks, offsets = _block_correspondence(count * block_size, block_size, factor)
        q = oft_blocks[factor] - oft_blocks[factor].transpose(-1, -2)
        skew[factor][blocks[:, None, None], offsets[:, :, None], offsets[:, None, :]] = -q
    return skew


def check_oft_blocks(key: str, blocks: torch.Tensor, out_dim: int) -> None:
    """Refuse an ``oft_blocks`` tensor that is no butterfly over ``out_dim`` rows, naming its key."""
    shape = list(blocks.shape)
    if blocks.dim() != 4:
        raise ValueError(f"{key}.oft_blocks has shape {shape}: a 3-D tensor is diagonal OFT, which this reads only "
                         "as BOFT ([m, N, b, b]).")
    m, count, size, other = shape
    if size != other or size % 2 or count * size != out_dim or out_dim % (size * 2 ** (m - 1)) or m < 1:
        raise ValueError(f"{key}.oft_blocks has shape {shape}, no butterfly of even {size} x {size} blocks over the "
                         f"module's {out_dim} outputs; the file was made for another model or is damaged.")
    if not torch.isfinite(blocks).all():
        raise ValueError(f"{key}.oft_blocks holds NaN or infinite values.")


def capped_lycoris_blocks(oft_blocks: torch.Tensor, alpha: float, out_dim: int) -> torch.Tensor:
    """``oft_blocks`` with LyCORIS's norm cap applied (``alpha * out_dim`` on the Frobenius norm of
    ``A - A^T`` over the whole tensor), as LyCORIS and A1111 apply ``alpha``; 0 leaves them as they are."""
    limit = alpha * out_dim
    norm = (oft_blocks - oft_blocks.transpose(-1, -2)).norm() + 1e-8
    if limit <= 0 or norm <= limit:
        return oft_blocks
    return oft_blocks * (limit / norm)


#: Key prefixes of LyCORIS files: kohya's per component, and LyCORIS's own for a single model.
PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2", "lycoris")
#: The prefixes that name each component of a pipeline.
COMPONENT_PREFIXES = {"unet": ("lora_unet", "lycoris"), "text_encoder": ("lora_te", "lora_te1"),
                      "text_encoder_2": ("lora_te2",)}
#: What PEFT puts before a module path in an adapter file's keys.
PEFT_PREFIX = "base_model.model."


def checkpoint_prefix(model: torch.nn.Module) -> str:
    """What the model's module paths lack against the original checkpoints that kohya, A1111 and
    ComfyUI name keys after: transformers >= 5 flattens CLIPTextModel (no ``text_model`` child)
    and strips ``text_model.`` from the checkpoints it loads."""
    if type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model"):
        return "text_model."
    return ""


def lycoris_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by key prefix (``<prefix>.oft_blocks`` -> ``{prefix: {"oft_blocks": ...}}``)."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        prefix, _, kind = key.partition(".")
        modules[prefix][kind] = tensor
    return dict(modules)


def modules_named_by(model: torch.nn.Module, keys: Iterable[str], prefixes: Iterable[str] = PREFIXES) -> dict[str, str]:
    """Key prefix -> module name, for the keys that name a module of ``model`` unambiguously under
    one of ``prefixes``."""
    path = checkpoint_prefix(model)
    names = [name for name, _ in model.named_modules() if name]
    table: dict[str, str] = {}
    for prefix in prefixes:
        table.update({key: name[len(path):] for key, name in
                      module_names_by_kohya(prefix, (path + n for n in names)).items()})
    return {key: table[key] for key in keys if key in table}


def peft_layout(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                prefixes: Iterable[str] = PREFIXES) -> tuple[dict[str, torch.Tensor], dict]:
    """The LyCORIS BOFT tensors of ``tensors`` that name modules of ``model``, in our (PEFT) layout
    as output-side rotations, with the config fields they imply; ``({}, {})`` when none does.

    ``alpha`` is applied as LyCORIS and A1111 apply it (a norm cap of ``alpha * out_dim``);
    ``diff_b`` becomes the trained bias (base bias plus difference). A 3-D ``oft_blocks`` is
    diagonal OFT, which is refused."""
    groups = lycoris_modules(tensors)
    named = modules_named_by(model, groups, prefixes)
    peft: dict[str, torch.Tensor] = {}
    adapted, shifted = [], []
    for key, name in named.items():
        parts, module = groups[key], model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        if "oft_blocks" in parts:
            blocks = parts["oft_blocks"].float()
            check_oft_blocks(key, blocks, base.weight.shape[0])
            alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
            peft[f"{PEFT_PREFIX}{name}.boft_R"] = skew_from_lycoris(capped_lycoris_blocks(blocks, alpha, blocks.shape[1] * blocks.shape[2]))
            if "rescale" in parts:
                peft[f"{PEFT_PREFIX}{name}.boft_s"] = parts["rescale"].float().reshape(-1)
            adapted.append(name)
        if "diff_b" in parts:
            if getattr(base, "bias", None) is None:
                raise ValueError(f"{key}.diff_b: module {name!r} has no bias.")
            suffix = "base_layer.bias" if "oft_blocks" in parts else "bias"
            peft[f"{PEFT_PREFIX}{name}.{suffix}"] = base.bias.detach().float().cpu() + parts["diff_b"].float()
            shifted.append(name)
    if not adapted:
        return {}, {}
    rotations = [peft[f"{PEFT_PREFIX}{name}.boft_R"] for name in adapted]
    full = all(r.shape[1].bit_count() == 1 and r.shape[0] == r.shape[1].bit_length() for r in rotations)
    bias = "all" if set(shifted) - set(adapted) else ("boft_only" if shifted else "none")
    return peft, {"block_size": rotations[0].shape[-1], "n_butterfly_factor": max(r.shape[0] for r in rotations),
                  "full_butterfly": full, "target_modules": sorted(adapted), "side": "output", "bias": bias,
                  "scale": any(f"{PEFT_PREFIX}{name}.boft_s" in peft for name in adapted)}
