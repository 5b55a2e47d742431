"""Exports for other tools: diffusers' LoRA and textual-inversion loaders, kohya keys, LyCORIS diff."""

import pytest
import torch
from safetensors.torch import load_file

import boft_diffusion as bd
from boft_diffusion.core.adapters import base_state_dict, boft_layers, merged_state_dict
from boft_diffusion.core.files import save_identifier_embeddings
from boft_diffusion.core.identifier import add_identifier_embeddings
from boft_diffusion.core.lycoris import checkpoint_prefix, kohya_names, module_names_by_kohya
from boft_diffusion.export import export_adapter, load_for_export, main
from boft_diffusion.exports.layouts import KOHYA_PREFIXES, choose_rank, low_rank
from boft_diffusion.exports.writers import PEFT_LORA_WEIGHTS
from boft_diffusion.families.loading import quiet_progress
from boft_diffusion.outputs.write import TEXT_ENCODER_FOLDER
from conftest import encode, randomize_adapter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "conv_shortcut", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def save_trained_adapter(folder, bias: str = "none", text_encoder: bool = True) -> None:
    """A train_dreambooth.py-style folder with non-trivial values: UNet, text encoder, identifier."""
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    unet_config = bd.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=UNET_TARGETS, bias=bias,
                                base_model_name_or_path="tiny", metadata={"instance_prompt": "a photo of sks star"})
    bd.apply_boft(pipe.unet, unet_config)
    randomize_adapter(pipe.unet, scale=0.2)
    if bias != "none":
        with torch.no_grad():
            for _, layer in boft_layers(pipe.unet):
                if layer.bias is not None:
                    layer.bias.add_(0.05 * torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(3)))
    bd.save_adapter(pipe.unet, folder)
    if text_encoder:
        bd.apply_boft(pipe.text_encoder, bd.BOFTConfig(block_size=8, target_modules=TEXT_TARGETS,
                                                       base_model_name_or_path="tiny"))
        randomize_adapter(pipe.text_encoder, scale=0.2, seed=1)
        bd.save_adapter(pipe.text_encoder, folder / TEXT_ENCODER_FOLDER)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"],
                              torch.randn(1, width, generator=torch.Generator().manual_seed(2)))
    save_identifier_embeddings(pipe.text_encoder, folder)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_trained_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def adapted(adapter_dir):
    return load_for_export(adapter_dir)


@pytest.fixture(scope="module")
def peft_full_rank(adapter_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft_full")
    export_adapter(adapter_dir, "peft-lora", folder, energy=1.0)
    return folder


def fresh_pipe():
    return quiet_progress(bd.load_pipeline("tiny", dtype=torch.float32))


def unet_output(pipe, context: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([10, 600]), encoder_hidden_states=context).sample


def fixed_context(pipe) -> torch.Tensor:
    width = pipe.unet.config.cross_attention_dim
    return torch.randn(2, 7, width, generator=torch.Generator().manual_seed(5))


def lora_layer_count(model) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))


def test_peft_lora_at_full_rank_loads_in_diffusers_and_matches_boft(adapted, peft_full_rank):
    keys = load_file(str(peft_full_rank / PEFT_LORA_WEIGHTS)).keys()
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(peft_full_rank))
    assert lora_layer_count(pipe.unet) == len(list(boft_layers(adapted.pipe.unet)))
    assert lora_layer_count(pipe.text_encoder) == len(list(boft_layers(adapted.pipe.text_encoder)))
    context = fixed_context(pipe)
    expected, got = unet_output(adapted.pipe, context), unet_output(pipe, context)
    assert not torch.allclose(unet_output(fresh_pipe(), context), expected, atol=1e-2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(encode(pipe, "a photo of star"), encode(adapted.pipe, "a photo of star"),
                               rtol=1e-4, atol=1e-4)


def test_kohya_lora_loads_with_diffusers_conversion_like_peft_lora(adapter_dir, tmp_path):
    kohya_file = tmp_path / "kohya.safetensors"
    export_adapter(adapter_dir, "lora", kohya_file, rank=4)
    export_adapter(adapter_dir, "peft-lora", tmp_path / "peft", rank=4)
    keys = load_file(str(kohya_file)).keys()
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for key in keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    kohya, peft = fresh_pipe(), fresh_pipe()
    kohya.load_lora_weights(str(kohya_file))
    peft.load_lora_weights(str(tmp_path / "peft"))
    assert lora_layer_count(kohya.unet) == lora_layer_count(peft.unet) > 0
    assert lora_layer_count(kohya.text_encoder) == lora_layer_count(peft.text_encoder) > 0
    context = fixed_context(kohya)
    torch.testing.assert_close(unet_output(kohya, context), unet_output(peft, context), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode(kohya, "a photo of star"), encode(peft, "a photo of star"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_diff_applied_by_key_equals_merged_state_dict(tmp_path, component):
    save_trained_adapter(tmp_path / "adapter", bias="boft_only")
    export_adapter(tmp_path / "adapter", "diff", tmp_path / "diff.safetensors")
    diff = load_file(str(tmp_path / "diff.safetensors"))
    assert any(key.endswith(".diff_b") for key in diff) and any(key.startswith("lora_te_") for key in diff)
    model = getattr(bd.load_pipeline("tiny", dtype=torch.float32), component)
    applied = model.state_dict()
    path = checkpoint_prefix(model)
    by_kohya = module_names_by_kohya(KOHYA_PREFIXES[component], (path + key.rpartition(".")[0] for key in applied))
    modules = {key: name.removeprefix(path) for key, name in by_kohya.items()}
    suffixes = {".diff": "weight", ".diff_b": "bias"}
    for key, delta in diff.items():
        kohya, _, kind = key.rpartition(".")
        if kohya in modules:
            name = f"{modules[kohya]}.{suffixes['.' + kind]}"
            applied[name] = applied[name] + delta
    adapted = getattr(load_for_export(tmp_path / "adapter").pipe, component)
    merged = merged_state_dict(adapted)
    merged.update({k: v for k, v in applied.items() if k.endswith("token_embedding.weight")})
    assert applied.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(applied[key], merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lycoris_reads_the_diff_file_for_a_diffusers_unet(tmp_path):
    """LyCORIS's kohya loader names keys from the modules it is given: the UNet as is; the text
    encoder under ``text_model`` (transformers >= 5 flattened it, so it is wrapped here)."""
    kohya = pytest.importorskip("lycoris.kohya")
    save_trained_adapter(tmp_path / "adapter", bias="boft_only")
    export_adapter(tmp_path / "adapter", "diff", tmp_path / "diff.safetensors")
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    text_encoder = torch.nn.ModuleDict({"text_model": pipe.text_encoder})
    target_names = kohya.LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME
    # its default targets match diffusers' time_embedding twice (by class and by name)
    kohya.LycorisNetworkKohya.apply_preset({"unet_target_name": []})
    try:
        network, weights = kohya.create_network_from_weights(1.0, str(tmp_path / "diff.safetensors"), None,
                                                             text_encoder, pipe.unet)
    finally:
        kohya.LycorisNetworkKohya.apply_preset({"unet_target_name": target_names})
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len({key.split(".")[0] for key in weights})
    network.merge_to(text_encoder, pipe.unet, weights, torch.float32, "cpu")
    adapted = load_for_export(tmp_path / "adapter").pipe
    for component in ("unet", "text_encoder"):
        merged, got = merged_state_dict(getattr(adapted, component)), getattr(pipe, component).state_dict()
        for key in merged:
            if not key.endswith("token_embedding.weight"):
                torch.testing.assert_close(got[key], merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_identifier_exports_as_textual_inversion_with_the_same_encoding(adapted, peft_full_rank):
    embedding = peft_full_rank / "sks.safetensors"
    assert list(load_file(str(embedding))) == ["<sks>"]
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(peft_full_rank))
    pipe.load_textual_inversion(str(embedding))
    assert len(pipe.tokenizer("a photo of <sks> star").input_ids) == len(pipe.tokenizer("a photo of sks star").input_ids)
    torch.testing.assert_close(encode(pipe, "a photo of <sks> star"), encode(adapted.pipe, "a photo of sks star"),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(encode(pipe, "a photo of sks star"), encode(adapted.pipe, "a photo of sks star"),
                              atol=1e-3)


def test_kohya_names_are_a_bijection_computed_from_the_model(adapted):
    unet = adapted.pipe.unet
    modules = {key.rpartition(".")[0] for key in base_state_dict(unet)}
    adapted_modules = [name for name, _ in boft_layers(unet)]
    names = kohya_names("lora_unet", adapted_modules, modules)
    assert len(set(names.values())) == len(names)
    inverse = module_names_by_kohya("lora_unet", modules)
    assert all(inverse[key] == name for name, key in names.items())
    assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    with pytest.raises(ValueError, match="shared by"):
        kohya_names("lora_unet", ["a.b_c"], ["a.b_c", "a_b.c"])


def test_rank_choice_and_truncation_error():
    delta = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    full = low_rank(delta, energy=1.0)
    assert full.rank == 16
    torch.testing.assert_close(full.product(), delta, rtol=1e-5, atol=1e-5)
    four = low_rank(delta, rank=4)
    assert four.up.shape == (16, 4, 1, 1) and four.down.shape == (4, 8, 3, 3)
    assert four.relative_error == pytest.approx(float((delta - four.product()).norm() / delta.norm()), rel=1e-4)
    values = torch.tensor([3.0, 2.0, 1.0])
    assert choose_rank(values, None, 9 / 14) == 1 and choose_rank(values, None, 0.65) == 2
    assert choose_rank(values, 10, None) == 3


def test_lora_command_prints_block_and_output_errors(adapter_dir, tmp_path, capsys):
    assert main([str(adapter_dir), "--format", "lora", "--rank", "4", "--output", str(tmp_path / "r4.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "unet down_blocks.0 " in printed and "encoder.layers.0 " in printed
    assert "overall ||dW - dW_r|| / ||dW||" in printed and "UNet output on a fixed input" in printed
    assert (tmp_path / "r4.safetensors").is_file() and (tmp_path / "sks.safetensors").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("argv, culprit", [
    (["--format", "lora", "--rank", "0"], "rank must be a positive integer, got 0"),
    (["--format", "lora", "--energy", "1.5"], "energy must be in (0, 1], got 1.5"),
    (["--format", "lora", "--energy", "0"], "energy must be in (0, 1], got 0.0"),
    (["--format", "diff", "--rank", "4"], "apply to the LoRA formats only"),
    (["--format", "peft-lora"], "a peft-lora export is a folder"),
])
def test_bad_requests_name_the_culprit(adapter_dir, tmp_path, capsys, argv, culprit):
    assert main([str(adapter_dir), *argv, "--output", str(tmp_path / "out.safetensors")]) == 2
    assert culprit in capsys.readouterr().err


def test_output_named_like_the_identifier_file_is_refused(adapter_dir, tmp_path, capsys):
    assert main([str(adapter_dir), "--format", "diff", "--output", str(tmp_path / "sks.safetensors")]) == 2
    assert "identifier embedding 'sks'" in capsys.readouterr().err
    assert not (tmp_path / "sks.safetensors").exists()


def test_missing_folder_and_adapter_for_another_model(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--format", "diff", "--output", str(tmp_path / "d.safetensors")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    from conftest import make_tiny_unet

    unet = make_tiny_unet()
    bd.apply_boft(unet, bd.BOFTConfig(block_size=8, target_modules=["to_q"], base_model_name_or_path="tiny"))
    bd.save_adapter(unet, tmp_path / "other")
    assert main([str(tmp_path / "other"), "--format", "diff", "--output", str(tmp_path / "d.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "other" in error and "to_q" in error
    assert main([str(tmp_path / "other"), "--format", "merged", "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "single-file" in capsys.readouterr().err


def test_merged_export_replaces_an_existing_folder(adapter_dir, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("old")
    export_adapter(adapter_dir, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged" / "stale.txt").exists()
    assert (tmp_path / "merged" / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
