import math

import pytest
import torch

from boft_diffusion.core.butterfly import (
    butterfly_matmul,
    butterfly_permutation,
    cayley,
    dense_rotation,
    drop_blocks,
    num_skew_params,
    params_from_skew,
    resolve_geometry,
    rotate_features_first,
    skew_from_params,
    valid_block_sizes,
)
from dense_reference import dense_boft_rotation, peft_butterfly_indices


def random_blocks(m: int, n: int, b: int, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(m, n, num_skew_params(b), generator=gen) * scale
    return cayley(skew_from_params(params, b))


@pytest.mark.parametrize("dim,b", [(64, 4), (96, 8), (32, 2)])
def test_permutation_matches_peft_convention(dim, b):
    n = dim // b
    max_m = 1 + int(math.log2(n & -n))
    for m in range(2, max_m + 1):
        for i in range(m):
            expected = peft_butterfly_indices(dim, n // 2**i, b // 2, m - 1)
            assert butterfly_permutation(dim, b, i).tolist() == expected


@pytest.mark.parametrize("dim,b", [(64, 4), (128, 8), (48, 6)])
def test_rotation_is_orthogonal_for_every_depth(dim, b):
    n = dim // b
    max_m = 1 + int(math.log2(n & -n))
    assert max_m >= 2
    for m in range(1, max_m + 1):
        rotation = dense_rotation(random_blocks(m, n, b, scale=2.0, seed=m))
        error = (rotation.T @ rotation - torch.eye(dim)).norm()
        assert error < 1e-5, (m, error)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_fast_rotation_equals_dense_reference(m):
    dim, b = 64, 4
    blocks_params = torch.randn(m, dim // b, b, b, dtype=torch.float64)
    reference = dense_boft_rotation(blocks_params)
    skew = 0.5 * (blocks_params - blocks_params.transpose(-1, -2))
    ours = cayley(skew).double()
    for shape in ((3, 5, dim), (4, 40, dim)):  # few rows (row-major path), many rows (feature-major path)
        x = torch.randn(shape, dtype=torch.float64)
        assert torch.allclose(butterfly_matmul(x, ours), x @ reference, atol=1e-5)
        assert torch.allclose(butterfly_matmul(x, ours, transpose=True), x @ reference.T, atol=1e-5)
    channels = torch.randn(2, dim, 3, 3, dtype=torch.float64)
    expected = (channels.movedim(1, -1) @ reference).movedim(-1, 1)
    assert torch.allclose(rotate_features_first(channels.flatten(2), ours).reshape(channels.shape), expected, atol=1e-5)


def test_full_depth_rotation_is_dense():
    dim, b = 32, 4
    m = 1 + int(math.log2(dim // b))
    rotation = dense_rotation(random_blocks(m, dim // b, b, scale=1.0))
    assert (rotation.abs() > 1e-6).all()
    shallow = dense_rotation(random_blocks(1, dim // b, b, scale=1.0))
    assert (shallow.abs() > 1e-6).float().mean() == pytest.approx(b / dim)


def test_skew_round_trip_and_zero_is_identity():
    params = torch.randn(2, 3, num_skew_params(6))
    skew = skew_from_params(params, 6)
    assert torch.equal(skew, -skew.transpose(-1, -2))
    assert torch.allclose(params_from_skew(skew), params)
    zero = cayley(torch.zeros(2, 3, 6, 6))
    assert torch.equal(zero, torch.eye(6).expand(2, 3, 6, 6))


def test_cayley_runs_in_float32_for_half_inputs():
    skew = skew_from_params(torch.randn(4, num_skew_params(8)), 8).to(torch.bfloat16)
    assert cayley(skew).dtype == torch.float32


@pytest.mark.parametrize("terms,bound", [(2, 0.5), (4, 0.05), (8, 1e-3)])
def test_neumann_series_orthogonality_error_shrinks(terms, bound):
    skew = skew_from_params(torch.randn(16, num_skew_params(8)) * 0.05, 8)
    approx = cayley(skew, neumann_terms=terms)
    error = (approx.transpose(-1, -2) @ approx - torch.eye(8)).abs().max()
    assert error < bound
    assert torch.allclose(approx, cayley(skew), atol=bound)


def test_dropout_replaces_the_expected_fraction_of_blocks():
    blocks = random_blocks(1, 8, 4)
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(4)
    dropped_counts = []
    for _ in range(2000):
        out = drop_blocks(blocks, 0.1, generator=gen)
        dropped_counts.append(sum(torch.equal(out[0, k], eye) for k in range(8)))
    mean = sum(dropped_counts) / len(dropped_counts)
    assert 0.65 < mean < 0.95  # 0.8 expected; PEFT's int(0.1 * 8) would give 0


def test_invalid_geometry_names_module_and_valid_sizes():
    with pytest.raises(ValueError, match=r"down.attn.to_q.*320.*valid block sizes") as info:
        resolve_geometry(320, 6, 0, 2, "down.attn.to_q")
    assert "8" in str(info.value)
    with pytest.raises(ValueError, match="at most 4 factor"):
        resolve_geometry(320, 8, 0, 5, "m")
    with pytest.raises(ValueError, match="even block size"):
        resolve_geometry(30, 3, 0, 2, "m")
    with pytest.raises(ValueError, match="block_num 7 with n_butterfly_factor 1 does not fit its dimension 320"):
        resolve_geometry(320, 0, 7, 1, "m")
    assert resolve_geometry(320, 0, 40, 2, "m") == (8, 40, 2)
    assert 6 not in valid_block_sizes(320, 2)


@pytest.mark.parametrize("dim, n_factors", [(320, 2), (64, 4), (96, 2), (40, 1)])
def test_every_suggested_block_num_and_size_fits_the_requested_depth(dim, n_factors):
    for wrong in (dict(block_size=0, block_num=3), dict(block_size=3, block_num=0)):
        with pytest.raises(ValueError, match=rf"for m={n_factors}: \[") as error:
            resolve_geometry(dim, n_factors=n_factors, **wrong)
        suggested = [int(v) for v in str(error.value).rsplit("[", 1)[1].rstrip("].").split(", ")]
        assert suggested
        key = "block_num" if wrong["block_num"] else "block_size"
        for value in suggested:
            other = {"block_num": 0, "block_size": 0, key: value}
            assert resolve_geometry(dim, n_factors=n_factors, **other).n_factors == n_factors
