"""Frozen Linear weights stored quantised and dequantised on every use (BOFT on a quantised base,
PEFT's QOFT).

Why: a personalisation run trains rotations only, yet holds the whole base model; its frozen
Linear weights can be stored in one byte (int8, fp8) or half a byte (nf4) per value while the
adapter trains in float32. ``QuantizedLinear.weight`` is the dequantised weight, so every
forward, rotation and fold of an adapter sees exactly the dequantised model: the adapter is exact
for it, and off from the original base only by the quantisation error. Plain torch, so it runs on
the CPU as on a GPU (no bitsandbytes); it saves memory, not time (each use dequantises).

- int8: per output row, symmetric: ``W ~ q * absmax(row) / 127``, q in [-127, 127].
- fp8: per output row, ``W ~ float(q) * absmax(row) / 448``, q a ``float8_e4m3fn`` (stored as
  its bytes, so casting the module to another dtype leaves it alone).
- nf4: QLoRA's 4-bit NormalFloat codebook over blocks of 64 consecutive values, each scaled by
  its absmax; two codes per byte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import set_submodule

#: --base_quantization choices; "none" keeps the float weights.
QUANTIZATIONS = ("none", "int8", "nf4", "fp8")

#: Values per nf4 scale (QLoRA's block size).
NF4_BLOCK = 64
_NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _row_absmax(weight: torch.Tensor, top: float) -> torch.Tensor:
    """Per-row scale mapping the row's largest magnitude onto ``top`` (1 for an all-zero row)."""
    absmax = weight.float().abs().amax(dim=1)
    return torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))


def _quantize(method: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale)`` of a 2-D weight; the scale keeps the weight's dtype, which is the
    dequantised dtype (a module cast moves it, and with it the dequantised weight)."""
    if method == "int8":
        scale = _row_absmax(weight, 127.0)
        data = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    elif method == "fp8":
        scale = _row_absmax(weight, _FP8_MAX)
        data = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
    elif method == "nf4":
        flat = weight.float().reshape(-1)
        flat = F.pad(flat, (0, (-flat.numel()) % NF4_BLOCK)).view(-1, NF4_BLOCK)
        absmax = flat.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = torch.tensor(_NF4_CODES)
        middles = (codes[1:] + codes[:-1]) / 2
        index = torch.bucketize(flat / scale[:, None], middles.to(flat.device)).to(torch.uint8).view(-1)
        index = F.pad(index, (0, index.numel() % 2))
        data = (index[0::2] << 4) | index[1::2]
    else:
        raise ValueError(f"unknown quantisation {method!r}; choose one of {QUANTIZATIONS[1:]}.")
    return data, scale.to(weight.dtype)


def dequantize(method: str, data: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The weight ``shape`` in ``scale.dtype`` from what :func:`_quantize` stored."""
    if method == "int8":
        return data.to(scale.dtype) * scale[:, None]
    if method == "fp8":
        return data.view(torch.float8_e4m3fn).to(scale.dtype) * scale[:, None]
    codes = torch.tensor(_NF4_CODES, dtype=scale.dtype, device=data.device)
    index = torch.stack((data >> 4, data & 15), dim=1).view(-1).long()
    numel = shape[0] * shape[1]
    values = codes[index[: scale.numel() * NF4_BLOCK]].view(-1, NF4_BLOCK) * scale[:, None]
    return values.view(-1)[:numel].view(shape)


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored quantised; ``weight`` is the dequantised one.

    A subclass of ``nn.Linear`` so that adapters wrap it as they wrap any Linear; the state dict
    holds ``weight_data`` and ``weight_scale`` instead of ``weight`` (the bias is kept as it was,
    trainable or not).
    """

    def __init__(self, linear: nn.Linear, method: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method = method
        data, scale = _quantize(method, linear.weight.detach())
        self.register_buffer("weight_data", data)
        self.register_buffer("weight_scale", scale)
        self.register_parameter("bias", linear.bias)
        self.train(linear.training)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self.method, self.weight_data, self.weight_scale, (self.out_features, self.in_features))

    def storage_key(self) -> tuple:
        """What the dequantised weight depends on (it is a new tensor at every access)."""
        data, scale = self.weight_data, self.weight_scale
        return data._version, data.data_ptr(), scale._version, scale.data_ptr(), scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantization={self.method}"


def quantize_linears(model: nn.Module, method: str) -> int:
    """Store every ``nn.Linear`` of ``model`` (wrapped by an adapter or not) as a
    :class:`QuantizedLinear`; returns how many. Call it on a frozen model before training: the
    weights no longer take gradients (biases keep theirs). ``"none"`` changes nothing."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantisation {method!r}; choose one of {QUANTIZATIONS}.")
    if method == "none":
        return 0
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and not module.weight.requires_grad]
    for name in targets:
        set_submodule(model, name, QuantizedLinear(model.get_submodule(name), method))
    return len(targets)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


def refuse_quantized(model: nn.Module, action: str) -> None:
    """Refuse ``action`` (a merge, a plain state dict) on a model with a quantised base: a merged
    weight would have to go back onto the quantisation grid, losing the adapter's precision, and a
    plain state dict has no ``weight`` for those layers."""
    found = quantized_layers(model)
    if found:
        name, layer = found[0]
        raise ValueError(
            f"cannot {action}: {len(found)} Linear layers (e.g. {name}) store their base weight quantised "
            f"({layer.method}). Load the adapter on the unquantised base model to merge or export it (the "
            "adapter file fits it), or call boft_diffusion.dequantize_linears(model) first to merge against "
            "the dequantised weights."
        )


def dequantize_linears(model: nn.Module) -> int:
    """Turn every :class:`QuantizedLinear` of ``model`` back into a plain ``nn.Linear`` holding its
    dequantised weight (what the adapter was trained against); returns how many."""
    found = quantized_layers(model)
    for name, layer in found:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight_scale.device, dtype=layer.weight_scale.dtype)
        with torch.no_grad():
            plain.weight.copy_(layer.weight)
        plain.weight.requires_grad_(False)
        plain.bias = layer.bias
        plain.train(layer.training)
        set_submodule(model, name, plain)
    return len(found)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (shared tensors once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
