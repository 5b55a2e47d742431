"""nn.Module wrappers that put named butterfly-orthogonal adapters on a frozen layer.

Training rotates the activations (``x @ R``) whenever that is exact without unfolding
(Linear, 1x1 Conv2d), so autograd never computes a gradient for the frozen weight (on CPUs, where
arithmetic bounds a step, that gradient's product costs more than the rotation). Other
convolutions rotate the flattened ``(in_channels, kh, kw)`` axis of the weight instead.
Inference without gradients folds ``diag(s) W R^T`` once into a cached weight, so an unmerged
adapter costs what the base layer costs.

A model's layers do not build their blocks one by one: a ``RotationBank`` run before the
model's forward solves the Cayley systems of all of them together and lends each layer its
slice (or its folded inference weight) for that forward only. A layer called on its own builds
what it needs itself, with the same numbers. Where kernel launches rather than arithmetic bound
a training step (GPUs), the bank instead folds the rotations into the Linear layers' weights,
all layers of a shape in one batched product per factor, and lends each layer its folded
weight: the layer then runs one ``F.linear``, and autograd reaches the adapter through the fold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .butterfly import (
    BlockGeometry,
    butterfly_matmul,
    cayley_blocks,
    drop_blocks,
    join_skew_params,
    num_skew_params,
    params_from_skew,
    rotate_features_first,
    skew_from_params,
    split_blocks,
    upcast,
)
from .config import SIDES
from .quantize import QuantizedLinear

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = ()

#: How training applies a Linear layer's rotation; see ``RotationBank``.
TrainingFold = Literal["auto", "fold", "rotate"]

ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_PATTERN.match(name):
        raise ValueError(f"invalid adapter name {name!r}: start with a letter or '_', then letters, digits, '_' or '-'.")


def rotated_dim(layer: nn.Module, side: str = "input") -> int:
    """Length of the axis R acts on: in_features (in_channels/groups * kh * kw) for the input
    side, out_features (out_channels) for the output side."""
    return layer.weight[0].numel() if side == "input" else layer.weight.shape[0]


def _memory_format(weight: torch.Tensor) -> torch.memory_format:
    """Keep a folded weight in its base weight's layout, so both take the same kernels (and sums)."""
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@dataclass
class AdapterSpec:
    """Per-adapter settings that are not trainable parameters."""

    geometry: BlockGeometry
    dropout: float = 0.0
    neumann_terms: int = 0
    strength: float = 1.0
    side: str = "input"


class RotationGroup(NamedTuple):
    """Settings under which layers' blocks can be built by one Cayley solve."""

    block_size: int
    neumann_terms: int
    strength: float
    dropout: float
    dtype: torch.dtype
    device: torch.device


class BOFTLayer(nn.Module):
    """Common logic of the Linear and Conv2d wrappers: adapters, strength, folding, merging."""

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.boft_skew = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self.merged: tuple[str, float] | None = None
        self._folded: torch.Tensor | None = None
        self._folded_key: tuple | None = None
        # What a RotationBank lends this layer for the duration of one model forward.
        self.lent_blocks: torch.Tensor | None = None
        self.lent_weight: torch.Tensor | None = None
        # ... or, in training, its differentiable folded weight ``diag(s) W R^T`` (Linear only).
        self.lent_train_weight: torch.Tensor | None = None
        # A new module starts in training mode; take the wrapped layer's mode instead, so that an
        # adapter loaded into an eval-mode pipeline does not apply its training-time block dropout.
        self.train(base_layer.training)

    # Geometry of the wrapped layer -----------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def rotated_dim(self) -> int:
        return rotated_dim(self.base_layer)

    def rotates_output(self, name: str) -> bool:
        return self.specs[name].side == "output"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    # Adapter bookkeeping ---------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        geometry: BlockGeometry,
        dropout: float = 0.0,
        neumann_terms: int = 0,
        scale: bool = True,
        side: str = "input",
    ) -> None:
        check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f"{self.module_name}: adapter {name!r} already exists.")
        if side not in SIDES:
            raise ValueError(f"{self.module_name}: side must be one of {SIDES}, got {side!r}.")
        if side == "output" and getattr(self.base_layer, "groups", 1) != 1:
            raise ValueError(f"{self.module_name}: an output-side rotation would mix the groups of a grouped "
                             "convolution; adapt its input side.")
        dim = rotated_dim(self.base_layer, side)
        if geometry.block_size * geometry.block_num != dim:
            raise ValueError(
                f"{self.module_name}: blocks {geometry.block_num} x {geometry.block_size} do not cover "
                f"its {side} dimension {dim}."
            )
        device = self.weight.device
        self.boft_skew[name] = nn.Parameter(
            torch.zeros(
                geometry.n_factors,
                geometry.block_num,
                num_skew_params(geometry.block_size),
                device=device,
            )
        )
        if scale:
            self.boft_s[name] = nn.Parameter(torch.ones(self.out_features, device=device))
        self.specs[name] = AdapterSpec(geometry, dropout, neumann_terms, side=side)

    def delete_adapter(self, name: str) -> None:
        if self.merged and self.merged[0] == name:
            self.unmerge()
        del self.boft_skew[name]
        if name in self.boft_s:
            del self.boft_s[name]
        del self.specs[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._forget_fold()

    def load_peft_tensors(self, name: str, boft_r: torch.Tensor, boft_s: torch.Tensor | None) -> None:
        """Copy PEFT-layout tensors (``boft_R [m, N, b, b]``, ``boft_s``) into adapter ``name``."""
        with torch.no_grad():
            self.boft_skew[name].copy_(params_from_skew(boft_r.float()))
            if boft_s is not None and name in self.boft_s:
                self.boft_s[name].copy_(boft_s.float().reshape(-1))

    def peft_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name`` in PEFT's layout: full skew ``boft_R`` and shaped ``boft_s``."""
        spec = self.specs[name]
        skew = skew_from_params(self.boft_skew[name].detach().float(), spec.geometry.block_size)
        s = self.boft_s[name].detach().float() if name in self.boft_s else torch.ones(self.out_features)
        return skew.contiguous(), self._peft_s_shape(s.cpu())

    def _peft_s_shape(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(-1, 1).contiguous()

    # Rotation and magnitude --------------------------------------------------------------------
    def rotation_blocks(self, name: str, apply_dropout: bool = False) -> torch.Tensor:
        """Orthogonal blocks ``[m, N, b, b]`` (float32) of adapter ``name`` at its strength."""
        spec = self.specs[name]
        blocks = cayley_blocks(self.boft_skew[name], spec.geometry.block_size, spec.strength, spec.neumann_terms)
        if apply_dropout:
            blocks = drop_blocks(blocks, spec.dropout)
        return blocks

    def rotation_group(self, name: str) -> RotationGroup:
        """How a forward now builds adapter ``name``'s blocks; layers of equal groups share one solve."""
        spec = self.specs[name]
        param = self.boft_skew[name]
        dropout = spec.dropout if self.training else 0.0
        return RotationGroup(spec.geometry.block_size, spec.neumann_terms, spec.strength, dropout, param.dtype, param.device)

    def magnitude(self, name: str) -> torch.Tensor | None:
        """Per-output magnitude ``s**strength`` (None when the adapter has none, or strength is 0)."""
        if name not in self.boft_s:
            return None
        s = self.boft_s[name]
        strength = self.specs[name].strength
        if strength == 1.0:
            return s
        if strength == 0.0:
            return None
        return s.sign() * s.abs().pow(strength)

    def folded_weight(self, name: str, apply_dropout: bool = False, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``diag(s) W R^T`` (input side) or ``diag(s) R W`` (output side) computed in float32
        (differentiable), cast to the weight's dtype.

        ``blocks``: adapter ``name``'s rotation blocks when already built (by a RotationBank).
        """
        weight = self.weight
        if blocks is None:
            blocks = self.rotation_blocks(name, apply_dropout)
        if self.rotates_output(name):
            flat = butterfly_matmul(upcast(weight).flatten(1).t(), blocks, transpose=True).t()
        else:
            flat = butterfly_matmul(upcast(weight).flatten(1), blocks, transpose=True)
        s = self.magnitude(name)
        if s is not None:
            flat = flat * upcast(s)[:, None]
        return flat.reshape(weight.shape).to(weight.dtype).contiguous(memory_format=_memory_format(weight))

    def fold_key(self, name: str) -> tuple:
        """Everything the folded weight of adapter ``name`` depends on.

        In-place changes through a tensor (``param.add_``, an optimiser step, ``copy_`` under
        ``no_grad``) move its version counter; replacing or moving it changes its storage. Writes
        through ``param.data`` bypass the version counter and are not seen.
        """
        spec = self.specs[name]
        skew = self.boft_skew[name]
        s = self.boft_s[name] if name in self.boft_s else None
        return (
            name, spec.strength, spec.neumann_terms,
            skew._version, skew.data_ptr(),
            None if s is None else (s._version, s.data_ptr()),
            self._weight_key(),
        )

    def _weight_key(self) -> tuple:
        """What the base weight's values depend on; a quantised base dequantises into a new tensor
        at every access, so its stored tensors stand for it."""
        if isinstance(self.base_layer, QuantizedLinear):
            return self.base_layer.storage_key()
        weight = self.weight
        return weight._version, weight.data_ptr(), weight.dtype

    def current_fold(self, name: str) -> torch.Tensor | None:
        """The cached folded weight of adapter ``name`` if nothing it depends on changed since."""
        if self._folded is not None and self._folded_key == self.fold_key(name):
            return self._folded
        return None

    def refresh_fold(self, name: str, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute and cache the folded inference weight (``blocks``: already built, undropped)."""
        key = self.fold_key(name)
        with torch.no_grad():
            self._folded = self.folded_weight(name, blocks=blocks)
        self._folded_key = key
        return self._folded

    def _inference_weight(self, name: str) -> torch.Tensor:
        """The folded weight for a forward without gradients: lent by the bank, cached, or refreshed."""
        if self.lent_weight is not None:
            return self.lent_weight
        if torch.compiler.is_compiling():
            return self.folded_weight(name)  # no cache check can run inside a graph: fold in it
        folded = self.current_fold(name)
        return folded if folded is not None else self.refresh_fold(name)

    def _training_blocks(self, name: str) -> torch.Tensor:
        """Blocks for a forward that rotates: lent by the bank, or built here."""
        if self.lent_blocks is not None:
            return self.lent_blocks
        return self.rotation_blocks(name, apply_dropout=self.training)

    def _forget_fold(self) -> None:
        self._folded = None
        self._folded_key = None

    def live_adapter(self) -> str | None:
        """The adapter a forward must apply on top of the (possibly merged) base weight."""
        if self.adapters_disabled or self.merged is not None:
            return None
        return self.active_adapter

    # Merging -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the active adapter into the base weight; the forward then costs the base layer."""
        name = self.active_adapter
        if name is None or self.merged is not None:
            return
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValueError(f"{self.module_name}: its base weight is stored quantised ({self.base_layer.method}); "
                             "the merged weight would be rounded back onto the quantisation grid. Merge on the "
                             "unquantised base, or boft_diffusion.dequantize_linears(model) first.")
        with torch.no_grad():
            merged = self.folded_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"{self.module_name}: merging adapter {name!r} gives non-finite weights; "
                    "the base weights were left unchanged."
                )
            self.weight.copy_(merged)
        self.merged = (name, self.specs[name].strength)
        self._forget_fold()

    def unmerge(self) -> None:
        """Undo ``merge`` with ``W = diag(1/s) W' R`` (input side) or ``W = R^T diag(1/s) W'``
        (output side): R is orthogonal, so no inverse is needed."""
        if self.merged is None:
            return
        name, merged_strength = self.merged
        spec = self.specs[name]
        current_strength, spec.strength = spec.strength, merged_strength
        try:
            with torch.no_grad():
                weight = self.weight
                flat = upcast(weight).flatten(1)
                s = self.magnitude(name)
                if s is not None:
                    flat = flat / upcast(s)[:, None]
                if self.rotates_output(name):
                    flat = butterfly_matmul(flat.t(), self.rotation_blocks(name)).t()
                else:
                    flat = butterfly_matmul(flat, self.rotation_blocks(name))
                weight.copy_(flat.reshape(weight.shape))
        finally:
            spec.strength = current_strength
        self.merged = None
        self._forget_fold()

    def train(self, mode: bool = True) -> BOFTLayer:
        """Entering training drops the folded inference weight: it is stale after the next step anyway."""
        if mode:
            self._forget_fold()
        return super().train(mode)

    def uses_folded_weight(self, name: str) -> bool:
        """Whether a forward now runs the folded weight (no gradients, no block dropout)."""
        dropout_active = self.training and self.specs[name].dropout > 0
        return not torch.is_grad_enabled() and not dropout_active

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(b={s.geometry.block_size}, N={s.geometry.block_num}, m={s.geometry.n_factors}, {s.side} side)"
            for n, s in self.specs.items()
        )
        return f"adapters=[{adapters}], active={self.active_adapter!r}, merged={self.merged is not None}"


def _apply_magnitude(y: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """Turn ``y = W x + b`` into ``s * W x + b`` as ``y + (s - 1)(y - b)``.

    Written this way so that ``s == 1`` returns ``y`` bit for bit: the base layer keeps its own
    fused bias kernel and a fresh adapter is exactly the base model on every backend.
    """
    if s is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    pre_bias = y if bias is None else y - bias.to(y.dtype).view(shape)
    return torch.addcmul(y, (s.float() - 1).to(y.dtype).view(shape), pre_bias)


def _rotated_output(y: torch.Tensor, blocks: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor | None,
                    channel_dim: int) -> torch.Tensor:
    """``s * (R y) + b`` for the bias-free output ``y`` of a layer, rotated along ``channel_dim``."""
    if channel_dim == 1:
        rotated = rotate_features_first(y.flatten(2), blocks, transpose=True).reshape(y.shape)
    else:
        rotated = butterfly_matmul(y, blocks, transpose=True)
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    if s is not None:
        rotated = rotated * s.to(y.dtype).view(shape)
    return rotated if bias is None else rotated + bias.to(y.dtype).view(shape)


class BOFTLinear(BOFTLayer):
    """nn.Linear with butterfly-orthogonal adapters: ``y = s * (W (R^T x)) + b`` (input side) or
    ``y = s * (R (W x)) + b`` (output side)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.live_adapter()
        if name is None:
            return self.base_layer(x)
        if self.uses_folded_weight(name):
            return F.linear(x, self._inference_weight(name), self.bias)
        if self.lent_train_weight is not None:
            return F.linear(x, self.lent_train_weight, self.bias)
        if self.rotates_output(name):
            return _rotated_output(F.linear(x, self.weight), self._training_blocks(name), self.magnitude(name),
                                   self.bias, channel_dim=-1)
        rotated = butterfly_matmul(x, self._training_blocks(name))
        y = F.linear(rotated, self.weight, self.bias)
        return _apply_magnitude(y, self.magnitude(name), self.bias, channel_dim=-1)


class BOFTConv2d(BOFTLayer):
    """nn.Conv2d with butterfly-orthogonal adapters on the flattened (in_channels, kh, kw) axis.

    1x1 convolutions rotate the input channels (exact and cheapest); larger kernels rotate the
    weight, which costs one small product per step instead of unfolding the input.
    """

    def _peft_s_shape(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(1, -1).contiguous()

    @property
    def rotates_input(self) -> bool:
        conv = self.base_layer
        return conv.kernel_size == (1, 1) and conv.groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.live_adapter()
        conv = self.base_layer
        if name is None:
            return conv(x)
        if self.uses_folded_weight(name):
            return conv._conv_forward(x, self._inference_weight(name), self.bias)
        blocks = self._training_blocks(name)
        if self.rotates_output(name):
            return _rotated_output(conv._conv_forward(x, self.weight, None), blocks, self.magnitude(name), self.bias,
                                   channel_dim=1)
        if self.rotates_input:
            rotated = rotate_features_first(x.flatten(2), blocks).reshape(x.shape)
            y = conv._conv_forward(rotated, self.weight, self.bias)
            return _apply_magnitude(y, self.magnitude(name), self.bias, channel_dim=1)
        return conv._conv_forward(x, self.folded_weight(name, blocks=blocks), self.bias)


def _channel_first(module: nn.Module) -> bool:
    """Whether the module's bias acts on dimension 1 of its output (convolutions, group and batch norms)."""
    base = module.base_layer if isinstance(module, BOFTLayer) else module
    return isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))


#: Modules whose output is ``f(x) + bias``, so a trained bias can be applied as a shift of the output.
SHIFTABLE_BIAS_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm,
                          nn.modules.batchnorm._BatchNorm)


class BiasShift:
    """Trained biases of adapters, added to one module's output while their adapter is live.

    Loading an adapter never writes the shared base bias: it stores ``trained - base`` here,
    owned by the adapter, so disabling or deleting the adapter gives back the base bit for bit.
    It lives on the module through a forward hook (the module and its state dict are unchanged).
    """

    ATTRIBUTE = "_boft_bias_shift"

    def __init__(self) -> None:
        self.deltas: dict[str, torch.Tensor] = {}
        self.strengths: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self._handle = None

    @classmethod
    def of(cls, module: nn.Module) -> BiasShift | None:
        return getattr(module, cls.ATTRIBUTE, None)

    @classmethod
    def ensure(cls, module: nn.Module) -> BiasShift:
        shift = cls.of(module)
        if shift is None:
            shift = cls()
            shift.attach(module)
        return shift

    def attach(self, module: nn.Module) -> None:
        setattr(module, self.ATTRIBUTE, self)
        self._handle = module.register_forward_hook(self._shift_output)

    def detach(self, module: nn.Module) -> None:
        self._handle.remove()
        delattr(module, self.ATTRIBUTE)

    def move(self, source: nn.Module, target: nn.Module) -> None:
        """Follow the module when an adapter wraps it or unwraps it."""
        self.detach(source)
        self.attach(target)

    def add(self, name: str, delta: torch.Tensor) -> None:
        self.deltas[name] = delta.detach().float().clone()
        self.strengths[name] = 1.0

    def remove(self, name: str) -> None:
        self.deltas.pop(name, None)
        self.strengths.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def live_delta(self) -> torch.Tensor | None:
        if self.adapters_disabled or self.active_adapter not in self.deltas:
            return None
        return self.deltas[self.active_adapter] * self.strengths[self.active_adapter]

    def unmerge(self) -> None:
        """Shifts are never merged into the base bias; nothing to undo."""

    def _shift_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.live_delta()
        if delta is None:
            return output
        delta = delta.to(output.device, output.dtype)
        if _channel_first(module):
            delta = delta.view([1, -1] + [1] * (output.dim() - 2))
        return output + delta


Member = tuple[BOFTLayer, str]


def joined_group_blocks(group: RotationGroup, members: list[Member]) -> torch.Tensor:
    """The blocks ``[sum m_i N_i, b, b]`` of every member (layer, adapter name), in member order,
    from one Cayley solve and one dropout draw."""
    params = [layer.boft_skew[name] for layer, name in members]
    joined = cayley_blocks(join_skew_params(params), group.block_size, group.strength, group.neumann_terms)
    return drop_blocks(joined, group.dropout)


def build_group_blocks(group: RotationGroup, members: list[Member]) -> list[torch.Tensor]:
    """The blocks ``[m_i, N_i, b, b]`` of every member, views of ``joined_group_blocks``."""
    return split_blocks(joined_group_blocks(group, members), [layer.boft_skew[name].shape for layer, name in members])


def block_grid(member: Member) -> torch.Size:
    """``(m, N)``: the member's butterfly factors and blocks per factor."""
    layer, name = member
    return layer.boft_skew[name].shape[:2]


def fold_batch_key(layer: BOFTLayer, name: str) -> tuple | None:
    """Layers of equal keys (and rotation group) fold their training weights in one batched product;
    None for layers that do not (convolutions)."""
    if not isinstance(layer, BOFTLinear):
        return None
    weight, spec = layer.weight, layer.specs[name]
    return weight.shape, weight.dtype, spec.geometry.n_factors, layer.magnitude(name) is not None, spec.side


def fold_training_weights(members: list[Member], blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``diag(s) W R^T`` (input side) or ``diag(s) R W`` (output side) of Linear layers of one
    ``fold_batch_key``, from their blocks ``[L, m, N, b, b]``.

    Computed in float32 outside autocast with one batched product per butterfly factor for all
    ``L`` layers (the rotated features lead: input-side weights are stacked transposed, output-side
    ones as they are, so factor 0 moves nothing), differentiable into the blocks and magnitudes;
    each weight is returned in its base weight's layout and dtype, so a fresh adapter runs the base
    layer's very product.
    """
    first, name = members[0]
    weight, output_side = first.weight, first.rotates_output(name)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        stacked = upcast(torch.stack([layer.weight if output_side else layer.weight.t() for layer, _ in members]))
        folded = rotate_features_first(stacked, blocks, transpose=True)
        scales = [layer.magnitude(name) for layer, name in members]
        if output_side:
            if scales[0] is not None:
                folded = folded * upcast(torch.stack(scales))[:, :, None]
            return folded.to(weight.dtype).contiguous().unbind(0)
        if scales[0] is not None:
            folded = folded * upcast(torch.stack(scales))[:, None, :]
        return folded.transpose(1, 2).to(weight.dtype).contiguous().unbind(0)


class RotationBank:
    """Builds what the adapted layers of one model need, together, once per model forward.

    ``lend`` runs before the forward: layers that will rotate (training, block dropout) get their
    blocks from one Cayley solve per ``RotationGroup``; layers that will run a folded weight get
    it, the stale ones refolded from one solve as well. ``reclaim`` runs after the forward (also
    when it raises), so nothing lent outlives it: a layer called on its own builds its own blocks.
    While gradient checkpointing is on, the backward pass re-runs parts of the forward after
    ``reclaim``; the layers then build their own blocks in both runs, so both record the same graph.

    ``training_fold``: ``"fold"`` lends rotating Linear layers their folded training weight
    instead of their blocks, ``"rotate"`` never does, ``"auto"`` does on CUDA devices only.
    """

    def __init__(
        self, layers: Iterable[BOFTLayer], checkpointable: Iterable[nn.Module] = (), training_fold: TrainingFold = "auto"
    ) -> None:
        self.layers = list(layers)
        self.checkpointable = list(checkpointable)
        self.training_fold = training_fold

    def _recomputes_forward(self) -> bool:
        return torch.is_grad_enabled() and any(module.gradient_checkpointing for module in self.checkpointable)

    def folds_in_training(self, device: torch.device) -> bool:
        """Whether rotating Linear layers on ``device`` get a folded weight (launch-bound devices do)."""
        return self.training_fold == "fold" or (self.training_fold == "auto" and device.type == "cuda")

    def _lend_training(self, group: RotationGroup, members: list[Member]) -> None:
        """One solve and one split for the group: a folding batch's blocks are one piece
        ``[L, m, N, b, b]``, any other layer's its own ``[m, N, b, b]``.

        Members are ordered by fold batch whether or not the batches fold, so block dropout draws
        the same blocks for each layer either way.
        """
        batches: dict[tuple | None, list[Member]] = {}
        for layer, name in members:
            batches.setdefault(fold_batch_key(layer, name), []).append((layer, name))
        fold = self.folds_in_training(group.device)
        pieces: list[tuple[list[Member], bool]] = []
        for key, batch in batches.items():
            if fold and key is not None:
                pieces.append((batch, True))
            else:
                pieces.extend(([member], False) for member in batch)
        joined = joined_group_blocks(group, [member for piece, _ in pieces for member in piece])
        shapes = [block_grid(piece[0]) for piece, _ in pieces]
        parts = joined.split([len(piece) * shape.numel() for (piece, _), shape in zip(pieces, shapes, strict=True)])
        for (piece, folds), shape, part in zip(pieces, shapes, parts, strict=True):
            if folds:
                blocks = part.view(len(piece), *shape, *joined.shape[-2:])
                for (layer, _), weight in zip(piece, fold_training_weights(piece, blocks), strict=True):
                    layer.lent_train_weight = weight
            else:
                piece[0][0].lent_blocks = part.view(*shape, *joined.shape[-2:])

    def lend(self) -> None:
        rotating: dict[RotationGroup, list[Member]] = {}
        stale: dict[RotationGroup, list[Member]] = {}
        for layer in self.layers:
            name = layer.live_adapter()
            if name is None or isinstance(layer.boft_skew[name], DTensor):
                continue  # FSDP2 unshards a layer wrapped on its own in its own forward: it builds its blocks there
            if not layer.uses_folded_weight(name):
                rotating.setdefault(layer.rotation_group(name), []).append((layer, name))
                continue
            layer.lent_weight = layer.current_fold(name)
            if layer.lent_weight is None:
                stale.setdefault(layer.rotation_group(name), []).append((layer, name))
        if not self._recomputes_forward():
            for group, members in rotating.items():
                self._lend_training(group, members)
        with torch.no_grad():
            for group, members in stale.items():
                for (layer, name), blocks in zip(members, build_group_blocks(group, members), strict=True):
                    layer.lent_weight = layer.refresh_fold(name, blocks)

    def reclaim(self) -> None:
        for layer in self.layers:
            layer.lent_blocks = None
            layer.lent_weight = None
            layer.lent_train_weight = None
