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


def dense_detection_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor,
                         anchors: torch.Tensor, labels: torch.Tensor, matched_boxes: torch.Tensor,
                         box_coder, alpha: float = 0.25, gamma: float = 2.0, box: str = "giou",
                         box_weight: float = 1.0, num_pos: torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
    """RetinaNet's loss: sigmoid focal loss over every anchor that is not ignored, and a box
    loss over the positives (``giou`` on decoded boxes or ``l1`` on encoded deltas), both summed
    and divided by the number of positive anchors, floor 1 (detectron2's normaliser).

    cls_logits (B, A, K); box_deltas (B, A, 4); anchors (A, 4); labels (B, A): class index,
    -1 background, -2 ignored; matched_boxes (B, A, 4) xyxy. ``num_pos`` overrides the count
    (e.g. the mean over processes, so every process divides by the same number).
    """
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
    pos = labels >= 0
    n = (pos.sum() if num_pos is None else num_pos).float().clamp_min(1.0)
    target = torch.zeros_like(cls_logits)
    target[pos, labels[pos]] = 1.0
    keep = labels >= -1
    loss_cls = sigmoid_focal_loss(cls_logits[keep], target[keep], alpha=alpha, gamma=gamma,
                                  reduction="sum") / n
    pos_anchors = anchors.unsqueeze(0).expand_as(box_deltas)[pos]
    if box == "l1":
        wanted = box_coder.encode_single(matched_boxes[pos], pos_anchors)
        loss_box = (box_deltas[pos] - wanted).abs().sum() / n
    elif box == "giou":
        pred = box_coder.decode_single(box_deltas[pos], pos_anchors)
        loss_box = generalized_box_iou_loss(pred, matched_boxes[pos], reduction="sum") / n
    else:
        raise ValueError(f"unknown box loss {box!r}")
    return {"loss": loss_cls + box_weight * loss_box, "loss_cls": loss_cls, "loss_box": loss_box}
