"""Typed settings: each recipe's config is a tree of dataclasses, filled in one place
(:func:`config_from_flags`) from the parsed flags; nothing downstream sees an argparse Namespace.

Flag defaults, ranges and whether a resume may change a flag live beside each flag's
``add_flag`` (``training/cli.py`` and the recipes' parsers); fields here carry no copy of them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..core.config import DEFAULT_TARGET_MODULES, BOFTConfig
from ..families.flow import TimestepDensity

Config = TypeVar("Config")


def config_from_flags(cls: type[Config], values: dict[str, Any], **overrides: Any) -> Config:
    """An instance of the dataclass ``cls`` from flat flag values: each field takes the flag of its
    name, a field whose type is itself a dataclass is filled from the same values, and fields with
    a default may be missing. ``overrides`` replace top-level fields."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if item.name in overrides:
            kwargs[item.name] = overrides[item.name]
        elif dataclasses.is_dataclass(hints[item.name]):
            kwargs[item.name] = config_from_flags(hints[item.name], values)
        elif item.name in values:
            kwargs[item.name] = values[item.name]
    return cls(**kwargs)


@dataclass
class OptimizerConfig:
    """AdamW (or 8-bit AdamW), its learning-rate schedule and gradient clipping."""

    learning_rate: float
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    use_8bit_adam: bool


@dataclass
class TrainerConfig:
    """Everything the loop needs: run length and batching, precision, checkpoints, validation
    cadence and logging. ``hparams`` is what the tracker and checkpoints record of the run (its
    resolved flags); ``run_control_flags`` are those a resume may change without a word."""

    output_dir: str
    seed: int
    train_batch_size: int
    max_train_steps: int | None
    num_train_epochs: int | None
    default_train_steps: int
    gradient_accumulation_steps: int
    compile: bool
    compile_backend: str
    mixed_precision: str
    allow_tf32: bool
    overwrite_output_dir: bool
    resume_from_checkpoint: str | None
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int
    report_to: str
    logging_dir: str
    optimizer: OptimizerConfig
    use_ema: bool
    ema_decay: float
    hparams: dict[str, Any] = field(default_factory=dict)
    run_control_flags: frozenset[str] = frozenset()


@dataclass
class ModelConfig:
    """The base model and how the frozen parts of it run."""

    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    resolution: int | None
    gradient_checkpointing: bool
    base_quantization: str
    max_sequence_length: int | None = None


@dataclass
class NoiseConfig:
    """Loss weighting and noise options of the denoising objective."""

    snr_gamma: float | None
    noise_offset: float
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def density(self) -> TimestepDensity:
        """The flow-matching timestep density and loss weighting these options ask for."""
        return TimestepDensity(self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale)


@dataclass
class ValidationConfig:
    """How validation images are sampled."""

    validation_prompt: list[str] | None
    num_validation_images: int
    num_inference_steps: int
    guidance_scale: float | None


@dataclass
class AdapterConfig:
    """Which adapter kind trains (BOFT, or a PEFT baseline) and its settings. Recipes without the
    baseline flags train BOFT."""

    boft_block_size: int | None
    boft_block_num: int
    boft_n_butterfly_factor: int
    boft_dropout: float
    boft_bias: str
    boft_target_modules: list[str]
    boft_scale: bool
    boft_cayley_neumann_terms: int
    boft_side: str
    boft_full_butterfly: bool
    adapter_type: str = "boft"
    lora_rank: int | None = None
    oft_block_size: int | None = None

    def boft(self, target_modules: list[str] | None = None, base_model: str | None = None) -> BOFTConfig:
        """The BOFT config for ``target_modules`` (default: --boft_target_modules)."""
        return BOFTConfig(
            block_size=self.boft_block_size,
            block_num=self.boft_block_num,
            n_butterfly_factor=self.boft_n_butterfly_factor,
            target_modules=list(target_modules or self.boft_target_modules or DEFAULT_TARGET_MODULES),
            dropout=self.boft_dropout,
            scale=self.boft_scale,
            bias=self.boft_bias,
            cayley_neumann_terms=self.boft_cayley_neumann_terms,
            base_model_name_or_path=base_model,
            side=self.boft_side,
            full_butterfly=self.boft_full_butterfly,
        )


@dataclass
class RunConfig:
    """What every recipe shares: the base model, the loop, the objective's options, validation
    sampling and the adapter."""

    model: ModelConfig
    trainer: TrainerConfig
    noise: NoiseConfig
    validation: ValidationConfig
    adapter: AdapterConfig
    dataloader_num_workers: int
