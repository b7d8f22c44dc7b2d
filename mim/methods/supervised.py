"""Supervised pretraining of the shared encoder: a linear head on the pooled tokens, cross-entropy.

The baseline every self-supervised method is measured against (the "supervised" init of
``mim compare``): the same :class:`MaskedEncoder` as MAE or BEiT, trained on the labels of a
labeled source set, saved in the same checkpoint format and exported as the same
``encoder.safetensors``. Pooling is the mean of the normalised patch tokens, as in the fine-tuning
classifier's ``global_pool=avg``; the head is dropped at export like any pretraining head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from mim.errors import ConfigError
from mim.methods.base import Method, MethodConfig, PretrainOutput, Pretrainer, require
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    num_classes: int = 0  # classes of the labeled source; 0 = from its labels

    def check(self, model: ModelConfig) -> None:
        require(self.num_classes >= 0, "config key 'method.num_classes' must be >= 0")


class SupervisedPretrainer(Pretrainer):
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


METHOD = Method(SupervisedConfig, SupervisedPretrainer.from_config)
