"""Writing the output folders of the training scripts (``read.py`` reads every kind back).

A DreamBooth folder holds the UNet's adapter (PEFT's layout) at its root, the text encoder's
adapter in ``text_encoder/`` and the learned identifier in ``learned_embeds.safetensors``; an
SDXL folder keeps the second text encoder's adapter and identifier in ``text_encoder_2/``. A
control folder adds ``control.json`` (mode and training metadata), the light control encoder's
files or the ControlNet's adapter in ``controlnet/`` with its fully trained parts beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..control.networks import ControlEncoder, controlnet_trainable_parameters
from ..core.config import BOFTConfig
from ..core.files import atomic_write, atomic_write_text, save_adapter, save_identifier_embeddings

TEXT_ENCODER_FOLDER = "text_encoder"
TEXT_ENCODER_2_FOLDER = "text_encoder_2"
CONTROLNET_FOLDER = "controlnet"
CONTROL_INFO = "control.json"
CONTROLNET_CONFIG = "controlnet_config.json"
CONTROLNET_TRAINABLE = "controlnet_trainable.safetensors"


def save_dreambooth(
    folder: str | os.PathLike, denoiser: nn.Module, metadata: dict[str, Any], encoders: dict[str, nn.Module],
    text_encoder_adapter: bool = False, identifier: bool = False, save: Callable[..., object] = save_adapter,
) -> None:
    """The denoiser's adapter at the folder's root, and, when they trained, each text encoder's
    adapter in a subfolder of its component name (``text_encoder/``, ``text_encoder_2/``) and its
    learned identifier (the first encoder's at the root, as textual-inversion files are); ``save``
    writes one adapter folder (BOFT by default)."""
    folder = Path(folder)
    save(denoiser, folder, metadata=metadata)
    for number, (name, encoder) in enumerate(encoders.items()):
        if text_encoder_adapter:
            save(encoder, folder / name, metadata=metadata)
        if identifier:
            save_identifier_embeddings(encoder, folder if number == 0 else folder / name)


def save_control(folder: str | os.PathLike, mode: str, unet_adapter: nn.Module | None, controlnet: Any = None,
                 encoder: ControlEncoder | None = None, metadata: dict[str, Any] | None = None) -> None:
    """A control folder: BOFT adapter(s) plus the fully trained control parts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"mode": mode, **(metadata or {})}
    if unet_adapter is not None:
        save_adapter(unet_adapter, folder, metadata=metadata)
        info["unet_adapter"] = "."
    if encoder is not None:
        encoder.save(folder)
    if controlnet is not None:
        save_adapter(controlnet, folder / CONTROLNET_FOLDER, metadata=metadata)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in controlnet_trainable_parameters(controlnet).items()}
        config = {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}
        atomic_write(folder, {
            CONTROLNET_TRAINABLE: lambda tmp: save_file(tensors, tmp),
            CONTROLNET_CONFIG: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=list)),
        })
    atomic_write_text(folder / CONTROL_INFO, json.dumps(info, indent=2))


def save_latest_validation(output_dir: str | os.PathLike) -> None:
    """Copy the newest validation grid to ``validation/latest.png``, the picture the model card
    shows, atomically: an interrupted copy leaves the previous picture whole."""
    grids = sorted((Path(output_dir) / "validation").glob("step-*.png"))
    if grids:
        atomic_write(grids[-1].parent, {"latest.png": lambda tmp: shutil.copyfile(grids[-1], tmp)})


def peft_interop_note(boft: BOFTConfig) -> str:
    """What Hugging Face PEFT (or, for an output-side adapter, ComfyUI, A1111 and LyCORIS) can do
    with an adapter of this depth, as measured (docs/adapter_format.md, docs/export.md)."""
    if boft.side == "output":
        return ("This adapter rotates the output side of each weight (LyCORIS's convention), which PEFT does not "
                "read: `python -m boft_diffusion.export <folder> --format lycoris --output boft.safetensors` writes "
                "a small exact file that ComfyUI and A1111 load natively"
                + (", and LyCORIS itself (full-butterfly geometry)." if boft.full_butterfly else
                   "; LyCORIS itself needs the full-butterfly geometry (`--boft_full_butterfly`).")
                + " At strength 1 every tool gives this adapter exactly; at another strength w, ComfyUI blends each "
                  "butterfly factor with the identity and scales the change by w again (w counts twice), A1111 "
                  "scales the weight change by w, and LyCORIS blends the factors only.")
    n_butterfly_factor = boft.n_butterfly_factor
    measured = ("PEFT runs m > 1 only through its CUDA extension; without it (on CPU, and where the extension "
                "fails to compile, as measured on an H200 with PEFT 0.21.2) PEFT builds m = 1 layers and refuses "
                "m > 1 files with `size mismatch for ...boft_R`.")
    if n_butterfly_factor == 1:
        return (f"This adapter has m = 1, so Hugging Face PEFT loads it too: "
                f"`PeftModel.from_pretrained(pipe.unet, folder)`. {measured}")
    return (f"This adapter has butterfly depth m = {n_butterfly_factor}: load it with boft-diffusion "
            f"(`bd.load_adapter` or `load_outputs`, any depth, any device). {measured}")


def boft_summary(boft: BOFTConfig, trainable: int) -> str:
    """The model card's BOFT lines: geometry, depth, dropout, targets and what trains."""
    depth = ("the full butterfly of each layer (LyCORIS's geometry)" if boft.full_butterfly
             else f"butterfly factors m = {boft.n_butterfly_factor}")
    return (f"BOFT: block size {boft.block_size or '-'}, block number {boft.block_num or '-'},\n"
            f"{depth}, {boft.side} side, dropout {boft.dropout},\n"
            f"targets {', '.join(boft.target_modules)}; {trainable:,} trainable parameters.")


def write_model_card(folder: str | os.PathLike, text: str) -> None:
    """The folder's README.md, written atomically."""
    atomic_write_text(Path(folder) / "README.md", text)


SCORES_HEADING = "## Scores"


def add_model_card_scores(folder: str | os.PathLike, rows: list[tuple[str, str]], note: str) -> None:
    """Put a "Scores" section (``rows`` of measure and value, then ``note``) at the end of the
    folder's model card, replacing an earlier one, written atomically."""
    card = Path(folder) / "README.md"
    text = card.read_text() if card.is_file() else ""
    text = text.split(SCORES_HEADING)[0].rstrip() + "\n\n"
    table = "\n".join(f"| {measure} | {value} |" for measure, value in rows)
    text += f"{SCORES_HEADING}\n\n| measure | value |\n|---|---|\n{table}\n\n{note}\n"
    atomic_write_text(card, text)
