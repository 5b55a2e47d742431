"""``--format lycoris``: output-side BOFT adapters exported as LyCORIS ``oft_blocks`` files give our
merged weights in the real ``lycoris-lora`` package (full-butterfly geometry) and in independent
re-implementations of ComfyUI's and A1111's formulas (any depth), SD and SDXL, trained biases
included; and such files, ours or LyCORIS's own, load back into our pipelines."""

import pytest
import torch
from foreign_loaders import a1111_patch, comfyui_patch
from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights
from safetensors.torch import load_file, save_file

import boft_diffusion as bd
from boft_diffusion.core.adapters import base_state_dict, boft_layers, merged_state_dict
from boft_diffusion.core.lycoris import COMPONENT_PREFIXES, lycoris_modules, modules_named_by
from boft_diffusion.export import export_adapter
from boft_diffusion.outputs.read import load_outputs
from conftest import make_tiny_sdxl, randomize_adapter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
#: geometry name -> BOFTConfig fields: plain OFT-like depth 1, depth 2, and LyCORIS's full butterfly
GEOMETRIES = {"m1": dict(n_butterfly_factor=1), "m2": dict(n_butterfly_factor=2), "full": dict(full_butterfly=True)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"sd": "tiny", "sdxl": str(make_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl"))}


def text_encoders(pipe) -> dict:
    names = ["text_encoder", "text_encoder_2"] if getattr(pipe, "text_encoder_2", None) is not None else ["text_encoder"]
    return {name: getattr(pipe, name) for name in names}


def output_side_adapter(model: str, folder, geometry: str, block_size: int = 8):
    """A trained-looking output-side adapter folder: UNet (with trained biases) and text encoder(s)."""
    pipe = bd.load_pipeline(model, dtype=torch.float32)
    common = dict(block_size=block_size, side="output", base_model_name_or_path=model, **GEOMETRIES[geometry])
    bd.apply_boft(pipe.unet, bd.BOFTConfig(target_modules=UNET_TARGETS, bias="boft_only", **common))
    randomize_adapter(pipe.unet, scale=0.2)
    with torch.no_grad():
        for _, layer in boft_layers(pipe.unet):
            if layer.bias is not None:
                layer.bias.add_(0.05 * torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(3)))
    bd.save_adapter(pipe.unet, folder)
    for seed, (name, encoder) in enumerate(text_encoders(pipe).items(), start=1):
        bd.apply_boft(encoder, bd.BOFTConfig(target_modules=TEXT_TARGETS, **common))
        randomize_adapter(encoder, scale=0.2, seed=seed)
        bd.save_adapter(encoder, folder / name)
    return folder


def merged_and_base(model: str, source) -> tuple[dict, dict]:
    """Per component: our merged state dict of ``source`` (folder or file) and the base's."""
    pipe = bd.load_pipeline(model, dtype=torch.float32)
    loaded = load_outputs(pipe, source)
    components = {"unet": pipe.unet, **text_encoders(pipe)}
    return ({name: merged_state_dict(module) for name, module in components.items() if module in loaded.models},
            {name: base_state_dict(module) for name, module in components.items()})


def file_modules(pipe, tensors) -> dict:
    """(component, module name) -> that module's tensors in the file, by kohya name."""
    groups = lycoris_modules(tensors)
    components = {"unet": pipe.unet, **text_encoders(pipe)}
    return {(component, name): groups[key] for component, model in components.items()
            for key, name in modules_named_by(model, groups, COMPONENT_PREFIXES[component]).items()}


@pytest.mark.parametrize("model", ["sd", "sdxl"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_comfyui_and_a1111_formulas_give_our_merged_weights(models, tmp_path, model, geometry):
    folder = output_side_adapter(models[model], tmp_path / "adapter", geometry)
    exported = export_adapter(folder, "lycoris", tmp_path / "boft.safetensors").paths[0]
    tensors = load_file(exported)
    merged, base = merged_and_base(models[model], folder)
    by_module = file_modules(bd.load_pipeline(models[model], dtype=torch.float32), tensors)
    assert len(by_module) == len(lycoris_modules(tensors)), "every key names a module"
    adapted = sum(1 for parts in by_module.values() if "oft_blocks" in parts)
    assert adapted == sum(len([k for k in m if k.endswith(".weight") and not torch.equal(m[k], base[c][k])])
                          for c, m in merged.items())
    biases = 0
    for (component, name), parts in by_module.items():
        weight, bias = base[component][f"{name}.weight"], base[component].get(f"{name}.bias")
        comfy_weight, comfy_bias = comfyui_patch(weight, bias, parts)
        assert torch.allclose(comfy_weight, merged[component][f"{name}.weight"], atol=1e-5), (component, name)
        assert torch.allclose(a1111_patch(weight, parts), merged[component][f"{name}.weight"], atol=1e-5)
        if "diff_b" in parts:
            biases += 1
            assert torch.allclose(comfy_bias, merged[component][f"{name}.bias"], atol=1e-6)
    assert biases > 0, "the UNet's trained biases travel as diff_b"
    depths = {parts["oft_blocks"].shape[0] for parts in by_module.values()}
    assert depths == ({1} if geometry == "m1" else {2} if geometry == "m2" else depths) and len(depths) >= 1


def lycoris_merge(module, tensors, prefix: str) -> int:
    """Merge the file into ``module`` with lycoris-lora itself (keys under ``prefix``); the number
    of LyCORIS modules it built."""
    previous = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network, _ = create_lycoris_from_weights(1.0, None, module, weights_sd=tensors)
    finally:
        LycorisNetwork.LORA_PREFIX = previous
    network.merge_to(1.0)
    return len(network.loras)


#: kohya prefix per component as lycoris-lora matches it against diffusers / transformers 5 module paths
LYCORIS_PREFIXES = {"sd": {"unet": "lora_unet", "text_encoder": "lora_te_text_model"},
                    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1_text_model", "text_encoder_2": "lora_te2"}}


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_lycoris_lora_loads_the_full_butterfly_export_and_merges_our_weights(models, tmp_path, model):
    folder = output_side_adapter(models[model], tmp_path / "adapter", "full")
    tensors = load_file(export_adapter(folder, "lycoris", tmp_path / "boft.safetensors").paths[0])
    merged, _ = merged_and_base(models[model], folder)
    plain = bd.load_pipeline(models[model], dtype=torch.float32)
    for component, prefix in LYCORIS_PREFIXES[model].items():
        module = getattr(plain, component)
        weights_only = {k: v for k, v in tensors.items() if not k.endswith(".diff_b")}
        built = lycoris_merge(module, weights_only, prefix)
        expected = merged[component]
        adapted = [key for key in expected if key.endswith(".weight") and
                   not torch.equal(expected[key], base_state_dict(getattr(bd.load_pipeline(models[model]), component))[key])]
        assert built == len(adapted) > 0, component
        state = module.state_dict()
        for key in adapted:
            assert torch.allclose(state[key], expected[key], atol=1e-5), (component, key)


def test_our_export_loads_back_into_a_pipeline_as_it_was(models, tmp_path):
    folder = output_side_adapter(models["sd"], tmp_path / "adapter", "m2")
    exported = export_adapter(folder, "lycoris", tmp_path / "boft.safetensors").paths[0]
    from_folder, _ = merged_and_base("tiny", folder)
    from_file, _ = merged_and_base("tiny", exported)
    assert set(from_file) == {"unet", "text_encoder"}
    for component, state in from_folder.items():
        for key, value in state.items():
            assert torch.allclose(from_file[component][key], value, atol=1e-5), (component, key)


def test_a_lycoris_trained_file_with_a_norm_cap_loads_as_lycoris_merges_it(tmp_path):
    """A file as LyCORIS (and SimpleTuner through it) writes one for a diffusers UNet: ``lycoris_`` keys,
    blocks that are not skew-symmetric, a rescale, and alpha 0.01 (a cap of 0.01 x out_dim that bites)."""
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v", "resnets.0.conv1")):
            out = module.weight.shape[0]
            blocks = out // 8
            key = "lycoris_" + name.replace(".", "_")
            tensors[f"{key}.oft_blocks"] = torch.randn(blocks.bit_length(), blocks, 8, 8, generator=gen) * 0.3
            tensors[f"{key}.rescale"] = 1 + 0.1 * torch.randn(out, *[1] * (module.weight.dim() - 1), generator=gen)
            tensors[f"{key}.alpha"] = torch.tensor(0.01)
    path = tmp_path / "simpletuner.safetensors"
    save_file(tensors, path)
    reference = bd.load_pipeline("tiny", dtype=torch.float32).unet
    assert lycoris_merge(reference, dict(tensors), "lycoris") == len(tensors) // 3
    bd.load_adapter(pipe.unet, path)
    ours = merged_state_dict(pipe.unet)
    for key, value in reference.state_dict().items():
        assert torch.allclose(ours[key], value, atol=1e-5), key


def test_input_side_adapters_are_refused_naming_the_exact_alternatives(tmp_path):
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.apply_boft(pipe.unet, bd.BOFTConfig(block_size=8, target_modules=["to_q"], base_model_name_or_path="tiny"))
    bd.save_adapter(pipe.unet, tmp_path / "adapter")
    with pytest.raises(ValueError, match="rotates the input side.*--format diff.*lora.*--boft_side output"):
        export_adapter(tmp_path / "adapter", "lycoris", tmp_path / "boft.safetensors")
    assert not (tmp_path / "boft.safetensors").exists()


def test_the_app_lists_and_samples_a_lycoris_file_as_its_folder(tmp_path):
    from boft_diffusion.app.studio import NO_ADAPTER, GenerationRequest, Limits, Studio

    adapters = tmp_path / "adapters"
    folder = output_side_adapter("tiny", adapters / "star", "m2")
    export_adapter(folder, "lycoris", adapters / "exports" / "star_boft.safetensors")
    (adapters / "exports" / "notes.safetensors").write_bytes(b"not a safetensors file")
    studio = Studio("tiny", adapters, Limits(max_size=128, max_steps=10, max_images=2))
    assert studio.list_adapters() == [NO_ADAPTER, "exports/star_boft.safetensors", "star"]
    assert studio.adapter_info("exports/star_boft.safetensors")["format"] == "lycoris"

    def generate(adapter):
        image = studio.generate(GenerationRequest(prompt="a photo of sks star", adapter=adapter, seed=0,
                                                  steps=4, width=64, height=64))[0][0]
        return torch.tensor(list(image.getdata()), dtype=torch.float32)

    from_file, from_folder, base = generate("exports/star_boft.safetensors"), generate("star"), generate(NO_ADAPTER)
    assert (from_file - from_folder).abs().max() <= 2  # 8-bit pixels, float rounding apart
    assert (from_file - base).abs().mean() > 1


def test_damaged_or_foreign_oft_blocks_are_refused_naming_the_key(tmp_path):
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    key = "lora_unet_" + name.replace(".", "_")
    out = pipe.unet.get_submodule(name).weight.shape[0]
    for blocks in (torch.zeros(2, out // 8 + 1, 8, 8), torch.zeros(8, out // 8, 8, 8), torch.zeros(out // 8, 8, 8)):
        path = tmp_path / "bad.safetensors"
        save_file({f"{key}.oft_blocks": blocks, f"{key}.alpha": torch.tensor(0.0)}, path)
        with pytest.raises(ValueError, match=key):
            bd.load_adapter(pipe.unet, path)
        assert not list(boft_layers(pipe.unet)), "nothing was installed"


def test_one_name_for_every_component_and_nothing_left_on_failure(models, tmp_path):
    folder = output_side_adapter(models["sd"], tmp_path / "adapter", "m2")
    exported = export_adapter(folder, "lycoris", tmp_path / "boft.safetensors").paths[0]
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.apply_boft(pipe.unet, bd.BOFTConfig(block_size=8, target_modules=["to_q"]))  # "default" taken on the UNet
    loaded = load_outputs(pipe, exported)
    assert loaded.adapter_name == "boft"
    assert {layer.active_adapter for _, layer in boft_layers(pipe.unet) if "boft" in layer.specs} == {"boft"}
    assert all("boft" in layer.specs for _, layer in boft_layers(pipe.text_encoder))
    tensors = load_file(exported)
    broken = {k: (v[:, :-1].contiguous() if k.startswith("lora_te") and k.endswith("oft_blocks") else v)
              for k, v in tensors.items()}
    save_file(broken, tmp_path / "broken.safetensors")
    fresh = bd.load_pipeline("tiny", dtype=torch.float32)
    with pytest.raises(ValueError, match="lora_te"):
        load_outputs(fresh, tmp_path / "broken.safetensors")
    assert not list(boft_layers(fresh.unet)) and not list(boft_layers(fresh.text_encoder))
