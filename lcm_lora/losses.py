"""Consistency distances (per example) and the per-example guidance scale."""

from __future__ import annotations

import torch

from .config import LOSS_TYPES


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example: [B, ...] -> [B]."""
    return (pred - target).square().flatten(1).mean(1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt(d^2 + c^2) - c) per example (iCT, arXiv 2310.14189 Sec. 3.3): ~|d| for |d| >> c, ~d^2/2c near 0."""
    d = (pred - target).flatten(1)
    return ((d.square() + c * c).sqrt() - c).mean(1)


def pseudo_huber_per_sample(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||d||^2 / D + c^2) - c per example, D its number of elements: iCT's distance (arXiv 2310.14189, Sec. 3.3,
    sqrt(||d||^2 + c'^2) - c' with c' = c sqrt(D), c = 0.00054 there) divided by sqrt(D), so that its scale matches
    the elementwise form's and c means the same per element. One norm per example, not one per element."""
    d = (pred - target).flatten(1)
    return (d.square().mean(1) + c * c).sqrt() - c


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    if loss_type == "l2":
        return l2(pred, target)
    if loss_type == "huber":
        return pseudo_huber(pred, target, huber_c)
    if loss_type == "huber_sample":
        return pseudo_huber_per_sample(pred, target, huber_c)
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}.")


def sample_guidance_scale(batch_size: int, w_min: float, w_max: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """w ~ U[w_min, w_max] per example (LCM Algorithm 1), LCM-paper convention (see solver.guide)."""
    return w_min + (w_max - w_min) * torch.rand(batch_size, generator=generator)
