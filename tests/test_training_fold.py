"""The batched training fold (all Linear layers' ``diag(s) W R^T`` at once, one F.linear each) gives the
numbers of rotating the activations, and is what "auto" picks on CUDA only."""

import pytest
import torch
from torch import nn

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from boft_diffusion.core.butterfly import cayley_blocks, dense_rotation, num_skew_params, rotate_features_first
from boft_diffusion.core.layers import BOFTLinear, RotationBank
from conftest import make_tiny_unet, randomize_adapter, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]  # Linear, 1x1 and 3x3 convs
TOLERANCE = dict(rtol=1e-4, atol=1e-7)


def adapted_unet(m, dropout=0.0):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=m, dropout=dropout, target_modules=TARGETS))
    randomize_adapter(unet)
    return unet.train()


def loss_and_grads(unet, mode, seed=0):
    """Loss and gradients of every adapter parameter (skew and s), block dropout drawn from ``seed``."""
    bd.set_training_fold(unet, mode)
    sample, timestep, context = unet_inputs()
    torch.manual_seed(seed)
    loss = unet(sample, timestep, encoder_hidden_states=context).sample.square().mean()
    return loss.detach(), torch.autograd.grad(loss, [p for p in unet.parameters() if p.requires_grad])


def linear_layers(unet):
    return [layer for _, layer in boft_layers(unet) if isinstance(layer, BOFTLinear)]


@pytest.mark.parametrize("transpose", [False, True])
def test_per_layer_blocks_rotate_each_batch_entry_by_its_own_rotation(transpose):
    layers, m, blocks_n, b, rows = 3, 2, 4, 4, 5
    gen = torch.Generator().manual_seed(0)
    blocks = cayley_blocks(torch.randn(layers, m, blocks_n, num_skew_params(b), generator=gen), b)
    z = torch.randn(layers, blocks_n * b, rows, generator=gen)
    rotated = rotate_features_first(z, blocks, transpose)
    for entry in range(layers):
        dense = dense_rotation(blocks[entry])
        expected = dense @ z[entry] if transpose else dense.t() @ z[entry]
        assert torch.allclose(rotated[entry], expected, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("m", [1, 2])
def test_batched_fold_equals_each_layers_folded_weight(m, dropout):
    unet = adapted_unet(m, dropout)
    layers = [layer for _, layer in boft_layers(unet)]
    lent = {}
    for mode in ("rotate", "fold"):
        bank = RotationBank(layers, training_fold=mode)
        torch.manual_seed(0)
        bank.lend()
        lent[mode] = {layer: (layer.lent_blocks, layer.lent_train_weight) for layer in layers}
        bank.reclaim()
    for layer in linear_layers(unet):
        blocks, _ = lent["rotate"][layer]
        no_blocks, folded = lent["fold"][layer]
        assert no_blocks is None and folded is not None
        expected = layer.folded_weight("default", blocks=blocks)
        assert folded.shape == expected.shape and folded.is_contiguous()
        assert torch.allclose(folded, expected, rtol=1e-5, atol=1e-6)
    convs = [layer for layer in layers if not isinstance(layer, BOFTLinear)]
    assert convs and all(lent["fold"][layer][0] is not None for layer in convs)  # convolutions keep their paths


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("m", [1, 2])
def test_fold_equals_rotating_activations_in_outputs_and_gradients(m, dropout):
    unet = adapted_unet(m, dropout)
    folded_forwards = []
    for layer in linear_layers(unet):
        layer.register_forward_pre_hook(lambda module, args: folded_forwards.append(module.lent_train_weight is not None))
    loss_r, grads_r = loss_and_grads(unet, "rotate")
    assert not any(folded_forwards)
    folded_forwards.clear()
    loss_f, grads_f = loss_and_grads(unet, "fold")
    assert folded_forwards and all(folded_forwards)
    assert torch.allclose(loss_f, loss_r, rtol=1e-6, atol=0)
    for a, b in zip(grads_f, grads_r, strict=True):
        assert torch.allclose(a, b, **TOLERANCE)
    if dropout:
        assert not torch.equal(loss_and_grads(unet, "fold", seed=1)[0], loss_f)  # dropout is drawn, and differs
    assert all(layer.lent_train_weight is None for layer in linear_layers(unet))


def test_fresh_adapter_folds_to_the_base_model_bit_for_bit():
    unet = make_tiny_unet().train()
    sample, timestep, context = unet_inputs()
    base = unet(sample, timestep, encoder_hidden_states=context).sample
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=TARGETS))
    bd.set_training_fold(unet, "fold")
    assert torch.equal(unet(sample, timestep, encoder_hidden_states=context).sample, base)


def test_gradient_checkpointing_lends_nothing_and_layers_rotate():
    unet = adapted_unet(2)
    expected = loss_and_grads(unet, "rotate")
    unet.enable_gradient_checkpointing()
    lent = []
    layer = linear_layers(unet)[0]
    layer.register_forward_pre_hook(lambda module, args: lent.append(module.lent_train_weight))
    loss, grads = loss_and_grads(unet, "fold")
    assert lent and all(weight is None for weight in lent)
    assert torch.allclose(loss, expected[0], rtol=1e-6, atol=0)
    for a, b in zip(grads, expected[1], strict=True):
        assert torch.allclose(a, b, **TOLERANCE)


def test_half_precision_weights_fold_in_float32_and_keep_their_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    bd.apply_boft(model, bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=["0", "1", "2"]))
    randomize_adapter(model)
    layers = [layer for _, layer in boft_layers(model.train())]
    bank = RotationBank(layers, training_fold="fold")
    bank.lend()
    for layer in layers:
        assert layer.lent_train_weight.dtype == torch.bfloat16
        expected = layer.folded_weight("default").float()  # also folded in float32: at most one rounding apart
        assert torch.allclose(layer.lent_train_weight.float(), expected, rtol=2**-7, atol=0)
    bank.reclaim()


def test_auto_folds_on_cuda_only_and_cpu_training_rotates():
    bank = RotationBank([])
    assert bank.folds_in_training(torch.device("cuda", 0)) and not bank.folds_in_training(torch.device("cpu"))
    unet = adapted_unet(2)
    seen = []
    layer = linear_layers(unet)[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append((module.lent_blocks, module.lent_train_weight)))
    loss_and_grads(unet, "auto")
    (blocks, weight), = seen
    assert blocks is not None and weight is None
    with pytest.raises(ValueError, match="training fold mode"):
        bd.set_training_fold(unet, "always")
