"""Hyperspherical energy of a layer's neurons: the quantity orthogonal finetuning keeps."""

from __future__ import annotations

import torch


def hyperspherical_energy(weight: torch.Tensor) -> float:
    """Mean inverse distance between the layer's unit-normalised neurons (the rows of the weight,
    each flattened over its inputs). A rotation of the inputs shared by every neuron, and any
    per-neuron scale, leave it unchanged; a LoRA update in general does not."""
    rows = weight.detach().double().flatten(1)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    distances = torch.cdist(rows, rows)
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    return float((1.0 / distances[off_diagonal].clamp_min(1e-12)).mean())


def energy_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Mean relative change of hyperspherical energy over the weights in both dicts."""
    changes = [abs(hyperspherical_energy(after[name]) - hyperspherical_energy(before[name]))
               / hyperspherical_energy(before[name]) for name in before]
    return float(sum(changes) / len(changes))
