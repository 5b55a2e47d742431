"""Typed settings of the shared trainer, built from the command line at the recipe boundary."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _from_namespace(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass ``cls`` from the flags of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


@dataclass
class OptimizerConfig:
    """AdamW (or 8-bit AdamW), its learning-rate schedule and gradient clipping."""

    learning_rate: float = 1e-3
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        return _from_namespace(cls, args)


@dataclass
class TrainerConfig:
    """Everything the loop needs: run length and batching, precision, checkpoints, validation
    cadence and logging. ``hparams`` is what the tracker records for the run (its flags)."""

    output_dir: str
    seed: int = 0
    train_batch_size: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int | None = None
    default_train_steps: int = 300
    gradient_accumulation_steps: int = 1
    compile: bool = False
    mixed_precision: str = "no"
    allow_tf32: bool = False
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = None
    validation_steps: int = 0
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    hparams: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainerConfig:
        return _from_namespace(cls, args, optimizer=OptimizerConfig.from_args(args), hparams=dict(vars(args)))
