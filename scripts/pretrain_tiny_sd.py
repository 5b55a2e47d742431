#!/usr/bin/env python
"""Pretrain the embedded tiny Stable Diffusion from scratch on the shapes world (CPU or CUDA).

Stages (all reproducible from --seed):
  1. render N training scenes (held-out combinations excluded) once;
  2. build a word-level CLIP BPE tokenizer (vocab.json / merges.txt generated here);
  3. train a tiny AutoencoderKL (64x64x3 -> 4x16x16) with L1+MSE and a tiny KL term,
     check that palette colours round-trip;
  4. encode the whole training set once (posterior mean/std cached);
  5. train a small UNet2DConditionModel (cross-attention blocks) jointly with a tiny
     CLIPTextModel: v-prediction on a cosine schedule (zero-ish terminal SNR, so the
     global colour is decided by the text, not leaked through the initial noise),
     min-SNR weighting, LR warm-up + cosine decay, EMA, 10% caption dropout for
     classifier-free guidance, caption variants (openings, dropped
     attributes, descriptor words: ``world.caption_variant``), drawn from a bank of
     --caption-variants tokenized captions per scene;
  6. save a standard diffusers StableDiffusionPipeline folder (fp16 weights, EMA
     weights, DPM-Solver++ sampler) to --out.

Examples::

    python scripts/pretrain_tiny_sd.py --quick             # < 1 min smoke test into a tmp dir
    nohup python scripts/pretrain_tiny_sd.py --out boft_diffusion/tiny/model \
        --work /tmp/tiny_sd_work > /tmp/tiny_sd_pretrain.log 2>&1 &
    python scripts/pretrain_tiny_sd.py --device cuda --batch 256 --max-minutes 5 \
        --init-vae boft_diffusion/tiny/model/vae --decoder-minutes 1.5   # a GPU run
    python scripts/pretrain_tiny_sd.py --world 4 --device cuda --batch 256 --max-minutes 5 \
        --workers 8 --out /tmp/tiny_v4                                  # world v4, its own VAE
    python scripts/pretrain_tiny_sd.py --world 4 --vae-channels 32 64 128 --vae-only \
        --work /tmp/v4_work --out /tmp/v4_vae                           # its VAE first, to check it
    python scripts/pretrain_tiny_sd.py --world 4 --init-from boft_diffusion/tiny/model \
        --init-vae boft_diffusion/tiny/model/vae --lr 4e-4 --warmup 50 --ema 0.995 \
        --max-minutes 75 --out /tmp/tiny_v4                             # world v4 from v3, on a CPU

The run checkpoints to --work (the VAE, the decoder fine-tune every 500 steps, the UNet every
--ckpt-every steps) and writes --out whole or not at all; rerun with --resume to go on.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boft_diffusion.core.files import atomic_folder  # noqa: E402
from boft_diffusion.tiny import subject_family  # noqa: E402
from boft_diffusion.tiny import world as W  # noqa: E402

#: Whole tokens that no pretraining caption uses: prompt words people may type, and the
#: descriptors kept out of the pool to measure robustness to words the model never saw.
EXTRA_WORDS = ["in", "striped", "shape", "object", *W.UNSEEN_DESCRIPTORS]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


class ThreadTuner:
    """Pick the intra-op thread count (1..max) that currently gives the fastest
    steps.  On a shared 2-core machine, 2 threads are best when idle but can be
    ~10x slower than 1 thread when another process competes for the cores
    (threads wait on each other at every parallel region).  Every ``period``
    steps the other setting is probed for ``probe`` steps."""

    def __init__(self, max_threads: int, period: int = 40, probe: int = 3):
        self.choices = sorted({1, max(1, max_threads)})
        self.cur = self.choices[-1]
        self.times = {c: None for c in self.choices}
        self.period, self.probe = period, probe
        self.k = 0
        self._best = self.cur
        self._t = None
        torch.set_num_threads(self.cur)

    def start(self):
        self._t = time.time()

    def stop(self):
        dt = time.time() - self._t
        old = self.times[self.cur]
        self.times[self.cur] = dt if old is None else 0.7 * old + 0.3 * dt
        self.k += 1
        if len(self.choices) == 1:
            return
        ph = self.k % self.period
        if ph == 0:  # probe the other setting
            self._best = self.cur
            other = [c for c in self.choices if c != self.cur][0]
            self.times[other] = None
            self._set(other)
        elif ph == self.probe:  # decide
            known = {c: t for c, t in self.times.items() if t is not None}
            self._set(min(known, key=known.get))

    def _set(self, n):
        if n != self.cur:
            self.cur = n
            torch.set_num_threads(n)

    def __repr__(self):
        return f"threads={self.cur} " + " ".join(f"{c}:{t:.2f}s" for c, t in self.times.items() if t is not None)


# ----------------------------------------------------------------------------
# tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    out = {}
    extra = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    toks = list(word[:-1]) + [word[-1] + "</w>"]
    while len(toks) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(toks, toks[1:], strict=False))]
        r, _ = min(pairs)
        if r == 1 << 30:
            break
        first, second = next((a, b) for (a, b) in zip(toks, toks[1:], strict=False) if ranks.get((a, b)) == r)
        new, i = [], 0
        while i < len(toks):
            if i < len(toks) - 1 and toks[i] == first and toks[i + 1] == second:
                new.append(first + second)
                i += 2
            else:
                new.append(toks[i])
                i += 1
        toks = new
    return toks


def build_tokenizer_files(folder: Path, words: list[str]) -> None:
    """Write vocab.json + merges.txt such that every word is one token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10):
        changed = False
        for w in words:
            toks = _bpe(w, ranks)
            while len(toks) > 1:
                pair = (toks[0], toks[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                toks = _bpe(w, ranks)
        if not changed:
            break
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")


def make_tokenizer(folder: Path, max_length: int, version: int = W.WORLD_VERSION):
    from transformers import CLIPTokenizer

    words = W.all_vocabulary_words(version) + EXTRA_WORDS
    build_tokenizer_files(folder, sorted(set(words)))
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    tok._tiny_source_dir = str(folder)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    return tok


# ----------------------------------------------------------------------------
# models


def make_models(args, vocab_size, bos, eos, pad):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(args.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, args.vae_channels[0] // 2),
        sample_size=64,
    )
    tcfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=args.text_dim,
        intermediate_size=args.text_dim * 4,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        max_position_embeddings=args.max_length,
        projection_dim=args.text_dim,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        hidden_act="quick_gelu",
    )
    text_encoder = CLIPTextModel(tcfg)
    c = tuple(args.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=c,
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.text_dim,
        attention_head_dim=4,  # (diffusers' legacy name: number of heads)
        norm_num_groups=min(32, c[0]),
        addition_embed_type="text",  # attention-pooled text embedding added to the time embedding
        addition_embed_type_num_heads=4,
    )
    return vae, text_encoder, unet


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------
# data


def _training_scenes(n: int, seed: int, version: int) -> list[W.Scene]:
    """World ``version``'s pretraining scenes, the subjects' combinations held out."""
    return W.training_scenes(n, seed, version=version, excluded=subject_family.subject_combos())


def _render_chunk(args: tuple[int, int, int, int]) -> np.ndarray:
    n, seed, version, start = args
    scenes = _training_scenes(n, seed, version)[start : start + 1000]
    return W.render_batch(scenes)


def render_dataset(n: int, seed: int, cache: Path | None, workers: int = 1,
                   version: int = W.WORLD_VERSION) -> tuple[np.ndarray, list[W.Scene]]:
    """The training scenes of world ``version`` (re-sampled, which is cheap) and their images
    (rendered in ``workers`` processes, cached in ``cache``)."""
    scenes = _training_scenes(n, seed, version)
    if cache is not None and cache.exists():
        images = np.load(cache, allow_pickle=False)["images"]
        if len(images) == n:
            return images, scenes
    t = time.time()
    jobs = [(n, seed, version, start) for start in range(0, n, 1000)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = np.concatenate(pool.map(_render_chunk, jobs))
    else:
        images = W.render_batch(scenes)
    log(f"rendered {n} scenes in {time.time() - t:.1f}s")
    if cache is not None:
        np.savez(cache, images=images)
    return images, scenes


def caption_bank(scenes: list[W.Scene], tokenizer, variants: int, rng: np.random.Generator) -> torch.Tensor:
    """Token ids [n, variants, max_length]: ``variants`` captions of every scene,
    drawn once, so the training loop only indexes."""
    t = time.time()
    captions = [W.caption_variant(s, rng) for s in scenes for _ in range(variants)]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    log(f"caption bank: {len(captions)} captions in {time.time() - t:.1f}s, e.g. {captions[:3]}")
    return ids.view(len(scenes), variants, -1)


def to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------
# VAE


def texture_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Generic images for the *VAE only* (so it is a general codec, not a palette
    codec): random RGB colours, random shapes filled with solid colour,
    stripes (random angle/period) or checkers on solid/striped backgrounds.
    The UNet and text encoder never see these."""
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    out = np.empty((n, 64, 64, 3), np.uint8)
    kinds = list(W.SHAPES)

    def fill():
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        mode = rng.integers(3)
        if mode == 0:
            return np.broadcast_to(c1, (64, 64, 3))
        if mode == 1:
            a = rng.uniform(0, np.pi)
            period = rng.uniform(4, 16)
            ph = ((xx * np.cos(a) + yy * np.sin(a)) / period + rng.random()) % 1.0
            return np.where((ph < 0.5)[..., None], c1, c2)
        cell = rng.integers(3, 10)
        return np.where((((xx // cell) + (yy // cell)) % 2 == 0)[..., None], c1, c2)

    for i in range(n):
        bg = fill() if rng.random() < 0.4 else np.broadcast_to(rng.integers(0, 256, 3), (64, 64, 3))
        img = np.array(bg, np.uint8)
        for _ in range(1 + int(rng.random() < 0.3)):
            shp = W.Shape(kinds[rng.integers(len(kinds))], "red", cx=float(rng.uniform(12, 52)),
                          cy=float(rng.uniform(12, 52)), radius=float(rng.uniform(6, 22)))
            m = np.asarray(W.render_mask(W.Scene("blue", (shp,)))) > 127
            img[m] = fill()[m]
        out[i] = img
    return out


def vae_batch(images: np.ndarray, args, rng: np.random.Generator) -> torch.Tensor:
    """A VAE training batch: world scenes plus a share of generic texture images."""
    n_tex = int(round(args.vae_batch * args.vae_p_texture))
    idx = rng.integers(0, len(images), args.vae_batch - n_tex)
    return to_tensor(np.concatenate([images[idx], texture_images(n_tex, rng)])).to(args.device)


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU from Ampere on, or a CPU that oneDNN has
    bf16 kernels for. Elsewhere autocast emulates bf16, and a step on the 2-core AVX2 development CPU took 15 s
    instead of 1.9 s in fp32 (2026-12-07)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's bf16 query
        return False


def autocast(args):
    """bf16 autocast on the training device (CPU or CUDA) where ``args.bf16`` (see ``native_bf16``)."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)


DECODER_CHECKPOINT = "vae_decoder_ft.pt"


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file, so a kill never leaves a half-written checkpoint."""
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def train_vae(vae, images, args, rng):
    tuner = ThreadTuner(args.threads)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        lr = args.vae_lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / args.vae_steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        tuner.start()
        x = vae_batch(images, args, rng)
        with autocast(args):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        tuner.stop()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"({time.time() - t0:.0f}s) {tuner}")
    vae.eval()
    return vae


def read_decoder_checkpoint(path: Path) -> dict:
    """A decoder fine-tune's save (``finetune_decoder``), or a clear stop for a file of another kind."""
    state = torch.load(path, map_location="cpu")
    if not isinstance(state, dict) or not {"vae", "opt", "step", "finished"} <= state.keys():
        raise SystemExit(f"{path} is not a decoder fine-tune checkpoint of this script (from before it could be "
                         "resumed?): move it away to fine-tune the decoder again")
    return state


def finetune_decoder(vae, images, args, rng, steps: int, minutes: float = 0.0, save_to: Path | None = None,
                     resume: bool = False, save_every: int = 500) -> int:
    """Sharpen the decoder with the encoder frozen (the latent space, and hence
    anything trained on it, stays valid).  Runs ``steps`` steps, or until
    ``minutes`` of wall time when that is set (LR cosine over the budget).
    ``save_to`` gets the VAE, the optimiser, the random states and the steps and seconds spent
    every ``save_every`` steps and at the end; ``resume`` goes on from there, so a killed fine-tune
    is finished, not taken as done (a step-counted run on the CPU at one thread count ends on the
    weights of a run never killed)."""
    step, spent, state = 0, 0.0, None
    if resume and save_to is not None and save_to.exists():
        state = read_decoder_checkpoint(save_to)
        vae.load_state_dict(state["vae"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, spent = state["step"], state["seconds"]
        if state["finished"]:
            log(f"decoder already fine-tuned ({step} steps); move {save_to} away to fine-tune it again")
            return step
        log(f"decoder fine-tune resumed at step {step} ({spent:.0f}s spent)")
    vae.requires_grad_(False)
    dec_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for q in dec_params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(dec_params, lr=args.decoder_lr, weight_decay=0.0)
    if state is not None:
        opt.load_state_dict(state["opt"])
    tuner = ThreadTuner(args.threads)
    t0 = time.time() - spent

    def save(finished: bool) -> None:
        if save_to is not None:
            save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "seconds": time.time() - t0, "finished": finished,
                         "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, save_to)

    while True:
        prog = step / steps if steps else 0.0
        if minutes:
            prog = max(prog, (time.time() - t0) / (minutes * 60))
        if prog >= 1.0:
            break
        lr = args.decoder_lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        tuner.start()
        x = vae_batch(images, args, rng)
        with autocast(args):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
        opt.step()
        tuner.stop()
        if step % 100 == 0:
            log(f"decoder step {step} l1 {l1.item():.4f} mse {mse.item():.5f} lr {lr:.2e} ({time.time() - t0:.0f}s) {tuner}")
        step += 1
        if step % save_every == 0:
            save(finished=False)
    vae.requires_grad_(False)
    vae.eval()
    save(finished=True)
    log(f"decoder fine-tuned for {step} steps ({time.time() - t0:.0f}s)")
    return step


@torch.no_grad()
def vae_colour_check(vae, dtype=torch.float32):
    """Mean abs error (0-255 scale) of reconstructed palette colours (object and
    background pixels) on a grid of rendered scenes, and the subject measure of
    each bundled subject's round-tripped instance images."""
    from boft_diffusion.tiny import metrics as M

    device = next(vae.parameters()).device
    scenes = [W.make_scene(c, k, b) for c in W.COLORS for b in W.COLORS if c != b for k in ("circle", "star")][::3]
    x = to_tensor(W.render_batch(scenes)).to(device, dtype)
    v = vae.to(dtype)
    rec = v.decode(v.encode(x).latent_dist.mean).sample.float().cpu()
    subjects = {}
    for name in W.SUBJECTS:
        inst = W.render_batch(W.subject_instance_scenes(5, subject=name))
        back = v.decode(v.encode(to_tensor(inst).to(device, dtype)).latent_dist.mean).sample.float()
        back = ((back.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        profile = M.SubjectProfile(list(inst))
        subjects[name] = round(float(np.mean([M.subject_fidelity(im, profile) for im in back])), 3)
    vae.to(torch.float32)
    x = x.float().cpu()
    err = ((rec.clamp(-1, 1) - x.float()).abs() * 127.5).mean().item()
    # error on the flat interior of background (corners)
    corner = ((rec[:, :, :8, :8].clamp(-1, 1) - x.float()[:, :, :8, :8]).abs() * 127.5).mean().item()
    centre = ((rec[:, :, 28:36, 28:36].clamp(-1, 1) - x.float()[:, :, 28:36, 28:36]).abs() * 127.5).mean().item()
    return {"mae": err, "bg_mae": corner, "centre_mae": centre, "subject_round_trip": subjects}


@torch.no_grad()
def encode_all(vae, images, batch=256):
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i : i + batch]).to(device)).latent_dist  # fp32 for exact latents
        means.append(d.mean.half())
        stds.append(d.std.half())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------
# UNet + text encoder


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, sched_cfg, fp16: bool, meta: dict):
    """The pipeline as a diffusers folder, written whole or not at all: a run killed while saving
    leaves the folder that was there (the embedded model, by default) as it was."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(sched_cfg, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu(),
        text_encoder=copy.deepcopy(text_encoder).cpu(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).cpu(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        pipe.to(torch.float16)
    with atomic_folder(out, fsync=True) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # transformers 5 writes only tokenizer.json; keep the generated BPE files too (older/slow tokenizers need them)
        src = Path(getattr(tokenizer, "_tiny_source_dir", ""))
        for fname in ("vocab.json", "merges.txt"):
            if (src / fname).is_file():
                shutil.copy(src / fname, tmp / "tokenizer" / fname)
        (tmp / "tiny_sd_meta.json").write_text(json.dumps(meta, indent=1))
    return pipe


def run_meta(args, steps_done: int, models: dict, **extra) -> dict:
    """What tiny_sd_meta.json records: the command, the resolved recipe, the device and the word lists."""
    device = torch.device(args.device)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_version": args.world,
        "unet_steps_done": steps_done,
        "params": {name: nparams(m) for name, m in models.items()},
        "identifier_words": list(W.IDENTIFIER_WORDS),
        "descriptor_pool": list(W.DESCRIPTOR_POOL),
        "unseen_descriptors": list(W.UNSEEN_DESCRIPTORS),
        "default_guidance_scale": 4.0,
        "default_num_inference_steps": 25,
        **extra,
    }


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False)


def export_checkpoint(args, out, work, vae, text_encoder, unet, tokenizer, images):
    ck = torch.load(work / "ckpt.pt")
    scale = ck.get("scaling_factor") or args.scaling_factor
    if scale is None:
        scale = estimated_scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=scale)
    unet.load_state_dict(ck["ema_unet"])
    text_encoder.load_state_dict(ck["ema_text"])
    meta = run_meta(args, ck["step"], {"vae": vae, "text_encoder": text_encoder, "unet": unet},
                    exported_from_checkpoint=True)
    pipe = save_pipeline(out, vae, text_encoder.eval(), tokenizer, unet.eval(), noise_scheduler().config,
                         not args.no_fp16, meta)
    log(f"exported step {ck['step']} to {out} (scaling_factor {scale:.4f})")
    return pipe, out


def estimated_scaling_factor(vae, images: np.ndarray) -> float:
    """1 / std of the latents of the first 4,000 training images: what unit-variance latents need, when the
    full encoding of a training run is not at hand."""
    m, _ = encode_all(vae, images[:4000])
    return float(1.0 / m.float().std())


def save_vae(vae, images: np.ndarray, out: Path) -> Path:
    """The VAE alone as a diffusers folder, with its estimated scaling factor, written whole or not at all."""
    vae.register_to_config(scaling_factor=estimated_scaling_factor(vae, images))
    with atomic_folder(out, fsync=True) as tmp:
        vae.cpu().save_pretrained(str(tmp), safe_serialization=True)
    log(f"vae saved to {out} (scaling_factor {vae.config.scaling_factor:.4f})")
    return out


def load_vae(args, vae, work: Path, images: np.ndarray, rng: np.random.Generator):
    """The VAE to start from: --init-vae (a diffusers folder), else this run's vae.pt when
    resuming, else a new one trained here."""
    from diffusers import AutoencoderKL

    vae_path = work / "vae.pt"
    if args.init_vae:
        vae = AutoencoderKL.from_pretrained(args.init_vae, torch_dtype=torch.float32)
        log(f"vae from {args.init_vae}")
    elif (args.resume or args.export_ckpt) and vae_path.exists():
        vae.load_state_dict(torch.load(vae_path))
        log("loaded vae checkpoint")
    else:
        vae.to(args.device)
        t = time.time()
        train_vae(vae, images, args, rng)
        log(f"vae trained in {time.time() - t:.0f}s")
        save_atomic(vae.state_dict(), vae_path)
    return vae.to(args.device).eval()


def load_fine_tuned_decoder(vae, path: Path) -> None:
    """This run's fine-tuned decoder, for a run that resumes or exports without fine-tuning it."""
    state = read_decoder_checkpoint(path)
    vae.load_state_dict(state["vae"])
    if state["finished"]:
        log(f"loaded the decoder fine-tuned {state['step']} steps")
    else:
        log(f"WARNING: the decoder in {path} stopped at step {state['step']}, unfinished: "
            "--resume with its --decoder-steps or --decoder-minutes finishes it")


def warm_start(folder: Path, text_encoder, unet, tokenizer) -> dict:
    """Start the UNet and text encoder from an earlier embedded model (a diffusers folder), so a
    world that only adds to the last one (v4's patterns) need not be learned from scratch on a CPU.
    Token embeddings are matched by token: words the old tokenizer had keep what they learned,
    new words start from this run's random initialisation."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    old_unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    old_text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    old_vocab = CLIPTokenizer.from_pretrained(folder / "tokenizer").get_vocab()
    old_rows = old_text.get_input_embeddings().weight.detach()
    rows = text_encoder.get_input_embeddings().weight.detach().clone()
    kept = 0
    for token, index in tokenizer.get_vocab().items():
        if token in old_vocab:
            rows[index] = old_rows[old_vocab[token]]
            kept += 1
    old_text.set_input_embeddings(torch.nn.Embedding.from_pretrained(rows, freeze=False))
    try:
        unet.load_state_dict(old_unet.state_dict())
        text_encoder.load_state_dict(old_text.state_dict())
    except RuntimeError as err:
        raise SystemExit(f"--init-from {folder}: its UNet or text encoder has another shape than this run's "
                         f"(--unet-channels, --text-dim, --text-layers, --max-length must match it): {err}") from None
    log(f"unet and text encoder from {folder}: {kept} tokens kept, {len(tokenizer) - kept} new")
    return {"from": str(folder), "tokens_kept": kept, "tokens_new": len(tokenizer) - kept}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output pipeline folder (default: package model dir)")
    p.add_argument("--work", default=None, help="scratch dir: dataset cache, checkpoints (default /tmp/tiny_sd_work)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=W.WORLD_VERSION, choices=W.WORLD_VERSIONS,
                   help="the world to pretrain on: 3 (the embedded model's) or 4 (every shape with every pattern)")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--caption-variants", type=int, default=8, help="captions drawn per scene")
    p.add_argument("--init-vae", default=None, help="start from this diffusers VAE folder instead of training one")
    p.add_argument("--init-from", default=None,
                   help="start the UNet and text encoder from this pipeline folder (same sizes; tokens matched by word)")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae-channels", type=int, nargs=3, default=[16, 32, 64])
    p.add_argument("--unet-channels", type=int, nargs=3, default=[32, 64, 128])
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--text-dim", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="UNet wall-time budget: the LR schedule follows max(step/steps, time/budget) and training "
                        "stops when either is done (0: steps only, exactly reproducible)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-p-texture", type=float, default=0.3)
    p.add_argument("--decoder-steps", type=int, default=0, help="decoder-only fine-tune steps (frozen encoder)")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--decoder-minutes", type=float, default=0.0, help="decoder fine-tune wall-time budget")
    p.add_argument("--vae-only", action="store_true",
                   help="stop after the VAE (trained, or loaded, and its decoder fine-tuned if asked): save it "
                        "to --out (required) as a diffusers AutoencoderKL folder, for vae_round_trip.py --vae before "
                        "a UNet is trained on it; --init-vae OUT goes on from it, as does --resume with the same "
                        "--work and --vae-channels")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training (default: where the device computes bf16 in hardware, "
                        "see native_bf16)")
    p.add_argument("--no-fp16", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="go on from --work: its VAE, an unfinished decoder fine-tune, the UNet's last checkpoint")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke test into a tmp dir")
    p.add_argument("--export-ckpt", action="store_true",
                   help="only export the pipeline from the EMA weights of --work/ckpt.pt (+ vae.pt)")
    p.add_argument("--scaling-factor", type=float, default=None, help="with --export-ckpt (else re-estimated)")
    args = p.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = native_bf16(args.device)
    if args.vae_only and not (args.out or args.quick):
        p.error("--vae-only needs --out: the default is the embedded model's folder, which a VAE alone would spoil")
    return args


def main(argv=None):
    args = parse_args(argv)

    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="tiny_sd_quick_"))
        args.out = args.out or str(tmp / "model")
        args.work = args.work or str(tmp / "work")
        args.n_train, args.vae_steps, args.vae_batch = 64, 3, 4
        args.steps, args.batch, args.warmup, args.ckpt_every = 3, 4, 1, 2
        args.caption_variants = 2
        args.vae_channels, args.unet_channels = [16, 32, 32], [32, 32, 64]
        args.text_dim, args.text_layers = 32, 1
    out = Path(args.out) if args.out else Path(W.__file__).resolve().parent / "model"
    work = Path(args.work or "/tmp/tiny_sd_work")
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    log("args", vars(args))

    cache = None if args.quick else work / f"data_{args.n_train}_{args.seed}_w{args.world}.npz"
    images, scenes = render_dataset(args.n_train, args.seed, cache, args.workers, args.world)
    tokenizer = make_tokenizer(work / "tokenizer", args.max_length, args.world)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    vae, text_encoder, unet = make_models(args, len(tokenizer), bos, eos, pad)
    log(f"params: vae {nparams(vae)/1e6:.2f}M text {nparams(text_encoder)/1e6:.2f}M unet {nparams(unet)/1e6:.2f}M")

    warm = warm_start(Path(args.init_from), text_encoder, unet, tokenizer) if args.init_from else None

    # ---- VAE
    vae = load_vae(args, vae, work, images, rng)
    dec_path = work / DECODER_CHECKPOINT
    if (args.decoder_steps or args.decoder_minutes) and not args.export_ckpt:
        finetune_decoder(vae, images, args, rng, args.decoder_steps, args.decoder_minutes, save_to=dec_path,
                         resume=args.resume)
    elif (args.resume or args.export_ckpt) and dec_path.exists():
        load_fine_tuned_decoder(vae, dec_path)
    if args.export_ckpt:
        return export_checkpoint(args, out, work, vae, text_encoder, unet, tokenizer, images)
    log("vae check fp32", vae_colour_check(vae))
    if args.vae_only:
        return None, save_vae(vae, images, out)

    t = time.time()
    lat_mean, lat_std = encode_all(vae, images)
    scale = float(1.0 / lat_mean.float().std())
    vae.register_to_config(scaling_factor=scale)
    log(f"encoded {len(images)} in {time.time() - t:.0f}s, latent std {1/scale:.3f} -> scaling_factor {scale:.4f}")
    # its own generator: a resumed run, which skips the VAE's draws, trains on the same captions
    bank = caption_bank(scenes, tokenizer, args.caption_variants, np.random.default_rng([args.seed, 1])).to(device)

    # ---- UNet + text encoder
    noise_sched = noise_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    snr_all = alphas_cumprod / (1 - alphas_cumprod)

    unet.to(device)
    text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    start = 0
    ckpt_path = work / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device)
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
        rng = np.random.default_rng(args.seed * 1000 + start)
        torch.manual_seed(args.seed * 1000 + start)
        log(f"resumed at step {start}")

    saved_at = start

    def save_checkpoint(step: int) -> None:
        nonlocal saved_at
        saved_at = step
        save_atomic({"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                     "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                     "opt": opt.state_dict(), "step": step, "scaling_factor": scale}, ckpt_path)
        log(f"checkpoint at step {step}")

    tuner = ThreadTuner(args.threads)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    lat_mean, lat_std = lat_mean.to(device), lat_std.to(device)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    n = len(images)
    loss_acc, k_acc = torch.zeros((), device=device), 0
    done = start
    for step in range(start, args.steps):
        # progress in [0, 1]: by steps, or by wall time when --max-minutes is set (whichever is further),
        # so that a time-capped run still anneals its learning rate to the end
        prog = step / args.steps
        if args.max_minutes:
            prog = max(prog, (time.time() - t0) / (args.max_minutes * 60))
        if prog >= 1.0:
            log(f"schedule finished at step {step} ({time.time() - t0:.0f}s)")
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        tuner.start()
        it = torch.from_numpy(rng.integers(0, n, args.batch)).to(device)
        variant = torch.from_numpy(rng.integers(0, args.caption_variants, args.batch)).to(device)
        ids = bank[it, variant]
        drop = torch.from_numpy(rng.random(args.batch) < args.p_uncond).to(device)
        ids = torch.where(drop[:, None], empty_ids, ids)
        lat = (lat_mean[it].float() + lat_std[it].float() * torch.randn(args.batch, 4, 16, 16, device=device)) * scale
        noise = torch.randn_like(lat)
        ts = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = noise_sched.add_noise(lat, noise, ts)
        target = noise_sched.get_velocity(lat, noise, ts)
        with autocast(args):
            enc = text_encoder(ids)[0]
            pred = unet(noisy, ts, encoder_hidden_states=enc).sample.float()
        snr = snr_all[ts]
        w = torch.clamp(snr, max=args.min_snr) / (snr + 1) if args.min_snr > 0 else torch.ones_like(snr)
        loss = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for em, m in ((ema_unet, unet), (ema_text, text_encoder)):
                torch._foreach_lerp_(list(em.parameters()), list(m.parameters()), 1 - d)
        tuner.stop()
        done = step + 1
        loss_acc += loss.detach()
        k_acc += 1
        if step % 200 == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(f"step {step} loss {loss_acc.item() / k_acc:.4f} lr {lr:.2e} {el:.0f}s "
                f"({el / (step - start + 1):.3f}s/it) {tuner}")
            loss_acc, k_acc = torch.zeros((), device=device), 0
        if (step + 1) % args.ckpt_every == 0:
            save_checkpoint(step + 1)
    if saved_at != done:  # a time-capped run stops between checkpoints
        save_checkpoint(done)
    train_s = time.time() - t0
    meta = run_meta(args, done, {"vae": vae, "text_encoder": text_encoder, "unet": unet},
                    unet_train_seconds=round(train_s), total_seconds=round(time.time() - t_start),
                    vae_check=vae_colour_check(vae), warm_start=warm)
    pipe = save_pipeline(out, vae, ema_text, tokenizer, ema_unet, noise_sched.config, not args.no_fp16, meta)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved pipeline to {out} ({size / 1e6:.1f} MB); total {time.time() - t_start:.0f}s")
    return pipe, out


if __name__ == "__main__":
    main()
