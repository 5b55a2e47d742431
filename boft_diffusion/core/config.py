"""Adapter configuration, and its mapping to PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import __version__

BIAS_MODES = ("none", "boft_only", "all")
#: Which side of a weight an adapter rotates: the input features (``W R^T``, PEFT's convention) or
#: the output features (``R W``, LyCORIS's, which ComfyUI and A1111 read natively).
SIDES = ("input", "output")
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
METADATA_KEY = "boft_diffusion"
DEFAULT_BLOCK_SIZE = 8
#: Beyond this the truncated series costs more than the exact solve and gains nothing; an
#: unbounded count lets one adapter stall every sampler step.
MAX_NEUMANN_TERMS = 32
#: Deeper than log2 of any layer width Stable Diffusion has; each factor is one more product per forward.
MAX_BUTTERFLY_FACTORS = 16


#: ``peft_type`` of an output-side adapter: PEFT refuses it (it would read the blocks as input-side ones).
OUTPUT_SIDE_PEFT_TYPE = "BOFT_OUTPUT_SIDE"


@dataclass
class BOFTConfig:
    """How to adapt a model with butterfly-orthogonal finetuning.

    Set at most one of ``block_size`` (features per orthogonal block, 8 when neither is given) or
    ``block_num`` (blocks per layer). ``n_butterfly_factor`` is the butterfly depth ``m``; it is honoured on every device.
    ``target_modules`` is a list of module-name suffixes or one regular expression matched
    against full module names, as in PEFT. ``dropout`` is the probability that each orthogonal
    block is replaced by the identity in a training step. ``scale`` adds a learned per-output
    magnitude. ``bias`` picks which biases train: "none", "boft_only" (adapted layers) or "all".
    ``cayley_neumann_terms > 0`` swaps the exact Cayley solve for a truncated series.
    ``side`` is the side of each weight the rotation acts on: "input" (``W R^T``, PEFT's
    convention) or "output" (``R W``, LyCORIS's, which ComfyUI and A1111 read natively).
    ``full_butterfly`` gives each layer LyCORIS's geometry instead (see ``full_butterfly_geometry``):
    the largest even block size up to ``block_size`` with a power-of-two block count, at full depth,
    so that LyCORIS itself loads the exported file; ``n_butterfly_factor`` is then ignored.
    """

    block_size: int | None = None
    block_num: int = 0
    n_butterfly_factor: int = 2
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    dropout: float = 0.0
    scale: bool = True
    bias: str = "none"
    cayley_neumann_terms: int = 0
    base_model_name_or_path: str | None = None
    side: str = "input"
    full_butterfly: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size is None:
            self.block_size = 0 if self.block_num else DEFAULT_BLOCK_SIZE
        if (self.block_size > 0) == (self.block_num > 0):
            raise ValueError(
                f"Set exactly one of block_size ({self.block_size}) and block_num ({self.block_num}); "
                "the other must be 0."
            )
        if self.n_butterfly_factor < 1:
            raise ValueError(f"n_butterfly_factor must be >= 1, got {self.n_butterfly_factor}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}.")
        if self.full_butterfly and self.block_num:
            raise ValueError("full_butterfly derives each layer's block number: give a block_size, not a block_num.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if not 0 <= self.cayley_neumann_terms <= MAX_NEUMANN_TERMS:
            raise ValueError(f"cayley_neumann_terms must be in [0, {MAX_NEUMANN_TERMS}], got {self.cayley_neumann_terms}.")
        if self.n_butterfly_factor > MAX_BUTTERFLY_FACTORS:
            raise ValueError(f"n_butterfly_factor must be <= {MAX_BUTTERFLY_FACTORS}, got {self.n_butterfly_factor}.")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty.")

    def to_peft_dict(self) -> dict[str, Any]:
        """The JSON PEFT's BOFTConfig reads, plus our own fields under ``boft_diffusion``."""
        ours = {
            **self.metadata,
            "library_version": __version__,
            "scale": self.scale,
            "cayley_neumann_terms": self.cayley_neumann_terms,
            "full_butterfly": self.full_butterfly,
        }
        return {
            # PEFT reads "BOFT" as input-side rotations: an output-side file must fail there, not load wrong
            "peft_type": "BOFT" if self.side == "input" else OUTPUT_SIDE_PEFT_TYPE,
            "task_type": None,
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "boft_block_size": self.block_size,
            "boft_block_num": self.block_num,
            "boft_n_butterfly_factor": self.n_butterfly_factor,
            "target_modules": self.target_modules,
            "exclude_modules": None,
            "boft_dropout": self.dropout,
            "fan_in_fan_out": False,
            "bias": self.bias,
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            METADATA_KEY: ours,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> BOFTConfig:
        """Read an ``adapter_config.json`` written by us or by PEFT."""
        if data.get("peft_type") not in ("BOFT", OUTPUT_SIDE_PEFT_TYPE):
            raise ValueError(f"not a BOFT adapter config (peft_type={data.get('peft_type')!r}).")
        if data.get("fan_in_fan_out"):
            raise ValueError("fan_in_fan_out=True adapters (Conv1D models) are not supported.")
        ours = data.get(METADATA_KEY) or {}
        if not isinstance(ours, dict):
            raise ValueError(f"{METADATA_KEY} must be a JSON object, got {type(ours).__name__}.")
        ours = dict(ours)
        ours.pop("library_version", None)
        neumann = _integer(ours, "cayley_neumann_terms", 0)
        ours.pop("cayley_neumann_terms", None)
        scale = _boolean(ours.pop("scale", True), "scale")
        side = "output" if data["peft_type"] == OUTPUT_SIDE_PEFT_TYPE else "input"
        ours.pop("side", None)
        full_butterfly = _boolean(ours.pop("full_butterfly", False), "full_butterfly")
        targets = data.get("target_modules") or list(DEFAULT_TARGET_MODULES)
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise ValueError("target_modules must be a string or a list of strings.")
        return cls(
            block_size=_integer(data, "boft_block_size", 0),
            block_num=_integer(data, "boft_block_num", 0),
            n_butterfly_factor=_integer(data, "boft_n_butterfly_factor", 1),
            target_modules=targets,
            dropout=_number(data, "boft_dropout"),
            scale=scale,
            bias=_text(data, "bias", "none"),
            cayley_neumann_terms=neumann,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            side=side,
            full_butterfly=full_butterfly,
            metadata=ours,
        )

    def replace(self, **changes: Any) -> BOFTConfig:
        return dataclasses.replace(self, **changes)


def _integer(data: dict[str, Any], key: str, default: int) -> int:
    """An integer field of a config file (null means the default), refused when of another type."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}.")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}.")
    return float(value)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    return value


def _text(data: dict[str, Any], key: str, default: str) -> str:
    value = data.get(key) or default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}.")
    return value
