"""The training loop shared by train_dreambooth.py and train_controlnet.py.

Written once: accelerate set-up, seeding, optimiser and diffusers LR schedules, gradient
accumulation and clipping, mixed precision with float32 adapter weights, gradient
checkpointing, atomic checkpoints and exact resume, validation grids, tensorboard and tqdm, and a
machine-readable progress file (``progress.json``) for watchers such as the app's Train tab.
A recipe supplies the modules to train, a loss function and how to save its outputs; the loop
reads its own settings from a typed ``TrainerConfig``.

Every random draw of micro-batch ``k`` (data order, noise, timesteps, flips, BOFT dropout)
comes from generators seeded by ``(seed, k, rank)``, so a resumed run replays exactly what an
uninterrupted run would have done: the checkpointed RNG state is the step counter.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..core import __version__
from ..core.adapters import compile_adapted
from ..core.files import WriteError, atomic_write, atomic_write_text, remove_stale_temporaries
from ..core.images import image_grid
from .checkpoints import STATE_JSON, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainerConfig
from .ema import AdapterEMA

logger = logging.getLogger("boft_diffusion")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad output folder, ...); the message says why."""


# Set-up ---------------------------------------------------------------------------------------
def check_output_dir(config: TrainerConfig, adapter_files: Sequence[str]) -> None:
    """Refuse to mix two runs in one folder unless resuming one of its checkpoints or explicitly
    overwriting: a resume that finds no checkpoint would otherwise start from scratch and
    overwrite the folder's outputs."""
    folder = Path(config.output_dir)
    if not folder.exists() or config.overwrite_output_dir:
        return
    if config.resume_from_checkpoint and (config.resume_from_checkpoint != "latest" or list_checkpoints(folder)):
        return
    previous = [name for name in adapter_files if (folder / name).exists()] + [p.name for p in list_checkpoints(folder)]
    if previous and config.resume_from_checkpoint:
        raise TrainingError(
            f"{folder} holds the outputs of another run ({', '.join(previous[:3])}) but no checkpoint to resume; "
            "pass --overwrite_output_dir to replace it, or choose another --output_dir."
        )
    if previous:
        raise TrainingError(
            f"{folder} already holds another run ({', '.join(previous[:3])}); pass --resume_from_checkpoint latest "
            "to continue it or --overwrite_output_dir to replace it."
        )


def check_compile_backend(config: TrainerConfig, device: torch.device) -> None:
    """Refuse ``--compile`` with inductor on the CPU: there (torch 2.13) inductor's backward of the tiny
    UNet's mid-block attention is wrong, with or without adapters (its forward is right), while aot_eager
    matches eager to 1e-7; a flag that silently trains something else is worse than none. The slow test
    ``test_inductor_backward_on_the_cpu_is_wrong_without_any_adapter`` fails once torch fixes it."""
    if config.compile and config.compile_backend == "inductor" and device.type == "cpu":
        raise TrainingError("--compile with the inductor backend computes wrong gradients on the CPU (torch's "
                            "inductor backward, with or without adapters: issue #36); pass --compile_backend "
                            "aot_eager, or leave --compile out.")


def make_accelerator(config: TrainerConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("--report_to tensorboard needs tensorboard: pip install 'boft-diffusion[tensorboard]', "
                            "or pass --report_to none.")
    logging_dir = Path(config.output_dir) / config.logging_dir
    # Without a GPU, several processes (torchrun / accelerate launch) run data parallel on CPU (gloo).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    multi_cpu = distributed and not torch.cuda.is_available()
    if not distributed:
        # A second run in the same process (tests, the demo) may use another precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(logging_dir)),
    )
    # New layers (control encoder, ControlNet embedding) are initialised from the seed, not from chance.
    set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("boft_diffusion").setLevel(logging.WARNING)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for frozen weights under the chosen mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place(module: nn.Module, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Move a frozen module; cast only when a half dtype is asked for (float32 is the loaded dtype)."""
    if device is not None:
        module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)


def make_optimizer(
    config: TrainerConfig, params: dict[str, nn.Parameter], num_processes: int,
    learning_rates: dict[str, float] | None = None, head_start: tuple[str, ...] = (),
) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) at the learning rate, except parameters whose names end with a key of
    ``learning_rates``, which get that rate; ``scale_lr`` scales every rate alike. Parameters whose
    names end with a suffix in ``head_start`` get groups of their own, marked ``"head_start"``."""
    opt = config.optimizer
    factor = config.gradient_accumulation_steps * config.train_batch_size * num_processes if opt.scale_lr else 1
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in params.items():
        rate = next((r for suffix, r in (learning_rates or {}).items() if name.endswith(suffix)), opt.learning_rate)
        groups.setdefault((rate, name.endswith(head_start)), []).append(param)
    if opt.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        [{"params": group, "lr": rate * factor, "head_start": early} for (rate, early), group in groups.items()],
        lr=opt.learning_rate * factor,
        betas=(opt.adam_beta1, opt.adam_beta2),
        weight_decay=opt.adam_weight_decay,
        eps=opt.adam_epsilon,
    )


def head_start_steps(fraction: float, max_steps: int) -> int:
    """The steps a head start of ``fraction`` of ``max_steps`` takes, leaving at least one for the
    parameters that join late; says so when rounding or that limit moves it by a step or more."""
    steps = min(round(fraction * max_steps), max_steps - 1)
    if fraction and abs(steps - fraction * max_steps) >= 1:
        logger.warning("a head start of %g of %d steps is %d steps", fraction, max_steps, steps)
    return steps


def make_lr_scheduler(config: TrainerConfig, optimizer: torch.optim.Optimizer, max_steps: int,
                      head_start_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The diffusers schedule ``--lr_scheduler`` over ``max_steps``; with a head start, only the
    optimiser's ``"head_start"`` groups follow it from step 0, and the others stay at rate 0 for
    ``head_start_steps`` steps, then run the same schedule over the steps that remain."""
    from diffusers.optimization import get_scheduler

    opt = config.optimizer

    def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return get_scheduler(opt.lr_scheduler, optimizer, num_warmup_steps=opt.lr_warmup_steps,
                             num_training_steps=steps)

    if not head_start_steps:
        return schedule(optimizer, max_steps)
    if not 0 < head_start_steps < max_steps:
        raise TrainingError(f"a head start of {head_start_steps} steps leaves no step of the {max_steps} "
                            "for the other parameters.")

    def shape(steps: int) -> Callable[[int], float]:
        # at the real base rate: the polynomial schedule's floor is a rate, not a factor
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optimizer.defaults["lr"])
        return schedule(probe, steps).lr_lambdas[0]

    full, rest = shape(max_steps), shape(max_steps - head_start_steps)

    def joined_late(step: int) -> float:
        return rest(step - head_start_steps) if step >= head_start_steps else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [full if group["head_start"] else joined_late for group in optimizer.param_groups])


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


def epoch_batches(groups: Sequence[Sequence[int]], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """One epoch's batches, each from a single group: every group shuffled and cut into batches
    (the last one filled up from the group's start), then the batches shuffled."""
    batches = []
    for number, group in enumerate(groups):
        gen = torch.Generator().manual_seed(derive_seed(seed, epoch, number, 0xB0C7))
        order = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
        for start in range(0, len(order), batch_size):
            batches.append([order[(start + j) % len(order)] for j in range(batch_size)])
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xB0C8))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def grouped_batch_indices(
    micro_step: int, groups: Sequence[Sequence[int]], batch_size: int, num_processes: int, rank: int, seed: int
) -> list[int]:
    """Example indices of this process's share of global micro-batch ``micro_step`` when every
    batch must come from one group (an aspect-ratio bucket): a pure function of the step, as
    :func:`micro_batch_indices`, so resume replays it."""
    count = batches_per_epoch(0, batch_size, groups)
    per_epoch = max(1, math.ceil(count / num_processes))
    epoch, position = divmod(micro_step, per_epoch)
    return epoch_batches(groups, batch_size, epoch, seed)[(position * num_processes + rank) % count]


def batches_per_epoch(dataset_len: int, batch_size: int, groups: Sequence[Sequence[int]] | None = None) -> int:
    """Global micro-batches of one process's worth in an epoch: grouped batches are cut per group."""
    if groups:
        return sum(math.ceil(len(group) / batch_size) for group in groups)
    return math.ceil(dataset_len / batch_size)


def steps_for(config: TrainerConfig, dataset_len: int, num_processes: int,
              groups: Sequence[Sequence[int]] | None = None) -> int:
    if config.max_train_steps is not None:
        return config.max_train_steps
    if config.num_train_epochs is not None:
        per_epoch = math.ceil(batches_per_epoch(dataset_len, config.train_batch_size, groups) / num_processes)
        return math.ceil(per_epoch * config.num_train_epochs / config.gradient_accumulation_steps)
    return config.default_train_steps


# The loop -----------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """What a training script plugs into the shared loop.

    ``modules``: name -> module holding trainable parameters.
    ``compute_loss(models, indices, generator) -> (loss, logs)``: one micro-batch's loss, with
    ``models`` the same modules as prepared for data parallelism (call these in the forward).
    ``save_outputs(folder, step)``: write the trained artefacts (adapter folders, encoders).
    ``validate(step) -> rows of images``: optional, run on the main process.
    ``validation_metrics() -> {name: value}``: optional numbers logged and printed at each validation.
    ``learning_rates``: parameter-name suffix -> learning rate, for parameters that need their own.
    ``schedule``: the recipe's own settings that change which random draws a step makes; a
    resumed run must match them.
    ``groups``: example indices by group (aspect-ratio buckets); each micro-batch then comes from one.
    ``head_start``: parameter-name suffixes that train alone for the first ``head_start_fraction``
    of the steps (the identifier's embedding before the adapters: textual inversion, then
    DreamBooth); every other parameter then joins, its learning-rate schedule run over the steps left.
    """

    modules: dict[str, nn.Module]
    dataset_len: int
    compute_loss: Callable[[dict[str, nn.Module], list[int], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    save_outputs: Callable[[Path, int], None]
    validate: Callable[[int], list[list[Image.Image]]] | None = None
    validation_metrics: Callable[[], dict[str, float]] | None = None
    run_name: str = "boft"
    learning_rates: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    groups: list[list[int]] | None = None
    head_start: tuple[str, ...] = ()
    head_start_fraction: float = 0.0


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

    def __init__(self, config: TrainerConfig, accelerator, recipe: Recipe) -> None:
        self.config = config
        self.accelerator = accelerator
        self.recipe = recipe
        self.params = trainable_tensors(recipe.modules)
        if not self.params:
            raise TrainingError("nothing to train: no parameter requires a gradient.")
        for param in self.params.values():
            if param.dtype != torch.float32:
                param.data = param.data.float()
        self.max_steps = steps_for(config, recipe.dataset_len, accelerator.num_processes, recipe.groups)
        optimizer = make_optimizer(config, self.params, accelerator.num_processes, recipe.learning_rates,
                                   recipe.head_start)
        self.head_start_steps = head_start_steps(recipe.head_start_fraction, self.max_steps)
        self.lr_scheduler = make_lr_scheduler(config, optimizer, self.max_steps, self.head_start_steps)
        # by position: loading a checkpoint replaces the groups' settings with the saved ones
        self.late_groups = [i for i, group in enumerate(optimizer.param_groups) if not group["head_start"]]
        if config.compile:
            for module in recipe.modules.values():
                compile_adapted(module, backend=config.compile_backend)
        prepared = accelerator.prepare(*recipe.modules.values(), optimizer)
        self.wrapped = dict(zip(recipe.modules, prepared[:-1], strict=True))
        self.optimizer = prepared[-1]
        self.step = 0
        self.output_dir = Path(config.output_dir)
        self.ema = AdapterEMA(self.params, config.ema_decay) if config.use_ema else None
        self.progress: dict[str, Any] = {}

    # checkpoints ---------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        state = {"library_version": __version__, **self._schedule(), "flags": recorded_flags(self.config)}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["grad_scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
        return state

    def _schedule(self) -> dict[str, int]:
        """Settings that decide which examples and random draws each step uses: resume needs them equal."""
        config = self.config
        return {"seed": config.seed, "train_batch_size": config.train_batch_size,
                "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "num_processes": self.accelerator.num_processes, "dataset_len": self.recipe.dataset_len,
                "head_start_steps": self.head_start_steps, **self.recipe.schedule}

    def _explain_write_error(self, error: WriteError) -> TrainingError:
        checkpoints = list_checkpoints(self.output_dir)
        kept = f"earlier checkpoints are intact (latest: {checkpoints[-1].name})" if checkpoints else \
            "no earlier checkpoint was written"
        return TrainingError(f"{error} at step {self.step}; {kept}.")

    def save_checkpoint(self) -> Path | None:
        path = None
        if self.accelerator.is_main_process:
            try:
                path = self._write_checkpoint()
            except WriteError as error:
                raise self._explain_write_error(error) from error
            logger.info("saved %s", path)
            self._write_progress(checkpoint=path.name)
        self.accelerator.wait_for_everyone()
        return path

    def _write_checkpoint(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.step,
            self.params,
            self.optimizer,
            self.lr_scheduler,
            self._trainer_state(),
            extra_files={"adapter": functools.partial(self.recipe.save_outputs, step=self.step),
                         **({EMA_FOLDER: self.ema.save} if self.ema else {})},
            total_limit=self.config.checkpoints_total_limit,
        )

    def maybe_resume(self) -> None:
        spec = self.config.resume_from_checkpoint
        if not spec:
            return
        path = resolve_checkpoint(self.output_dir, spec)
        if path is None:
            logger.info("no checkpoint in %s; starting from scratch", self.output_dir)
            return
        changed = changed_flags(json.loads((path / STATE_JSON).read_text()).get("flags", {}),
                                recorded_flags(self.config))
        because = f" (flags changed since: {changed})" if changed else ""
        try:
            tensors, state = load_checkpoint(path, self.optimizer, self.lr_scheduler)
        except (ValueError, KeyError) as error:
            raise TrainingError(f"{path} does not fit this run{because}: {error}") from error
        saved = {"head_start_steps": 0, **state}  # checkpoints from before head starts had none
        moved = {k: (saved.get(k), v) for k, v in self._schedule().items() if k in saved and saved[k] != v}
        if moved:
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in moved.items())
            raise TrainingError(f"{path} was written with other settings ({details}); resume with the same ones.")
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise TrainingError(f"{path} does not match this run{because}: it lacks {missing[:3]} "
                                f"(and {len(missing)} in all).")
        with torch.no_grad():
            for name, param in self.params.items():
                if tensors[name].shape != param.shape:
                    raise TrainingError(
                        f"{path}: {name} has shape {list(tensors[name].shape)}, this run {list(param.shape)}{because}."
                    )
                param.copy_(tensors[name])
        if self.ema is not None:
            try:
                self.ema.load(path / EMA_FOLDER)
            except ValueError as error:
                raise TrainingError(f"{error} Resume with the flags it was written with{because}.") from error
        if changed:
            logger.warning("resuming %s with changed flags: %s", path, changed)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # one optimiser step --------------------------------------------------------------------------
    def _micro_step(self, micro: int, last: bool) -> dict[str, float]:
        config, acc = self.config, self.accelerator
        if self.recipe.groups:
            indices = grouped_batch_indices(micro, self.recipe.groups, config.train_batch_size, acc.num_processes,
                                            acc.process_index, config.seed)
        else:
            indices = micro_batch_indices(micro, self.recipe.dataset_len, config.train_batch_size, acc.num_processes,
                                          acc.process_index, config.seed)
        # A CPU generator: the same draws on every device type, and usable with CPU-side sampling.
        generator = torch.Generator().manual_seed(derive_seed(config.seed, micro, acc.process_index))
        torch.manual_seed(derive_seed(config.seed, micro, acc.process_index, 0xD0))
        sync = contextlib.ExitStack()
        if not last:
            for module in self.wrapped.values():
                sync.enter_context(acc.no_sync(module))
        with sync:
            with acc.autocast():
                loss, logs = self.recipe.compute_loss(self.wrapped, indices, generator)
            losses = acc.gather(loss.detach().float().reshape(1))
            if not torch.isfinite(losses).all():
                checkpoints = list_checkpoints(self.output_dir)
                last_good = checkpoints[-1] if checkpoints else "none yet"
                raise TrainingError(
                    f"the loss became {losses.tolist()} at step {self.step + 1}; stopping. "
                    f"Last good checkpoint: {last_good}. Try a lower --learning_rate or --mixed_precision no."
                )
            acc.backward(loss / config.gradient_accumulation_steps)
        return {"loss": losses.mean().item(), **logs}

    def _drop_late_gradients(self) -> None:
        """During a head start, the parameters that join later get no gradient: AdamW then leaves
        their moments untouched, and clipping measures only the parameters that move."""
        for index in self.late_groups:
            for param in self.optimizer.param_groups[index]["params"]:
                param.grad = None

    def _check_gradients(self) -> None:
        """Clip, and refuse to apply non-finite gradients (fp16's scaler skips those steps itself)."""
        config, acc = self.config, self.accelerator
        max_norm = config.optimizer.max_grad_norm if config.optimizer.max_grad_norm and config.optimizer.max_grad_norm > 0 else float("inf")
        norm = acc.clip_grad_norm_(list(self.params.values()), max_norm)
        if getattr(acc, "scaler", None) is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            checkpoints = list_checkpoints(self.output_dir)
            raise TrainingError(
                f"non-finite gradients at step {self.step + 1}; stopping before they reach the weights. "
                f"Last good checkpoint: {checkpoints[-1] if checkpoints else 'none yet'}."
            )

    def train(self) -> dict[str, Any]:
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            for path in remove_stale_temporaries(self.output_dir):
                logger.info("removed %s, left by a run that was killed", path)
        acc.wait_for_everyone()
        self.maybe_resume()
        if acc.is_main_process and config.report_to != "none":
            acc.init_trackers(self.recipe.run_name, config=_tracker_config(config.hparams))
        for module in self.wrapped.values():
            module.train()
        accumulated: dict[str, float] = {}
        throughput = Throughput(acc.device)
        self.progress = {"step": self.step, "max_steps": self.max_steps, "first_step": self.step,
                         "started": time.time(), "loss": None, "checkpoint": None, "validation": None,
                         "finished": False}
        self._write_progress()
        # closed on the way out of an error too, so the error line starts a line of its own
        with tqdm(total=self.max_steps, initial=self.step, desc="steps", disable=not acc.is_local_main_process) as progress:
            while self.step < self.max_steps:
                accumulated = {}
                for j in range(config.gradient_accumulation_steps):
                    micro = self.step * config.gradient_accumulation_steps + j
                    logs = self._micro_step(micro, last=j == config.gradient_accumulation_steps - 1)
                    for key, value in logs.items():
                        accumulated[key] = accumulated.get(key, 0.0) + value / config.gradient_accumulation_steps
                if self.step < self.head_start_steps:
                    self._drop_late_gradients()
                self._check_gradients()
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                throughput.tick()
                rates = self.lr_scheduler.get_last_lr()
                accumulated["lr"] = rates[0]
                if self.head_start_steps:
                    accumulated["lr_head_start"] = next(r for i, r in enumerate(rates) if i not in self.late_groups)
                progress.update(1)
                progress.set_postfix(loss=f"{accumulated['loss']:.4f}")
                acc.log(accumulated, step=self.step)
                self._write_progress(step=self.step, loss=accumulated["loss"])
                if config.checkpointing_steps and self.step % config.checkpointing_steps == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
                if config.validation_steps and self.step % config.validation_steps == 0 and self.step < self.max_steps:
                    self.run_validation()
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
                metrics = self.recipe.validation_metrics() if self.recipe.validation_metrics else {}
            for module in self.wrapped.values():
                module.train()
            if metrics:
                logger.info("validation at step %d: %s", self.step,
                            ", ".join(f"{name} {value:.6f}" for name, value in metrics.items()))
                self.accelerator.log(metrics, step=self.step)
            if rows:
                grid = image_grid(rows)
                path = self.output_dir / "validation" / f"step-{self.step:06d}.png"
                atomic_write(path.parent, {path.name: functools.partial(grid.save, format="PNG")})
                self._log_image(grid)
                self._write_progress(validation=str(path.relative_to(self.output_dir)))
        self.accelerator.wait_for_everyone()
        return path

    def _log_image(self, grid: Image.Image) -> None:
        if self.config.report_to != "tensorboard":
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
            try:
                if self.ema is not None:  # the last step's weights beside the average
                    self.recipe.save_outputs(self.output_dir / RAW_FOLDER, self.step)
            except WriteError as error:
                raise self._explain_write_error(error) from error
        if self.ema is not None:
            self.ema.copy_to_params()  # from here on the run's adapter is the average, on every process
        if acc.is_main_process:
            flags = json.dumps(flags_as_json(self.config.hparams), indent=2)
            try:
                self.recipe.save_outputs(self.output_dir, self.step)
                atomic_write_text(self.output_dir / FLAGS_JSON, flags)
            except WriteError as error:
                raise self._explain_write_error(error) from error
        self.run_validation()
        if acc.is_main_process:
            self._write_progress(finished=True)

    def _write_progress(self, **changes: Any) -> None:
        """:data:`PROGRESS_JSON` with ``changes``, on the main process: a watcher reads the step, loss,
        timing, last checkpoint and last validation grid without parsing logs (``seconds`` counts from
        this process's first step, ``first_step`` is where it resumed, so a rate survives resumes)."""
        if not self.accelerator.is_main_process or not self.progress:
            return
        self.progress.update(changes, seconds=round(time.time() - self.progress["started"], 3))
        record = {key: value for key, value in self.progress.items() if key != "started"}
        try:
            atomic_write_text(self.output_dir / PROGRESS_JSON, json.dumps(record))
        except WriteError as error:
            raise self._explain_write_error(error) from error

    def close(self) -> None:
        """End trackers and the process group; call once every process is done with files."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


#: With --use_ema: a checkpoint's folder of the average, and the output folder's of the last step's weights.
EMA_FOLDER = "ema"
RAW_FOLDER = "raw"

#: The run's resolved flags (command line over --config file over defaults), written beside its outputs.
FLAGS_JSON = "training_flags.json"

#: The run's progress (step, max_steps, first_step, seconds, loss, checkpoint, validation, finished),
#: rewritten atomically after every optimiser step, checkpoint and validation grid.
PROGRESS_JSON = "progress.json"


def flags_as_json(hparams: dict[str, Any]) -> dict[str, Any]:
    """The flags as :data:`FLAGS_JSON` holds them (paths and other objects as strings)."""
    return json.loads(json.dumps(hparams, default=str))


def recorded_flags(config: TrainerConfig) -> dict[str, Any]:
    """The flags a checkpoint records, to name the ones a resume changes (JSON values): all but
    those a resume may change without a word."""
    return {k: v for k, v in flags_as_json(config.hparams).items() if k not in config.run_control_flags}


def changed_flags(before: dict[str, Any], now: dict[str, Any]) -> str:
    """``--flag old -> new`` for each flag that differs; flags older checkpoints did not record are skipped."""
    return ", ".join(f"--{k} {before[k]} -> {now.get(k)}" for k in sorted(before) if before[k] != now.get(k))


def _tracker_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """Flags as tensorboard hparams: scalars only."""
    config = {}
    for key, value in hparams.items():
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
        elif value is not None:
            config[key] = json.dumps(value)
    return config
