"""Command-line flag groups shared by the training scripts, and turning them into typed configs."""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.config import DEFAULT_TARGET_MODULES, MAX_NEUMANN_TERMS, SIDES
from ..core.quantize import QUANTIZATIONS
from ..families import ModelFamily
from ..families.flow import WEIGHTING_SCHEMES
from ..families.loading import default_guidance
from .config import RunConfig, TrainerConfig, config_from_flags
from .trainer import TrainingError


def add_flag(group: Any, *names: str, bounds: tuple[float | None, float | None] | None = None,
             run_control: bool = False, **kwargs: Any) -> argparse.Action:
    """``group.add_argument`` that also records the facts other code derives from the flag: its
    allowed range ``(smallest, largest)`` (None for no bound), checked before any model loads, and
    whether a resumed run may change it without a word (``run_control``: where and how long a run
    goes, what it logs and samples)."""
    action = group.add_argument(*names, **kwargs)
    action.bounds = bounds
    action.run_control = run_control
    return action


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    add_flag(group, "--pretrained_model_name_or_path", default="tiny",
             help='"tiny" (the embedded model), a diffusers folder, a hub id or a single .safetensors file.')
    add_flag(group, "--revision", default=None, help="Hub revision of the base model.")
    add_flag(group, "--variant", default=None, help='Weight variant of the base model, e.g. "fp16".')
    add_flag(group, "--max_sequence_length", bounds=(1, None), type=int, default=None,
             help="T5 tokens per prompt on Flux.1 and SD3 (default: the pipeline's, 512 on Flux.1, 256 on SD3).")
    add_flag(group, "--base_quantization", default="none", choices=list(QUANTIZATIONS),
             help="Store the denoiser's frozen Linear weights quantised (int8, fp8: 1 byte a weight; nf4: half "
                  "a byte) and dequantise them at each use; the adapter trains in float32 against the "
                  "dequantised weights. Saves memory, not time. The saved adapter loads on the unquantised "
                  "base; --save_merged is refused (merge on the unquantised base).")


def add_training_args(parser: argparse.ArgumentParser, default_output_dir: str, default_steps: int) -> None:
    group = parser.add_argument_group("training")
    add_flag(group, "--config", run_control=True, default=None,
             help="A TOML (.toml) or YAML (.yaml, .yml) file of flags by their names without dashes, "
                  "e.g. learning_rate = 2e-3; flags given on the command line win.")
    add_flag(group, "--output_dir", run_control=True, default=default_output_dir)
    add_flag(group, "--overwrite_output_dir", run_control=True, action="store_true",
             help="Train into an output_dir that already holds another run.")
    add_flag(group, "--seed", bounds=(0, 2**32 - 1), type=int, default=0)
    add_flag(group, "--resolution", type=int, default=None,
             help="Training image size (default: the base model's native size).")
    add_flag(group, "--train_batch_size", bounds=(1, None), type=int, default=1, help="Per process.")
    add_flag(group, "--max_train_steps", bounds=(1, None), run_control=True, type=int, default=None,
             help=f"Optimiser steps; overrides --num_train_epochs (default {default_steps}).")
    add_flag(group, "--num_train_epochs", bounds=(1, None), run_control=True, type=int, default=None)
    parser.set_defaults(default_train_steps=default_steps)
    add_flag(group, "--gradient_accumulation_steps", bounds=(1, None), type=int, default=1)
    add_flag(group, "--gradient_checkpointing", action="store_true")
    add_flag(group, "--compile", action="store_true",
             help="torch.compile the trained models' forward: cheaper steps on a GPU after a one-off "
                  "compile (a minute or more per model; validation compiles its no-grad forward too).")
    add_flag(group, "--compile_backend", default="inductor", choices=list(COMPILE_BACKENDS),
             help="torch.compile backend of --compile. inductor is refused for training on the CPU, where its "
                  "backward gives wrong gradients (the UNet's mid-block attention, with or without adapters); "
                  "aot_eager matches eager there to float rounding.")
    add_flag(group, "--learning_rate", bounds=(0, None), type=float, default=1e-3)
    add_flag(group, "--scale_lr", action="store_true",
             help="Multiply the learning rate by batch size, accumulation steps and processes.")
    add_flag(group, "--lr_scheduler", default="constant",
             choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                      "constant_with_warmup"])
    add_flag(group, "--lr_warmup_steps", bounds=(0, None), type=int, default=0)
    add_flag(group, "--adam_beta1", bounds=(0, 1), type=float, default=0.9)
    add_flag(group, "--adam_beta2", bounds=(0, 1), type=float, default=0.999)
    add_flag(group, "--adam_weight_decay", bounds=(0, None), type=float, default=0.0)
    add_flag(group, "--adam_epsilon", bounds=(0, None), type=float, default=1e-8)
    add_flag(group, "--use_ema", action="store_true",
             help="Keep an exponential moving average of the adapter; the output folder's adapter is the "
                  "average, the last step's weights are in output_dir/raw, checkpoints hold both.")
    add_flag(group, "--ema_decay", bounds=(0, 1), type=float, default=0.99,
             help="Decay of --use_ema per optimiser step (0.99: about the last 100 steps).")
    add_flag(group, "--max_grad_norm", bounds=(0, None), type=float, default=1.0)
    add_flag(group, "--snr_gamma", bounds=(0, None), type=float, default=None,
             help="Min-SNR loss weighting with this gamma (5.0 is the usual choice); default: plain MSE.")
    add_flag(group, "--weighting_scheme", default="none", choices=list(WEIGHTING_SCHEMES),
             help="Flow-matching models (Flux.1, SD3): logit_normal and mode draw timesteps from those densities, "
                  "sigma_sqrt and cosmap weigh their losses; none draws uniformly, as diffusers' Flux script.")
    add_flag(group, "--logit_mean", type=float, default=0.0, help="Mean of --weighting_scheme logit_normal.")
    add_flag(group, "--logit_std", bounds=(0, None), type=float, default=1.0,
             help="Standard deviation of --weighting_scheme logit_normal.")
    add_flag(group, "--mode_scale", type=float, default=1.29, help="Scale of --weighting_scheme mode.")
    add_flag(group, "--noise_offset", bounds=(0, None), type=float, default=0.0,
             help="Add offset * randn(batch, channels, 1, 1) to the noise: learns overall darker or "
                  "brighter images than plain noise allows (0.05 to 0.1 is usual).")
    add_flag(group, "--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    add_flag(group, "--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
             help="Frozen weights in half precision; adapter weights stay float32.")
    add_flag(group, "--allow_tf32", action="store_true")
    add_flag(group, "--dataloader_num_workers", bounds=(0, None), run_control=True, type=int, default=0,
             help="Threads that decode images while the data set is loaded into memory.")
    add_checkpoint_and_logging_args(parser)


def add_checkpoint_and_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints and logging")
    add_flag(group, "--checkpointing_steps", bounds=(0, None), run_control=True, type=int, default=0, help="0: no intermediate checkpoints.")
    add_flag(group, "--checkpoints_total_limit", bounds=(1, None), run_control=True, type=int, default=None)
    add_flag(group, "--resume_from_checkpoint", run_control=True, default=None, help='A checkpoint folder or "latest".')
    add_flag(group, "--validation_prompt", run_control=True, nargs="+", default=None)
    add_flag(group, "--num_validation_images", bounds=(1, None), run_control=True, type=int, default=2)
    add_flag(group, "--validation_steps", bounds=(0, None), run_control=True, type=int, default=0, help="0: validate at the end only.")
    add_flag(group, "--num_inference_steps", bounds=(1, None), run_control=True, type=int, default=25, help="Sampler steps for validation.")
    add_flag(group, "--guidance_scale", bounds=(0, None), type=float, default=None,
             help="Validation sampling; on Flux.1-dev also the guidance its embedding is told during training "
                  "(default: the pipeline's, 3.5 there).")
    add_flag(group, "--report_to", run_control=True, default="tensorboard", choices=["tensorboard", "none"])
    add_flag(group, "--logging_dir", run_control=True, default="logs", help="Relative to output_dir.")


#: torch.compile backends --compile offers.
COMPILE_BACKENDS = ("inductor", "aot_eager")


def add_boft_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("BOFT")
    add_flag(group, "--boft_block_size", bounds=(0, None), type=int, default=None,
             help="Features per orthogonal block (default 8 unless --boft_block_num is set).")
    add_flag(group, "--boft_block_num", bounds=(0, None), type=int, default=0)
    add_flag(group, "--boft_n_butterfly_factor", bounds=(1, None), type=int, default=2, help="Butterfly depth m.")
    add_flag(group, "--boft_dropout", bounds=(0, 1), type=float, default=0.1, help="Probability of dropping each block.")
    add_flag(group, "--boft_bias", default="none", choices=["none", "boft_only", "all"])
    add_flag(group, "--boft_target_modules", nargs="+", default=None,
             help=f"Module names (suffixes) to adapt (default: {' '.join(DEFAULT_TARGET_MODULES)}, with "
                  "add_q_proj add_k_proj add_v_proj to_add_out on Flux.1 and SD3).")
    add_flag(group, "--boft_scale", dest="boft_scale", action="store_true", default=True,
             help="Learn a per-output magnitude (default).")
    add_flag(group, "--no_boft_scale", dest="boft_scale", action="store_false")
    add_flag(group, "--boft_side", default="input", choices=list(SIDES),
             help="Which side of each weight the rotation acts on: input (W R^T, PEFT's convention) or output "
                  "(R W, LyCORIS's: boft_diffusion.export's lycoris format then writes a small exact file that "
                  "ComfyUI, A1111 and LyCORIS load natively).")
    add_flag(group, "--boft_full_butterfly", action="store_true",
             help="Each layer gets LyCORIS's geometry: the largest even block size up to --boft_block_size that "
                  "cuts it into a power-of-two number of blocks, at full depth (--boft_n_butterfly_factor is "
                  "ignored); with --boft_side output, LyCORIS itself then loads the exported file.")
    add_flag(group, "--boft_cayley_neumann_terms", bounds=(0, MAX_NEUMANN_TERMS), type=int, default=0,
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
    """Parse ``argv``, after the flags of the ``--config`` file it names (the command line wins),
    and check every flag's range."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None):
        argv = config_tokens(parser, read_config_file(known.config), known.config) + argv
    args = parser.parse_args(argv)
    check_flag_ranges(parser, args)
    return args


def run_cli(parse: Callable[[list[str] | None], Any], run: Callable[[Any], Any], argv: list[str] | None) -> int:
    """Entry point of a training script: parse into a typed config, run, and turn expected
    failures into exit code 2."""
    try:
        run(parse(argv))
    except (TrainingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def check_flag_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range or non-finite numeric flags before any model loads, naming the flag:
    a zero batch or accumulation count, negative step counts and NaN rates otherwise fail
    minutes later (or silently train nothing). Each flag's range is declared by :func:`add_flag`."""
    for action in parser._actions:
        bounds = getattr(action, "bounds", None)
        value = getattr(args, action.dest, None)
        if bounds is None or value is None:
            continue
        low, high = bounds
        if not math.isfinite(value):
            raise TrainingError(f"--{action.dest} {value} is not a finite number.")
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise TrainingError(f"--{action.dest} {value} is out of range: it must be {allowed}.")


def run_control_flags(parser: argparse.ArgumentParser) -> frozenset[str]:
    """Flags a resumed run may change without a word (declared with ``run_control=True``)."""
    return frozenset(action.dest for action in parser._actions if getattr(action, "run_control", False))


def recipe_parser(description: str | None, add_recipe_args: Callable[[argparse.ArgumentParser], None],
                  default_output_dir: str, default_steps: int) -> argparse.ArgumentParser:
    """A training script's parser: the model flags, the recipe's own, then the shared training and
    BOFT flags (diffusers' names)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_args(parser)
    add_recipe_args(parser)
    add_training_args(parser, default_output_dir, default_steps)
    add_boft_args(parser)
    return parser


def parse_recipe_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A recipe's flags (see :func:`parse_args`), with the guidance scale resolved to the one the
    run samples with, so the run records what it used."""
    args = parse_args(parser, argv)
    args.guidance_scale = default_guidance(args.pretrained_model_name_or_path, args.guidance_scale)
    return args


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    """The part of a recipe's config every recipe shares, from its parsed flags."""
    values = vars(args)
    trainer = config_from_flags(TrainerConfig, values, hparams=dict(values),
                                run_control_flags=run_control_flags(parser))
    return config_from_flags(RunConfig, values, trainer=trainer)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` that shows each flag's default, also for flags without help text, and keeps the
    description's examples as written. Defaults of None, empty lists and on/off switches are left
    out: their help says what happens without them."""

    def _format_action(self, action: argparse.Action) -> str:
        default = self._default_text(action)
        if default:
            action = copy.copy(action)
            action.help = f"{action.help} {default}" if action.help else default
        return super()._format_action(action)

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS, []):
            return ""
        if action.help and "%(default)" in action.help:
            return ""
        value = " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else action.default
        return f"(default: {value})".replace("%", "%%")


def check_resolution(resolution: int | None, family: ModelFamily, pipe: Any) -> int:
    """The training resolution: the model's native one for None, else ``resolution`` if the VAE and
    the denoiser's downsampling (or patches) divide it (an odd latent size would train off the
    model's grid)."""
    vae_factor = pipe.vae_scale_factor
    if resolution is None:
        return family.native_resolution(pipe)
    multiple = family.latent_multiple(pipe)
    if resolution <= 0 or resolution % multiple:
        nearest = max(multiple, round(resolution / multiple) * multiple)
        raise TrainingError(
            f"--resolution {resolution} must be a positive multiple of {multiple} (the VAE downsamples by "
            f"{vae_factor}, the {family.denoiser_name} by {multiple // vae_factor} more), e.g. {nearest}; leave it "
            "out for the model's own size."
        )
    return resolution
