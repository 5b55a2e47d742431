"""The PEFT LoRA and OFT baselines the DreamBooth benchmark compares BOFT with: injection, files, training."""

import json

import pytest
import torch
from safetensors.torch import load_file

import boft_diffusion as bd
import train_dreambooth
from boft_diffusion.kinds.peft_baselines import (
    apply_lora,
    apply_oft,
    load_peft_adapter,
    peft_parameter_count,
    save_peft_adapter,
)
from boft_diffusion.outputs.read import load_outputs
from conftest import make_tiny_unet, run_unet

pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if "lora_" in name}


def test_fresh_lora_is_the_base_model_and_files_round_trip(tmp_path, inputs):
    unet = make_tiny_unet()
    expected = run_unet(unet, inputs)
    apply_lora(unet, rank=2, target_modules=TARGETS)
    assert torch.equal(run_unet(unet, inputs), expected), "B = 0: a fresh LoRA must not change the model"
    parameters = lora_parameters(unet)
    assert parameters and all(p.requires_grad for p in parameters.values())
    with torch.no_grad():
        for param in parameters.values():
            param.copy_(torch.randn_like(param) * 0.1)
    adapted = run_unet(unet, inputs)
    assert not torch.allclose(adapted, expected)

    save_peft_adapter(unet, tmp_path / "lora", metadata={"instance_prompt": "a photo of sks star"})
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == sorted(TARGETS)
    assert config["boft_diffusion"] == {"instance_prompt": "a photo of sks star"}
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "lora" / "adapter_model.safetensors").values())

    fresh = make_tiny_unet()
    load_peft_adapter(fresh, tmp_path / "lora")
    assert torch.allclose(run_unet(fresh, inputs), adapted, atol=1e-6)
    assert sum(p.numel() for p in lora_parameters(fresh).values()) == sum(p.numel() for p in parameters.values())


def test_lora_dreambooth_run_loads_with_the_output_reader(tmp_path, capsys):
    out = tmp_path / "lora"
    flags = ["--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1",
             "--report_to", "none", "--adapter_type", "lora", "--lora_rank", "2", "--learning_rate", "1e-2"]
    assert train_dreambooth.main([*flags, "--output_dir", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "# LORA DreamBooth adapter" in (out / "README.md").read_text()

    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    adapter = load_outputs(pipe, out, load=load_peft_adapter)
    assert adapter.models == [pipe.unet]
    trained = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k), "LoRA B did not train"

    assert train_dreambooth.main([*flags, "--output_dir", str(tmp_path / "merged"), "--save_merged"]) == 2
    assert "--save_merged is for BOFT adapters" in capsys.readouterr().err


def test_fresh_oft_is_the_base_model_and_files_round_trip(tmp_path, inputs):
    unet = make_tiny_unet()
    expected = run_unet(unet, inputs)
    apply_oft(unet, block_size=16, target_modules=[*TARGETS, "conv1", "conv2"])
    assert torch.allclose(run_unet(unet, inputs), expected, atol=1e-6), "a fresh OFT must not change the model"
    parameters = {name: p for name, p in unet.named_parameters() if "oft_" in name}
    assert parameters and peft_parameter_count(unet) == sum(p.numel() for p in parameters.values())
    with torch.no_grad():
        for param in parameters.values():
            param.add_(torch.randn_like(param) * 0.1)
    adapted = run_unet(unet, inputs)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    save_peft_adapter(unet, tmp_path / "oft")
    config = json.loads((tmp_path / "oft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 16 and not config["use_cayley_neumann"]
    fresh = make_tiny_unet()
    load_peft_adapter(fresh, tmp_path / "oft")
    assert torch.allclose(run_unet(fresh, inputs), adapted, atol=1e-5)

    oft_layers = [m for m in fresh.modules() if hasattr(m, "oft_R")]
    assert any(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in oft_layers)
    for layer in oft_layers:
        layer.merge()
    assert torch.allclose(run_unet(fresh, inputs), adapted, atol=1e-5), "training must see the merged model"
