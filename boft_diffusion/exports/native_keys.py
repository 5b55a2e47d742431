"""The key names ComfyUI gives the Flux.1 and SD3 transformers (Black Forest Labs' and Stability's
own checkpoint layouts, under ``diffusion_model.``), and how diffusers' modules sit inside them:
one fused ``qkv`` (Flux single blocks: ``linear1`` = q, k, v and the MLP's input) holds the
diffusers projections stacked along the output rows."""

from __future__ import annotations

import re

import torch

from .layouts import Delta

NATIVE_PREFIX = "diffusion_model."

#: diffusers block -> native block, and per module inside it: (native module, place in the fused stack).
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0), "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0),
}
_SD3_JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_out.0": ("x_block.attn.proj", 0),
    "attn.to_add_out": ("context_block.attn.proj", 0), "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1), "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", 0), "ff.net.0.proj": ("x_block.mlp.fc1", 0),
    "ff.net.2": ("x_block.mlp.fc2", 0), "ff_context.net.0.proj": ("context_block.mlp.fc1", 0),
    "ff_context.net.2": ("context_block.mlp.fc2", 0),
}
#: Per family: (diffusers block pattern, native block name, module table).
NATIVE_BLOCKS = {
    "flux": ((r"transformer_blocks\.(\d+)\.(.+)", "double_blocks", _FLUX_DOUBLE),
             (r"single_transformer_blocks\.(\d+)\.(.+)", "single_blocks", _FLUX_SINGLE)),
    "sd3": ((r"transformer_blocks\.(\d+)\.(.+)", "joint_blocks", _SD3_JOINT),),
}

#: Per family: modules outside the blocks.
NATIVE_TOP = {
    "flux": {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"},
    "sd3": {"proj_out": "final_layer.linear", "context_embedder": "context_embedder"},
}


def native_place(family: str, module: str) -> tuple[str, int]:
    """The native module (without ``diffusion_model.``) that holds diffusers ``module``, and its
    place in that module's fused stack; a module with no native counterpart is an error naming it."""
    if module in NATIVE_TOP[family]:
        return NATIVE_TOP[family][module], 0
    for pattern, block, table in NATIVE_BLOCKS[family]:
        match = re.fullmatch(pattern, module)
        if match and match.group(2) in table:
            name, index = table[match.group(2)]
            return f"{block}.{match.group(1)}.{name}", index
    raise ValueError(f"{module}: no {family} checkpoint module holds it; its diff has no ComfyUI key.")


def native_stacks(family: str, model: torch.nn.Module) -> dict[str, list[str]]:
    """Each native module of ``model`` with the diffusers modules stacked in it, in stack order."""
    stacks: dict[str, dict[int, str]] = {}
    for name, _ in model.named_modules():
        try:
            native, index = native_place(family, name)
        except ValueError:
            continue
        stacks.setdefault(native, {})[index] = name
    return {native: [members[i] for i in sorted(members)] for native, members in stacks.items()}


def native_deltas(family: str, model: torch.nn.Module, deltas: dict[str, Delta]) -> dict[str, Delta]:
    """``deltas`` of diffusers modules as deltas of the native modules holding them (keys with
    ``diffusion_model.``): the members' rows stacked in order, zeros for members the adapter left alone."""
    modules, stacks = dict(model.named_modules()), native_stacks(family, model)
    fused = {}
    for native in sorted({native_place(family, name)[0] for name in deltas}):
        members = [deltas.get(member, Delta()) for member in stacks[native]]
        shapes = [modules[member].weight.shape for member in stacks[native]]
        weight = torch.cat([d.weight if d.weight is not None else torch.zeros(shape)
                            for d, shape in zip(members, shapes, strict=True)])
        bias = None
        if any(d.bias is not None for d in members):
            bias = torch.cat([d.bias if d.bias is not None else torch.zeros(shape[0])
                              for d, shape in zip(members, shapes, strict=True)])
        fused[NATIVE_PREFIX + native] = Delta(weight.detach(), None if bias is None else bias.detach())
    return fused
