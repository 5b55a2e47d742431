"""Evaluation: tiny-world reports, edge agreement, and CLIP / DINO scores with tiny random models."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth
from boft_diffusion.evaluation import cli as evaluation
from boft_diffusion.evaluation.image_metrics import clip_scores, dino_score, edge_agreement
from boft_diffusion.evaluation.tiny_world import tiny_world_samples
from boft_diffusion.families.loading import load_pipeline, quiet_progress
from boft_diffusion.tiny import world

ROOT = Path(__file__).resolve().parent.parent


def test_edge_agreement_separates_matching_and_other_scenes():
    scene = world.held_out_scenes(2, seed=5)
    image = world.render(scene[0])
    assert edge_agreement(image, world.render_edges(scene[0])) > 0.6
    assert edge_agreement(image, world.render_edges(scene[1])) < 0.4


def test_fewer_samples_are_the_first_of_more():
    """Checkpoints are scored on fewer samples than a run's end; the benchmark's curve pairs them with
    the base model's first samples, which holds only if those are the same prompts and images (up to
    the rounding of float math batched differently on several threads)."""
    pipe = quiet_progress(load_pipeline("tiny", dtype=torch.float32))
    few, more, other_seeds = (tiny_world_samples(pipe, "a photo of sks ohwx star", "a photo of star", n, seed=seed,
                                                 steps=2) for n, seed in ((2, 100), (3, 100), (2, 200)))
    for measure in ("subject", "recontext", "captions", "class_prompt"):
        for (prompt, image), (prompt_more, image_more), (_, image_other) in zip(
                getattr(few, measure), getattr(more, measure)[:2], getattr(other_seeds, measure), strict=True):
            image, image_more, image_other = (np.asarray(i, dtype=np.int16) for i in (image, image_more, image_other))
            assert prompt == prompt_more, measure
            assert np.abs(image - image_more).max() <= 2, measure
            assert np.abs(image - image_other).mean() > 10, f"{measure}: other seeds must draw other images"


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("db") / "adapter"
    assert train_dreambooth.main(["--output_dir", str(out), "--max_train_steps", "2", "--report_to", "none",
                                  "--num_validation_images", "1", "--num_inference_steps", "2"]) == 0
    assert "block size 8, block number -," in (out / "README.md").read_text()  # the default, not the raw flag
    return out


def test_tiny_world_report(trained_adapter, tmp_path):
    report = evaluation.main(["--adapter", str(trained_adapter), "--num_images", "2", "--num_inference_steps", "2",
                              "--output_json", str(tmp_path / "r.json")])
    tiny = report["tiny_world"]
    assert 0.5 < tiny["instances"] <= 1.0
    for side in ("base", "adapter"):
        assert set(tiny[side]) == {"subject", "recontext_background", "recontext_subject", "class_prompt_fidelity",
                                   "class_subject", "class_shape"}
        assert all(0.0 <= v <= 1.0 for v in tiny[side].values())
    assert (tmp_path / "r.json").is_file()


def tiny_clip(folder: Path) -> str:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "boft_diffusion" / "tiny" / "model" / "tokenizer")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def tiny_dino(folder: Path) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_clip_and_dino_scores_with_local_models(tmp_path, trained_adapter):
    clip, dino = tiny_clip(tmp_path / "clip"), tiny_dino(tmp_path / "dino")
    instances = [world.render_subject("blue"), world.render_subject("green")]
    same = clip_scores(clip, instances, "a photo of sks star", instances)
    other = clip_scores(clip, [Image.new("RGB", (64, 64), "black")] * 2, "a photo of sks star", instances)
    assert -1 <= same["clip_t"] <= 1 and same["clip_i"] > other["clip_i"]
    long_prompt = clip_scores(clip, instances, "a photo of sks " + "bright " * 200 + "star", instances)
    assert -1 <= long_prompt["clip_t"] <= 1, "a prompt longer than CLIP's context is truncated, not an error"
    assert dino_score(dino, instances, instances) > dino_score(
        dino, [Image.new("RGB", (64, 64), "black")] * 2, instances)
    report = evaluation.main(["--adapter", str(trained_adapter), "--num_images", "2", "--num_inference_steps", "2",
                              "--clip_model", clip, "--dino_model", dino])
    assert {"clip_t", "clip_i", "dino"} <= set(report)
