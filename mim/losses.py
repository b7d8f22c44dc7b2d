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


def softmax_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       alpha: torch.Tensor | None = None, label_smoothing: float = 0.0,
                       reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss with a softmax (Lin et al. 2017, arXiv 1708.02002, eq. 5):
    ``-sum_c t_c * alpha_c * (1 - p_c)**gamma * log p_c`` per sample.

    logits (B, K); target (B,) class ids or (B, K) probabilities (mixup's soft targets, which
    already carry their smoothing); alpha (K,) per-class weights or None. With gamma=0 and no
    alpha it is cross-entropy. torchvision has only the sigmoid (one-vs-rest) version.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if target.ndim == 1:
        k = logits.shape[-1]
        t = torch.nn.functional.one_hot(target.long(), k).to(logp.dtype)
        if label_smoothing:
            t = t * (1.0 - label_smoothing) + label_smoothing / k
    else:
        t = target.to(logp.dtype)
    focus = (-torch.expm1(logp)).clamp_min(1.0e-12).pow(gamma)  # (1 - p)^gamma, finite grads
    per_class = -t * focus * logp
    if alpha is not None:
        per_class = per_class * alpha.to(per_class)[None, :]
    loss = per_class.sum(dim=-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
