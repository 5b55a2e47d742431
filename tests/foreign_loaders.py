"""Independent re-implementations of how ComfyUI and A1111 apply a LyCORIS BOFT file, written from
reading their loaders (ComfyUI ``comfy/weight_adapter/boft.py`` and ``comfy/lora.py``, A1111
``extensions-builtin/Lora/network_oft.py`` and ``network.py``), naively: one stage at a time, in
float32, with the explicit inverse both use. Only the formulas are theirs; the key matching is a
plain lookup by kohya name."""

import torch


def _cayley_stages(oft_blocks: torch.Tensor, cap: float) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` per block, ``Q = A - A^T`` scaled down to Frobenius norm ``cap`` (over
    the whole tensor) when it is larger and ``cap > 0``."""
    q = oft_blocks - oft_blocks.transpose(-1, -2)
    norm = torch.norm(q)
    if cap > 0 and norm > cap:
        q = q * cap / (norm + 1e-8)
    eye = torch.eye(oft_blocks.shape[-1])
    return (eye + q) @ torch.linalg.inv(eye - q)


def _butterfly_rows(weight: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
    """Stage i (from 0): rows of each 2k-chunk paired (r, r + k), k = 2^i b / 2, runs of b rows multiplied
    by the stage's blocks, then put back."""
    m, _, b, _ = stages.shape
    x = weight
    for i in range(m):
        k = 2**i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("nij,nj...->ni...", stages[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x


def comfyui_patch(weight: torch.Tensor, bias: torch.Tensor | None, tensors: dict[str, torch.Tensor],
                  strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI: alpha caps ``||Q||`` as written; at strength s each stage is ``s C + (1 - s) I`` and the
    weight moves by ``s (rescale * R W - W)``; a ``diff_b`` moves the bias by ``s diff_b``."""
    stages = _cayley_stages(tensors["oft_blocks"].float(), float(tensors.get("alpha", torch.tensor(0.0))))
    if strength != 1:
        stages = strength * stages + (1 - strength) * torch.eye(stages.shape[-1])
    rotated = _butterfly_rows(weight.float(), stages)
    if "rescale" in tensors:
        rotated = rotated * tensors["rescale"].float()
    patched = weight + strength * (rotated - weight)
    if bias is not None and "diff_b" in tensors:
        bias = bias + strength * tensors["diff_b"]
    return patched, bias


def a1111_patch(weight: torch.Tensor, tensors: dict[str, torch.Tensor], multiplier: float = 1.0) -> torch.Tensor:
    """A1111: alpha times the output dimension caps ``||Q||``; the stages are used as they are and the
    weight moves by ``multiplier (rescale * R W - W)``; its OFT module reads no bias."""
    out = weight.shape[0]
    stages = _cayley_stages(tensors["oft_blocks"].float(), float(tensors.get("alpha", torch.tensor(0.0))) * out)
    rotated = _butterfly_rows(weight.float(), stages)
    if "rescale" in tensors:
        rotated = rotated * tensors["rescale"].float().reshape(out, *[1] * (weight.dim() - 1))
    return weight + multiplier * (rotated - weight)


# ComfyUI's Flux.1 / SD3 "diff" patches (comfy/utils.py flux_to_diffusers, comfy/lora.py, re-implemented)
KeyMap = dict[str, tuple[str, tuple | None]]


def _map_qkv(keys: KeyMap, src: str, dst: str, names: tuple[str, ...], hidden: int) -> None:
    """Weight and bias of each of ``names`` as a ``hidden``-row slice of the fused ``dst``, in order."""
    for end in ("weight", "bias"):
        for n, name in enumerate(names):
            keys[f"{src}.{name}.{end}"] = (f"{dst}.{end}", (0, n * hidden, hidden))


def _map_plain(keys: KeyMap, src: str, dst: str, table: dict[str, str]) -> None:
    """Weight and bias of each diffusers module of ``table`` under its ComfyUI name, whole."""
    for name, native in table.items():
        for end in ("weight", "bias"):
            keys[f"{src}{name}.{end}"] = (f"{dst}{native}.{end}", None)


def comfyui_flux_key_map(depth: int, single_depth: int, hidden: int) -> KeyMap:
    """diffusers weight key -> (ComfyUI model key, (dim, start, length) inside it, or None), for the
    block modules an adapter can touch, as ``flux_to_diffusers`` maps them with prefix ``diffusion_model.``."""
    keys: KeyMap = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        _map_qkv(keys, f"{src}.attn", f"{dst}.img_attn.qkv", ("to_q", "to_k", "to_v"), hidden)
        _map_qkv(keys, f"{src}.attn", f"{dst}.txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"), hidden)
        _map_plain(keys, f"{src}.", f"{dst}.", {
            "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"})
    for i in range(single_depth):
        src, dst = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        _map_qkv(keys, src, f"{dst}.linear1", ("attn.to_q", "attn.to_k", "attn.to_v"), hidden)
        for end in ("weight", "bias"):
            keys[f"{src}.proj_mlp.{end}"] = (f"{dst}.linear1.{end}", (0, 3 * hidden, 4 * hidden))
        _map_plain(keys, f"{src}.", f"{dst}.", {"proj_out": "linear2"})
    _map_plain(keys, "", "diffusion_model.",
               {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"})
    return keys


def comfyui_sd3_key_map(depth: int, hidden: int) -> KeyMap:
    """The same for SD3's joint blocks (``mmdit_to_diffusers``: x_block and context_block)."""
    keys: KeyMap = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        _map_qkv(keys, f"{src}.attn", f"{dst}.x_block.attn.qkv", ("to_q", "to_k", "to_v"), hidden)
        _map_qkv(keys, f"{src}.attn", f"{dst}.context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"),
                 hidden)
        _map_plain(keys, f"{src}.", f"{dst}.", {
            "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
            "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
            "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"})
    _map_plain(keys, "", "diffusion_model.", {"proj_out": "final_layer.linear", "context_embedder": "context_embedder"})
    return keys


def to_comfyui_layout(state_dict: dict[str, torch.Tensor], key_map: dict) -> dict[str, torch.Tensor]:
    """A diffusers state dict in ComfyUI's layout (slices written into the fused tensors, as
    ``convert_diffusers_mmdit`` does); keys the map does not name are left out."""
    native: dict[str, torch.Tensor] = {}
    for key, (target, offset) in key_map.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if offset is None:
            native[target] = value.clone()
            continue
        dim, start, length = offset
        fused = native.get(target)
        if fused is None or fused.shape[dim] < start + length:
            shape = list(value.shape)
            shape[dim] = start + length
            grown = torch.zeros(shape, dtype=value.dtype)
            if fused is not None:
                grown.narrow(dim, 0, fused.shape[dim]).copy_(fused)
            fused = grown
        fused.narrow(dim, start, length).copy_(value)
        native[target] = fused
    return native


def comfyui_apply_diffs(native: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                        strength: float = 1.0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's ``diff`` / ``diff_b`` patches: ``<key>.diff`` is added to ``<key>.weight`` and
    ``<key>.diff_b`` to ``<key>.bias`` when the shapes agree; keys it cannot place are returned
    (ComfyUI logs them as "lora key not loaded")."""
    patched, skipped = dict(native), []
    for key, value in tensors.items():
        base, _, kind = key.rpartition(".")
        target = f"{base}.weight" if kind == "diff" else f"{base}.bias" if kind == "diff_b" else None
        if target is None or target not in patched or patched[target].shape != value.shape:
            skipped.append(key)
            continue
        patched[target] = patched[target] + strength * value
    return patched, skipped
