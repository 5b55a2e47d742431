"""Exporting a pipeline with its adapters folded in, as a plain diffusers folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.adapters import has_adapters, merged_state_dict


def export_merged_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """Save ``pipe`` with every adapted component's active adapter (and learned identifier
    embeddings) merged into plain modules.

    The result loads with ``StableDiffusionPipeline.from_pretrained`` and no boft-diffusion code;
    the adapters in ``pipe`` itself are left untouched.
    """
    components = dict(pipe.components)
    for key, module in pipe.components.items():
        if module is None or not hasattr(module, "state_dict") or not has_adapters(module):
            continue
        config = module.config
        plain = type(module).from_config(config) if hasattr(type(module), "from_config") else type(module)(config)
        plain.load_state_dict(merged_state_dict(module))
        components[key] = plain.to(device=module.device, dtype=module.dtype)
    folder = Path(folder)
    type(pipe)(**components).save_pretrained(folder, safe_serialization=True)
    return folder
