"""Butterfly-orthogonal math as pure tensor functions.

Conventions (shared with Hugging Face PEFT so adapter files are interchangeable):

* A rotation over ``dim`` features is ``R = B_{m-1} ... B_1 B_0`` with
  ``B_i = P_i . blockdiag(C_i1, ..., C_iN) . P_i^T``, ``N = dim / b`` blocks of size ``b``.
* ``P_i`` is the butterfly permutation of factor ``i``: inside each chunk of ``b * 2**i``
  features, the sub-blocks of ``b / 2`` features are regrouped with the even-numbered ones
  first and the odd-numbered ones after them. ``P_0`` is the identity.
* ``C = (I - S)(I + S)^-1`` is the Cayley transform of a skew-symmetric ``S``.
* The adapted weight is ``W' = diag(s) . W . R^T``; acting on row-vector activations this is
  ``y = s * ((x @ R) @ W^T)``.

Nothing here builds a dense ``dim x dim`` matrix: each factor is a reshape/transpose of the
feature axis plus one batched ``b x b`` product, so the cost is ``O(m * dim * b)`` per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "BlockGeometry",
    "resolve_geometry",
    "full_butterfly_geometry",
    "valid_block_sizes",
    "max_butterfly_factors",
    "butterfly_permutation",
    "num_skew_params",
    "skew_from_params",
    "params_from_skew",
    "cayley",
    "cayley_blocks",
    "join_skew_params",
    "split_blocks",
    "upcast",
    "drop_blocks",
    "butterfly_matmul",
    "rotate_features_first",
    "dense_rotation",
]


class BlockGeometry(NamedTuple):
    """Block layout of one adapted feature axis."""

    block_size: int
    block_num: int
    n_factors: int


def _is_valid(dim: int, block_size: int, n_factors: int) -> bool:
    if block_size < 1 or n_factors < 1 or dim % block_size:
        return False
    if n_factors == 1:
        return True
    return block_size % 2 == 0 and dim % (block_size * 2 ** (n_factors - 1)) == 0


def valid_block_sizes(dim: int, n_factors: int) -> list[int]:
    """Block sizes that tile ``dim`` with ``n_factors`` butterfly factors."""
    return [b for b in range(1, dim + 1) if _is_valid(dim, b, n_factors)]


def valid_block_nums(dim: int, n_factors: int) -> list[int]:
    """Block numbers that tile ``dim`` with ``n_factors`` butterfly factors."""
    return [dim // b for b in reversed(valid_block_sizes(dim, n_factors))]


def max_butterfly_factors(dim: int, block_size: int) -> int:
    """Largest number of factors possible for ``dim`` and ``block_size`` (0 if none)."""
    if not _is_valid(dim, block_size, 1):
        return 0
    m = 1
    while _is_valid(dim, block_size, m + 1):
        m += 1
    return m


def resolve_geometry(
    dim: int, block_size: int, block_num: int, n_factors: int, module_name: str = "module"
) -> BlockGeometry:
    """Check a BOFT configuration against a feature dimension and return its geometry.

    Exactly one of ``block_size`` / ``block_num`` must be non-zero. Raises ValueError naming the
    module, its dimension and what would be valid, instead of silently changing ``n_factors``.
    """
    if (block_size > 0) == (block_num > 0):
        raise ValueError(
            f"{module_name}: set exactly one of block_size ({block_size}) and block_num ({block_num})."
        )
    if n_factors < 1:
        raise ValueError(f"{module_name}: n_butterfly_factor must be >= 1, got {n_factors}.")
    if block_num > 0:
        if dim % block_num or not _is_valid(dim, dim // block_num, n_factors):
            raise ValueError(
                f"{module_name}: block_num {block_num} with n_butterfly_factor {n_factors} does not fit its "
                f"dimension {dim}; valid block_num values for m={n_factors}: {valid_block_nums(dim, n_factors)}."
            )
        block_size = dim // block_num
    if not _is_valid(dim, block_size, n_factors):
        sizes = valid_block_sizes(dim, n_factors)
        limit = max_butterfly_factors(dim, block_size)
        factor_hint = (
            f"with block_size {block_size} at most {limit} factor(s) fit"
            if limit
            else f"block_size {block_size} does not divide {dim}"
        )
        raise ValueError(
            f"{module_name}: block_size {block_size} with n_butterfly_factor {n_factors} does not fit "
            f"its dimension {dim} (m > 1 needs an even block size and dim divisible by "
            f"block_size * 2**(m-1)); {factor_hint}; valid block sizes for m={n_factors}: {sizes}."
        )
    return BlockGeometry(block_size, dim // block_size, n_factors)


def full_butterfly_block_sizes(dim: int) -> list[int]:
    """Even block sizes that cut ``dim`` into a power-of-two number of blocks."""
    return [b for b in range(2, dim + 1, 2) if dim % b == 0 and (dim // b).bit_count() == 1]


def full_butterfly_geometry(dim: int, block_size: int, module_name: str = "module") -> BlockGeometry:
    """LyCORIS's BOFT geometry for ``dim`` features and a block size of at most ``block_size``: the
    largest even block size ``b`` that cuts ``dim`` into a power-of-two number ``N`` of blocks, at
    the full depth ``m = log2(N) + 1`` (a dense rotation). LyCORIS derives this geometry from the
    layer and refuses a file of any other shape, so only such adapters load there."""
    sizes = [b for b in full_butterfly_block_sizes(dim) if b <= block_size]
    if not sizes:
        raise ValueError(
            f"{module_name}: no full butterfly of block size at most {block_size} fits its dimension {dim} (it needs "
            f"an even block size that cuts {dim} into a power-of-two number of blocks; LyCORIS says 'impossible to "
            f"decompose'); block sizes that do: {full_butterfly_block_sizes(dim)}. Without the full butterfly, "
            "ComfyUI and A1111 still read any even block size at any depth."
        )
    block_num = dim // sizes[-1]
    return BlockGeometry(sizes[-1], block_num, block_num.bit_length())


def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Index form of ``P_factor``: ``(P x)[j] == x[perm[j]]``.

    Reference helper for tests and dense checks; the fast path never materialises it.
    """
    chunk = block_size * 2**factor
    half = block_size // 2 if factor > 0 else block_size
    groups = chunk // (2 * half) if factor > 0 else 1
    idx = torch.arange(dim)
    if factor == 0:
        return idx
    return idx.view(dim // chunk, groups, 2, half).transpose(1, 2).reshape(dim)


def num_skew_params(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def skew_from_params(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """Build skew-symmetric blocks ``[..., b, b]`` from their upper-triangle entries ``[..., b(b-1)/2]``."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=params.device)
    upper = params.new_zeros(*params.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = params
    return upper - upper.transpose(-1, -2)


def params_from_skew(matrix: torch.Tensor) -> torch.Tensor:
    """Free entries of the skew part ``0.5 (A - A^T)`` of (not necessarily skew) blocks ``[..., b, b]``."""
    block_size = matrix.shape[-1]
    skew = 0.5 * (matrix - matrix.transpose(-1, -2))
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=matrix.device)
    return skew[..., rows, cols]


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision inputs are lifted, float64 is kept (for gradcheck)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def cayley(skew: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal blocks ``(I - S)(I + S)^-1`` in at least float32, whatever the input dtype.

    ``neumann_terms = 0`` solves exactly (batched LU). ``k > 0`` replaces the inverse by the
    series ``I - S + S^2 - ...`` truncated after ``k`` terms: cheaper on accelerators, but only
    orthogonal up to ``O(||S||^k)``.
    """
    skew = upcast(skew)
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    with torch.autocast(device_type=skew.device.type, enabled=False):
        if neumann_terms <= 0:
            # I + S is invertible for every skew S (eigenvalues 1 + i*lambda), so skip the error
            # check of linalg.solve: on a GPU it waits for the device at every call.
            return torch.linalg.solve_ex(eye + skew, eye - skew).result
        inverse = eye.expand_as(skew)
        power = eye.expand_as(skew)
        for _ in range(1, neumann_terms):
            power = -(power @ skew)
            inverse = inverse + power
        return (eye - skew) @ inverse


def cayley_blocks(params: torch.Tensor, block_size: int, strength: float = 1.0, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal blocks ``[..., b, b]`` of ``Cayley(strength * S)`` from the free entries ``[..., b(b-1)/2]`` of ``S``."""
    if strength != 1.0:
        params = params * strength
    return cayley(skew_from_params(params, block_size), neumann_terms)


def join_skew_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack the skew parameters ``[m_i, N_i, k]`` of several layers into one ``[sum m_i N_i, k]`` batch.

    One Cayley solve over the joined batch replaces one solve per layer: on a GPU the cost of a
    step of small adapters is the number of kernels, not their size.
    """
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in params])


def split_blocks(joined: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Undo ``join_skew_params`` on the blocks ``[sum m_i N_i, b, b]``: views ``[m_i, N_i, b, b]`` per layer."""
    sizes = [shape[0] * shape[1] for shape in shapes]
    block = joined.shape[-2:]
    return [part.view(*shape[:2], *block) for part, shape in zip(joined.split(sizes), shapes, strict=True)]


def drop_blocks(blocks: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiplicative dropout: replace each ``b x b`` block by the identity with probability ``p``."""
    if p <= 0.0:
        return blocks
    keep_shape = blocks.shape[:-2]
    dropped = torch.rand(keep_shape, generator=generator, device=blocks.device) < p
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return torch.where(dropped[..., None, None], eye, blocks)


def _factor_rows(x: torch.Tensor, blocks: torch.Tensor, factor: int) -> torch.Tensor:
    """Row-major: ``x @ P_i blockdiag(blocks) P_i^T`` along the last axis of ``x`` (few rows)."""
    lead = x.shape[:-1]
    dim = x.shape[-1]
    block_num, block_size, _ = blocks.shape
    if factor == 0:
        y = x.reshape(-1, block_num, block_size).transpose(0, 1)
        y = torch.bmm(y, blocks)
        return y.transpose(0, 1).reshape(*lead, dim)
    half = block_size // 2
    groups = 2**factor
    chunks = dim // (block_size * groups)
    # x @ P_i: bring the two halves that the butterfly pairs next to each other.
    y = x.reshape(-1, chunks, 2, groups, half).permute(1, 3, 0, 2, 4)
    y = y.reshape(block_num, -1, block_size)
    y = torch.bmm(y, blocks)
    # ... @ P_i^T: send them back to their strided places.
    y = y.reshape(chunks, groups, -1, 2, half).permute(2, 0, 3, 1, 4)
    return y.reshape(*lead, dim)


def _factor_features(z: torch.Tensor, blocks_t: torch.Tensor, factor: int) -> torch.Tensor:
    """Feature-major: ``(P_i blockdiag(blocks) P_i^T)^T z`` for ``z`` of shape ``[B, dim, R]``.

    With the features leading, every permutation moves contiguous runs of ``R`` values and
    factor 0 needs no copy at all, which is what makes long activations cheap to rotate.
    ``blocks_t`` holds the transposed blocks, ``[N, b, b]`` for the whole batch or ``[B, N, b, b]``.
    """
    batch, dim, rows = z.shape
    block_num, block_size, _ = blocks_t.shape[-3:]
    if factor == 0:
        return torch.matmul(blocks_t, z.reshape(batch, block_num, block_size, rows)).reshape(batch, dim, rows)
    half = block_size // 2
    groups = 2**factor
    chunks = dim // (block_size * groups)
    y = z.reshape(batch, chunks, 2, groups, half, rows).transpose(2, 3).reshape(batch, block_num, block_size, rows)
    y = torch.matmul(blocks_t, y)
    return y.reshape(batch, chunks, groups, 2, half, rows).transpose(2, 3).reshape(batch, dim, rows)


def rotate_features_first(z: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``R^T z`` (or ``R z``) for ``z`` of shape ``[B, dim, R]``: ``(x @ R)^T`` for ``z = x^T``.

    This is the rotation of channels-first activations (a 1x1 convolution's input) as they lie.
    ``blocks`` is ``[m, N, b, b]`` (one ``R`` for the batch) or ``[B, m, N, b, b]`` (one per
    entry): then ``B`` layers' transposed weights ``W_l^T`` become ``(W_l R_l^T)^T`` with one
    batched product per factor for all of them, where a loop over the layers would launch ``B``.
    """
    factors = _unbind_factors(blocks, z.dtype)
    if transpose:
        for factor, factor_blocks in enumerate(factors):
            z = _factor_features(z, factor_blocks, factor)
    else:
        for factor in reversed(range(len(factors))):
            z = _factor_features(z, factors[factor].transpose(-1, -2), factor)
    return z


def _unbind_factors(blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The factors' blocks (axis ``-4``) as views; one unbind backpropagates as one stack, where
    indexing each factor would allocate and fill a zero gradient of all ``m`` factors per factor."""
    return blocks.to(dtype).unbind(-4)


def butterfly_matmul(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) along the last axis of ``x``, with ``R`` given by its factor blocks.

    ``blocks`` has shape ``[m, N, b, b]``; ``x @ R`` applies factor ``m-1`` first and factor 0
    last, ``x @ R^T`` the reverse with each block transposed. Inputs with many rows (activations)
    are rotated feature-major (one transposing copy, then contiguous moves); a few rows (weights
    of wide layers, short token sequences) are rotated row-major.
    """
    dim = x.shape[-1]
    rows = x.numel() // dim
    if 2 * rows >= dim:
        z = rotate_features_first(x.reshape(rows, dim).t().unsqueeze(0), blocks, transpose)
        return z.squeeze(0).t().reshape(x.shape)
    factors = _unbind_factors(blocks, x.dtype)
    if transpose:
        for factor, factor_blocks in enumerate(factors):
            x = _factor_rows(x, factor_blocks.transpose(-1, -2), factor)
    else:
        for factor in reversed(range(len(factors))):
            x = _factor_rows(x, factors[factor], factor)
    return x


def dense_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """Materialise ``R`` (``dim x dim``). For inspection and tests only."""
    dim = blocks.shape[1] * blocks.shape[2]
    return butterfly_matmul(torch.eye(dim, dtype=blocks.dtype, device=blocks.device), blocks)
