"""Losses as pure functions. Models call them; the engine alone calls backward."""

from __future__ import annotations

import torch

from mim.patching import patchify


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Patchified pixels (B, L, p*p*C); with ``norm_pix`` each patch is normalised by its own
    mean and variance (MAE's ``norm_pix_loss``)."""
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only. pred/target (B, L, D), mask (B, L) bool."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
