"""The training losses as pure functions of tensors, so each can be checked by hand."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, example_weights: torch.Tensor | None = None,
                   pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over examples of each example's MSE, times its weight where given.

    ``pixel_weights`` (broadcastable to the prediction) make each example's MSE a weighted mean,
    e.g. to learn less of a subject's background."""
    error = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, prediction.ndim))
    if pixel_weights is None:
        per_example = error.mean(dim=dims)
    else:
        weights = pixel_weights.float().expand_as(error)
        per_example = (error * weights).sum(dim=dims) / weights.sum(dim=dims).clamp_min(1e-8)
    if example_weights is None:
        return per_example.mean()
    return (per_example * example_weights).mean()


def pooled_mean(losses: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The mean over examples of per-part mean losses ``(loss, examples)``; one part is returned as is."""
    if len(losses) == 1:
        return losses[0][0]
    return sum(loss * count for loss, count in losses) / sum(count for _, count in losses)


def dreambooth_loss(instance_losses: Sequence[tuple[torch.Tensor, int]],
                    prior_losses: Sequence[tuple[torch.Tensor, int]],
                    prior_loss_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DreamBooth's objective from the per-part denoising losses of a micro-batch: the instance
    loss, plus ``prior_loss_weight`` times the prior-preservation loss on class images when there
    are any. Returns the loss and its two terms for logging."""
    instance_loss = pooled_mean(instance_losses)
    if not prior_losses:
        return instance_loss, {}
    prior_loss = pooled_mean(prior_losses)
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"instance_loss": instance_loss.item(), "prior_loss": prior_loss.item()}
