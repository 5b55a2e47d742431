"""The batched rotation build (one Cayley solve per group of layers) gives the per-layer numbers."""

import pytest
import torch

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from conftest import make_tiny_unet, randomize_adapter, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]  # Linear, 1x1 and 3x3 convs


def adapted_unet(**config):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(**{"block_size": 4, "n_butterfly_factor": 2, "target_modules": TARGETS, **config}))
    randomize_adapter(unet)
    return unet.train()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def loss_of(unet, inputs):
    sample, timestep, context = inputs
    return unet(sample, timestep, encoder_hidden_states=context).sample.square().mean()


def output_and_grads(unet, inputs, batched):
    bd.set_batched_rotations(unet, batched)
    loss = loss_of(unet, inputs)
    return loss.detach(), torch.autograd.grad(loss, trainable(unet))


@pytest.fixture
def solves(monkeypatch):
    """Counts Cayley solves."""
    calls = []
    solve = torch.linalg.solve_ex

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return solve(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_ex", counted)
    return calls


def assert_same(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [{}, {"cayley_neumann_terms": 4}, {"block_num": 2, "block_size": 0, "n_butterfly_factor": 1}])
def test_batched_build_equals_per_layer_values_and_gradients(config, solves):
    unet, inputs = adapted_unet(**config), unet_inputs()
    per_layer = output_and_grads(unet, inputs, batched=False)
    layer_solves = len(solves)
    solves.clear()
    batched = output_and_grads(unet, inputs, batched=True)
    assert_same(per_layer, batched)
    block_sizes = {layer.specs["default"].geometry.block_size for _, layer in boft_layers(unet)}
    exact = "cayley_neumann_terms" not in config
    assert layer_solves == (len(list(boft_layers(unet))) if exact else 0)
    assert len(solves) == (len(block_sizes) if exact else 0)  # one solve per block size, whatever the layer count


def test_gradient_accumulation_builds_a_graph_per_micro_batch():
    unet = adapted_unet()
    micro_batches = [unet_inputs(seed=1, batch=1), unet_inputs(seed=2, batch=1)]
    results = {}
    for batched in (False, True):
        bd.set_batched_rotations(unet, batched)
        unet.zero_grad()
        for inputs in micro_batches:
            loss_of(unet, inputs).backward()
        results[batched] = [p.grad.clone() for p in trainable(unet)]
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_block_dropout_draws_once_per_forward_and_trains():
    unet, inputs = adapted_unet(dropout=0.5), unet_inputs()
    torch.manual_seed(0)
    first = loss_of(unet, inputs)
    torch.manual_seed(0)
    again = loss_of(unet, inputs)
    other = loss_of(unet, inputs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    grads = torch.autograd.grad(first, trainable(unet))
    assert all(torch.isfinite(g).all() for g in grads)
    unet.eval()  # no dropout: the deterministic adapted output
    assert not torch.equal(loss_of(unet, inputs), first)


def test_gradient_checkpointing_recomputes_the_same_graph():
    unet, inputs = adapted_unet(), unet_inputs()
    expected = output_and_grads(unet, inputs, batched=False)
    unet.enable_gradient_checkpointing()
    assert_same(output_and_grads(unet, inputs, batched=True), expected)


def test_lifecycle_changes_between_forwards_are_seen():
    unet, inputs = adapted_unet(), unet_inputs()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=2, n_butterfly_factor=1, target_modules=["to_q", "to_v"]), "second")
    randomize_adapter(unet, "second", seed=3)
    bd.set_adapter(unet, "default")

    def both_ways():
        losses = []
        for batched in (False, True):
            bd.set_batched_rotations(unet, batched)
            losses.append(loss_of(unet, inputs).detach())
        return losses

    seen = []
    for change in (
        lambda: None,
        lambda: bd.set_adapter(unet, "second"),
        lambda: bd.set_adapter_strength(unet, 0.5),
        lambda: bd.set_adapter(unet, "default"),
        lambda: bd.disable_adapters(unet),
        lambda: bd.enable_adapters(unet),
        lambda: bd.merge_adapter(unet),
        lambda: bd.unmerge_adapter(unet),
    ):
        change()
        per_layer, batched = both_ways()
        assert torch.allclose(per_layer, batched, rtol=1e-5)
        seen.append(batched)
    assert len({round(v.item(), 7) for v in seen[:3]}) == 3  # the adapter switch and strength change were seen
    assert torch.equal(seen[3], seen[0])  # back to "default" at its own strength
    assert torch.allclose(seen[6], seen[3], rtol=1e-4)  # merged == unmerged


def test_nothing_is_lent_outside_a_forward():
    unet, inputs = adapted_unet(), unet_inputs()
    loss_of(unet, inputs)
    with torch.no_grad():
        unet.eval()
        loss_of(unet, inputs)
    with pytest.raises(TypeError):
        unet(inputs[0])  # a forward that raises still hands everything back
    assert all(layer.lent_blocks is None and layer.lent_weight is None for _, layer in boft_layers(unet))


def test_unmerged_inference_reuses_the_fold_until_something_changes(monkeypatch):
    unet, inputs = adapted_unet(), unet_inputs()
    unet.eval()
    folds = []
    for _, layer in boft_layers(unet):
        fold = layer.folded_weight
        monkeypatch.setattr(layer, "folded_weight", lambda *a, _fold=fold, **k: folds.append(1) or _fold(*a, **k))
    n_layers = len(list(boft_layers(unet)))

    def forward():
        folds.clear()
        with torch.no_grad():
            return loss_of(unet, inputs)

    first = forward()
    assert len(folds) == n_layers
    assert torch.equal(forward(), first) and not folds  # reused
    layer = next(layer for _, layer in boft_layers(unet))
    with torch.no_grad():
        layer.boft_skew["default"].mul_(2.0)
    changed = forward()
    assert len(folds) == 1 and not torch.equal(changed, first)
    bd.set_batched_rotations(unet, False)
    assert torch.equal(forward(), changed) and not folds  # the layers check the same keys themselves
