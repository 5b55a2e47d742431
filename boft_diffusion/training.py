"""The training loop shared by train_dreambooth.py and train_controlnet.py.

Written once: accelerate set-up, seeding, optimiser and diffusers LR schedules, gradient
accumulation and clipping, mixed precision with float32 adapter weights, gradient
checkpointing, atomic checkpoints and exact resume, validation grids, tensorboard and tqdm.
A recipe supplies the modules to train, a loss function and how to save its outputs.

Every random draw of micro-batch ``k`` (data order, noise, timesteps, flips, BOFT dropout)
comes from generators seeded by ``(seed, k, rank)``, so a resumed run replays exactly what an
uninterrupted run would have done: the checkpointed RNG state is the step counter.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import BOFTConfig

logger = logging.getLogger("boft_diffusion")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad output folder, ...); the message says why."""


# Command-line flags shared by the training scripts ----------------------------------------------
def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", default="tiny",
                       help='"tiny" (the embedded model), a diffusers folder, a hub id or a single .safetensors file.')
    group.add_argument("--revision", default=None, help="Hub revision of the base model.")
    group.add_argument("--variant", default=None, help='Weight variant of the base model, e.g. "fp16".')


def add_training_args(parser: argparse.ArgumentParser, default_output_dir: str, default_steps: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", default=default_output_dir)
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Train into an output_dir that already holds another run.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--resolution", type=int, default=None,
                       help="Training image size (default: the base model's native size).")
    group.add_argument("--train_batch_size", type=int, default=1, help="Per process.")
    group.add_argument("--max_train_steps", type=int, default=None,
                       help=f"Optimiser steps; overrides --num_train_epochs (default {default_steps}).")
    group.add_argument("--num_train_epochs", type=int, default=None)
    parser.set_defaults(default_train_steps=default_steps)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=1e-3)
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by batch size, accumulation steps and processes.")
    group.add_argument("--lr_scheduler", default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting with this gamma (5.0 is the usual choice); default: plain MSE.")
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    group.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                       help="Frozen weights in half precision; adapter weights stay float32.")
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--dataloader_num_workers", type=int, default=0,
                       help="Threads that decode images while the data set is loaded into memory.")
    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--checkpointing_steps", type=int, default=0, help="0: no intermediate checkpoints.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    group.add_argument("--validation_prompt", nargs="+", default=None)
    group.add_argument("--num_validation_images", type=int, default=2)
    group.add_argument("--validation_steps", type=int, default=0, help="0: validate at the end only.")
    group.add_argument("--num_inference_steps", type=int, default=25, help="Sampler steps for validation.")
    group.add_argument("--guidance_scale", type=float, default=None)
    group.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    group.add_argument("--logging_dir", default="logs", help="Relative to output_dir.")


def add_boft_args(parser: argparse.ArgumentParser, default_targets: Sequence[str]) -> None:
    group = parser.add_argument_group("BOFT")
    group.add_argument("--boft_block_size", type=int, default=None,
                       help="Features per orthogonal block (default 8 unless --boft_block_num is set).")
    group.add_argument("--boft_block_num", type=int, default=0)
    group.add_argument("--boft_n_butterfly_factor", type=int, default=2, help="Butterfly depth m.")
    group.add_argument("--boft_dropout", type=float, default=0.1, help="Probability of dropping each block.")
    group.add_argument("--boft_bias", default="none", choices=["none", "boft_only", "all"])
    group.add_argument("--boft_target_modules", nargs="+", default=list(default_targets))
    group.add_argument("--boft_scale", dest="boft_scale", action="store_true", default=True,
                       help="Learn a per-output magnitude (default).")
    group.add_argument("--no_boft_scale", dest="boft_scale", action="store_false")
    group.add_argument("--boft_cayley_neumann_terms", type=int, default=0,
                       help="0: exact Cayley; k > 0: k-term Neumann series (faster, approximate).")


def run_cli(build_parser: Callable[[str | None], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Any],
            description: str | None, argv: list[str] | None) -> int:
    """Entry point of a training script: parse, run, and turn expected failures into exit code 2."""
    args = build_parser(description).parse_args(argv)
    try:
        run(args)
    except (TrainingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def boft_config_from_args(args: argparse.Namespace, target_modules: Sequence[str] | None = None) -> BOFTConfig:
    return BOFTConfig(
        block_size=args.boft_block_size,
        block_num=args.boft_block_num,
        n_butterfly_factor=args.boft_n_butterfly_factor,
        target_modules=list(target_modules or args.boft_target_modules),
        dropout=args.boft_dropout,
        scale=args.boft_scale,
        bias=args.boft_bias,
        cayley_neumann_terms=args.boft_cayley_neumann_terms,
        base_model_name_or_path=args.pretrained_model_name_or_path,
    )


# Set-up ---------------------------------------------------------------------------------------
def check_output_dir(args: argparse.Namespace, adapter_files: Sequence[str]) -> None:
    """Refuse to mix two runs in one folder unless resuming or explicitly overwriting."""
    folder = Path(args.output_dir)
    if not folder.exists() or args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    previous = [name for name in adapter_files if (folder / name).exists()] + [p.name for p in list_checkpoints(folder)]
    if previous:
        raise TrainingError(
            f"{folder} already holds another run ({', '.join(previous[:3])}); pass --resume_from_checkpoint latest "
            "to continue it or --overwrite_output_dir to replace it."
        )


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    logging_dir = Path(args.output_dir) / args.logging_dir
    # Without a GPU, several processes (torchrun / accelerate launch) run data parallel on CPU (gloo).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    multi_cpu = distributed and not torch.cuda.is_available()
    if not distributed:
        # A second run in the same process (tests, the demo) may use another precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    # New layers (control encoder, ControlNet embedding) are initialised from the seed, not from chance.
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("boft_diffusion").setLevel(logging.WARNING)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for frozen weights under the chosen mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(
    args: argparse.Namespace, params: dict[str, nn.Parameter], num_processes: int,
    learning_rates: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) at --learning_rate, except parameters whose names end with a key of
    ``learning_rates``, which get that rate; --scale_lr scales every rate alike."""
    factor = args.gradient_accumulation_steps * args.train_batch_size * num_processes if args.scale_lr else 1
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        rate = next((r for suffix, r in (learning_rates or {}).items() if name.endswith(suffix)), args.learning_rate)
        groups.setdefault(rate, []).append(param)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        [{"params": group, "lr": rate * factor} for rate, group in groups.items()],
        lr=args.learning_rate * factor,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction).")


def denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, snr_gamma: float | None,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example MSE, averaged; with ``snr_gamma`` weighted by Min-SNR (Hang et al. 2023).

    Min-SNR caps the weight of nearly clean timesteps and, for v-prediction, shrinks that of
    nearly pure noise, where the target is the data mean: without it a few instance images
    pull the whole palette of a small model towards their average colour. ``pixel_weight``
    (broadcastable to the prediction) turns each example's MSE into a weighted mean, e.g. to
    learn less of a subject's background."""
    error = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, prediction.ndim))
    if pixel_weight is None:
        per_example = error.mean(dim=dims)
    else:
        weight = pixel_weight.float().expand_as(error)
        per_example = (error * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)
    if not snr_gamma:
        return per_example.mean()
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    capped = torch.clamp(snr, max=snr_gamma)
    weight = capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr
    return (per_example * weight).mean()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_order(dataset_len: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xDA7A))
    return torch.randperm(dataset_len, generator=gen).tolist()


def micro_batch_indices(
    micro_step: int, dataset_len: int, batch_size: int, num_processes: int, rank: int, seed: int
) -> list[int]:
    """Example indices of this process's share of global micro-batch ``micro_step``."""
    per_epoch = max(1, math.ceil(dataset_len / (batch_size * num_processes)))
    epoch, position = divmod(micro_step, per_epoch)
    order = epoch_order(dataset_len, epoch, seed)
    start = (position * num_processes + rank) * batch_size
    return [order[(start + j) % dataset_len] for j in range(batch_size)]


def steps_for(args: argparse.Namespace, dataset_len: int, num_processes: int) -> int:
    if args.max_train_steps is not None:
        return args.max_train_steps
    if args.num_train_epochs is not None:
        per_epoch = math.ceil(dataset_len / (args.train_batch_size * num_processes))
        return math.ceil(per_epoch * args.num_train_epochs / args.gradient_accumulation_steps)
    return args.default_train_steps


def image_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    width, height = rows[0][0].size
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * width, len(rows) * height), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (x * width, y * height))
    return grid


# The loop -----------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """What a training script plugs into the shared loop.

    ``modules``: name -> module holding trainable parameters (wrapped for data parallelism).
    ``compute_loss(indices, generator) -> (loss, logs)``: one micro-batch's loss.
    ``save_outputs(folder)``: write the trained artefacts (adapter folders, encoders).
    ``validate(step) -> rows of images``: optional, run on the main process.
    ``learning_rates``: parameter-name suffix -> learning rate, for parameters that need their own.
    ``schedule``: the recipe's own settings that change which random draws a step makes; a
    resumed run must match them.
    """

    modules: dict[str, nn.Module]
    dataset_len: int
    compute_loss: Callable[[list[int], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    save_outputs: Callable[[Path], None]
    validate: Callable[[int], list[list[Image.Image]]] | None = None
    run_name: str = "boft"
    metadata: dict[str, Any] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)


def trainable_tensors(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {
        f"{key}.{name}": param
        for key, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


class Throughput:
    """Optimiser steps per second after the first (which pays for warm-up), wall clock, so any
    checkpointing or validation in between counts; and peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ticks = 0
        self.first = self.last = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter()
        if self.ticks == 0:
            self.first = self.last
        self.ticks += 1

    def summary(self) -> dict[str, float]:
        speed: dict[str, float] = {}
        if self.ticks > 1:
            speed["steps_per_second"] = (self.ticks - 1) / (self.last - self.first)
        if self.device.type == "cuda":
            speed["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return speed


class Trainer:
    """Runs a Recipe: resume, accumulate, clip, step, checkpoint, validate, log, save."""

    def __init__(self, args: argparse.Namespace, accelerator, recipe: Recipe) -> None:
        self.args = args
        self.accelerator = accelerator
        self.recipe = recipe
        self.params = trainable_tensors(recipe.modules)
        if not self.params:
            raise TrainingError("nothing to train: no parameter requires a gradient.")
        for param in self.params.values():
            if param.dtype != torch.float32:
                param.data = param.data.float()
        self.max_steps = steps_for(args, recipe.dataset_len, accelerator.num_processes)
        optimizer = make_optimizer(args, self.params, accelerator.num_processes, recipe.learning_rates)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=self.max_steps
        )
        prepared = accelerator.prepare(*recipe.modules.values(), optimizer)
        self.wrapped = dict(zip(recipe.modules, prepared[:-1], strict=True))
        self.optimizer = prepared[-1]
        self.step = 0
        self.output_dir = Path(args.output_dir)

    # checkpoints ---------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        state = {"library_version": __version__, **self._schedule()}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["grad_scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
        return state

    def _schedule(self) -> dict[str, int]:
        """Settings that decide which examples and random draws each step uses: resume needs them equal."""
        args = self.args
        return {"seed": args.seed, "train_batch_size": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_processes": self.accelerator.num_processes, "dataset_len": self.recipe.dataset_len,
                **self.recipe.schedule}

    def save_checkpoint(self) -> Path | None:
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.output_dir,
                self.step,
                self.params,
                self.optimizer,
                self.lr_scheduler,
                self._trainer_state(),
                extra_files={"adapter": self.recipe.save_outputs},
                total_limit=self.args.checkpoints_total_limit,
            )
            logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def maybe_resume(self) -> None:
        spec = self.args.resume_from_checkpoint
        if not spec:
            return
        path = resolve_checkpoint(self.output_dir, spec)
        if path is None:
            logger.info("no checkpoint in %s; starting from scratch", self.output_dir)
            return
        tensors, state = load_checkpoint(path, self.optimizer, self.lr_scheduler)
        changed = {k: (state.get(k), v) for k, v in self._schedule().items() if k in state and state[k] != v}
        if changed:
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise TrainingError(f"{path} was written with other settings ({details}); resume with the same ones.")
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise TrainingError(f"{path} does not match this run: it lacks {missing[:3]} (and {len(missing)} in all).")
        with torch.no_grad():
            for name, param in self.params.items():
                if tensors[name].shape != param.shape:
                    raise TrainingError(
                        f"{path}: {name} has shape {list(tensors[name].shape)}, this run {list(param.shape)}."
                    )
                param.copy_(tensors[name])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # one optimiser step --------------------------------------------------------------------------
    def _micro_step(self, micro: int, last: bool) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        indices = micro_batch_indices(
            micro, self.recipe.dataset_len, args.train_batch_size, acc.num_processes, acc.process_index, args.seed
        )
        # A CPU generator: the same draws on every device type, and usable with CPU-side sampling.
        generator = torch.Generator().manual_seed(derive_seed(args.seed, micro, acc.process_index))
        torch.manual_seed(derive_seed(args.seed, micro, acc.process_index, 0xD0))
        sync = contextlib.ExitStack()
        if not last:
            for module in self.wrapped.values():
                sync.enter_context(acc.no_sync(module))
        with sync:
            with acc.autocast():
                loss, logs = self.recipe.compute_loss(indices, generator)
            losses = acc.gather(loss.detach().float().reshape(1))
            if not torch.isfinite(losses).all():
                checkpoints = list_checkpoints(self.output_dir)
                last_good = checkpoints[-1] if checkpoints else "none yet"
                raise TrainingError(
                    f"the loss became {losses.tolist()} at step {self.step + 1}; stopping. "
                    f"Last good checkpoint: {last_good}. Try a lower --learning_rate or --mixed_precision no."
                )
            acc.backward(loss / args.gradient_accumulation_steps)
        return {"loss": losses.mean().item(), **logs}

    def _check_gradients(self) -> None:
        """Clip, and refuse to apply non-finite gradients (fp16's scaler skips those steps itself)."""
        args, acc = self.args, self.accelerator
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
        norm = acc.clip_grad_norm_(list(self.params.values()), max_norm)
        if getattr(acc, "scaler", None) is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            checkpoints = list_checkpoints(self.output_dir)
            raise TrainingError(
                f"non-finite gradients at step {self.step + 1}; stopping before they reach the weights. "
                f"Last good checkpoint: {checkpoints[-1] if checkpoints else 'none yet'}."
            )

    def train(self) -> dict[str, Any]:
        args, acc = self.args, self.accelerator
        self.maybe_resume()
        if acc.is_main_process and args.report_to != "none":
            acc.init_trackers(self.recipe.run_name, config=_tracker_config(args))
        for module in self.wrapped.values():
            module.train()
        progress = tqdm(total=self.max_steps, initial=self.step, desc="steps", disable=not acc.is_local_main_process)
        accumulated: dict[str, float] = {}
        throughput = Throughput(acc.device)
        while self.step < self.max_steps:
            accumulated = {}
            for j in range(args.gradient_accumulation_steps):
                micro = self.step * args.gradient_accumulation_steps + j
                logs = self._micro_step(micro, last=j == args.gradient_accumulation_steps - 1)
                for key, value in logs.items():
                    accumulated[key] = accumulated.get(key, 0.0) + value / args.gradient_accumulation_steps
            self._check_gradients()
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            throughput.tick()
            accumulated["lr"] = self.lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{accumulated['loss']:.4f}")
            acc.log(accumulated, step=self.step)
            if args.checkpointing_steps and self.step % args.checkpointing_steps == 0 and self.step < self.max_steps:
                self.save_checkpoint()
            if args.validation_steps and self.step % args.validation_steps == 0 and self.step < self.max_steps:
                self.run_validation()
        progress.close()
        speed = throughput.summary()
        if speed:
            logger.info("training speed: %s", speed)
        self.finish()
        return {"step": self.step, **accumulated, **speed}

    # validation and final outputs ------------------------------------------------------------------
    def run_validation(self) -> Path | None:
        if self.recipe.validate is None:
            return None
        path = None
        if self.accelerator.is_main_process:
            for module in self.wrapped.values():
                module.eval()
            with self.accelerator.autocast():
                rows = self.recipe.validate(self.step)
            for module in self.wrapped.values():
                module.train()
            if rows:
                grid = image_grid(rows)
                path = self.output_dir / "validation" / f"step-{self.step:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                self._log_image(grid)
        self.accelerator.wait_for_everyone()
        return path

    def _log_image(self, grid: Image.Image) -> None:
        if self.args.report_to != "tensorboard":
            return
        import numpy as np

        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")

    def check_replicas_agree(self) -> None:
        """All processes must hold the same weights after training; a mismatch is a bug, not noise."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.params.values()]).to(acc.device)
        gathered = acc.gather(flat.reshape(1, -1))
        if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
            raise TrainingError("the processes ended with different adapter weights (gradients were not synchronised).")
        logger.info("trained weights are identical on all %d processes", acc.num_processes)

    def finish(self) -> None:
        acc = self.accelerator
        self.check_replicas_agree()
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.recipe.save_outputs(self.output_dir)
        self.run_validation()

    def close(self) -> None:
        """End trackers and the process group; call once every process is done with files."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as tensorboard hparams: scalars only."""
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
        elif value is not None:
            config[key] = json.dumps(value)
    return config

