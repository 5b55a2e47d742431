import json
import shutil

import numpy as np
import pytest
import torch

from boft_diffusion.families.loading import ModelLoadError, load_pipeline, quiet_progress
from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR


def _pretrain_module():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pretrain_tiny_sd", root / "scripts" / "pretrain_tiny_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_sizes():
    """The model sizes of ``--quick``: the embedded model's architecture family, small."""
    import argparse

    return argparse.Namespace(vae_channels=[16, 32, 32], unet_channels=[32, 32, 64], unet_layers=1,
                              text_dim=32, text_layers=1, max_length=24)


@pytest.fixture(scope="module")
def quick_pipeline_dir(tmp_path_factory):
    """An untrained pipeline folder with the embedded model's architecture family
    (tiny sizes), written by the pretraining script's own helpers."""

    from diffusers import DDPMScheduler

    mod = _pretrain_module()
    tmp = tmp_path_factory.mktemp("quick")
    tok = mod.make_tokenizer(tmp / "tok", 24)
    args = _tiny_sizes()
    torch.manual_seed(0)
    vae, text, unet = mod.make_models(args, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    out = tmp / "model"
    mod.save_pipeline(out, vae.eval(), text.eval(), tok, unet.eval(), sched.config, True, {"recipe": {}})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_quick_pretraining_mode(tmp_path, world):
    out = tmp_path / "model"
    n_threads = torch.get_num_threads()
    try:
        _pretrain_module().main(["--quick", "--world", str(world), "--out", str(out)])
    finally:
        torch.set_num_threads(n_threads)
    pipe = load_pipeline(str(out), device="cpu")
    assert pipe("a red circle on a blue background", num_inference_steps=2).images[0].size == (64, 64)
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert json.loads((out / "tiny_sd_meta.json").read_text())["world_version"] == world
    ring = "a red star with an orange ring on a black background"
    whole_words = len(pipe.tokenizer(ring, add_special_tokens=False).input_ids) == len(ring.split())
    assert whole_words == (world == 4)


def test_vae_only_pretraining_saves_a_vae_folder_and_trains_no_unet(tmp_path):
    """A new VAE's round trip is checked before minutes of UNet training go into its latent space."""
    from diffusers import AutoencoderKL

    from boft_diffusion.tiny import world
    from boft_diffusion.tiny.evaluate import round_trip

    mod = _pretrain_module()
    out, work = tmp_path / "vae", tmp_path / "work"
    n_threads = torch.get_num_threads()
    try:
        mod.main(["--quick", "--world", "4", "--vae-only", "--out", str(out), "--work", str(work)])
    finally:
        torch.set_num_threads(n_threads)
    vae = AutoencoderKL.from_pretrained(str(out))
    assert list(vae.config.block_out_channels) == [16, 32, 32]
    assert vae.config.scaling_factor != pytest.approx(0.18215), "diffusers' default: this VAE's was not estimated"
    assert (work / "vae.pt").is_file() and not (work / "ckpt.pt").exists()
    assert not (out / "unet").exists()
    scene = world.Scene("blue", (world.Shape("star", "red", cx=32.0, cy=32.0, radius=20.0),))
    assert round_trip(vae, [world.render(scene)])[0].size == (64, 64)
    with pytest.raises(SystemExit):
        mod.parse_args(["--vae-only"])


@pytest.mark.parametrize("native", [True, False])
def test_pretraining_autocasts_to_bf16_only_where_the_device_computes_it(monkeypatch, native):
    mod = _pretrain_module()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: native)
    assert mod.parse_args([]).bf16 is native, "emulated bf16 is several times slower than fp32"
    assert mod.parse_args(["--device", "cuda"]).bf16 is native, "GPUs before Ampere emulate it too"
    assert mod.parse_args(["--bf16"]).bf16 and not mod.parse_args(["--device", "cuda", "--no-bf16"]).bf16


def test_quick_pretrain_roundtrip(quick_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(str(quick_pipeline_dir), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32
    tok = pipe.tokenizer
    assert tok.model_max_length == pipe.text_encoder.config.max_position_embeddings
    for word in ("sks", "zwx", "ohwx", "star", "background", "photo"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    gen = torch.Generator().manual_seed(0)
    img = pipe("a red circle on a blue background", num_inference_steps=2, generator=gen).images[0]
    assert img.size == (64, 64)
    gen = torch.Generator().manual_seed(0)
    img2 = pipe("a red circle on a blue background", num_inference_steps=2, generator=gen).images[0]
    assert np.array_equal(np.asarray(img), np.asarray(img2))


def test_warm_start_keeps_an_older_models_weights_and_words(quick_pipeline_dir, tmp_path):
    """World v4 can start from the v3 model on a CPU: the UNet is copied, every word the old
    tokenizer had keeps its embedding (a v3 caption encodes exactly as before), new words are new."""

    from transformers import CLIPTextModel

    mod = _pretrain_module()
    pipe = load_pipeline(str(quick_pipeline_dir), device="cpu")
    tok = mod.make_tokenizer(tmp_path / "tok", 24, version=4)
    sizes = _tiny_sizes()
    _, text, unet = mod.make_models(sizes, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    info = mod.warm_start(quick_pipeline_dir, text, unet, tok)
    old_vocab, new_vocab = pipe.tokenizer.get_vocab(), tok.get_vocab()
    assert info["tokens_kept"] == len(old_vocab.keys() & new_vocab.keys())
    assert info["tokens_new"] == len(tok) - info["tokens_kept"] > 0
    assert {word for word in old_vocab if word.endswith("</w>")} <= new_vocab.keys()
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], value), name
    old_text = CLIPTextModel.from_pretrained(quick_pipeline_dir / "text_encoder", torch_dtype=torch.float32).eval()
    caption = "a photo of sks star on a blue background"

    def encode(model, tokenizer):
        ids = tokenizer(caption, padding="max_length", max_length=24, return_tensors="pt").input_ids
        return model.eval()(ids)[0]

    assert torch.equal(encode(text, tok), encode(old_text, pipe.tokenizer))
    assert len(tok("dots", add_special_tokens=False).input_ids) == 1

    sizes.unet_channels = [32, 64, 64]
    _, text, unet = mod.make_models(sizes, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    with pytest.raises(SystemExit, match="--init-from .*--unet-channels"):
        mod.warm_start(quick_pipeline_dir, text, unet, tok)


def _folder_bytes(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_pretraining_save_killed_midway_leaves_the_old_model_folder_whole(quick_pipeline_dir, tmp_path, monkeypatch):
    """The pretraining script writes over the embedded model by default: a save that fails after
    some files are written keeps every file of the model that was there, and leaves no temporary."""

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    mod = _pretrain_module()
    out = tmp_path / "model"
    shutil.copytree(quick_pipeline_dir, out)
    before = _folder_bytes(out)
    tok = mod.make_tokenizer(tmp_path / "tok", 24)
    sizes = _tiny_sizes()
    torch.manual_seed(1)
    vae, text, unet = mod.make_models(sizes, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
    save = StableDiffusionPipeline.save_pretrained

    def save_then_die(self, folder, **kwargs):
        save(self, folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        mod.save_pipeline(out, vae, text, tok, unet, sched, True, {"recipe": {"new": True}})
    assert _folder_bytes(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "tok"]

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", save)
    mod.save_pipeline(out, vae, text, tok, unet, sched, True, {"recipe": {"new": True}})
    after = _folder_bytes(out)
    assert after.keys() == before.keys()
    assert after["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]
    assert json.loads(after["tiny_sd_meta.json"]) == {"recipe": {"new": True}}


def test_killed_decoder_fine_tune_resumes_to_the_weights_of_one_never_killed(tmp_path, monkeypatch):
    """A decoder fine-tune is an hour on a CPU: one killed midway is finished from its last save by
    --resume, to the very weights of a run never killed (on the CPU at one thread); a finished one
    is left as it is; a file the script did not write that way is refused by name."""
    import argparse

    mod = _pretrain_module()
    tok = mod.make_tokenizer(tmp_path / "tok", 24)
    sizes = _tiny_sizes()
    args = argparse.Namespace(decoder_lr=1e-3, threads=1, vae_batch=2, vae_p_texture=0.5, device="cpu",
                              bf16=False, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)

    def fresh_vae():
        torch.manual_seed(0)
        return mod.make_models(sizes, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)[0]

    def fine_tune(vae, save_to, resume=False):
        torch.manual_seed(1)
        return mod.finetune_decoder(vae, images, args, np.random.default_rng(2), 6, save_to=save_to,
                                    resume=resume, save_every=2)

    n_threads = torch.get_num_threads()
    try:
        whole = fresh_vae()
        assert fine_tune(whole, tmp_path / "whole.pt") == 6
        batch, calls = mod.vae_batch, []

        def killed_in_step_5(*a):
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return batch(*a)

        monkeypatch.setattr(mod, "vae_batch", killed_in_step_5)
        killed = tmp_path / "killed.pt"
        with pytest.raises(KeyboardInterrupt):
            fine_tune(fresh_vae(), killed)
        saved = torch.load(killed)
        assert saved["step"] == 4 and not saved["finished"]
        monkeypatch.setattr(mod, "vae_batch", batch)
        resumed = fresh_vae()
        assert fine_tune(resumed, killed, resume=True) == 6
        assert torch.load(killed)["finished"]
        for name, value in whole.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], value), name
        assert not torch.equal(fresh_vae().decoder.conv_out.weight, whole.decoder.conv_out.weight)

        again = fresh_vae()
        assert fine_tune(again, killed, resume=True) == 6
        assert torch.equal(again.decoder.conv_out.weight, whole.decoder.conv_out.weight)

        torch.save(whole.state_dict(), tmp_path / "plain.pt")
        with pytest.raises(SystemExit, match="plain.pt is not a decoder fine-tune checkpoint"):
            fine_tune(fresh_vae(), tmp_path / "plain.pt", resume=True)
    finally:
        torch.set_num_threads(n_threads)


@pytest.mark.slow
def test_export_ckpt_writes_the_pipeline_a_finished_run_saved(tmp_path):
    """--export-ckpt rebuilds a pipeline from a run's checkpoint (a killed run's last one): for a
    finished run it is the very pipeline the run saved, from the EMA weights, the fine-tuned decoder
    and the same latent scale."""
    mod = _pretrain_module()
    work = tmp_path / "work"
    n_threads = torch.get_num_threads()
    try:
        mod.main(["--quick", "--work", str(work), "--out", str(tmp_path / "trained"), "--decoder-steps", "2"])
        mod.main(["--quick", "--work", str(work), "--out", str(tmp_path / "exported"), "--export-ckpt"])
    finally:
        torch.set_num_threads(n_threads)
    trained, exported = _folder_bytes(tmp_path / "trained"), _folder_bytes(tmp_path / "exported")
    for part in ("unet", "text_encoder", "vae"):
        name = f"{part}/{'model' if part == 'text_encoder' else 'diffusion_pytorch_model'}.safetensors"
        assert exported[name] == trained[name], name
    assert json.loads(exported["vae/config.json"])["scaling_factor"] == json.loads(trained["vae/config.json"])["scaling_factor"]
    meta = json.loads(exported["tiny_sd_meta.json"])
    assert meta["exported_from_checkpoint"] and meta["unet_steps_done"] == 3


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope"):
        load_pipeline(str(missing))


def test_incomplete_folder_error(quick_pipeline_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quick_pipeline_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match=r"broken.*unet"):
        load_pipeline(str(broken))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(empty))


def test_corrupt_weights_error(quick_pipeline_dir, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(quick_pipeline_dir, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_pipeline(str(broken))
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(broken))


def test_missing_single_file_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "model.safetensors"))


def test_unavailable_hub_id_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as ei:
        load_pipeline("nobody-here/definitely-not-cached-sd")
    msg = str(ei.value)
    assert "nobody-here/definitely-not-cached-sd" in msg and "cache" in msg and "HF_HUB_OFFLINE" in msg


def test_embedded_model_meta_and_size():
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024
    meta = json.loads((EMBEDDED_MODEL_DIR / "tiny_sd_meta.json").read_text())
    assert "recipe" in meta


def test_tiny_samples_a_64x64_image_of_the_caption():
    from boft_diffusion.tiny import metrics as M

    pipe = quiet_progress(load_pipeline("tiny", device="cpu"))
    img = pipe("a red circle on a blue background", num_inference_steps=25, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    fidelity = M.prompt_fidelity(img, "a red circle on a blue background")
    assert fidelity["background"] == 1.0 and fidelity["shape_color"] == 1.0


@pytest.mark.slow
def test_tiny_prompt_fidelity_on_held_out():
    from boft_diffusion.families.loading import tiny_defaults
    from boft_diffusion.tiny import world as W
    from boft_diffusion.tiny.evaluate import evaluate_prompt_fidelity

    pipe = quiet_progress(load_pipeline("tiny", device="cpu"))
    scenes = W.held_out_scenes(16, seed=0)
    d = tiny_defaults()
    res = evaluate_prompt_fidelity(pipe, scenes, seeds=range(16), steps=d["num_inference_steps"],
                                   guidance=d["guidance_scale"])
    # These 16 samples (fixed seeds) score 16/16, 16/16 and 14/16 on a CPU; each bound lets one more
    # sample miss, as float rounding on another CPU may flip a borderline one. Sampling at guidance
    # 1.5 instead of the model's 4 draws the right shape 12 times: below the bound.
    assert res["n"] == 16
    assert res["background"] >= 15 / 16
    assert res["shape_color"] >= 15 / 16
    assert res["shape_class"] >= 13 / 16


@pytest.mark.slow
def test_tiny_follows_the_prompt_forms_dreambooth_writes():
    """A word in the identifier slot, trained or never seen, and the bare class prompts."""
    from boft_diffusion.families.loading import tiny_defaults
    from boft_diffusion.tiny import metrics as M
    from boft_diffusion.tiny import world as W
    from boft_diffusion.tiny.evaluate import generate

    pipe = quiet_progress(load_pipeline("tiny", device="cpu"))
    d = tiny_defaults()
    colours = ("blue", "white")
    prompts = [f"a photo of {word} {shape} on a {colour} background"
               for word, colour in zip(("sks", W.UNSEEN_DESCRIPTORS[0]), colours, strict=True) for shape in W.SHAPES]
    prompts += [f"a photo of {shape}" for shape in W.SHAPES]
    images = generate(pipe, prompts, list(range(len(prompts))), d["num_inference_steps"], d["guidance_scale"])
    scores = [M.prompt_fidelity(im, p) for im, p in zip(images, prompts, strict=True)]
    # These samples score 13/14 backgrounds and 19/21 shapes on a CPU (64 samples per form:
    # docs/research/tiny_model_v3.md); each bound lets one more miss.
    assert np.mean([s["background"] for s in scores[:14]]) >= 12 / 14
    assert np.mean([s["shape_class"] for s in scores]) >= 18 / 21
    assert scores[14 + W.SHAPES.index("star")]["shape_class"] == 1.0, "'a photo of star' draws a star"


def test_offline_hub_error_names_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"`hf download nobody/not-a-cached-model`"):
        load_pipeline("nobody/not-a-cached-model")
