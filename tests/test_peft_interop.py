"""Files interchange with Hugging Face PEFT's BOFT at butterfly depths m = 1, 2 and 4.

PEFT runs m > 1 only through its CUDA extension (fbd_cuda, compiled at run time); without it,
PEFT builds m = 1 layers whatever its config says. What docs/adapter_format.md and the model cards state is
checked here: PEFT loads our m = 1 folders and gives our outputs; it refuses our m > 1 folders
with a size mismatch on ``boft_R``; we load the folders PEFT writes at every depth, holding the
depth PEFT actually ran (m = 1 without the extension), with PEFT's outputs.
"""

import warnings

import pytest
import torch

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from conftest import make_tiny_unet, randomize_adapter, run_unet

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
DEPTHS = [1, 2, 4]


def peft_runs_deep() -> bool:
    """Whether PEFT honours m > 1 here: only on CUDA, and only when its extension compiles."""
    if not torch.cuda.is_available():
        return False
    from peft.tuners.boft.layer import get_fbd_cuda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_fbd_cuda() is not None


def skip_where_peft_runs_deep(depth: int) -> None:
    if depth > 1 and peft_runs_deep():
        pytest.skip("PEFT's CUDA extension loaded: its m > 1 runs on the GPU only; "
                    "check it with `python benchmarks/peft_depth_check.py --device cuda`.")


def peft_outputs(model, inputs):
    sample, timestep, context = inputs
    with torch.no_grad():
        return model(sample, timestep, encoder_hidden_states=context).sample


def peft_load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_tiny_unet(), str(folder)).eval()


def our_adapter(folder, depth: int, inputs) -> torch.Tensor:
    """Save a trained-looking adapter of depth ``depth`` in ``folder``; return its UNet outputs."""
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=depth, target_modules=TARGETS))
    randomize_adapter(unet)
    bd.save_adapter(unet, folder)
    return run_unet(unet, inputs)


@pytest.mark.parametrize("depth", DEPTHS)
def test_we_read_our_adapter_at_every_depth(tmp_path, inputs, depth):
    ours = our_adapter(tmp_path / "ours", depth, inputs)
    unet = make_tiny_unet()
    bd.load_adapter(unet, tmp_path / "ours")
    assert torch.equal(run_unet(unet, inputs), ours)


def test_peft_reads_our_depth_one_adapter(tmp_path, inputs):
    ours = our_adapter(tmp_path / "ours", 1, inputs)
    peft_model = peft_load(tmp_path / "ours")
    wrapped = [n for n, m in peft_model.named_modules() if type(m).__name__ == "Conv2d" and hasattr(m, "boft_R")]
    assert wrapped, "PEFT did not adapt the Conv2d targets"
    theirs = peft_outputs(peft_model, inputs)
    assert not torch.allclose(theirs, run_unet(make_tiny_unet(), inputs), atol=1e-3)
    assert torch.allclose(theirs, ours, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 4])
def test_peft_without_its_cuda_extension_refuses_our_deeper_adapter(tmp_path, inputs, depth):
    skip_where_peft_runs_deep(depth)
    our_adapter(tmp_path / "ours", depth, inputs)
    with pytest.raises(RuntimeError, match=rf"size mismatch for \S+boft_R\S*: copying a param with shape "
                                           rf"torch.Size\(\[{depth}, \d+, 4, 4\]\)"):
        peft_load(tmp_path / "ours")


@pytest.mark.parametrize("depth", DEPTHS)
def test_we_read_peft_adapter(tmp_path, inputs, depth):
    skip_where_peft_runs_deep(depth)
    config = peft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=depth, target_modules=TARGETS, init_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        peft_model = peft.get_peft_model(make_tiny_unet(), config)
    peft_model.eval()
    theirs = peft_outputs(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "theirs"))

    unet = make_tiny_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bd.load_adapter(unet, tmp_path / "theirs")
    ran = 1  # the depth PEFT built without its extension, and so wrote
    assert {layer.specs["default"].geometry.n_factors for _, layer in boft_layers(unet)} == {ran}
    if depth > ran:
        assert any(f"n_butterfly_factor={depth} but its tensors hold [{ran}]" in str(w.message) for w in caught)
    ours = run_unet(unet, inputs)
    assert not torch.allclose(ours, run_unet(make_tiny_unet(), inputs), atol=1e-5)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and our training path (input-side rotation) agrees with PEFT's dense path too
    unet.train()
    assert torch.allclose(run_unet(unet, inputs, grad=True), theirs, atol=1e-5)
