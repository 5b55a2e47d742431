"""An exponential moving average of the trained tensors (``--use_ema``), kept in float32 beside them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

#: The average's file inside a checkpoint's ``ema/`` folder.
EMA_FILE = "ema.safetensors"


class AdapterEMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step, from the
    parameters' starting values: the average, not the last step, is often the better adapter."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = {name: param.detach().float().clone() for name, param in params.items()}

    def update(self) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1 - self.decay)

    def copy_to_params(self) -> None:
        """Put the average into the parameters (the end of a run: what is saved and sampled)."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])

    def save(self, folder: Path) -> None:
        """Write the average into ``folder`` (a checkpoint's ``ema/``, inside its atomic write)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.cpu().contiguous() for name, tensor in self.shadow.items()}, str(folder / EMA_FILE))

    def load(self, folder: Path) -> None:
        """Restore the average from a checkpoint's ``ema/``; a missing or mismatched one is an error."""
        path = folder / EMA_FILE
        if not path.is_file():
            raise ValueError(f"{folder.parent} holds no EMA ({path.name}): it was written without --use_ema.")
        tensors = load_file(str(path))
        if set(tensors) != set(self.shadow):
            raise ValueError(f"{path} holds the average of other parameters than this run trains.")
        for name, tensor in tensors.items():
            self.shadow[name].copy_(tensor)
