"""Learned identifier embeddings: only the identifier's positions change; files round-trip and merge."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_diffusion as bd
from boft_diffusion.core.adapters import (
    disable_adapters,
    enable_adapters,
    merge_adapter,
    merged_state_dict,
    set_adapter_strength,
    unmerge_adapter,
)
from boft_diffusion.core.files import EMBEDDINGS_NAME, load_identifier_embeddings, save_identifier_embeddings
from boft_diffusion.core.identifier import (
    IdentifierEmbedding,
    add_identifier_embeddings,
    identifier_words,
    initializer_vectors,
    remove_identifier_embeddings,
)
from boft_diffusion.families.loading import quiet_progress
from conftest import encode


@pytest.fixture(scope="module")
def pipe():
    return bd.load_pipeline("tiny", dtype=torch.float32)


def random_vector(pipe, seed: int = 0) -> torch.Tensor:
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    return torch.randn(1, width, generator=torch.Generator().manual_seed(seed))


def test_identifier_words():
    assert identifier_words("a photo of sks star", "a photo of star") == ["sks"]
    assert identifier_words("a sks dog and a sks dog", "a dog") == ["sks", "and"]
    assert identifier_words("a photo of star", "a photo of star") == []


def test_only_prompts_with_the_identifier_change(pipe):
    base_instance, base_class = encode(pipe, "a photo of sks star"), encode(pipe, "a photo of star")
    layer = add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe))
    try:
        assert layer.identifier_vectors.requires_grad
        assert torch.equal(encode(pipe, "a photo of star"), base_class)
        assert not torch.allclose(encode(pipe, "a photo of sks star"), base_instance, atol=1e-3)
        sks = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
        rows = pipe.text_encoder.get_input_embeddings()(torch.tensor([[sks, sks + 1]]))[0]
        assert torch.equal(rows[0], layer.identifier_vectors[0].detach())
        assert torch.equal(rows[1], layer.base_layer.weight[sks + 1])
        disable_adapters(pipe.text_encoder)
        assert torch.equal(encode(pipe, "a photo of sks star"), base_instance)
        enable_adapters(pipe.text_encoder)
        assert not torch.allclose(encode(pipe, "a photo of sks star"), base_instance, atol=1e-3)
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    assert torch.equal(encode(pipe, "a photo of sks star"), base_instance)


def test_strength_and_merge_treat_the_identifier_like_an_adapter(pipe):
    base_instance = encode(pipe, "a photo of sks star")
    layer = add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe, 4))
    sks = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
    original_row = layer.weight[sks].detach().clone()
    try:
        learned = encode(pipe, "a photo of sks star")
        set_adapter_strength(pipe.text_encoder, 0.0)
        assert torch.allclose(encode(pipe, "a photo of sks star"), base_instance, atol=1e-6)
        set_adapter_strength(pipe.text_encoder, 1.0)
        merge_adapter(pipe.text_encoder)
        assert torch.equal(layer.weight[sks], layer.identifier_vectors[0].detach())
        assert torch.allclose(encode(pipe, "a photo of sks star"), learned, atol=1e-6)
        set_adapter_strength(pipe.text_encoder, 0.5)  # re-merges at the new strength
        assert torch.allclose(layer.weight[sks], (original_row + layer.identifier_vectors[0].detach()) / 2, atol=1e-6)
        disable_adapters(pipe.text_encoder)  # unmerges
        assert torch.equal(layer.weight[sks], original_row)
        assert torch.allclose(encode(pipe, "a photo of sks star"), base_instance, atol=1e-6)
        enable_adapters(pipe.text_encoder)
        set_adapter_strength(pipe.text_encoder, 1.0)
        merge_adapter(pipe.text_encoder)
        unmerge_adapter(pipe.text_encoder)
        assert torch.equal(layer.weight[sks], original_row)
        assert torch.allclose(encode(pipe, "a photo of sks star"), learned, atol=1e-6)
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    assert torch.equal(encode(pipe, "a photo of sks star"), base_instance)


def test_multi_token_identifier_is_refused(pipe):
    word = "zqxvkj"
    assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) > 1
    with pytest.raises(ValueError, match="zqxvkj.*single token"):
        add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, [word])
    assert not isinstance(pipe.text_encoder.get_input_embeddings(), IdentifierEmbedding)
    installed = add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"])
    try:
        with pytest.raises(ValueError, match="single token"):
            add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, [word])
        assert pipe.text_encoder.get_input_embeddings() is installed, "a refused identifier must change nothing"
    finally:
        remove_identifier_embeddings(pipe.text_encoder)


def test_an_identifier_started_from_a_word_encodes_as_that_word(pipe):
    """``initializer_vectors`` reads the base rows even with identifiers installed, so "sks star"
    started from "orange" encodes exactly as "orange star" until it is trained."""
    installed = add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe))
    try:
        vectors = initializer_vectors(pipe.text_encoder, pipe.tokenizer, ["orange"])
        assert torch.equal(vectors, installed.base_layer.weight[pipe.tokenizer("orange", add_special_tokens=False)
                                                                .input_ids].float())
        add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], vectors)
        assert torch.equal(encode(pipe, "a photo of sks star"), encode(pipe, "a photo of orange star"))
        with pytest.raises(ValueError, match="zqxvkj.*single token"):
            initializer_vectors(pipe.text_encoder, pipe.tokenizer, ["zqxvkj"])
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    assert not torch.equal(encode(pipe, "a photo of sks star"), encode(pipe, "a photo of orange star"))


def test_save_load_round_trip_and_file_for_another_model(pipe, tmp_path):
    add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe, 1))
    try:
        expected = encode(pipe, "a photo of sks star")
        save_identifier_embeddings(pipe.text_encoder, tmp_path)
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    tensors = load_file(tmp_path / EMBEDDINGS_NAME)
    assert list(tensors) == ["sks"] and tensors["sks"].shape == (random_vector(pipe).shape[1],)

    assert load_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, tmp_path)
    try:
        assert torch.equal(encode(pipe, "a photo of sks star"), expected)
        assert not pipe.text_encoder.get_input_embeddings().identifier_vectors.requires_grad
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    assert not load_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, tmp_path / "elsewhere")

    other = tmp_path / "other"
    other.mkdir()
    save_file({"sks": torch.zeros(768)}, other / EMBEDDINGS_NAME)
    with pytest.raises(ValueError, match="another model"):
        load_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, other)
    (other / EMBEDDINGS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, other)
    assert not isinstance(pipe.text_encoder.get_input_embeddings(), IdentifierEmbedding)


def test_merged_state_dict_writes_the_learned_row(pipe):
    from transformers import CLIPTextModel

    add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe, 2))
    try:
        expected = encode(pipe, "a photo of sks star")
        plain = CLIPTextModel(pipe.text_encoder.config)
        plain.load_state_dict(merged_state_dict(pipe.text_encoder))
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    ids = pipe.tokenizer(["a photo of sks star"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(plain(ids)[0], expected, atol=1e-6)


def test_half_precision_pipeline_keeps_its_dtype_with_an_identifier(pipe, tmp_path):
    """The float32 learned vectors must not become the text encoder's dtype: pipelines read it
    to cast prompt embeddings, and a float32 prompt would then meet half-precision UNet weights."""
    add_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], random_vector(pipe, 3))
    try:
        save_identifier_embeddings(pipe.text_encoder, tmp_path)
    finally:
        remove_identifier_embeddings(pipe.text_encoder)
    half = quiet_progress(bd.load_pipeline("tiny", dtype=torch.bfloat16, device="cpu"))
    assert load_identifier_embeddings(half.text_encoder, half.tokenizer, tmp_path)
    assert half.text_encoder.dtype == torch.bfloat16
    images = half("a photo of sks star", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()
