"""An independent, deliberately naive dense BOFT written from PEFT's documented conventions.

Shared by the tests: explicit permutation matrices, explicit block diagonals, explicit products.
"""

import torch


def peft_butterfly_indices(dim: int, block_num: int, half_block: int, n_extra_factors: int) -> list[int]:
    """PEFT's ``block_butterfly_perm`` re-derived with Python lists: inside each chunk of
    ``dim / block_num`` features, sub-blocks of ``half_block`` go even-numbered first, then odd."""
    if n_extra_factors == 0:
        return list(range(dim))
    chunk = dim // block_num
    subblocks = chunk // half_block
    order = [j for j in range(subblocks) if j % 2 == 0] + [j for j in range(subblocks) if j % 2 == 1]
    indices = []
    for start in range(0, dim, chunk):
        for j in order:
            indices.extend(range(start + j * half_block, start + (j + 1) * half_block))
    return indices


def permutation_matrix(indices: list[int]) -> torch.Tensor:
    n = len(indices)
    p = torch.zeros(n, n, dtype=torch.float64)
    for row, col in enumerate(indices):
        p[row, col] = 1.0
    return p


def cayley_dense(matrix: torch.Tensor) -> torch.Tensor:
    skew = 0.5 * (matrix - matrix.T)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return (eye - skew) @ torch.linalg.inv(eye + skew)


def dense_boft_rotation(boft_r: torch.Tensor) -> torch.Tensor:
    """R = B_{m-1} ... B_0 from PEFT-layout ``boft_R [m, N, b, b]`` (float64)."""
    m, n, b, _ = boft_r.shape
    dim = n * b
    rotation = torch.eye(dim, dtype=torch.float64)
    for i in range(m):
        blocks = [cayley_dense(boft_r[i, k].double()) for k in range(n)]
        p = permutation_matrix(peft_butterfly_indices(dim, n // 2**i, b // 2, m - 1))
        factor = p @ torch.block_diag(*blocks) @ p.T
        rotation = factor @ rotation
    return rotation


def dense_boft_weight(weight: torch.Tensor, boft_r: torch.Tensor, boft_s: torch.Tensor) -> torch.Tensor:
    """PEFT's merged weight ``diag(s) W_flat R^T`` reshaped back to ``weight.shape``."""
    rotation = dense_boft_rotation(boft_r)
    flat = weight.double().reshape(weight.shape[0], -1)
    merged = (rotation @ flat.T).T * boft_s.double().reshape(-1, 1)
    return merged.reshape(weight.shape)
