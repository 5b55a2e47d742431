"""Files interchange with Hugging Face PEFT's BOFT (on CPU PEFT runs m = 1 only)."""

import warnings

import pytest
import torch

import boft_diffusion as bd
from conftest import make_tiny_unet, randomize_adapter, run_unet

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def peft_outputs(model, inputs):
    sample, timestep, context = inputs
    with torch.no_grad():
        return model(sample, timestep, encoder_hidden_states=context).sample


def test_peft_reads_our_adapter(tmp_path, inputs):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=1, target_modules=TARGETS))
    randomize_adapter(unet)
    ours = run_unet(unet, inputs)
    bd.save_adapter(unet, tmp_path / "ours")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(make_tiny_unet(), str(tmp_path / "ours"))
    peft_model.eval()
    wrapped = [n for n, m in peft_model.named_modules() if type(m).__name__ == "Conv2d" and hasattr(m, "boft_R")]
    assert wrapped, "PEFT did not adapt the Conv2d targets"
    theirs = peft_outputs(peft_model, inputs)
    assert not torch.allclose(theirs, run_unet(make_tiny_unet(), inputs), atol=1e-3)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_we_read_peft_adapter(tmp_path, inputs):
    config = peft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=1, target_modules=TARGETS, init_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        peft_model = peft.get_peft_model(make_tiny_unet(), config)
    peft_model.eval()
    theirs = peft_outputs(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "theirs"))

    unet = make_tiny_unet()
    bd.load_adapter(unet, tmp_path / "theirs")
    ours = run_unet(unet, inputs)
    assert not torch.allclose(ours, run_unet(make_tiny_unet(), inputs), atol=1e-3)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and our training path (input-side rotation) agrees with PEFT's dense path too
    unet.train()
    assert torch.allclose(run_unet(unet, inputs, grad=True), theirs, atol=1e-5)
