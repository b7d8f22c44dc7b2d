"""Classifiers on frozen features: weighted k-NN as in DINO, and a linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor,
             val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             num_classes: int = 0, chunk: int = 512) -> float:
    """Top-1 of the k nearest training features by cosine similarity, each voting for its class
    with weight ``exp(similarity / temperature)`` (Wu et al. 2018; DINO's ``knn_classifier``)."""
    train, val = F.normalize(train.float(), dim=1), F.normalize(val.float(), dim=1)
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(val), chunk):
        sim, idx = (val[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(
            1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == val_labels[start:start + chunk]).sum())
    return correct / max(len(val), 1)


def linear_probe_top1(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor,
                      val_labels: torch.Tensor, epochs: int, seed: int, num_classes: int = 0,
                      batch_size: int = 256, lr: float = 1e-2) -> float:
    """Top-1 of a linear classifier trained ``epochs`` epochs (AdamW, cross-entropy) on features
    standardised with the training set's statistics (MAE's BatchNorm without affine). Seeded by
    ``seed`` alone and run on the CPU, so every process computes the same number."""
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    x, xv = (train - mean) / std, (val - mean) / std
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x.shape[1], generator=g) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                loss = F.cross_entropy(x[idx] @ weight.T + bias, train_labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        return float(((xv @ weight.T + bias).argmax(dim=1) == val_labels).float().mean())
