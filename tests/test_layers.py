import pytest
import torch
from torch import nn

from boft_diffusion.core.butterfly import resolve_geometry
from boft_diffusion.core.layers import BOFTConv2d, BOFTLinear
from dense_reference import dense_boft_weight


def wrap(base, block_size=4, m=2, dropout=0.0, scale=True, name="layer"):
    layer = BOFTLinear(base, name) if isinstance(base, nn.Linear) else BOFTConv2d(base, name)
    geometry = resolve_geometry(layer.rotated_dim, block_size, 0, m, name)
    layer.add_adapter("default", geometry, dropout=dropout, scale=scale)
    layer.active_adapter = "default"
    return layer


def randomize(layer, name="default", seed=0, scale=0.4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.boft_skew[name].copy_(torch.randn(layer.boft_skew[name].shape, generator=gen) * scale)
        if name in layer.boft_s:
            layer.boft_s[name].copy_(1 + 0.2 * torch.randn(layer.boft_s[name].shape, generator=gen))


def peft_layout(layer, name="default"):
    boft_r, boft_s = layer.peft_tensors(name)
    return boft_r, boft_s


CONVS = [
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=5, kernel_size=(1, 3), stride=2, padding=(0, 2), dilation=(1, 2)),
    dict(in_channels=16, out_channels=8, kernel_size=1),
    dict(in_channels=8, out_channels=8, kernel_size=3, groups=2, padding=1),
]


def make_linear(seed=0, din=32, dout=24):
    torch.manual_seed(seed)
    return nn.Linear(din, dout)


def make_conv(spec, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(**spec)


def all_layers():
    yield make_linear(), torch.randn(3, 7, 32)
    for spec in CONVS:
        yield make_conv(spec), torch.randn(2, spec["in_channels"], 9, 10)


def block_size_for(layer):
    dim = layer.weight[0].numel()
    return 4 if dim % 8 == 0 else 2


@pytest.mark.parametrize("index", range(1 + len(CONVS)))
@pytest.mark.parametrize("grad", [True, False])
def test_fresh_adapter_is_exactly_the_base(index, grad):
    base, x = list(all_layers())[index]
    expected = base(x).detach()
    layer = wrap(base, block_size=block_size_for(base)).train(grad)
    with torch.set_grad_enabled(grad):
        assert torch.equal(layer(x).detach(), expected)


@pytest.mark.parametrize("index", range(1 + len(CONVS)))
@pytest.mark.parametrize("m", [1, 2])
def test_matches_dense_reference(index, m):
    base, x = list(all_layers())[index]
    layer = wrap(base, block_size=block_size_for(base), m=m)
    randomize(layer)
    boft_r, boft_s = peft_layout(layer)
    dense_weight = dense_boft_weight(base.weight.detach(), boft_r, boft_s).float()
    if isinstance(base, nn.Linear):
        expected = nn.functional.linear(x, dense_weight, base.bias)
    else:
        expected = base._conv_forward(x, dense_weight, base.bias)
    layer.train()
    assert torch.allclose(layer(x), expected, atol=1e-5)  # training path
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)  # folded inference path


def hyperspherical_energy(weight: torch.Tensor) -> torch.Tensor:
    unit = weight.double().reshape(weight.shape[0], -1)
    unit = unit / unit.norm(dim=1, keepdim=True)
    dist = torch.cdist(unit, unit)
    off = ~torch.eye(len(unit), dtype=torch.bool)
    return (1.0 / dist[off]).sum()


@pytest.mark.parametrize("index", [0, 1])
def test_hyperspherical_energy_is_preserved(index):
    base, _ = list(all_layers())[index]
    original = hyperspherical_energy(base.weight.detach())
    layer = wrap(base, block_size=block_size_for(base), m=2, scale=False)
    randomize(layer, scale=1.0)
    with torch.no_grad():
        rotated = layer.folded_weight("default")
    assert not torch.allclose(rotated, base.weight)
    assert torch.allclose(hyperspherical_energy(rotated), original, rtol=1e-5)


@pytest.mark.parametrize("index", range(1 + len(CONVS)))
def test_merge_unmerge_and_strength(index):
    base, x = list(all_layers())[index]
    original = base.weight.detach().clone()
    base_out = base(x).detach()
    layer = wrap(base, block_size=block_size_for(base))
    randomize(layer)
    with torch.no_grad():
        layer.specs["default"].strength = 0.0
        assert torch.equal(layer(x), base_out)
        layer.specs["default"].strength = 1.0
        adapted = layer(x)
        layer.merge(safe_merge=True)
        assert not torch.equal(layer.weight, original)
        assert torch.allclose(layer(x), adapted, atol=1e-5)
        assert torch.allclose(layer.base_layer(x), adapted, atol=1e-5)  # merged forward is the base layer
        layer.unmerge()
        assert torch.allclose(layer.weight, original, atol=1e-5)
    layer.specs["default"].strength = 0.0
    layer.train()
    assert torch.allclose(layer(x), base_out, atol=1e-6)


def test_strength_interpolates_rotation_angle():
    layer = wrap(make_linear(), block_size=4)
    randomize(layer)
    x = torch.randn(4, 32)
    base_out = layer.base_layer(x)
    distances = []
    with torch.no_grad():
        for alpha in (0.0, 0.5, 1.0, 1.5):
            layer.specs["default"].strength = alpha
            distances.append((layer(x) - base_out).norm().item())
    assert distances[0] == 0.0
    assert distances[0] < distances[1] < distances[2] < distances[3]


def test_safe_merge_refuses_non_finite_weights():
    layer = wrap(make_linear(), block_size=4)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.boft_s["default"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, original)
    assert layer.merged is None


def test_gradcheck_float64():
    base = nn.Linear(8, 6).double()
    layer = wrap(base, block_size=2, m=3).double()
    randomize(layer)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))
    params = [layer.boft_skew["default"], layer.boft_s["default"]]
    out = layer(x).sum()
    grads = torch.autograd.grad(out, params)
    eps = 1e-6
    for param, grad in zip(params, grads, strict=True):
        flat = param.detach().view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            with torch.no_grad():
                flat[i] += eps
                up = layer(x).sum()
                flat[i] -= 2 * eps
                down = layer(x).sum()
                flat[i] += eps
            assert abs((up - down).item() / (2 * eps) - grad.view(-1)[i].item()) < 1e-6


def test_conv_weight_side_gradcheck():
    base = make_conv(CONVS[0])
    layer = wrap(base, block_size=4, m=2).double()
    randomize(layer)
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward(dtype):
    base = make_linear().to(dtype)
    layer = wrap(base, block_size=4)
    randomize(layer)
    assert layer.rotation_blocks("default").dtype == torch.float32
    assert layer.boft_skew["default"].dtype == torch.float32
    x = torch.randn(4, 32, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert torch.isfinite(layer.boft_skew["default"].grad).all()
    assert layer.boft_skew["default"].grad.abs().sum() > 0
    conv = wrap(make_conv(CONVS[0]).to(dtype), block_size=4)
    randomize(conv)
    y = conv(torch.randn(2, 8, 5, 5, dtype=dtype))
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(conv.boft_skew["default"].grad).all()


def test_autocast_bf16_keeps_rotation_in_float32():
    layer = wrap(make_linear(), block_size=4)
    randomize(layer)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), atol=0.1)
    out.float().sum().backward()
    assert layer.boft_skew["default"].grad.dtype == torch.float32


def test_dropout_only_in_training():
    layer = wrap(make_linear(), block_size=4, dropout=0.5)
    randomize(layer)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    outs = [layer(x).detach() for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_inference_cache_follows_parameter_updates():
    layer = wrap(make_linear(), block_size=4)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = layer(x)
    randomize(layer)
    with torch.no_grad():
        after = layer(x)
        train_path = None
    with torch.enable_grad():
        train_path = layer(x).detach()
    assert not torch.equal(before, after)
    assert torch.allclose(after, train_path, atol=1e-5)


CHANGES = {
    "skew": lambda layer: layer.boft_skew["default"].mul_(1.5),
    "magnitude": lambda layer: layer.boft_s["default"].add_(0.1),
    "base weight": lambda layer: layer.base_layer.weight.mul_(0.5),
    "strength": lambda layer: setattr(layer.specs["default"], "strength", 0.5),
    "active adapter": lambda layer: setattr(layer, "active_adapter", "other"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_inference_cache_is_reused_until_a_dependency_changes(change, monkeypatch):
    layer = wrap(make_linear(), block_size=4).eval()
    layer.add_adapter("other", layer.specs["default"].geometry)
    randomize(layer)
    randomize(layer, "other", seed=1)
    folds = []
    fold = layer.folded_weight
    monkeypatch.setattr(layer, "folded_weight", lambda *a, **k: folds.append(1) or fold(*a, **k))
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before) and len(folds) == 1  # reused, not refolded
        CHANGES[change](layer)  # in place, under no_grad
        after = layer(x)
    assert len(folds) == 2 and not torch.equal(after, before)
    with torch.enable_grad():
        assert torch.allclose(after, layer(x), atol=1e-5)  # the unfolded path agrees
