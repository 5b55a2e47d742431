"""SDXL end to end on a random-weight tiny SDXL (tests/conftest.py): detection, training with both
text encoders, checkpoint and exact resume, our loader, PEFT's loader and the app."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import boft_diffusion as bd
import train_dreambooth
from boft_diffusion.app.studio import GenerationRequest, Limits, Studio
from boft_diffusion.families import StableDiffusionXL
from boft_diffusion.families.loading import is_sdxl, quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.training.sampling import vae_decodes_in_own_dtype
from conftest import kill_at_checkpoint_and_resume, make_tiny_sdxl

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--max_train_steps", "3", "--num_inference_steps", "2", "--num_validation_images", "1",
        "--report_to", "none", "--boft_block_size", "8"]
#: both text encoders adapted, identifier on both, prior preservation with generated class images
FULL = ["--train_text_encoder", "--train_identifier_embedding", "--identifier_token", "sks",
        "--with_prior_preservation", "--class_prompt", "a photo of star", "--num_class_images", "2"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def load(folder: Path):
    return quiet_progress(bd.load_pipeline(folder, dtype=torch.float32, device="cpu"))


def train(sdxl: Path, out: Path, *flags) -> int:
    return train_dreambooth.main([*FAST, "--pretrained_model_name_or_path", str(sdxl), "--output_dir", str(out),
                                  *map(str, flags)])


def sample(pipe, prompt: str = "a photo of sks star"):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def test_sdxl_folder_loads_as_sdxl_and_training_encodes_as_sampling(sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = load(sdxl)
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe)
    assert not is_sdxl(bd.load_pipeline("tiny", dtype=torch.float32, device="cpu"))
    prompts = ["a photo of sks star", "a photo of star"]
    with torch.no_grad():
        family = StableDiffusionXL()
        encoded = family.encode_prompts(family.text_encoders(pipe), prompts, torch.device("cpu"))
        hidden, pooled = encoded.hidden, encoded.pooled
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(hidden, expected) and torch.equal(pooled, expected_pooled)


def test_sdxl_dreambooth_trains_saves_and_loads_in_a_fresh_pipeline(sdxl, tmp_path):
    out = tmp_path / "out"
    assert train(sdxl, out, *FULL, "--class_data_dir", tmp_path / "class", "--validation_prompt",
                 "a photo of sks star") == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2, "class images come from the SDXL pipeline"
    assert (out / "validation" / "step-000003.png").is_file()
    for part in ("adapter_model.safetensors", "text_encoder/adapter_model.safetensors",
                 "text_encoder_2/adapter_model.safetensors", "learned_embeds.safetensors",
                 "text_encoder_2/learned_embeds.safetensors"):
        assert (out / part).is_file(), part
    assert any(k.endswith("q_proj.boft_R") for k in load_file(out / "text_encoder_2" / "adapter_model.safetensors"))

    pipe = load(sdxl)
    base = sample(pipe)
    adapter = load_outputs(pipe, out)
    assert adapter.models == [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    assert set(adapter.identifier) == set(adapter.identifier_2) == {"sks"}
    adapted = sample(pipe)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base, atol=1e-4)
    adapter.switch(False)
    assert torch.allclose(sample(pipe, "a photo of star"), _base_sample(sdxl, "a photo of star"), atol=1e-5)


def test_sdxl_vae_runs_in_float32_under_fp16(sdxl, tmp_path, monkeypatch):
    """SDXL's VAE overflows in float16 (diffusers keeps it in float32): under --mixed_precision fp16
    both scripts encode the training images and decode the validation images in float32 outside
    autocast, while the UNet runs in half precision."""
    from diffusers import AutoencoderKL

    import train_controlnet

    calls = {"encode": [], "decode": []}

    def recording(name):
        original = getattr(AutoencoderKL, name)

        def record(vae, tensor, *args, **kwargs):
            calls[name].append((vae.dtype, tensor.dtype, torch.is_autocast_enabled(tensor.device.type)))
            return original(vae, tensor, *args, **kwargs)
        return record

    for name in calls:
        monkeypatch.setattr(AutoencoderKL, name, recording(name))
    assert train(sdxl, tmp_path / "fp16", "--mixed_precision", "fp16", "--max_train_steps", "1") == 0
    assert train_controlnet.main([*FAST, "--pretrained_model_name_or_path", str(sdxl), "--mixed_precision", "fp16",
                                  "--train_data_dir", str(ROOT / "examples" / "tiny_control"), "--max_train_samples",
                                  "2", "--max_train_steps", "1", "--output_dir", str(tmp_path / "light")]) == 0
    # dreambooth: an encode, a validation decode; control: an encode, 4 validation pairs of base and control
    assert [len(calls["encode"]), len(calls["decode"])] == [2, 1 + 4 * 2]
    assert set(calls["encode"]) | set(calls["decode"]) == {(torch.float32, torch.float32, False)}
    assert (tmp_path / "fp16" / "validation" / "step-000001.png").is_file()
    assert (tmp_path / "light" / "validation" / "step-000001.png").is_file()


def test_a_pipeline_decodes_in_the_vaes_dtype_inside_autocast(sdxl):
    """Class images are sampled inside autocast too: the VAE must not follow it into half precision."""
    pipe = load(sdxl)
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pipe.vae.decode(latents).sample.dtype == torch.bfloat16
        with vae_decodes_in_own_dtype(pipe.vae):
            decoded = pipe.vae.decode(latents).sample
    assert decoded.dtype == torch.float32 and "decode" not in vars(pipe.vae)
    with torch.no_grad():
        assert torch.equal(decoded, pipe.vae.decode(latents.float()).sample)


def _base_sample(sdxl: Path, prompt: str):
    return sample(load(sdxl), prompt)


def test_peft_reads_an_sdxl_unet_adapter_of_depth_one(sdxl, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "out"
    assert train(sdxl, out, "--boft_n_butterfly_factor", "1", "--boft_dropout", "0") == 0
    ours = load(sdxl)
    bd.load_adapter(ours.unet, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(sdxl).unet, str(out)).eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 24, 64, generator=generator)
    conditions = {"text_embeds": torch.randn(1, 16, generator=generator),
                  "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        expected = ours.unet(latents, 10, context, added_cond_kwargs=conditions).sample
        got = theirs(latents, 10, context, added_cond_kwargs=conditions).sample
        base = load(sdxl).unet(latents, 10, context, added_cond_kwargs=conditions).sample
    assert not torch.allclose(expected, base, atol=1e-5), "training moved the adapter"
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_app_serves_an_sdxl_adapter(sdxl, tmp_path):
    adapters = tmp_path / "adapters"
    assert train(sdxl, adapters / "star", "--train_text_encoder", "--train_identifier_embedding",
                 "--identifier_token", "sks", "--max_train_steps", "2") == 0
    studio = Studio(str(sdxl), adapters, Limits(max_size=64, max_steps=2, max_images=1))
    assert studio.list_adapters()[1:] == ["star"]
    results = studio.generate(GenerationRequest(prompt="a photo of sks star", adapter="star", steps=2, seed=1,
                                                compare_with_base=True))
    (base, base_label), (adapted, adapted_label) = results
    assert '"rendered": "base"' in base_label and '"rendered": "adapter"' in adapted_label
    assert base.size == adapted.size == (64, 64) and base.tobytes() != adapted.tobytes()


def launch(sdxl: Path, out: Path, *extra) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train_dreambooth.py"), *FAST, "--pretrained_model_name_or_path", str(sdxl),
               "--output_dir", str(out), "--max_train_steps", "8", "--checkpointing_steps", "2",
               "--train_text_encoder", "--train_identifier_embedding", "--identifier_token", "sks",
               *map(str, extra)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def all_tensors(folder: Path) -> dict:
    files = ["adapter_model.safetensors", "learned_embeds.safetensors", "text_encoder/adapter_model.safetensors",
             "text_encoder_2/adapter_model.safetensors", "text_encoder_2/learned_embeds.safetensors"]
    return {f"{name}:{key}": value for name in files for key, value in load_file(folder / name).items()}


@pytest.mark.slow
def test_sdxl_kill_and_resume_equals_uninterrupted_run(sdxl, tmp_path):
    reference = launch(sdxl, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    kill_at_checkpoint_and_resume(lambda out, *extra: launch(sdxl, out, *extra), tmp_path / "killed")
    expected, actual = all_tensors(tmp_path / "reference"), all_tensors(tmp_path / "killed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_sdxl_merged_export_is_a_plain_sdxl_pipeline_with_the_adapter_folded_in(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    assert train(sdxl, out, "--train_text_encoder", "--train_identifier_embedding", "--identifier_token", "sks",
                 "--save_merged", "--boft_dropout", "0") == 0
    merged = StableDiffusionXLPipeline.from_pretrained(out / "merged")
    adapted, base = load(sdxl), load(sdxl)
    load_outputs(adapted, out)
    prompts = ["a photo of sks star"]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    outputs = []
    for pipe in (merged, adapted, base):
        with torch.no_grad():
            encoded = StableDiffusionXL().encode_prompts(StableDiffusionXL().text_encoders(pipe), prompts,
                                                         torch.device("cpu"))
            hidden, pooled = encoded.hidden, encoded.pooled
            outputs.append(pipe.unet(latents, 10, hidden, added_cond_kwargs={"text_embeds": pooled,
                                                                              "time_ids": time_ids}).sample)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-4)


def test_export_writes_sdxl_merged_folders_and_refuses_the_sd_key_layouts(sdxl, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from boft_diffusion import export

    out = tmp_path / "out"
    assert train(sdxl, out, "--max_train_steps", "1") == 0
    assert export.main([str(out), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged"), StableDiffusionXLPipeline)
    assert export.main([str(out), "--format", "diff", "--output", str(tmp_path / "diff.safetensors")]) == 2
    assert "only --format merged" in capsys.readouterr().err
    assert not (tmp_path / "diff.safetensors").exists()


def test_light_control_trains_on_sdxl_and_samples_through_the_sdxl_pipeline(sdxl, tmp_path, capsys):
    import train_controlnet

    data = ROOT / "examples" / "tiny_control"
    flags = [*FAST, "--pretrained_model_name_or_path", str(sdxl), "--train_data_dir", str(data),
             "--max_train_samples", "4", "--learning_rate", "1e-2", "--max_train_steps", "2"]
    out = tmp_path / "light"
    assert train_controlnet.main([*flags, "--output_dir", str(out)]) == 0
    assert (out / "validation" / "step-000002.png").is_file()
    pipe = load(sdxl)
    adapter = load_outputs(pipe, out)
    condition = Image.open(sorted((data / "conditioning").glob("*.png"))[0])
    def sample_with(image):
        return adapter.sample(image, prompt="a red star", num_inference_steps=2, output_type="np",
                              generator=torch.Generator().manual_seed(0))

    with_control, blank = sample_with(condition), sample_with(Image.new("RGB", condition.size))
    assert with_control.shape == (64, 64, 3) and abs(with_control - blank).max() > 0, "the control steers sampling"

    assert train_controlnet.main([*flags, "--control", "controlnet", "--output_dir", str(tmp_path / "cn")]) == 2
    assert "--control controlnet is for SD 1.x / 2.x models" in capsys.readouterr().err


def test_sdxl_unet_sees_each_images_size_and_crop(sdxl, tmp_path, monkeypatch):
    """With --bucket and --center_crop, the UNet's time ids carry each file's size, its crop's
    top-left and its bucket: SDXL's size conditioning reaches the model."""
    import numpy as np

    from boft_diffusion.recipes import base as recipe_base

    images = tmp_path / "images"
    images.mkdir()
    for width, height in [(96, 64), (64, 96)]:
        Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(images / f"{width}x{height}.png")
    seen = []
    real_load = recipe_base.load_pipeline

    def recording_load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()),
            with_kwargs=True)
        return pipe

    monkeypatch.setattr(recipe_base, "load_pipeline", recording_load)
    assert train(sdxl, tmp_path / "out", "--instance_data_dir", images, "--bucket", "--center_crop",
                 "--max_train_steps", "2", "--validation_steps", "0", "--num_validation_images", "1") == 0
    training = {tuple(row) for rows in seen for row in rows if row[:2] != [64.0, 64.0]}
    # 96x64 -> bucket 80x48 (w x h): resized to 80x53, 2 rows cropped off the top; and transposed
    assert training == {(64.0, 96.0, 2.0, 0.0, 48.0, 80.0), (96.0, 64.0, 0.0, 2.0, 80.0, 48.0)}


def test_an_sdxl_folder_on_an_sd_model_is_refused_naming_the_part(sdxl, tmp_path):
    out = tmp_path / "out"
    assert train(sdxl, out, "--train_identifier_embedding", "--identifier_token", "sks", "--max_train_steps", "1") == 0
    with pytest.raises(ValueError, match="was trained on SDXL"):
        load_outputs(bd.load_pipeline("tiny", dtype=torch.float32, device="cpu"), out)


def test_a_cached_hub_id_of_an_sdxl_model_loads_as_sdxl(sdxl, tmp_path, monkeypatch):
    """Offline, from the Hugging Face cache layout (refs/main -> snapshots/<commit>/...)."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    commit = "0" * 40
    shutil.copytree(sdxl, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pipe = bd.load_pipeline("someone/tiny-sdxl", dtype=torch.float32, device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)


def test_single_file_checkpoints_are_told_apart_by_the_second_text_encoder(tmp_path):
    from safetensors.torch import save_file

    from boft_diffusion.families.loading import _file_kind

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)},
              tmp_path / "sd.safetensors")
    assert _file_kind(tmp_path / "xl.safetensors") == "sdxl" and _file_kind(tmp_path / "sd.safetensors") == "sd"
