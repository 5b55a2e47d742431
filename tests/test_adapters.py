import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from conftest import make_tiny_unet, randomize_adapter, run_unet
from dense_reference import dense_boft_weight

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def test_apply_freezes_base_and_counts_parameters(tiny_unet):
    config = bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=ATTENTION)
    bd.apply_boft(tiny_unet, config)
    expected = 0
    for _, layer in boft_layers(tiny_unet):
        n = layer.rotated_dim // 4
        expected += 2 * n * (4 * 3 // 2) + layer.out_features
    assert expected > 0
    assert bd.count_trainable_parameters(tiny_unet) == expected
    trainable = {n for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert all(".boft_" in n for n in trainable)
    names = [n for n, _ in boft_layers(tiny_unet)]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("to_out.0") for n in names)


def test_fresh_adapter_keeps_unet_outputs(tiny_unet, inputs):
    expected = run_unet(tiny_unet, inputs)
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=3, target_modules=ATTENTION))
    tiny_unet.train()
    assert torch.equal(run_unet(tiny_unet, inputs, grad=True), expected)
    tiny_unet.eval()
    assert torch.equal(run_unet(tiny_unet, inputs), expected)


def test_adapters_take_the_mode_of_the_model_they_join(tiny_unet, inputs, tmp_path):
    """An adapter loaded into an eval-mode pipeline must not apply its training-time block dropout."""
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION, dropout=0.5))
    randomize_adapter(tiny_unet)
    bd.save_adapter(tiny_unet, tmp_path / "adapter")
    tiny_unet.train()
    torch.manual_seed(0)
    assert not torch.equal(run_unet(tiny_unet, inputs, grad=True), run_unet(tiny_unet, inputs, grad=True))

    loaded = make_tiny_unet().eval()
    bd.load_adapter(loaded, tmp_path / "adapter")
    assert not any(layer.training for _, layer in boft_layers(loaded))
    tiny_unet.eval()
    assert torch.equal(run_unet(loaded, inputs, grad=True), run_unet(tiny_unet, inputs, grad=True))


def test_invalid_sizes_fail_before_touching_model(tiny_unet):
    config = bd.BOFTConfig(block_size=8, n_butterfly_factor=4, target_modules=ATTENTION)
    with pytest.raises(ValueError, match=r"to_\w.*dimension 32.*valid block sizes"):
        bd.apply_boft(tiny_unet, config)
    assert not list(boft_layers(tiny_unet))
    assert bd.adapter_configs(tiny_unet) == {}


def test_bias_modes(tiny_unet):
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION, bias="boft_only"))
    trainable = [n for n, p in tiny_unet.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert trainable and all(".base_layer.bias" in n for n in trainable)
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=["conv1"], bias="all"), "everything")
    trainable = [n for n, p in tiny_unet.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert any("norm" in n for n in trainable)


def test_several_adapters(tiny_unet, inputs):
    base = run_unet(tiny_unet, inputs)
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION), "first")
    randomize_adapter(tiny_unet, "first", seed=1)
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=8, n_butterfly_factor=1, target_modules=["to_q"]), "second")
    randomize_adapter(tiny_unet, "second", seed=2)
    assert bd.active_adapter(tiny_unet) == "second"
    second = run_unet(tiny_unet, inputs)
    bd.set_adapter(tiny_unet, "first")
    first = run_unet(tiny_unet, inputs)
    assert not torch.allclose(first, second) and not torch.allclose(first, base)
    trainable = {n.split(".")[-1] for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert trainable == {"first"}
    bd.disable_adapters(tiny_unet)
    assert torch.equal(run_unet(tiny_unet, inputs), base)
    bd.enable_adapters(tiny_unet)
    assert torch.equal(run_unet(tiny_unet, inputs), first)
    bd.delete_adapter(tiny_unet, "first")
    assert set(bd.adapter_configs(tiny_unet)) == {"second"}
    bd.set_adapter(tiny_unet, "second")
    assert torch.equal(run_unet(tiny_unet, inputs), second)
    bd.delete_adapter(tiny_unet, "second")
    assert not list(boft_layers(tiny_unet))
    assert torch.equal(run_unet(tiny_unet, inputs), base)


def test_merge_strength_and_unmerge(tiny_unet, inputs):
    base = run_unet(tiny_unet, inputs)
    weights = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION + ["conv1"]))
    randomize_adapter(tiny_unet)
    adapted = run_unet(tiny_unet, inputs)
    bd.set_adapter_strength(tiny_unet, 0.0)
    assert torch.equal(run_unet(tiny_unet, inputs), base)
    bd.set_adapter_strength(tiny_unet, 0.5)
    half = run_unet(tiny_unet, inputs)
    bd.merge_adapter(tiny_unet, safe_merge=True)
    assert torch.allclose(run_unet(tiny_unet, inputs), half, atol=1e-5)
    bd.set_adapter_strength(tiny_unet, 1.0)  # re-merges
    assert torch.allclose(run_unet(tiny_unet, inputs), adapted, atol=1e-5)
    bd.disable_adapters(tiny_unet)  # unmerges
    assert torch.allclose(run_unet(tiny_unet, inputs), base, atol=1e-5)
    for name, param in tiny_unet.named_parameters():
        original = weights.get(name.replace(".base_layer", ""))
        if original is not None:
            assert torch.allclose(param, original, atol=1e-5), name
    with pytest.raises(ValueError, match="strength"):
        bd.set_adapter_strength(tiny_unet, -1.0)


def test_save_load_round_trip_and_file_layout(tiny_unet, inputs, tmp_path):
    config = bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=ATTENTION + ["conv1"])
    bd.apply_boft(tiny_unet, config)
    randomize_adapter(tiny_unet)
    expected = run_unet(tiny_unet, inputs)
    bd.save_adapter(tiny_unet, tmp_path / "adapter", metadata={"instance_prompt": "a photo of sks star", "steps": 3})
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data["peft_type"] == "BOFT" and data["boft_n_butterfly_factor"] == 2
    assert data["boft_diffusion"]["instance_prompt"] == "a photo of sks star"
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert tensors[f"{q}.boft_R"].shape == (2, 8, 4, 4)
    assert tensors[f"{q}.boft_s"].shape == (32, 1)
    conv = "base_model.model.down_blocks.0.resnets.0.conv1"
    assert tensors[f"{conv}.boft_R"].shape == (2, 32 * 9 // 4, 4, 4)
    assert tensors[f"{conv}.boft_s"].shape == (1, 32)

    fresh = make_tiny_unet()
    name = bd.load_adapter(fresh, tmp_path / "adapter")
    assert name == "default"
    assert torch.allclose(run_unet(fresh, inputs), expected, atol=1e-6)
    assert bd.adapter_configs(fresh)["default"].metadata["steps"] == 3


def test_load_rejects_other_model_and_leaves_it_unchanged(tiny_unet, inputs, tmp_path):
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION))
    bd.save_adapter(tiny_unet, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("attn1.to_q.boft_R"))
    tensors[key] = torch.zeros(2, 4, 4, 4)
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    other = make_tiny_unet()
    before = run_unet(other, inputs)
    with pytest.raises(ValueError, match=r"attn1.to_q.*\[2, 4, 4, 4\].*dimension is 32"):
        bd.load_adapter(other, tmp_path / "a")
    assert not list(boft_layers(other)) and torch.equal(run_unet(other, inputs), before)

    tensors["base_model.model.mid_block.not_there.boft_R"] = tensors.pop(key)
    tensors["base_model.model.mid_block.not_there.boft_s"] = tensors.pop(key.replace("boft_R", "boft_s"))
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="mid_block.not_there"):
        bd.load_adapter(other, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        bd.load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        bd.load_adapter(other, tmp_path / "missing")
    assert not list(boft_layers(other))


def test_save_is_atomic_when_interrupted(tiny_unet, tmp_path, monkeypatch):
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION))
    bd.save_adapter(tiny_unet, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomize_adapter(tiny_unet)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("boft_diffusion.core.files.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        bd.save_adapter(tiny_unet, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_load_peft_layout_with_deep_butterfly_matches_dense_reference(tmp_path, inputs):
    """A PEFT-format file with m = 3 and non-skew boft_R (PEFT keeps full matrices)."""
    unet = make_tiny_unet()
    gen = torch.Generator().manual_seed(3)
    tensors, targets = {}, {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")) or name.endswith("resnets.0.conv2"):
            dim = module.weight[0].numel()
            boft_r = torch.randn(3, dim // 4, 4, 4, generator=gen) * 0.3
            s_shape = (module.weight.shape[0], 1) if module.weight.dim() == 2 else (1, module.weight.shape[0])
            boft_s = 1 + 0.1 * torch.randn(s_shape, generator=gen)
            tensors[f"base_model.model.{name}.boft_R"] = boft_r
            tensors[f"base_model.model.{name}.boft_s"] = boft_s
            targets[name] = dense_boft_weight(module.weight.detach(), boft_r, boft_s).float()
    (tmp_path / "peft").mkdir()
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    config = {"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1,
              "target_modules": ["to_q", "to_v", "conv2"], "bias": "none", "boft_dropout": 0.0}
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))

    reference = make_tiny_unet()
    with torch.no_grad():
        for name, weight in targets.items():
            reference.get_submodule(name).weight.copy_(weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bd.load_adapter(unet, tmp_path / "peft")
    assert any("3 factors" in str(w.message) or "[3]" in str(w.message) for w in caught)
    assert all(layer.specs["default"].geometry.n_factors == 3 for _, layer in boft_layers(unet))
    assert torch.allclose(run_unet(unet, inputs), run_unet(reference, inputs), atol=1e-5)


def test_multiple_adapters_keep_their_own_geometry(tmp_path, inputs):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=3, target_modules=ATTENTION), "deep")
    randomize_adapter(unet, "deep")
    bd.apply_boft(unet, bd.BOFTConfig(block_num=2, n_butterfly_factor=1, target_modules=ATTENTION), "flat")
    randomize_adapter(unet, "flat", seed=5)
    bd.save_adapter(unet, tmp_path / "deep", "deep")
    bd.save_adapter(unet, tmp_path / "flat", "flat")
    for name in ("deep", "flat"):
        bd.set_adapter(unet, name)
        expected = run_unet(unet, inputs)
        other = make_tiny_unet()
        bd.load_adapter(other, tmp_path / name, adapter_name=name)
        assert torch.allclose(run_unet(other, inputs), expected, atol=1e-6)


def test_invalid_adapter_name_leaves_model_unchanged(tiny_unet):
    with pytest.raises(ValueError, match="invalid adapter name"):
        bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION), "9 lives")
    assert not list(boft_layers(tiny_unet))


def test_bias_all_round_trip_with_two_adapters(tmp_path, inputs):
    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=["to_q"]), "only_q")
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, target_modules=["to_k"], bias="all"), "with_bias")
    randomize_adapter(unet, "with_bias")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.endswith("bias"):
                param.add_(0.01)
    expected = run_unet(unet, inputs)
    bd.save_adapter(unet, tmp_path / "b", "with_bias")
    keys = load_file(tmp_path / "b" / "adapter_model.safetensors").keys()
    assert not any(".base_layer.bias" in k and "to_q" in k for k in keys)
    fresh = make_tiny_unet()
    bd.load_adapter(fresh, tmp_path / "b")
    assert torch.allclose(run_unet(fresh, inputs), expected, atol=1e-6)


def test_unmerge_uses_the_strength_it_merged_with(tiny_unet):
    weights = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    bd.apply_boft(tiny_unet, bd.BOFTConfig(block_size=4, target_modules=ATTENTION))
    randomize_adapter(tiny_unet)
    bd.set_adapter_strength(tiny_unet, 0.7)
    bd.merge_adapter(tiny_unet)
    for _, layer in boft_layers(tiny_unet):
        layer.specs["default"].strength = 1.3  # changed behind the API's back
    bd.unmerge_adapter(tiny_unet)
    for name, param in tiny_unet.named_parameters():
        original = weights.get(name.replace(".base_layer", ""))
        if original is not None:
            assert torch.allclose(param, original, atol=1e-5), name
