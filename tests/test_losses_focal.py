"""Softmax focal loss against its formula, and cross-entropy as its gamma = 0 case."""

import pytest
import torch
import torch.nn.functional as F

from mim.losses import softmax_focal_loss


def direct_focal(logits, target, gamma, alpha=None):
    """Loop form of -alpha_y (1 - p_y)^gamma log p_y, averaged over the batch."""
    total = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        z = torch.tensor(row, dtype=torch.float64)
        p = torch.exp(z[y]) / torch.exp(z).sum()
        a = 1.0 if alpha is None else alpha[y]
        total += -a * (1 - p) ** gamma * torch.log(p)
    return float(total) / len(target)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_matches_the_formula(gamma):
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(16, 5, generator=g) * 3, torch.randint(0, 5, (16,), generator=g)
    alpha = [0.1, 0.5, 1.0, 2.0, 4.0]
    assert softmax_focal_loss(logits, target, gamma).item() == pytest.approx(
        direct_focal(logits, target, gamma), rel=1e-5)
    assert softmax_focal_loss(logits, target, gamma, torch.tensor(alpha)).item() == pytest.approx(
        direct_focal(logits, target, gamma, alpha), rel=1e-5)


def test_gamma_zero_is_cross_entropy_also_smoothed_and_soft():
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(32, 7, generator=g), torch.randint(0, 7, (32,), generator=g)
    assert torch.allclose(softmax_focal_loss(logits, target, gamma=0.0),
                          F.cross_entropy(logits, target), atol=1e-6)
    assert torch.allclose(softmax_focal_loss(logits, target, gamma=0.0, label_smoothing=0.1),
                          F.cross_entropy(logits, target, label_smoothing=0.1), atol=1e-6)
    soft = torch.softmax(torch.randn(32, 7, generator=g), dim=-1)
    assert torch.allclose(softmax_focal_loss(logits, soft, gamma=0.0),
                          F.cross_entropy(logits, soft), atol=1e-6)


def test_focusing_down_weights_easy_examples():
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.0]])  # easy, hard; both of class 0
    per_sample = softmax_focal_loss(logits, torch.tensor([0, 0]), gamma=2.0, reduction="none")
    ce = F.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    ratio = per_sample / ce
    assert ratio[0] < 1e-3 < 0.3 < ratio[1] < 1.0


def test_gradients_are_finite_when_confident():
    logits = torch.tensor([[80.0, 0.0, 0.0]], requires_grad=True)
    softmax_focal_loss(logits, torch.tensor([0]), gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()
