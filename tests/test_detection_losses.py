"""The detection loss against torchvision's reference ops."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from mim.losses import dense_detection_loss

CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def _case(seed=0, B=2, A=30, K=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, A, K, generator=g)
    deltas = 0.1 * torch.randn(B, A, 4, generator=g)
    xy = torch.rand(A, 2, generator=g) * 50
    anchors = torch.cat([xy, xy + 8 + torch.rand(A, 2, generator=g) * 20], dim=1)
    labels = torch.randint(-2, K, (B, A), generator=g)
    jitter = torch.rand(B, A, 4, generator=g) * 4
    matched = anchors.expand(B, -1, -1) + jitter
    return logits, deltas, anchors, labels, matched


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)])
def test_focal_part_equals_torchvision_normalised_by_positives(alpha, gamma):
    logits, deltas, anchors, labels, matched = _case()
    out = dense_detection_loss(logits, deltas, anchors, labels, matched, CODER, alpha=alpha,
                               gamma=gamma)
    keep, pos = labels >= -1, labels >= 0
    onehot = torch.zeros_like(logits)
    onehot[pos, labels[pos]] = 1.0
    ref = sigmoid_focal_loss(logits[keep], onehot[keep], alpha=alpha, gamma=gamma,
                             reduction="sum") / pos.sum()
    assert torch.allclose(out["loss_cls"], ref, rtol=1e-6)


def test_box_losses_and_normaliser():
    logits, deltas, anchors, labels, matched = _case(1)
    pos = labels >= 0
    n = pos.sum()
    l1 = dense_detection_loss(logits, deltas, anchors, labels, matched, CODER, box="l1")
    wanted = CODER.encode_single(matched[pos], anchors.expand(2, -1, -1)[pos])
    assert torch.allclose(l1["loss_box"], (deltas[pos] - wanted).abs().sum() / n, rtol=1e-6)
    giou = dense_detection_loss(logits, deltas, anchors, labels, matched, CODER, box="giou",
                                box_weight=2.0)
    decoded = CODER.decode_single(deltas[pos], anchors.expand(2, -1, -1)[pos])
    ref = generalized_box_iou_loss(decoded, matched[pos], reduction="sum") / n
    assert torch.allclose(giou["loss_box"], ref, rtol=1e-6)
    assert torch.allclose(giou["loss"], giou["loss_cls"] + 2.0 * giou["loss_box"])
    # exact deltas: zero box loss; a given normaliser replaces the count
    exact = torch.zeros_like(deltas)
    exact[pos] = wanted
    zero = dense_detection_loss(logits, exact, anchors, labels, matched, CODER, box="giou")
    assert zero["loss_box"].abs() < 1e-5
    ten = dense_detection_loss(logits, deltas, anchors, labels, matched, CODER,
                               num_pos=torch.tensor(10.0))
    assert torch.allclose(ten["loss_cls"] * 10, l1["loss_cls"] * n, rtol=1e-5)


def test_no_positives_divides_by_one_and_ignored_anchors_give_no_gradient():
    logits, deltas, anchors, labels, matched = _case(2)
    labels = torch.where(labels >= 0, torch.full_like(labels, -1), labels)  # no positives
    logits.requires_grad_(True)
    out = dense_detection_loss(logits, deltas, anchors, labels, matched, CODER)
    keep = labels >= -1
    ref = sigmoid_focal_loss(logits[keep], torch.zeros_like(logits[keep]), reduction="sum")
    assert torch.allclose(out["loss_cls"], ref) and out["loss_box"] == 0
    out["loss"].backward()
    assert (logits.grad[labels == -2] == 0).all() and (logits.grad[keep] != 0).any()
