"""The layouts an exported adapter is written in, as plain tensor dictionaries.

kohya key names computed from the model, LyCORIS "full" weight differences, LyCORIS BOFT
(``oft_blocks``) for output-side rotations, LoRA by truncated SVD (kohya and diffusers/PEFT
naming), textual-inversion embeddings, and how much a truncated LoRA loses. Nothing here loads
models or writes files: ``export.py`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.lycoris import lycoris_oft_blocks

#: kohya's prefix for each adapted pipeline component (SD 1.x / 2.x naming).
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
#: The same for SDXL, whose two text encoders are ``lora_te1`` and ``lora_te2``.
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
#: Flux.1's transformer and CLIP, and SD3's transformer and two CLIPs (T5 never trains).
KOHYA_PREFIXES_FLUX = {"transformer": "lora_unet", "text_encoder": "lora_te1"}
KOHYA_PREFIXES_SD3 = {**KOHYA_PREFIXES_FLUX, "text_encoder_2": "lora_te2"}


@dataclass
class Delta:
    """What an adapter changes in one module: W' - W and b' - b (None when unchanged)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class LowRank:
    """``delta ~ up @ down`` (for a convolution: ``down`` is the k x k conv, ``up`` a 1 x 1 conv)."""

    up: torch.Tensor
    down: torch.Tensor
    delta_norm: float
    residual_norm: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def relative_error(self) -> float:
        return self.residual_norm / self.delta_norm if self.delta_norm > 0 else 0.0

    def product(self) -> torch.Tensor:
        """The rank-r weight difference, in the module's weight shape."""
        flat = self.up.flatten(1) @ self.down.flatten(1)
        return flat.reshape(self.up.shape[0], *self.down.shape[1:])


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` (capped at full rank), or the smallest rank whose singular values keep ``energy``
    of the squared Frobenius norm."""
    full = singular_values.numel()
    if rank is not None:
        return min(rank, full)
    squares = singular_values.double().square()
    kept = squares.cumsum(0) / squares.sum()
    return min(int((kept < energy - 1e-12).sum()) + 1, full)


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Truncated SVD of a weight difference (float64), split evenly between the two factors."""
    flat = delta.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    if delta.dim() == 4:
        up = up.reshape(*up.shape, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    return LowRank(up.contiguous(), down.contiguous(), float(s.norm()), float(s[r:].norm()))


def diff_state_dict(deltas: dict[str, Delta]) -> dict[str, torch.Tensor]:
    """LyCORIS "full": ``<kohya key>.diff`` (and ``.diff_b``), added to the base weights by key."""
    tensors = {}
    for key, delta in deltas.items():
        if delta.weight is not None:
            tensors[f"{key}.diff"] = delta.weight.float().contiguous()
        if delta.bias is not None:
            tensors[f"{key}.diff_b"] = delta.bias.float().contiguous()
    return tensors


def kohya_lora_state_dict(factors: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """kohya LoRA: ``lora_down`` / ``lora_up`` with ``alpha`` = rank, so the scale alpha / rank is 1."""
    tensors = {}
    for key, factor in factors.items():
        tensors[f"{key}.lora_down.weight"] = factor.down
        tensors[f"{key}.lora_up.weight"] = factor.up
        tensors[f"{key}.alpha"] = torch.tensor(float(factor.rank))
    return tensors


def peft_lora_state_dict(factors: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA under ``<component>.<module path>``: with no alphas stored, diffusers
    sets alpha = rank for every module (scale 1)."""
    tensors = {}
    for name, factor in factors.items():
        tensors[f"{name}.lora_A.weight"] = factor.down
        tensors[f"{name}.lora_B.weight"] = factor.up
    return tensors


def lycoris_boft_state_dict(key: str, skew: torch.Tensor, scale: torch.Tensor | None,
                            weight_dim: int) -> dict[str, torch.Tensor]:
    """One module's LyCORIS BOFT tensors: ``oft_blocks``, ``rescale`` shaped like the weight's rows
    (``[out, 1]``, ``[out, 1, 1, 1]`` for a convolution) when a magnitude trained, and ``alpha`` 0
    (no norm cap: the only value every reader applies the same way)."""
    tensors = {f"{key}.oft_blocks": lycoris_oft_blocks(skew.float()).contiguous(),
               f"{key}.alpha": torch.tensor(0.0)}
    if scale is not None:
        tensors[f"{key}.rescale"] = scale.float().reshape(-1, *[1] * (weight_dim - 1)).contiguous()
    return tensors


def textual_inversion_state_dict(token: str, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """One token, one vector, shaped [1, width]: the layout diffusers, A1111 and ComfyUI all read."""
    return {token: vector.detach().float().reshape(1, -1).contiguous()}


# How much a LoRA loses ---------------------------------------------------------------------------
@dataclass
class LoraReport:
    """Relative Frobenius error ||dW - dW_r|| / ||dW|| per block and overall, ranks per block, and
    the error of a UNet forward on a fixed input, relative to the BOFT output and to the adapter's
    own effect on it (BOFT output minus base output)."""

    block_errors: dict[str, float]
    block_ranks: dict[str, tuple[int, int, int]]
    overall_error: float
    output_error: float | None = None
    output_error_of_effect: float | None = None


def block_of(module_name: str) -> str:
    """The module's path up to its first index ("down_blocks.1", "encoder.layers.0")."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def approximation_report(factors: dict[str, dict[str, LowRank]]) -> LoraReport:
    """Errors pooled as norms (not averaged), so a block's error weighs its modules by their change."""
    squares: dict[str, list[float]] = {}
    ranks: dict[str, list[int]] = {}
    for component, by_module in factors.items():
        for name, factor in by_module.items():
            block = f"{component} {block_of(name)}"
            total = squares.setdefault(block, [0.0, 0.0])
            total[0] += factor.residual_norm ** 2
            total[1] += factor.delta_norm ** 2
            ranks.setdefault(block, []).append(factor.rank)
    residual = sum(r for r, _ in squares.values())
    norm = sum(n for _, n in squares.values())
    return LoraReport(
        block_errors={block: (r / n) ** 0.5 if n else 0.0 for block, (r, n) in squares.items()},
        block_ranks={block: (len(rs), min(rs), max(rs)) for block, rs in ranks.items()},
        overall_error=(residual / norm) ** 0.5 if norm else 0.0,
    )


def format_report(report: LoraReport) -> str:
    lines = [f"{'block':<44} {'modules':>7} {'rank':>9} {'rel. error':>10}"]
    for block, error in report.block_errors.items():
        count, low, high = report.block_ranks[block]
        ranks = str(low) if low == high else f"{low}-{high}"
        lines.append(f"{block:<44} {count:>7} {ranks:>9} {error:>10.4f}")
    lines.append(f"overall ||dW - dW_r|| / ||dW||: {report.overall_error:.4f}")
    if report.output_error is not None:
        lines.append(f"UNet output on a fixed input: ||y_lora - y_boft|| / ||y_boft|| = {report.output_error:.2e}, "
                     f"/ ||y_boft - y_base|| = {report.output_error_of_effect:.4f}")
    return "\n".join(lines)
