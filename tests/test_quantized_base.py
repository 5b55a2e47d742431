"""A quantised base (--base_quantization, QOFT): the adapter on int8 / fp8 / nf4 weights behaves exactly as
the same adapter on a float model holding the dequantised weights (forward, gradients, inference fold),
the stored weights shrink, and merging refuses rather than rounding the merged weight."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_dreambooth import FAST
from torch import nn

import boft_diffusion as bd
import train_dreambooth
from boft_diffusion.core.adapters import boft_layers
from boft_diffusion.core.quantize import NF4_BLOCK, QuantizedLinear, dequantize, quantize_linears, storage_bytes
from conftest import make_tiny_unet, randomize_adapter, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
METHODS = ["int8", "fp8", "nf4"]


def adapt(unet):
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=TARGETS))
    randomize_adapter(unet)
    return unet


def quantized_and_dequantized(method):
    """The tiny UNet with its Linear weights quantised, and a float twin holding the dequantised weights;
    the same adapter on both."""
    quantized = make_tiny_unet().requires_grad_(False)
    assert bd.quantize_linears(quantized, method) > 0
    plain = copy.deepcopy(quantized)
    bd.dequantize_linears(plain)
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    return adapt(quantized), adapt(plain)


@pytest.mark.parametrize("method", METHODS)
def test_weights_round_trip_within_the_quantisation_step(method):
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    weight[3] = 0  # an all-zero row stays zero
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = QuantizedLinear(linear, method)
    error = (layer.weight - weight).abs()
    row_max = weight.abs().amax(1, keepdim=True)
    bound = {"int8": row_max / 127 / 2, "fp8": row_max / 16, "nf4": torch.full_like(weight, weight.abs().max() * 0.09)}
    assert (error <= bound[method] + 1e-7).all()
    assert torch.equal(layer.weight[3], torch.zeros(40))
    assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad


def test_nf4_pads_a_weight_whose_size_is_no_multiple_of_the_block():
    linear = nn.Linear(7, 5)  # 35 values: one padded block
    layer = QuantizedLinear(linear, "nf4")
    assert layer.weight_scale.numel() == 1 and 35 < NF4_BLOCK
    assert layer.weight_data.numel() == NF4_BLOCK // 2
    assert dequantize("nf4", layer.weight_data, layer.weight_scale, (5, 7)).shape == (5, 7)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_on_quantised_base_equals_adapter_on_dequantised_weights(method):
    quantized, plain = quantized_and_dequantized(method)
    sample, timestep, context = unet_inputs()
    outputs, grads = [], []
    for model in (quantized, plain):
        model.train()
        out = model(sample, timestep, encoder_hidden_states=context).sample
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert grads[0] and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads, strict=True))
    for model in (quantized, plain):  # inference folds diag(s) W R^T against the dequantised W
        model.eval()
    with torch.no_grad():
        first = quantized(sample, timestep, encoder_hidden_states=context).sample
        folds = {name: layer._folded for name, layer in boft_layers(quantized)}
        again = quantized(sample, timestep, encoder_hidden_states=context).sample
        reference = plain(sample, timestep, encoder_hidden_states=context).sample
    assert torch.allclose(first, reference, rtol=1e-5, atol=1e-6) and torch.equal(first, again)
    assert all(layer._folded is folds[name] for name, layer in boft_layers(quantized)), "the fold was recomputed"


def test_quantised_linears_take_a_quarter_of_the_bytes():
    unet = make_tiny_unet().requires_grad_(False)
    linears = {name: m for name, m in unet.named_modules() if type(m) is nn.Linear}
    linear_bytes = sum(storage_bytes(m) for m in linears.values())
    before = storage_bytes(unet)
    bd.quantize_linears(unet, "int8")
    # per layer: 1 byte a weight and a float32 scale a row, against 4 bytes a weight
    after_linear = sum(storage_bytes(unet.get_submodule(name)) for name in linears)
    assert after_linear < 0.3 * linear_bytes
    assert storage_bytes(unet) == before - linear_bytes + after_linear


def test_merging_a_quantised_base_is_refused_and_works_once_dequantised():
    quantized, _ = quantized_and_dequantized("int8")
    quantized.eval()
    sample, timestep, context = unet_inputs()
    with torch.no_grad():
        expected = quantized(sample, timestep, encoder_hidden_states=context).sample
    with pytest.raises(ValueError, match=r"quantised \(int8\).*unquantised base"):
        bd.merge_adapter(quantized)
    with pytest.raises(ValueError, match="quantised"):
        next(layer for _, layer in boft_layers(quantized) if isinstance(layer.base_layer, QuantizedLinear)).merge()
    assert not any(layer.merged for _, layer in boft_layers(quantized)), "a refused merge merged some layers"
    bd.dequantize_linears(quantized)
    bd.merge_adapter(quantized)
    with torch.no_grad():
        merged = quantized(sample, timestep, encoder_hidden_states=context).sample
    assert torch.allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_int8_training_saves_an_adapter_for_the_float_base_and_resumes_exactly(tmp_path, caplog):
    """train_dreambooth.py --base_quantization int8: trains (against the rounded weights: another adapter
    than the float run's), resumes bitwise, and its adapter loads on the unquantised base, where it acts
    as on the quantised one up to the quantisation error."""
    def train(out, *flags) -> int:
        return train_dreambooth.main([*FAST, "--output_dir", str(out), "--boft_dropout", "0", "--learning_rate", "0.05",
                                      *map(str, flags)])

    whole, resumed, unquantized = tmp_path / "whole", tmp_path / "resumed", tmp_path / "float"
    with caplog.at_level("INFO", logger="boft_diffusion"):
        assert train(whole, "--max_train_steps", "3", "--base_quantization", "int8") == 0
    assert any("stored as int8" in record.getMessage() for record in caplog.records)
    assert train(resumed, "--max_train_steps", "2", "--checkpointing_steps", "1", "--base_quantization", "int8") == 0
    assert train(resumed, "--max_train_steps", "3", "--resume_from_checkpoint", str(resumed / "checkpoint-1"),
                 "--overwrite_output_dir", "--base_quantization", "int8") == 0
    assert train(unquantized, "--max_train_steps", "3") == 0
    name = "adapter_model.safetensors"
    trained, again, floats = (load_file(folder / name) for folder in (whole, resumed, unquantized))
    assert all(torch.equal(trained[key], again[key]) for key in trained)
    assert any(not torch.equal(trained[key], floats[key]) for key in trained), "the base was not quantised"

    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(sample, 10, context).sample
        bd.load_adapter(pipe.unet, whole)
        on_float = pipe.unet(sample, 10, context).sample
        quantize_linears(pipe.unet.requires_grad_(False), "int8")
        on_int8 = pipe.unet(sample, 10, context).sample
    assert not torch.allclose(on_float, base, atol=1e-4), "the adapter changes nothing"
    assert (on_int8 - on_float).abs().mean() < 0.02 * on_float.abs().mean()
