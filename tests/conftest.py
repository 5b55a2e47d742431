import contextlib
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from boft_diffusion.tiny.toy import toy_unet_config


def make_tiny_unet(seed: int = 0):
    """A two-level UNet2DConditionModel with cross-attention, random weights, built from a config."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**toy_unet_config()).eval()


def unet_inputs(seed: int = 1, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=gen),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 5, 32, generator=gen),
    )


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def inputs():
    return unet_inputs()


def run_unet(unet, inputs, grad: bool = False) -> torch.Tensor:
    sample, timestep, context = inputs
    with torch.set_grad_enabled(grad):
        return unet(sample, timestep, encoder_hidden_states=context).sample.detach()


def encode(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's hidden states for one prompt, padded as the pipeline pads: what an
    identifier embedding or an exported text-encoder adapter changes."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def randomize_adapter(model, adapter_name: str = "default", scale: float = 0.3, seed: int = 0) -> None:
    """Give an adapter non-trivial values, as after training."""
    from boft_diffusion.core.adapters import boft_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in boft_layers(model):
            if adapter_name in layer.specs:
                skew = layer.boft_skew[adapter_name]
                skew.copy_(torch.randn(skew.shape, generator=gen) * scale)
                if adapter_name in layer.boft_s:
                    s = layer.boft_s[adapter_name]
                    s.copy_(1 + 0.1 * torch.randn(s.shape, generator=gen))


def make_tiny_sdxl(folder, seed: int = 0):
    """A random-weight SDXL pipeline folder: a UNet conditioned on pooled text and sizes
    (addition_embed_type "text_time"), a CLIPTextModel and a CLIPTextModelWithProjection, both
    with the embedded model's tokenizer, and the embedded model's VAE (64 px images, 16 px latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR

    torch.manual_seed(seed)
    text = dict(vocab_size=732, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, bos_token_id=730, eos_token_id=731, pad_token_id=731, projection_dim=16)
    time_dim = 8
    unet = UNet2DConditionModel(**toy_unet_config(
        sample_size=16, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text["projection_dim"],
    ))
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR / "vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def kill_at_checkpoint_and_resume(launch: Callable[..., object], folder: Path) -> None:
    """Start ``launch(folder)``, SIGKILL it once checkpoint-4 exists, check that it wrote no final
    adapter and kept a checkpoint, then resume it to the end (the kill-and-resume tests)."""
    from boft_diffusion.training.checkpoints import list_checkpoints

    victim = launch(folder)
    deadline = time.time() + 300
    while not (folder / "checkpoint-4").exists():
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (folder / "adapter_model.safetensors").exists()
    assert list_checkpoints(folder)[-1].name in ("checkpoint-4", "checkpoint-6")
    resumed = launch(folder, "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]


def _launch(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | str:
    """The finished run, or, for a run still going after ``timeout``, the stacks faulthandler
    printed when SIGABRT stopped every process of it."""
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        import psutil  # accelerate's dependency

        # torchrun starts its workers in sessions of their own: signal each process, workers first.
        launcher = psutil.Process(process.pid)
        stuck = [*launcher.children(recursive=True), launcher]
        for member in stuck:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for member in stuck:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            _, stderr = process.communicate()
        return stderr[-8000:]


def run_two_processes(script: Path, args: Sequence[str], output_dir: Path, env: dict,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script --output_dir output_dir`` under torchrun as two CPU processes, its rendezvous
    on a free port.

    CI once saw such a launch stall for 10 minutes; none of 87 launches here stalled. So a stalled
    launch is stopped with SIGABRT, its stacks go out as a warning, and it is tried once more; a
    second stall fails the test with the stacks.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *map(str, args), "--output_dir", str(output_dir)]
    stalled = f"{script.name} on two processes stalled for {timeout} s; where each process waited:\n"
    result = _launch(command, env, timeout)
    if isinstance(result, str):
        warnings.warn(stalled + result, stacklevel=2)
        shutil.rmtree(output_dir, ignore_errors=True)
        result = _launch(command, env, timeout)
        if isinstance(result, str):
            pytest.fail(stalled + result)
    return result
