"""train_dreambooth.py on the embedded tiny model: outputs, resume, bad input, several processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth
from boft_diffusion.core.images import image_to_tensor
from boft_diffusion.families import StableDiffusion
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.recipes import dreambooth
from boft_diffusion.training.checkpoints import list_checkpoints
from boft_diffusion.training.data import load_images
from conftest import encode, kill_at_checkpoint_and_resume, run_two_processes

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--max_train_steps", "4", "--num_inference_steps", "2", "--num_validation_images", "1",
        "--report_to", "none", "--boft_block_size", "8", "--boft_dropout", "0.1"]


def run_main(*flags) -> int:
    return train_dreambooth.main([*FAST, *map(str, flags)])


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_short_run_writes_peft_adapter_card_and_grid(tmp_path):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--validation_prompt", "a photo of sks star", "a photo of star",
                    "--report_to", "tensorboard") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 2
    assert config["boft_diffusion"]["instance_prompt"] == "a photo of sks ohwx star"
    assert config["boft_diffusion"]["train_steps"] == 4
    assert config["base_model_name_or_path"] == "tiny"
    tensors = load_file(out / "adapter_model.safetensors")
    skews = [v for k, v in tensors.items() if k.endswith("boft_R")]
    assert skews and any(v.abs().sum() > 0 for v in skews), "training did not move the adapter"
    card = (out / "README.md").read_text()
    assert "sks ohwx star" in card and "m = 2: load it with boft-diffusion" in card
    assert (out / "validation" / "latest.png").is_file()
    grid = Image.open(out / "validation" / "step-000004.png")
    assert grid.size[1] == 2 * grid.size[0]  # two prompts, one image each
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_refuses_output_dir_of_another_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--max_train_steps", "1") == 0
    assert run_main("--output_dir", out, "--max_train_steps", "1") == 2
    assert "already holds another run" in capsys.readouterr().err
    assert run_main("--output_dir", out, "--max_train_steps", "1", "--overwrite_output_dir") == 0


def test_invalid_block_size_fails_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--boft_block_size", "24", "--with_prior_preservation",
                    "--class_data_dir", tmp_path / "class", "--class_prompt", "a photo of star") == 2
    err = capsys.readouterr().err
    assert "to_q" in err and "valid block sizes" in err
    assert not (tmp_path / "class").exists() or not any((tmp_path / "class").iterdir())


@pytest.mark.parametrize("resolution", ["60", "0", "-64"])
def test_resolution_off_the_latent_grid_is_refused(tmp_path, capsys, resolution):
    assert run_main("--output_dir", tmp_path / "out", "--resolution", resolution) == 2
    assert f"--resolution {resolution} must be a positive multiple of 16 (the VAE downsamples by 4" in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_bad_instance_folders(tmp_path, capsys, caplog):
    assert run_main("--output_dir", tmp_path / "a", "--instance_data_dir", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert run_main("--output_dir", tmp_path / "b", "--instance_data_dir", empty) == 2
    assert "no usable instance images" in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    source = Image.open(sorted((ROOT / "boft_diffusion" / "tiny" / "subjects" / "sks_star").glob("*.png"))[0])
    source.convert("L").save(mixed / "gray.png")
    source.convert("RGBA").save(mixed / "rgba.png")
    source.convert("P").save(mixed / "palette.png")
    Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257).save(mixed / "sixteen.png")
    source.resize((32, 32)).save(mixed / "small.png")
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (mixed / "notes.md").write_text("hello")
    (mixed / "readme.txt").write_text("a caption sidecar's suffix: never an image candidate")
    with caplog.at_level("WARNING", logger="boft_diffusion"):
        assert run_main("--output_dir", tmp_path / "c", "--instance_data_dir", mixed, "--max_train_steps", "1") == 0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "broken.png" in messages and "notes.md" in messages and "readme.txt" not in messages
    assert "small.png" in messages and "upscaling" in messages


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_loss = dreambooth.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(dreambooth, "denoising_loss", poisoned)
    assert run_main("--output_dir", out, "--checkpointing_steps", "2", "--max_train_steps", "6") == 2
    err = capsys.readouterr().err
    assert "nan" in err and "step 3" in err and "checkpoint-2" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()


def test_prior_preservation_generates_and_resumes_class_images(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), "red").save(class_dir / "class_00000.png")
    flags = ["--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of star",
             "--num_class_images", "3", "--sample_batch_size", "2", "--max_train_steps", "2"]
    assert run_main("--output_dir", tmp_path / "out", *flags) == 0
    names = sorted(os.listdir(class_dir))
    assert names == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (np.asarray(Image.open(class_dir / "class_00000.png")) == [255, 0, 0]).all()  # kept, not regenerated


def adapter_tensors(folder: Path) -> dict:
    return {**load_file(folder / "adapter_model.safetensors"),
            **{f"identifier.{k}": v for k, v in load_file(folder / "learned_embeds.safetensors").items()}}


def launch(out: Path, *extra) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train_dreambooth.py"), *FAST, "--output_dir", str(out),
               "--max_train_steps", "8", "--checkpointing_steps", "2", "--train_identifier_embedding",
               "--identifier_token", "sks", *map(str, extra)]
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    reference = launch(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    kill_at_checkpoint_and_resume(launch, tmp_path / "killed")

    expected, actual = adapter_tensors(tmp_path / "reference"), adapter_tensors(tmp_path / "killed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.slow
def test_two_processes_train_one_synchronised_adapter(tmp_path):
    out = tmp_path / "ddp"
    result = run_two_processes(ROOT / "train_dreambooth.py", [*FAST, "--max_train_steps", "3"], out, subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical on all 2 processes" in result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "progress.json", "training_flags.json",
        "validation"]


def test_resume_refuses_checkpoint_of_other_configuration(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--checkpointing_steps", "2", "--max_train_steps", "3") == 0
    shutil.rmtree(out / "validation")
    assert run_main("--output_dir", out, "--resume_from_checkpoint", "latest", "--boft_block_size", "4") == 2
    assert "checkpoint-2" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_checkpointing_text_encoder_accumulation_and_merged_export(tmp_path):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--mixed_precision", "bf16", "--gradient_checkpointing",
                    "--train_text_encoder", "--gradient_accumulation_steps", "2", "--max_train_steps", "1",
                    "--save_merged", "--random_flip") == 0
    text_adapter = load_file(out / "text_encoder" / "adapter_model.safetensors")
    assert any(k.endswith("q_proj.boft_R") for k in text_adapter)
    assert all(v.dtype == torch.float32 for v in text_adapter.values())

    from diffusers import StableDiffusionPipeline

    import boft_diffusion as bd

    merged = StableDiffusionPipeline.from_pretrained(out / "merged", safety_checker=None)
    assert not any("boft" in name for name, _ in merged.unet.named_parameters())
    adapted = bd.load_pipeline("tiny", dtype=torch.float32)
    bd.load_adapter(adapted.unet, out)
    bd.load_adapter(adapted.text_encoder, out / "text_encoder")
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = adapted.tokenizer(["a photo of sks star"], padding="max_length",
                            max_length=adapted.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        context = adapted.text_encoder(ids)[0]
        expected = adapted.unet(sample, 10, context).sample
        got = merged.unet.float()(sample, 10, merged.text_encoder.float()(ids)[0]).sample
    # the merged export holds bf16 weights (the training precision): compare loosely
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_v_prediction_scheduler(tmp_path):
    import boft_diffusion as bd

    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "vpred")
    assert run_main("--output_dir", tmp_path / "out", "--pretrained_model_name_or_path", tmp_path / "vpred",
                    "--max_train_steps", "2") == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_resume_with_changed_flags_names_them(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--checkpointing_steps", "2", "--max_train_steps", "3") == 0
    assert run_main("--output_dir", out, "--resume_from_checkpoint", "latest", "--train_identifier_embedding",
                    "--identifier_token", "sks") == 2
    err = capsys.readouterr().err
    assert "flags changed since: --identifier_token None -> ['sks'], --train_identifier_embedding False -> True" in err
    assert "parameter groups" in err  # PyTorch's own words follow ours
    assert run_main("--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps", "4",
                    "--learning_rate", "2e-3") == 0
    assert "changed flags: --learning_rate 0.001 -> 0.002" in caplog.text


def test_resume_refuses_changed_batch_settings(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--checkpointing_steps", "2", "--max_train_steps", "3") == 0
    assert run_main("--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps", "4",
                    "--gradient_accumulation_steps", "2") == 2
    assert "gradient_accumulation_steps 1 -> 2" in capsys.readouterr().err


def test_identifier_embedding_is_learned_saved_merged_and_leaves_class_prompts_alone(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    import boft_diffusion as bd

    out = tmp_path / "out"
    assert run_main("--output_dir", out, "--train_identifier_embedding", "--class_prompt", "a photo of star",
                    "--identifier_learning_rate", "1e-2", "--save_merged") == 0
    learned = load_file(out / "learned_embeds.safetensors")
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    ids = {word: pipe.tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("sks", "ohwx")}
    base_rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    assert sorted(learned) == ["ohwx", "sks"]  # both words of the default "a photo of sks ohwx star"
    assert all((learned[word] - base_rows[i]).abs().max() > 1e-3 for word, i in ids.items())
    base_class, base_instance = encode(pipe, "a photo of star"), encode(pipe, "a photo of sks ohwx star")

    assert load_outputs(pipe, out).models == [pipe.unet, pipe.text_encoder]
    assert torch.equal(encode(pipe, "a photo of star"), base_class)
    assert not torch.allclose(encode(pipe, "a photo of sks ohwx star"), base_instance, atol=1e-4)
    merged = StableDiffusionPipeline.from_pretrained(out / "merged", safety_checker=None)
    for word, i in ids.items():
        assert torch.allclose(merged.text_encoder.get_input_embeddings().weight[i].float(), learned[word])
    assert "learned_embeds.safetensors" in (out / "README.md").read_text()

    assert run_main("--output_dir", tmp_path / "bad", "--train_identifier_embedding", "--identifier_token", "zqxvkj") == 2
    assert "single token" in capsys.readouterr().err
    assert run_main("--output_dir", tmp_path / "bad", "--train_identifier_embedding") == 2
    assert "--identifier_token" in capsys.readouterr().err


def test_initializer_token_starts_the_identifier_from_a_word(tmp_path, capsys):
    import boft_diffusion as bd

    flags = ["--train_identifier_embedding", "--class_prompt", "a photo of star", "--identifier_learning_rate", "1e-3"]
    assert run_main("--output_dir", tmp_path / "out", *flags, "--initializer_token", "orange", "purple") == 0
    learned = load_file(tmp_path / "out" / "learned_embeds.safetensors")
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    row = {w: rows[pipe.tokenizer(w, add_special_tokens=False).input_ids[0]] for w in ("orange", "purple", "sks", "ohwx")}
    assert (learned["sks"] - row["orange"]).abs().max() < 0.01 < (learned["sks"] - row["sks"]).abs().max()
    assert (learned["ohwx"] - row["purple"]).abs().max() < 0.01 < (learned["ohwx"] - row["ohwx"]).abs().max()

    assert run_main("--output_dir", tmp_path / "bad", *flags, "--initializer_token", "orange") == 2
    assert "1 words for 2 identifier" in capsys.readouterr().err
    assert run_main("--output_dir", tmp_path / "bad", *flags, "--initializer_token", "zqxvkj") == 2
    assert "--initializer_token" in capsys.readouterr().err
    assert run_main("--output_dir", tmp_path / "bad", "--initializer_token", "orange") == 2
    assert "needs --train_identifier_embedding" in capsys.readouterr().err


def test_identifier_only_fraction_learns_the_embedding_first_and_resumes_exactly(tmp_path, capsys):
    import boft_diffusion as bd

    flags = ["--train_identifier_embedding", "--class_prompt", "a photo of star", "--identifier_only_fraction", "0.5",
             "--checkpointing_steps", "1", "--lr_scheduler", "cosine", "--boft_dropout", "0"]
    out = tmp_path / "out"
    assert run_main("--output_dir", out, *flags) == 0
    held = load_file(out / "checkpoint-2" / "trainable.safetensors")
    rotations = [key for key in held if "boft_skew" in key]
    assert rotations and all(not held[key].any() for key in rotations)  # the adapters still the identity
    assert all(torch.equal(held[key], torch.ones_like(held[key])) for key in held if "boft_s." in key)
    pipe = bd.load_pipeline("tiny", dtype=torch.float32)
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[pipe.tokenizer("sks ohwx", add_special_tokens=False).input_ids]
    assert (held["text_encoder.embeddings.token_embedding.identifier.vectors"] - rows).abs().max() > 1e-3  # it moved
    moments = load_file(out / "checkpoint-2" / "optimizer.safetensors")
    assert len({key.split(".")[0] for key in moments}) == 1  # no gradient, so no AdamW moments, for the adapters
    final = load_file(out / "adapter_model.safetensors")
    assert any(final[key].abs().max() > 1e-4 for key in final if key.endswith("boft_R"))  # then they joined

    resumed = tmp_path / "resumed"  # from inside the head start
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    assert run_main("--output_dir", resumed, *flags, "--resume_from_checkpoint", "latest") == 0
    expected, actual = adapter_tensors(out), adapter_tensors(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert run_main("--output_dir", resumed, *flags, "--resume_from_checkpoint", str(resumed / "checkpoint-1"),
                    "--max_train_steps", "8") == 2  # a head start of 4 steps, not the 2 it began with
    assert "head_start_steps 2 -> 4" in capsys.readouterr().err

    assert run_main("--output_dir", tmp_path / "bad", "--identifier_only_fraction", "0.5") == 2
    assert "--identifier_only_fraction needs --train_identifier_embedding" in capsys.readouterr().err
    assert run_main("--output_dir", tmp_path / "bad", *flags[:3], "--identifier_only_fraction", "1") == 2
    assert "--identifier_only_fraction 1.0 leaves no step for the adapters" in capsys.readouterr().err


def subject_copy(folder: Path) -> Path:
    """The bundled star's images, without their caption sidecars."""
    shutil.copytree(ROOT / "boft_diffusion" / "tiny" / "subjects" / "sks_star", folder,
                    ignore=shutil.ignore_patterns("*.txt"))
    return folder


def test_caption_sidecars_are_not_image_candidates(caplog):
    """The bundled subjects carry .txt captions; a run without --caption_extension must neither
    try them as images nor warn about them."""
    folder = ROOT / "boft_diffusion" / "tiny" / "subjects" / "sks_star"
    assert len(list(folder.glob("*.txt"))) == 5
    with caplog.at_level("WARNING", logger="boft_diffusion"):
        loaded = load_images(folder, 64)
    assert [p.suffix for p, _ in loaded] == [".png"] * 5
    assert not caplog.records


def test_sidecar_captions_are_the_prompts_of_their_images(tmp_path, capsys, caplog, monkeypatch):
    instances = subject_copy(tmp_path / "captioned")
    captions = {"sks_star_00": "a photo of sks star on a black background",
                "sks_star_01": "a photo of SKS star, on a blue background", "sks_star_02": "a photo of a star"}
    for stem, caption in captions.items():
        (instances / f"{stem}.txt").write_text(f"  {caption}\n")
    mean_to_stem = {round(float(image_to_tensor(Image.open(path).convert("RGB")).mean()), 4): path.stem
                    for path in sorted(instances.glob("*.png"))}
    assert len(mean_to_stem) == 5, "the test tells images apart by their mean"
    pairs: list[tuple[str, str]] = []
    batches: list[list[str]] = []
    real_augment, real_encode = dreambooth.augment_batch, StableDiffusion.encode_prompts

    def recording_augment(images, **kwargs):
        batches.append([mean_to_stem[round(float(image[:3].mean()), 4)] for image in images])
        return real_augment(images, **kwargs)

    def recording_encode(self, encoders, prompts, device, max_sequence_length=None):
        pairs.extend(zip(batches.pop(0), prompts, strict=True))
        return real_encode(self, encoders, prompts, device, max_sequence_length)

    monkeypatch.setattr(dreambooth, "augment_batch", recording_augment)
    monkeypatch.setattr(StableDiffusion, "encode_prompts", recording_encode)
    common = ["--instance_data_dir", instances, "--caption_extension", ".txt", "--train_batch_size", "5",
              "--train_identifier_embedding", "--class_prompt", "a photo of star", "--max_train_steps", "1"]
    with caplog.at_level("WARNING", logger="boft_diffusion"):
        assert run_main("--output_dir", tmp_path / "a", *common) == 0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "non-image" not in messages, "caption files are not images to skip"
    assert "captions without the identifier ohwx sks: sks_star_02.png" in messages  # "SKS," still names it
    expected = {stem: captions.get(stem, "a photo of sks ohwx star") for stem in mean_to_stem.values()}
    assert dict(pairs) == expected and len(pairs) == 5

    pairs.clear()
    assert run_main("--output_dir", tmp_path / "b", *common, "--caption_dropout_rate", "1",
                    "--caption_extension", "txt") == 0
    assert [prompt for _, prompt in pairs] == ["a photo of sks ohwx star"] * 5
    assert run_main("--output_dir", tmp_path / "d", *common, "--caption_dropout_rate", "1.5") == 2
    assert "not a probability" in capsys.readouterr().err
    assert run_main("--output_dir", tmp_path / "e", "--caption_dropout_rate", "0.5") == 2
    assert "needs --caption_extension" in capsys.readouterr().err

    (instances / "sks_star_03.txt").write_text("   \n")
    assert run_main("--output_dir", tmp_path / "c", *common) == 2
    assert "sks_star_03.txt is empty" in capsys.readouterr().err


def test_class_images_are_drawn_and_trained_on_the_instance_captions(tmp_path, capsys, monkeypatch):
    """--class_prompts_from_captions: class image i is drawn from instance caption i (cycled) less
    the identifier, its caption is written beside it, and it trains on that caption; caption
    dropout sends class images to --class_prompt."""
    subject = ROOT / "boft_diffusion" / "tiny" / "subjects" / "sks_star"
    instance_captions = [p.read_text().strip() for p in sorted(subject.glob("*.txt"))]
    assert len(set(instance_captions)) == 5 and all(" sks ohwx star " in c for c in instance_captions)
    class_dir = tmp_path / "class"
    encoded: list[list[str]] = []
    real_encode = StableDiffusion.encode_prompts

    def recording_encode(self, encoders, prompts, device, max_sequence_length=None):
        encoded.append(list(prompts))
        return real_encode(self, encoders, prompts, device, max_sequence_length)

    monkeypatch.setattr(StableDiffusion, "encode_prompts", recording_encode)
    common = ["--instance_data_dir", subject, "--caption_extension", ".txt", "--with_prior_preservation",
              "--class_prompt", "a photo of star", "--class_data_dir", class_dir, "--num_class_images", "6",
              "--sample_batch_size", "4", "--train_batch_size", "6", "--max_train_steps", "1",
              "--train_identifier_embedding", "--class_prompts_from_captions"]
    assert run_main("--output_dir", tmp_path / "a", *common) == 0
    expected = [c.replace(" sks ohwx star ", " star ") for c in instance_captions + instance_captions[:1]]
    written = [(class_dir / f"class_{i:05d}.txt").read_text() for i in range(6)]
    assert written == expected and len(list(class_dir.glob("*.png"))) == 6
    trained = [p for batch in encoded for p in batch]
    assert sorted(p for p in trained if "sks" not in p) == sorted(expected)  # one step covers every class image

    (class_dir / "class_00005.png").unlink()
    (class_dir / "class_00005.txt").unlink()
    encoded.clear()
    assert run_main("--output_dir", tmp_path / "b", *common, "--caption_dropout_rate", "1") == 0
    assert (class_dir / "class_00005.txt").read_text() == expected[5]  # resumed with the same caption
    trained = [p for batch in encoded for p in batch]
    assert [p for p in trained if "sks" not in p] == ["a photo of star"] * 6

    plain_dir = tmp_path / "plain_class"
    plain_dir.mkdir()
    Image.new("RGB", (64, 64), "red").save(plain_dir / "class_00000.png")
    assert run_main("--output_dir", tmp_path / "c", *common, "--class_data_dir", plain_dir) == 2
    assert "already holds class images without .txt captions (class_00000.png" in capsys.readouterr().err
    config = dreambooth.DreamBoothConfig.from_flags(["--class_prompt", "a photo of star"])
    assert dreambooth.class_captions(config, ["a photo of SKS ohwx star, on a red background", "sks ohwx star",
                                            "a photo of sks ohwx star, on a red background"]) == [
        "a photo of star, on a red background", "star"]
    assert run_main("--output_dir", tmp_path / "d", "--with_prior_preservation", "--class_prompt", "a photo of star",
                    "--class_data_dir", plain_dir, "--class_prompts_from_captions") == 2
    assert "needs --caption_extension and --with_prior_preservation" in capsys.readouterr().err


def square_masks(folder: Path) -> Path:
    folder.mkdir()
    for image in sorted((ROOT / "boft_diffusion" / "tiny" / "subjects" / "sks_star").glob("*.png")):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(folder / image.name)
    return folder


def test_subject_masks_weight_the_instance_loss(tmp_path, capsys):
    masks = square_masks(tmp_path / "masks")
    common = ["--max_train_steps", "3", "--seed", "3"]

    def adapter(name: str, *flags) -> dict:
        assert run_main("--output_dir", tmp_path / name, *common, *flags) == 0
        return load_file(tmp_path / name / "adapter_model.safetensors")

    plain = adapter("plain")
    unit = adapter("unit", "--instance_mask_dir", masks, "--background_loss_weight", "1")
    masked = adapter("masked", "--instance_mask_dir", masks)
    assert all(torch.allclose(plain[k], unit[k], atol=1e-6) for k in plain), "weight 1 everywhere is the plain loss"
    assert any(not torch.allclose(plain[k], masked[k], atol=1e-4) for k in plain)

    assert run_main("--output_dir", tmp_path / "unmasked", *common, "--background_loss_weight", "0.5") == 2
    assert "needs --instance_mask_dir" in capsys.readouterr().err
    (masks / "sks_star_04.png").unlink()
    assert run_main("--output_dir", tmp_path / "missing", *common, "--instance_mask_dir", masks) == 2
    err = capsys.readouterr().err
    assert "no mask in" in err and "sks_star_04.png" in err


def test_masks_follow_their_images_through_centre_crops(tmp_path):
    """A wide image and its mask are cropped alike; cut-out masks use their alpha; bad masks are named."""
    from boft_diffusion.training.data import DataError

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    wide = np.zeros((64, 96, 3), dtype=np.uint8)
    wide[:, :40] = 255  # a white band on the left
    Image.fromarray(wide).save(images / "wide.png")
    band = np.zeros((64, 96, 4), dtype=np.uint8)
    band[:, :40, 3] = 255  # a cut-out: opaque where the band is, transparent elsewhere
    Image.fromarray(band, "RGBA").save(masks / "wide.png")
    loaded = dreambooth.ImageSet.from_folder(images, 64, crop=True, workers=0, what="images", mask_dir=masks)
    tensor = loaded.tensors[0]
    assert tensor.shape == (4, 64, 64)
    assert torch.equal(tensor[3] > 0.5, tensor[0] > 0), "the mask must cover exactly the image's white band"
    assert int((tensor[3] > 0.5).any(0).sum()) == 40 - 16

    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(masks / "wide.png")
    with pytest.raises(DataError, match="wide.png is 64x64.*96x64"):
        dreambooth.ImageSet.from_folder(images, 64, crop=True, workers=0, what="images", mask_dir=masks)
    Image.fromarray(np.zeros((64, 96), dtype=np.uint8)).save(masks / "wide.png")
    Image.fromarray(np.zeros((64, 96), dtype=np.uint8)).save(masks / "wide.jpg")
    with pytest.raises(DataError, match="two masks for 'wide'"):
        dreambooth.ImageSet.from_folder(images, 64, crop=True, workers=0, what="images", mask_dir=masks)


def test_real_size_check_script_runs_its_tiny_variant(tmp_path):
    """benchmarks/gpu_check.py (run on a GPU at SD 1.5 size) takes the same path at tiny size on CPU."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--size", "tiny", "--mixed_precision", "no",
               "--max_train_steps", "2", "--recipes", "attention+convs+identifier", "--workdir", str(tmp_path)]
    output = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert output.returncode == 0, output.stderr[-2000:]
    rows = [json.loads(line) for line in output.stdout.splitlines() if line.startswith("{")]
    result = rows[-1]
    assert result["recipe"] == "attention+convs+identifier" and result["step"] == 2
    assert result["steps_per_second"] > 0 and "peak_memory_gib" not in result  # CPU: no GPU memory to report
    assert result["validation_grid"] and result["finite"]
    assert result["reloaded_adapter_changes_output"] > 0
    assert (tmp_path / "attention-convs-identifier" / "learned_embeds.safetensors").is_file()
