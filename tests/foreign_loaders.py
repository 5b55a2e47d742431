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
