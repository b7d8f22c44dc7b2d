"""SimMIM (Xie et al. 2021, arXiv 2111.09886): regress the raw pixels of the masked patches.

A mask token replaces the masked patches in the encoder input; one linear layer maps each
patch token to its p*p*C pixels (the paper's 1x1 conv + pixel shuffle is the same map); the
loss is L1 over the masked patches' pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mim.losses import denormalize_patch_pixels, masked_l1_loss, pixel_targets
from mim.methods.base import Method, PretrainOutput
from mim.methods.masked_prediction import (MaskConfig, MaskedPredictionModel, init_head,
                                           masking_kwargs)
from mim.models.encoder import MaskedEncoder, create_encoder
from mim.viz import reconstruction_grid


@dataclass
class SimMIMConfig(MaskConfig):
    name: str = "simmim"
    norm_pix_loss: bool = True  # per-patch normalised pixel targets


class SimMIM(MaskedPredictionModel):
    def __init__(self, encoder: MaskedEncoder, norm_pix_loss: bool = False, **masking: Any) -> None:
        super().__init__(encoder, **masking)
        self.norm_pix_loss = norm_pix_loss
        patch_dim = encoder.patch_size ** 2 * encoder.in_chans
        self.head = init_head(nn.Linear(encoder.embed_dim, patch_dim))

    @classmethod
    def from_config(cls, cfg: Any) -> SimMIM:
        return cls(create_encoder(cfg.model, use_mask_token=True),
                   norm_pix_loss=cfg.method.norm_pix_loss, **masking_kwargs(cfg.method))

    def forward(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> PretrainOutput:
        """images (B, C, H, W); masking: an optional bool (B, L) mask, True = masked."""
        mask = self.sample_mask(images.shape[0], images.device) if masking is None else masking
        pred = self.head(self.encode_patches(images, mask))  # (B, L, p*p*C)
        target = pixel_targets(images, self.encoder.patch_size, self.norm_pix_loss)
        loss = masked_l1_loss(pred, target, mask)
        return PretrainOutput(loss=loss, pred=pred, mask=mask, target=target)

    def picture(self, images: torch.Tensor, mean: Any, std: Any,
                seed: int = 0) -> torch.Tensor | None:
        return reconstruction_grid(self, images, mean, std, seed)

    def reconstruct(self, images: torch.Tensor, out: PretrainOutput) -> torch.Tensor:
        """Predicted pixels (B, L, p*p*C) in the input's units (norm-pix undone per patch)."""
        if self.norm_pix_loss:
            return denormalize_patch_pixels(out.pred, images, self.encoder.patch_size)
        return out.pred.float()


METHOD = Method(SimMIMConfig, SimMIM.from_config)
