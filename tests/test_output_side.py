"""The output-side rotation (``BOFTConfig(side="output")``, LyCORIS's convention ``W' = diag(s) R W``):
exact against a dense reference in every path (rotating the outputs, the folded inference weight,
merge and unmerge, the batched training fold), with strength and several adapters."""

import pytest
import torch
from torch import nn

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from boft_diffusion.core.butterfly import resolve_geometry
from boft_diffusion.core.files import read_adapter_config
from boft_diffusion.core.layers import BOFTConv2d, BOFTLinear, rotated_dim
from conftest import make_tiny_unet, randomize_adapter, unet_inputs
from dense_reference import dense_boft_rotation

BASES = [
    lambda: nn.Linear(12, 16),
    lambda: nn.Conv2d(6, 8, kernel_size=3, padding=1),
    lambda: nn.Conv2d(8, 16, kernel_size=1),
]
INPUTS = [lambda: torch.randn(3, 5, 12), lambda: torch.randn(2, 6, 5, 5), lambda: torch.randn(2, 8, 4, 4)]


def output_layer(index, m=2, block_size=4, seed=0):
    torch.manual_seed(seed)
    base = BASES[index]()
    layer = BOFTLinear(base, "layer") if isinstance(base, nn.Linear) else BOFTConv2d(base, "layer")
    geometry = resolve_geometry(rotated_dim(base, "output"), block_size, 0, m, "layer")
    layer.add_adapter("default", geometry, side="output")
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.boft_skew["default"].normal_(0, 0.3)
        layer.boft_s["default"].copy_(1 + 0.2 * torch.randn(layer.out_features))
    return layer


def reference_weight(layer, name="default"):
    """``diag(s) R W`` from the PEFT-layout tensors through dense permutation and block matrices."""
    boft_r, boft_s = layer.peft_tensors(name)
    rotation = dense_boft_rotation(boft_r.double())
    weight = layer.weight.detach().double()
    flat = rotation @ weight.flatten(1)
    return (flat * boft_s.double().reshape(-1, 1)).reshape(weight.shape)


def reference_forward(layer, x):
    weight = reference_weight(layer).float()
    if isinstance(layer, BOFTLinear):
        return nn.functional.linear(x, weight, layer.bias)
    return layer.base_layer._conv_forward(x, weight, layer.bias)


@pytest.mark.parametrize("index", range(len(BASES)))
@pytest.mark.parametrize("m", [1, 2])
def test_output_side_matches_the_dense_reference_in_every_path(index, m):
    layer = output_layer(index, m)
    x = INPUTS[index]()
    expected = reference_forward(layer, x)
    rotated = layer.train()(x)  # gradients on: the outputs are rotated
    with torch.no_grad():
        folded = layer.eval()(x)  # the folded inference weight R W
    assert torch.allclose(rotated, expected, atol=1e-5)
    assert torch.allclose(folded, expected, atol=1e-5)
    assert torch.allclose(layer.folded_weight("default"), reference_weight(layer).float(), atol=1e-5)
    base = layer.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer.base_layer(x), expected, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.weight, base, atol=1e-5)


def test_output_side_rotates_the_other_axis_than_the_input_side():
    """On a random square weight the two sides give different weights (no exact conversion)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    sides = {}
    for side in ("input", "output"):
        adapted = bd.apply_boft(nn.Sequential(nn.Linear(16, 16)), bd.BOFTConfig(block_size=4, target_modules=["0"],
                                                                            side=side))
        adapted[0].base_layer.load_state_dict(model[0].state_dict())
        with torch.no_grad():
            adapted[0].boft_skew["default"].copy_(torch.linspace(-0.5, 0.5, adapted[0].boft_skew["default"].numel())
                                                  .reshape(adapted[0].boft_skew["default"].shape))
        sides[side] = adapted[0].folded_weight("default")
    assert (sides["input"] - sides["output"]).norm() > 0.1


def test_fresh_output_side_adapter_is_exactly_the_base_and_strength_zero_too():
    layer = output_layer(0)
    x = INPUTS[0]()
    with torch.no_grad():
        layer.boft_skew["default"].zero_()
        layer.boft_s["default"].fill_(1.0)
    assert torch.equal(layer.train()(x), layer.base_layer(x))
    randomized = output_layer(0)
    randomized.specs["default"].strength = 0.0
    with torch.no_grad():
        assert torch.allclose(randomized.eval()(x), randomized.base_layer(x), atol=1e-6)


def test_output_side_grouped_convolution_is_refused():
    conv = BOFTConv2d(nn.Conv2d(8, 8, 3, groups=2), "grouped")
    with pytest.raises(ValueError, match="grouped convolution"):
        conv.add_adapter("default", resolve_geometry(8, 4, 0, 1), side="output")


@pytest.mark.parametrize("m", [1, 2])
def test_output_side_training_fold_equals_rotating_outputs(m):
    """The batched fold of all Linear layers' ``diag(s) R W`` gives the loss and gradients of
    rotating each layer's outputs; a UNet also carries an input-side adapter beside it."""
    unet = make_tiny_unet()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=m, target_modules=targets, side="output"))
    randomize_adapter(unet)
    unet.train()
    results = {}
    for mode in ("rotate", "fold"):
        bd.set_training_fold(unet, mode)
        sample, timestep, context = unet_inputs()
        loss = unet(sample, timestep, encoder_hidden_states=context).sample.square().mean()
        results[mode] = (loss.detach(), torch.autograd.grad(loss, [p for p in unet.parameters() if p.requires_grad]))
    assert torch.allclose(results["fold"][0], results["rotate"][0], rtol=1e-6, atol=0)
    for a, b in zip(results["fold"][1], results["rotate"][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert all(layer.specs["default"].side == "output" for _, layer in boft_layers(unet))


def test_output_side_adapter_saves_and_loads_with_its_side(tmp_path):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=["to_q", "to_out.0", "conv1"], side="output"))
    randomize_adapter(unet)
    unet.eval()
    sample, timestep, context = unet_inputs()
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=context).sample
    bd.save_adapter(unet, tmp_path / "adapter")
    fresh = make_tiny_unet().eval()
    bd.load_adapter(fresh, tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter").side == "output"
    with torch.no_grad():
        assert torch.allclose(fresh(sample, timestep, encoder_hidden_states=context).sample, expected, atol=1e-6)


def test_adapters_of_both_sides_live_on_one_model_and_switch():
    """An input-side and an output-side adapter on the same layers: each, when active, gives its own
    reference weight, and deleting one leaves the other as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv2d(16, 8, 3, padding=1))
    bd.apply_boft(model, bd.BOFTConfig(block_size=4, target_modules=["0", "1"]), adapter_name="inp")
    bd.apply_boft(model, bd.BOFTConfig(block_size=4, target_modules=["0", "1"], side="output"), adapter_name="out")
    for name in ("inp", "out"):
        randomize_adapter(model, name, seed={"inp": 1, "out": 2}[name])
    expected = {}
    for name in ("inp", "out"):
        bd.set_adapter(model, name)
        expected[name] = {i: model[i].folded_weight(name).detach().clone() for i in (0, 1)}
        assert all(model[i].rotates_output(name) == (name == "out") for i in (0, 1))
    assert not torch.allclose(expected["inp"][0], expected["out"][0])
    reference = reference_weight(model[0], "out").float()
    assert torch.allclose(expected["out"][0], reference, atol=1e-5)
    bd.delete_adapter(model, "inp")
    bd.set_adapter(model, "out")
    assert all(torch.equal(model[i].folded_weight("out"), expected["out"][i]) for i in (0, 1))


def test_peft_refuses_an_output_side_folder_instead_of_misreading_it(tmp_path):
    """PEFT would read output-side blocks as input-side ones (silently wrong on square layers), so the
    folder's peft_type is one PEFT does not know."""
    peft = pytest.importorskip("peft")
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=["to_q"], side="output"))
    bd.save_adapter(unet, tmp_path / "adapter")
    with pytest.raises(Exception, match="BOFT_OUTPUT_SIDE"):
        peft.PeftModel.from_pretrained(make_tiny_unet(), tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter").side == "output"
