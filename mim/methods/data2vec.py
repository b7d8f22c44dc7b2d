"""data2vec (Baevski et al. 2022, arXiv 2202.03555), vision: predict the teacher's contextual
features of the masked patches.

The student is the mask-token encoder of SimMIM and BEiT; the teacher is an exponential moving
average of it (timm's ``ModelEmaV3``) that sees the whole image. The target of each patch is the
average of the teacher's top ``top_k_layers`` block outputs, taken after each block's
feed-forward network and before its last residual connection (the paper's choice), each
instance-normalised over the patches first. A linear head regresses it from the student's patch
token with a smooth L1 loss (``loss_beta``; 0 = squared error) over the masked patches only. The
teacher's decay moves linearly from ``ema_decay`` to ``ema_end_decay`` over
``ema_anneal_updates`` updates and is applied in :meth:`Data2Vec.after_update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from mim.errors import ConfigError
from mim.methods.base import Method, PretrainOutput, require
from mim.methods.masked_prediction import (MaskConfig, MaskedPredictionModel, init_head,
                                           masking_kwargs)
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder


@dataclass
class Data2VecConfig(MaskConfig):
    name: str = "data2vec"
    mask_ratio: float = 0.6  # data2vec's 60% blockwise masks (BEiT's generator)
    mask_type: Literal["random", "block"] = "block"
    top_k_layers: int = 6  # teacher blocks averaged into the target (6 of ViT-B's 12)
    loss_beta: float = 2.0  # smooth L1's beta; 0 = squared error
    ema_decay: float = 0.9998  # teacher decay at the first update ...
    ema_end_decay: float = 0.9999  # ... annealed linearly to this
    ema_anneal_updates: int = 100_000  # over this many updates, then constant

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        require(self.top_k_layers >= 1, "config key 'method.top_k_layers' must be >= 1")
        require(not model.depth or self.top_k_layers <= model.depth,
                f"config key 'method.top_k_layers' ({self.top_k_layers}) exceeds the encoder's "
                f"{model.depth} blocks ('model.depth')")
        require(self.loss_beta >= 0, "config key 'method.loss_beta' must be >= 0")
        require(0 <= self.ema_decay <= self.ema_end_decay <= 1,
                "config keys 'method.ema_decay' <= 'method.ema_end_decay' must lie in [0, 1], "
                f"got {self.ema_decay} and {self.ema_end_decay}")
        require(self.ema_anneal_updates >= 0,
                "config key 'method.ema_anneal_updates' must be >= 0")


class Data2Vec(MaskedPredictionModel):
    def __init__(self, encoder: MaskedEncoder, top_k_layers: int = 6, loss_beta: float = 2.0,
                 ema_decay: float = 0.9998, ema_end_decay: float = 0.9999,
                 ema_anneal_updates: int = 100_000, **masking: Any) -> None:
        super().__init__(encoder, **masking)
        if top_k_layers > len(encoder.vit.blocks):
            raise ConfigError(f"config key 'method.top_k_layers' ({top_k_layers}) exceeds the "
                              f"encoder's {len(encoder.vit.blocks)} blocks")
        self.top_k_layers, self.loss_beta = top_k_layers, loss_beta
        self.ema_decay, self.ema_end_decay = ema_decay, ema_end_decay
        self.ema_anneal_updates = ema_anneal_updates
        self.teacher = ModelEmaV3(encoder, decay=ema_decay)  # teacher.module: the EMA encoder
        self.teacher.requires_grad_(False)  # moved by after_update only, never by the optimizer
        self.head = init_head(nn.Linear(encoder.embed_dim, encoder.embed_dim))

    @classmethod
    def from_config(cls, cfg: Any) -> Data2Vec:
        m = cfg.method
        return cls(create_encoder(cfg.model, use_mask_token=True), top_k_layers=m.top_k_layers,
                   loss_beta=m.loss_beta, ema_decay=m.ema_decay, ema_end_decay=m.ema_end_decay,
                   ema_anneal_updates=m.ema_anneal_updates, **masking_kwargs(m))

    def train(self, mode: bool = True) -> Data2Vec:
        super().train(mode)
        self.teacher.eval()  # no drop path in the targets
        return self

    def teacher_decay(self, step: int) -> float:
        """The decay of update ``step``: linear from ``ema_decay`` to ``ema_end_decay``."""
        if step >= self.ema_anneal_updates:
            return self.ema_end_decay
        return self.ema_decay + (self.ema_end_decay - self.ema_decay) * step / self.ema_anneal_updates

    def after_update(self, step: int) -> None:
        self.teacher.decay = self.teacher_decay(step)
        self.teacher.update(self.encoder)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the mean of the teacher's top-K feed-forward outputs, each
        instance-normalised per channel over the patches."""
        teacher: MaskedEncoder = self.teacher.module
        feats: list[torch.Tensor] = []
        hooks = [blk.mlp.register_forward_hook(lambda mod, inp, out: feats.append(out))
                 for blk in teacher.vit.blocks[-self.top_k_layers:]]
        try:
            teacher(images)
        finally:
            for h in hooks:
                h.remove()
        P = teacher.num_prefix_tokens
        normed = [F.instance_norm(f[:, P:].float().transpose(1, 2)).transpose(1, 2)
                  for f in feats]
        return torch.stack(normed).mean(0)

    def forward(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> PretrainOutput:
        """images (B, C, H, W); masking: an optional bool (B, L) mask, True = masked."""
        mask = self.sample_mask(images.shape[0], images.device) if masking is None else masking
        pred = self.head(self.encode_patches(images, mask))  # (B, L, D)
        target = self.targets(images)
        p, t = pred[mask].float(), target[mask]
        loss = (F.smooth_l1_loss(p, t, beta=self.loss_beta) if self.loss_beta > 0
                else F.mse_loss(p, t))
        return PretrainOutput(loss=loss, pred=pred, mask=mask, target=target)


METHOD = Method(Data2VecConfig, Data2Vec.from_config)
