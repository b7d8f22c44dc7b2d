"""Supervised pretraining of the shared encoder: a linear head on the pooled tokens, cross-entropy.

The baseline every self-supervised method is measured against (the "supervised" init of
``mim compare``): the same :class:`MaskedEncoder` as MAE or BEiT, trained on the labels of a
labeled source set, saved in the same checkpoint format and exported as the same
``encoder.safetensors``. Pooling is the mean of the normalised patch tokens, as in the fine-tuning
classifier's ``global_pool=avg``; the head is dropped at export like any pretraining head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from mim.config import ConfigError
from mim.data.labels import source_labels
from mim.models.encoder import MaskedEncoder, create_encoder
from mim.models.mae import PretrainOutput


class SupervisedPretrainer(nn.Module):
    needs_labels = True  # the pretraining engine passes ``labels=`` to forward

    def __init__(self, encoder: MaskedEncoder, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"config key 'method.num_classes': supervised pretraining needs at "
                              f"least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, cfg: Any) -> SupervisedPretrainer:
        if cfg.method.num_classes < 1:
            raise ConfigError("config key 'method.num_classes' is not resolved: the pretraining "
                              "engine sets it from the data's labels")
        return cls(create_encoder(cfg.model), cfg.method.num_classes)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> PretrainOutput:
        """images (B, C, H, W), labels (B,) -> loss, pred = logits (B, K), mask all False (B, L)."""
        tokens = self.encoder(images)  # (B, prefix + L, D), normalised
        logits = self.head(tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1))
        loss = F.cross_entropy(logits.float(), labels)
        mask = torch.zeros(images.shape[0], self.encoder.num_patches, dtype=torch.bool,
                           device=images.device)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return PretrainOutput(loss=loss, pred=logits, mask=mask, target=labels,
                              metrics={"train_top1": accuracy})


def num_classes_of(source: Any, configured: int = 0) -> int:
    """The class count for supervised pretraining: ``configured`` or 1 + the largest label; a clear
    error when the data has no labels (an image folder without classes, a dataset without a
    label column)."""
    try:
        labels = source_labels(source)
    except ConfigError as e:
        raise ConfigError(f"method.name=supervised needs labels: {e}") from None
    if not labels or min(labels) < 0:
        raise ConfigError("method.name=supervised needs labels, and the training data has none "
                          "(or negative ones); point 'data' at a labeled set (or set "
                          "'data.label_column')")
    n = configured or len(getattr(source, "classes", None) or []) or max(labels) + 1
    if max(labels) >= n:
        raise ConfigError(f"the training labels span [0, {max(labels)}] but "
                          f"'method.num_classes' is {n}")
    return n
