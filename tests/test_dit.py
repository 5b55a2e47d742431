"""Flux.1 and SD3 end to end on tiny random-weight pipelines built from configs (tests/dit_models.py,
tokenizers made with the tokenizers library): recognition, prompt encoding as the pipelines encode,
the rectified-flow loss against a step written out by hand with diffusers' own helpers, training
with every text-side option, kill and resume, our loader, the exports (a diffusers LoRA read by
``load_lora_weights``, a merged folder, ComfyUI's diff keys) and the app."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit_models import make_tiny_flux, make_tiny_sd3
from foreign_loaders import comfyui_apply_diffs, comfyui_flux_key_map, comfyui_sd3_key_map, to_comfyui_layout
from safetensors.torch import load_file, save_file

import boft_diffusion as bd
import train_dreambooth
from boft_diffusion.app.studio import GenerationRequest, Limits, Studio
from boft_diffusion.core.adapters import merged_state_dict
from boft_diffusion.export import export_adapter
from boft_diffusion.families import family_of
from boft_diffusion.families.flux import image_position_ids, pack_latents, unpack_latents
from boft_diffusion.families.loading import ModelLoadError, _file_kind, check_pipeline_folder, quiet_progress
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes.dreambooth import DreamBooth, DreamBoothConfig
from conftest import kill_at_checkpoint_and_resume, run_two_processes

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks star"
#: Flux samples at 1024 px unless told (its pipeline fixes 128 latent rows); SD3's tiny model is native at 64.
FLAGS = {"flux": ["--resolution", "64"], "sd3": []}
FAST = ["--max_train_steps", "3", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dit")
    return {"flux": make_tiny_flux(folder / "flux"), "sd3": make_tiny_sd3(folder / "sd3")}


def load(folder: Path):
    return quiet_progress(bd.load_pipeline(folder, dtype=torch.float32, device="cpu"))


def train(models, name: str, out: Path, *flags) -> int:
    return train_dreambooth.main([*FAST, *FLAGS[name], "--pretrained_model_name_or_path", str(models[name]),
                                  "--output_dir", str(out), *map(str, flags)])


def sample(pipe, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def test_folders_and_single_files_are_told_apart_by_the_model(models, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    flux, sd3 = load(models["flux"]), load(models["sd3"])
    assert isinstance(flux, FluxPipeline) and isinstance(sd3, StableDiffusion3Pipeline)
    assert family_of(flux).name == "flux" and family_of(sd3).name == "sd3"
    assert family_of(bd.load_pipeline("tiny", dtype=torch.float32, device="cpu")).name == "sd"
    one = {"x": torch.zeros(1)}
    for name, key, kind in (("bfl", "double_blocks.0.img_attn.qkv.weight", "flux"),
                            ("sd35", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
                            ("sd", "model.diffusion_model.input_blocks.0.0.weight", "sd")):
        save_file({**one, key: torch.zeros(1)}, tmp_path / f"{name}.safetensors")
        assert _file_kind(tmp_path / f"{name}.safetensors") == kind
    broken = tmp_path / "no-t5"
    subprocess.run(["cp", "-r", str(models["sd3"]), str(broken)], check=True)
    subprocess.run(["rm", "-r", str(broken / "text_encoder_3")], check=True)
    with pytest.raises(ModelLoadError, match="text_encoder_3/"):
        check_pipeline_folder(broken)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_prompts_are_encoded_as_the_pipeline_encodes_them(models, name):
    pipe = load(models[name])
    family = family_of(pipe)
    prompts = [PROMPT, "a photo of star on a red background"]
    with torch.no_grad():
        encoded = family.encode_prompts(family.text_encoders(pipe), prompts, torch.device("cpu"), 16)
        if name == "flux":
            hidden, pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=16)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=16)
    assert torch.equal(encoded.hidden, hidden) and torch.equal(encoded.pooled, pooled)
    assert [e.trainable for e in family.text_encoders(pipe)][-1] is False, "T5 never trains"


def test_flux_packing_and_position_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(image_position_ids(6, 8, torch.device("cpu"), torch.float32), expected)


def test_flux_loss_is_a_rectified_flow_step_written_out_by_hand(models, tmp_path):
    """One micro-batch of the recipe against the step of diffusers' Flux script, computed here with
    the pipeline's own encode_prompt, packing and ids: posterior sample, (x - shift) * scale, uniform
    timesteps on the scheduler's sigmas, guidance 3.5, velocity target, sigma_sqrt weights."""
    from diffusers import FluxPipeline

    config = DreamBoothConfig.from_flags([*FAST, *FLAGS["flux"], "--pretrained_model_name_or_path",
                                          str(models["flux"]), "--output_dir", str(tmp_path), "--center_crop",
                                          "--max_sequence_length", "16", "--weighting_scheme", "sigma_sqrt",
                                          "--boft_dropout", "0"])
    recipe = DreamBooth(config)
    recipe.setup()
    loss, _ = recipe.compute_loss(recipe.modules, [1], torch.Generator().manual_seed(5))

    pipe, generator = recipe.pipe, torch.Generator().manual_seed(5)
    part = recipe.prepare(recipe.segments([1], generator)[0], generator)  # centre crop: no draws
    with torch.no_grad():
        hidden, pooled, text_ids = pipe.encode_prompt([config.subject.instance_prompt], device="cpu",
                                                      max_sequence_length=16)
        posterior = pipe.vae.encode(part.pixels).latent_dist
        x = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        x = (x - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        noise = torch.randn(x.shape, generator=generator)
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        index = (torch.rand(1, generator=generator) * scheduler.config.num_train_timesteps).long()
        sigma, t = scheduler.sigmas[index], scheduler.timesteps[index]
        noisy = (1 - sigma) * x + sigma * noise
        b, c, h, w = noisy.shape
        prediction = recipe.denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t / 1000,
            guidance=torch.full((1,), 3.5), pooled_projections=pooled, encoder_hidden_states=hidden,
            txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False)[0]
        prediction = FluxPipeline._unpack_latents(prediction, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                  pipe.vae_scale_factor)
        expected = (sigma**-2 * ((prediction - (noise - x)) ** 2).mean()).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_dreambooth_trains_every_text_option_and_loads_in_a_fresh_pipeline(models, name, tmp_path):
    out = tmp_path / "out"
    assert train(models, name, out, "--train_text_encoder", "--train_identifier_embedding", "--identifier_token",
                 "sks", "--with_prior_preservation", "--class_prompt", "a photo of star", "--num_class_images", "2",
                 "--class_data_dir", tmp_path / "class", "--weighting_scheme", "logit_normal",
                 "--gradient_checkpointing") == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2, "class images come from the transformer pipeline"
    assert (out / "validation" / "step-000003.png").is_file()
    clips = ["text_encoder"] + (["text_encoder_2"] if name == "sd3" else [])
    for part in ["adapter_model.safetensors", "learned_embeds.safetensors",
                 *(f"{clip}/adapter_model.safetensors" for clip in clips)]:
        assert (out / part).is_file(), part
    assert not (out / ("text_encoder_2" if name == "flux" else "text_encoder_3")).exists(), "T5 stays frozen"
    adapter_keys = load_file(out / "adapter_model.safetensors")
    assert any("add_q_proj" in key for key in adapter_keys) and any("to_add_out" in key for key in adapter_keys)

    pipe = load(models[name])
    base = sample(pipe)
    loaded = load_outputs(pipe, out)
    adapted = sample(pipe)
    assert not torch.allclose(base, adapted, atol=1e-4)
    loaded.switch(False)
    assert torch.allclose(sample(pipe), base, atol=1e-6)


def test_a_flux_adapter_trained_on_an_nf4_base_loads_on_the_full_precision_base(models, tmp_path, caplog):
    """Nearly every weight of a transformer sits in a Linear layer, so --base_quantization reaches it all."""
    with caplog.at_level("INFO", logger="boft_diffusion"):
        assert train(models, "flux", tmp_path / "q", "--base_quantization", "nf4", "--max_sequence_length", "16") == 0
    assert "frozen Linear layers stored as nf4" in caplog.text
    pipe = load(models["flux"])
    base = sample(pipe)
    load_outputs(pipe, tmp_path / "q")
    assert not torch.allclose(sample(pipe), base, atol=1e-4)


def test_flow_options_are_refused_where_they_do_not_apply(models, tmp_path, capsys):
    assert train(models, "sd3", tmp_path / "a", "--snr_gamma", "5") != 0
    assert "--weighting_scheme" in capsys.readouterr().err
    assert train_dreambooth.main([*FAST, "--output_dir", str(tmp_path / "b"), "--weighting_scheme", "cosmap"]) != 0
    assert "flow-matching" in capsys.readouterr().err
    import train_controlnet

    assert train_controlnet.main(["--pretrained_model_name_or_path", str(models["sd3"]), "--output_dir",
                                  str(tmp_path / "c"), "--max_train_steps", "1", "--report_to", "none"]) != 0
    assert "transformer model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_kill_and_resume_equals_an_uninterrupted_run(models, name, tmp_path):
    def launch(folder: Path, *extra) -> subprocess.Popen:
        command = [sys.executable, str(ROOT / "train_dreambooth.py"), *FAST, *FLAGS[name], "--max_train_steps",
                   "8", "--checkpointing_steps", "2", "--pretrained_model_name_or_path", str(models[name]),
                   "--output_dir", str(folder), "--max_sequence_length", "16", "--train_text_encoder", *extra]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    straight = launch(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]
    kill_at_checkpoint_and_resume(launch, tmp_path / "resumed")
    for part in ("adapter_model.safetensors", "text_encoder/adapter_model.safetensors"):
        expected, got = load_file(tmp_path / "straight" / part), load_file(tmp_path / "resumed" / part)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), part


@pytest.mark.slow
def test_two_processes_train_one_synchronised_sd3_adapter(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = run_two_processes(ROOT / "train_dreambooth.py", [*FAST, "--pretrained_model_name_or_path",
                                                              models["sd3"]], tmp_path / "ddp", env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical on all 2 processes" in result.stderr
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """Per family, an adapter on both streams and the MLP projections, without and with trained
    biases (a LoRA cannot carry those; a diff carries them as diff_b)."""
    folder = tmp_path_factory.mktemp("trained")
    outputs = {}
    for name in models:
        for biases in (False, True):
            outputs[name, biases] = folder / f"{name}-{biases}"
            assert train(models, name, outputs[name, biases], "--boft_bias", "boft_only" if biases else "none",
                         "--learning_rate", "1e-2", "--boft_target_modules", "to_q", "to_k", "to_v", "to_out.0",
                         "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out") == 0
    return outputs


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_the_exported_lora_loads_in_diffusers_and_gives_our_adapters_output(models, trained, name, tmp_path):
    pipe = load(models[name])
    load_outputs(pipe, trained[name, False])
    ours = sample(pipe)
    result = export_adapter(trained[name, False], "peft-lora", tmp_path / "lora")
    assert result.report.overall_error < 1e-5
    fresh = load(models[name])
    base = sample(fresh)
    fresh.load_lora_weights(tmp_path / "lora")
    theirs = sample(fresh)
    change = (ours - base).abs().max()
    assert change > 1e-3 and (theirs - ours).abs().max() < 1e-4 * max(1.0, float(change))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_merged_folder_and_comfyui_diff_carry_the_adapter_exactly(models, trained, name, tmp_path):
    pipe = load(models[name])
    load_outputs(pipe, trained[name, True])
    ours = sample(pipe)
    merged = merged_state_dict(pipe.transformer)
    export_adapter(trained[name, True], "merged", tmp_path / "merged")
    folded = load(tmp_path / "merged")
    assert type(folded) is type(pipe) and torch.allclose(sample(folded), ours, atol=1e-5)

    export_adapter(trained[name, True], "diff", tmp_path / "diff.safetensors")
    diffs = load_file(tmp_path / "diff.safetensors")
    assert any(key.endswith(".diff_b") for key in diffs), "trained biases travel as diff_b"
    config = pipe.transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    key_map = (comfyui_flux_key_map(config.num_layers, config.num_single_layers, hidden) if name == "flux"
               else comfyui_sd3_key_map(config.num_layers, hidden))
    base = to_comfyui_layout(load(models[name]).transformer.state_dict(), key_map)
    patched, skipped = comfyui_apply_diffs(base, diffs)
    assert skipped == []
    expected = to_comfyui_layout(merged, key_map)
    assert patched.keys() == expected.keys()
    assert all(torch.allclose(patched[k], expected[k], atol=1e-6) for k in expected)
    assert any(not torch.equal(patched[k], base[k]) for k in base if "single_blocks" in k or name == "sd3")


def test_transformer_adapters_refuse_the_unet_formats(trained, tmp_path):
    for fmt, output in (("lora", "a.safetensors"), ("lycoris", "b.safetensors")):
        with pytest.raises(ValueError, match="merged, peft-lora or diff"):
            export_adapter(trained["flux", False], fmt, tmp_path / output)


def test_the_app_serves_a_flux_adapter(models, trained, tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    subprocess.run(["cp", "-r", str(trained["flux", False]), str(adapters / "star")], check=True)
    studio = Studio(str(models["flux"]), adapters, Limits(max_size=64, max_steps=2, max_images=1))
    assert studio.list_adapters()[1:] == ["star"]
    results = studio.generate(GenerationRequest(prompt=PROMPT, adapter="star", steps=2, seed=1,
                                                compare_with_base=True))
    (base, _), (adapted, _) = results
    assert base.size == adapted.size == (64, 64) and base.tobytes() != adapted.tobytes()


def test_the_flux_gpu_benchmark_runs_its_path_on_a_tiny_transformer(tmp_path):
    """benchmarks/bench_dit_gpu.py waits for a GPU; its path (build, both adapters at equal
    parameters, timed steps, the JSON) runs here on a tiny config."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dit_gpu.py"), "--size", "tiny",
                             "--device", "cpu", "--dtype", "float32", "--resolutions", "64", "--steps", "1",
                             "--caps_gb", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_dit_gpu.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["boft-m2", "lora"]
    assert rows[1]["trainable"] == pytest.approx(rows[0]["trainable"], rel=0.25), "LoRA gets about BOFT's parameters"
    assert all(row["s_per_step"] > 0 for row in rows)
