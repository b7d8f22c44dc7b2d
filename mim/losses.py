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


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the values of masked patches only (SimMIM). Shapes as above."""
    per_patch = (pred.float() - target.float()).abs().mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def denormalize_patch_pixels(pred: torch.Tensor, images: torch.Tensor,
                             patch_size: int) -> torch.Tensor:
    """Map a norm-pix prediction (B, L, p*p*C) back to the input's units with each patch's own
    mean and variance, taken from ``images`` (the inverse of ``pixel_targets(norm_pix=True)``)."""
    raw = pixel_targets(images, patch_size, norm_pix=False)
    mean = raw.mean(dim=-1, keepdim=True)
    std = (raw.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    return pred.float() * std + mean
