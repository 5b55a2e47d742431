"""Command-line flag groups shared by the training scripts, and turning them into typed configs."""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.config import MAX_NEUMANN_TERMS, BOFTConfig
from .trainer import TrainingError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", default="tiny",
                       help='"tiny" (the embedded model), a diffusers folder, a hub id or a single .safetensors file.')
    group.add_argument("--revision", default=None, help="Hub revision of the base model.")
    group.add_argument("--variant", default=None, help='Weight variant of the base model, e.g. "fp16".')


def add_training_args(parser: argparse.ArgumentParser, default_output_dir: str, default_steps: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--config", default=None,
                       help="A TOML (.toml) or YAML (.yaml, .yml) file of flags by their names without dashes, "
                            "e.g. learning_rate = 2e-3; flags given on the command line win.")
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
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the trained models' forward: cheaper steps on a GPU after a one-off "
                            "compile (a minute or more per model; validation compiles its no-grad forward too).")
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
    group.add_argument("--noise_offset", type=float, default=0.0,
                       help="Add offset * randn(batch, channels, 1, 1) to the noise: learns overall darker or "
                            "brighter images than plain noise allows (0.05 to 0.1 is usual).")
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The table of a TOML or YAML config file; a file that is missing, unparsable or not a table of
    flags is an error naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise TrainingError(f"--config {path}: use a .toml, .yaml or .yml file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"--config {path} cannot be read: {error}") from error
    try:
        if suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as error:  # tomllib.TOMLDecodeError, yaml.YAMLError: both say where
        raise TrainingError(f"--config {path} is not valid {suffix.lstrip('.').upper()}: {error}") from error
    if not isinstance(values, dict):
        raise TrainingError(f"--config {path} must hold a table of flags (name = value), not {type(values).__name__}.")
    return values


def config_tokens(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> list[str]:
    """Config entries as command-line tokens, so argparse types, checks and choices apply to them
    as to typed flags. Keys are the flags' names without dashes (their ``dest``); a switch takes
    true or false; a flag of several values takes a list. Unknown keys name the closest flag."""
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            actions.setdefault(action.dest, []).append(action)
    tokens: list[str] = []
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key).lstrip("-").replace("-", "_"), actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingError(f"--config {source}: unknown key {key!r}{hint}; keys are the flags' names without "
                                "dashes, as `--help` lists them.")
        if value is None:
            continue
        candidates = actions[key]
        if candidates[0].nargs == 0:
            if not isinstance(value, bool):
                raise TrainingError(f"--config {source}: {key} is a switch; give true or false, not {value!r}.")
            tokens += [a.option_strings[0] for a in candidates if a.const == value][:1]
            continue
        action = candidates[0]
        if isinstance(value, dict) or (isinstance(value, list) and action.nargs not in ("+", "*")):
            raise TrainingError(f"--config {source}: {key} takes one value, not {value!r}.")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and action.nargs == "+" and not items:
            raise TrainingError(f"--config {source}: {key} needs at least one value.")
        tokens += [action.option_strings[0], *map(str, items)]
    return tokens


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, after the flags of the ``--config`` file it names: the command line wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if not getattr(known, "config", None):
        return parser.parse_args(argv)
    return parser.parse_args(config_tokens(parser, read_config_file(known.config), known.config) + argv)


def run_cli(build_parser: Callable[[str | None], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Any],
            description: str | None, argv: list[str] | None) -> int:
    """Entry point of a training script: parse, run, and turn expected failures into exit code 2."""
    try:
        args = parse_args(build_parser(description), argv)
        validate_numeric_flags(args)
        run(args)
    except (TrainingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


#: flag -> (smallest, largest) allowed value, None for no bound; flags a script lacks are skipped.
NUMERIC_FLAG_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**32 - 1),
    "train_batch_size": (1, None),
    "max_train_steps": (1, None),
    "num_train_epochs": (1, None),
    "gradient_accumulation_steps": (1, None),
    "checkpointing_steps": (0, None),
    "checkpoints_total_limit": (1, None),
    "validation_steps": (0, None),
    "num_validation_images": (1, None),
    "num_inference_steps": (1, None),
    "dataloader_num_workers": (0, None),
    "lr_warmup_steps": (0, None),
    "learning_rate": (0, None),
    "adam_beta1": (0, 1),
    "adam_beta2": (0, 1),
    "adam_weight_decay": (0, None),
    "adam_epsilon": (0, None),
    "max_grad_norm": (0, None),
    "snr_gamma": (0, None),
    "noise_offset": (0, None),
    "guidance_scale": (0, None),
    "boft_block_size": (0, None),
    "boft_block_num": (0, None),
    "boft_n_butterfly_factor": (1, None),
    "boft_dropout": (0, 1),
    "boft_cayley_neumann_terms": (0, MAX_NEUMANN_TERMS),
    "num_class_images": (0, None),
    "sample_batch_size": (1, None),
    "prior_loss_weight": (0, None),
    "identifier_learning_rate": (0, None),
    "lora_rank": (1, None),
    "oft_block_size": (2, None),
    "max_train_samples": (1, None),
    "proportion_empty_prompts": (0, 1),
    "conditioning_scale": (0, None),
}


def validate_numeric_flags(args: argparse.Namespace) -> None:
    """Refuse out-of-range or non-finite numeric flags before any model loads, naming the flag:
    a zero batch or accumulation count, negative step counts and NaN rates otherwise fail
    minutes later (or silently train nothing)."""
    for flag, (low, high) in NUMERIC_FLAG_RANGES.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise TrainingError(f"--{flag} {value} is not a finite number.")
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise TrainingError(f"--{flag} {value} is out of range: it must be {allowed}.")


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



class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` that shows each flag's default, also for flags without help text, and keeps the
    description's examples as written. Defaults of None and on/off switches are left out: their
    help says what happens without them."""

    def _format_action(self, action: argparse.Action) -> str:
        default = self._default_text(action)
        if default:
            action = copy.copy(action)
            action.help = f"{action.help} {default}" if action.help else default
        return super()._format_action(action)

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return ""
        if action.help and "%(default)" in action.help:
            return ""
        value = " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else action.default
        return f"(default: {value})".replace("%", "%%")


def latent_multiple(pipe: Any) -> int:
    """What every image side must be a multiple of: the VAE's downsampling times the UNet's."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def check_resolution(resolution: int | None, pipe: Any) -> int:
    """The training resolution: the model's native one for None, else ``resolution`` if the VAE and
    the UNet's downsampling divide it (an odd latent size would train off the model's grid)."""
    vae_factor = pipe.vae_scale_factor
    if resolution is None:
        return pipe.unet.config.sample_size * vae_factor
    multiple = latent_multiple(pipe)
    unet_factor = multiple // vae_factor
    if resolution <= 0 or resolution % multiple:
        nearest = max(multiple, round(resolution / multiple) * multiple)
        raise TrainingError(
            f"--resolution {resolution} must be a positive multiple of {multiple} (the VAE downsamples by "
            f"{vae_factor}, the UNet by {unet_factor} more), e.g. {nearest}; leave it out for the model's own size."
        )
    return resolution
