"""Module-tree surgery shared by adapter injection and base quantisation."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` points in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
