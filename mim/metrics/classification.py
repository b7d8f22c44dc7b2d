"""Classification metrics from a confusion matrix: top-1/top-5, per-class precision, recall and
F1, macro-F1, mean cross-entropy; and the confusion matrix as a picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F


class ClassificationEvaluator:
    """Accumulates (confusion matrix, top-k hits, summed loss) over batches.

    Every statistic is a sum, so the result over several processes is ``merge(all-reduce sum)``
    of theirs: with each sample evaluated by exactly one process it is exact.
    """

    def __init__(self, num_classes: int, topk: int = 5) -> None:
        self.num_classes, self.topk = num_classes, min(topk, num_classes)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        self.topk_hits = 0.0
        self.loss_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (N, K), targets (N,) class ids."""
        logits, targets = logits.detach().float().cpu(), targets.detach().long().cpu()
        pred = logits.argmax(dim=-1)
        k = self.num_classes
        self.confusion += torch.bincount(targets * k + pred, minlength=k * k).view(k, k)
        top = logits.topk(self.topk, dim=-1).indices
        self.topk_hits += float((top == targets[:, None]).any(dim=-1).sum())
        self.loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))

    def merge(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the statistics by ``reduce_sum`` of them (e.g. an all-reduce over processes)."""
        packed = torch.cat([self.confusion.flatten(),
                            torch.tensor([self.topk_hits, self.loss_sum], dtype=torch.float64)])
        packed = reduce_sum(packed).cpu()
        k = self.num_classes
        self.confusion = packed[: k * k].view(k, k).clone()
        self.topk_hits, self.loss_sum = float(packed[-2]), float(packed[-1])

    def compute(self) -> dict[str, Any]:
        cm = self.confusion
        n = float(cm.sum())
        tp = cm.diag()
        predicted, actual = cm.sum(dim=0), cm.sum(dim=1)
        precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12),
                         torch.zeros_like(tp))
        seen = (predicted + actual) > 0  # as sklearn: classes in the targets or the predictions
        return {
            "num_samples": int(n),
            "top1": float(tp.sum()) / n if n else 0.0,
            "top5": self.topk_hits / n if n else 0.0,  # top-min(5, K)
            "loss": self.loss_sum / n if n else 0.0,
            "macro_f1": float(f1[seen].mean()) if bool(seen.any()) else 0.0,
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(a) for a in actual.tolist()],
        }


def save_confusion_matrix(confusion: torch.Tensor, class_names: list[str], path: Path,
                          title: str = "") -> None:
    """Counts, coloured by row share (recall); rows are true classes, columns predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.double()
    share = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
    k = cm.shape[0]
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if cm[i, j] > 0:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
