"""Model families: the registry tells SD from SDXL by the model, and a new family plugs into the
recipes without touching them (a test family whose text encoder is a stub)."""

import zlib

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth
from boft_diffusion.families import (
    EncodedPrompts,
    ModelFamily,
    StableDiffusion,
    StableDiffusionXL,
    TextEncoder,
    family_of,
    registered_families,
)
from boft_diffusion.families import base as family_base
from boft_diffusion.families.loading import load_pipeline


class StubTextFamily(ModelFamily):
    """The embedded model's UNet conditioned on a stub text encoder: each prompt becomes a fixed
    random sequence seeded by its text, so only the family knows how prompts are encoded."""

    name = "stub-text"

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def matches(self, pipe) -> bool:
        return hasattr(pipe, "unet")

    def text_encoders(self, pipe) -> list[TextEncoder]:
        self.shape = (pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
        return [TextEncoder("text_encoder", pipe.text_encoder, pipe.tokenizer)]

    def encode_prompts(self, encoders, prompts, device, max_sequence_length=None) -> EncodedPrompts:
        self.encoded.extend(prompts)
        rows = [torch.randn(self.shape, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return EncodedPrompts(torch.stack(rows).to(device))


def test_the_family_is_told_by_the_model():
    pipe = load_pipeline("tiny", dtype=torch.float32, device="cpu")
    assert isinstance(family_of(pipe), StableDiffusion)
    assert [f.name for f in registered_families()] == ["flux", "sd3", "sdxl", "sd"]
    with pytest.raises(ValueError, match="belongs to no known model family"):
        family_of(object())
    assert not StableDiffusionXL().matches(pipe)


def test_a_new_family_trains_through_the_unchanged_recipe(tmp_path, monkeypatch):
    stub = StubTextFamily()
    monkeypatch.setattr(family_base, "_REGISTRY", [stub, *family_base._REGISTRY])
    out = tmp_path / "out"
    flags = ["--output_dir", str(out), "--max_train_steps", "2", "--report_to", "none", "--resolution", "64",
             "--num_validation_images", "1", "--num_inference_steps", "2", "--seed", "0"]
    assert train_dreambooth.main(flags) == 0
    # the recipe encoded its prompt through the family (once: no text encoder trains) and trained the UNet
    assert stub.encoded == ["a photo of sks ohwx star"]
    trained = load_file(out / "adapter_model.safetensors")
    assert any(key.endswith("boft_R") and tensor.abs().sum() > 0 for key, tensor in trained.items())

    monkeypatch.setattr(family_base, "_REGISTRY", [family for family in family_base._REGISTRY if family is not stub])
    assert train_dreambooth.main([*flags, "--output_dir", str(tmp_path / "sd")]) == 0
    plain = load_file(tmp_path / "sd" / "adapter_model.safetensors")
    assert any(not torch.equal(trained[key], plain[key]) for key in trained), "the stub's prompts trained another adapter"
