"""MaskFeat (Wei et al. 2021, arXiv 2112.09133): predict the HOG features of the masked patches.

The target is computed on the fly from the (augmented) input, on the same device, by
:func:`mim.hog.hog_patch_targets`; a linear head maps each patch token to its HOG vector and the
loss is the mean squared error over the masked patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mim.hog import hog_dim, hog_patch_targets
from mim.losses import masked_mse_loss
from mim.methods.base import Method, PretrainOutput, require
from mim.methods.masked_prediction import (MaskConfig, MaskedPredictionModel, init_head,
                                           masking_kwargs)
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder


@dataclass
class MaskFeatConfig(MaskConfig):
    name: str = "maskfeat"
    hog_bins: int = 9  # orientation bins over 0-180 degrees
    hog_cell: int = 8  # cell size in pixels; must divide model.patch_size

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        require(self.hog_bins >= 1, f"config key 'method.hog_bins' must be >= 1, "
                                    f"got {self.hog_bins}")
        require(self.hog_cell >= 1 and model.patch_size % self.hog_cell == 0,
                f"config key 'method.hog_cell' ({self.hog_cell}) must divide "
                f"'model.patch_size' ({model.patch_size})")


class MaskFeat(MaskedPredictionModel):
    def __init__(self, encoder: MaskedEncoder, hog_cell: int = 8, hog_bins: int = 9,
                 **masking: Any) -> None:
        super().__init__(encoder, **masking)
        self.hog_cell, self.hog_bins = hog_cell, hog_bins
        out_dim = hog_dim(encoder.patch_size, hog_cell, hog_bins, encoder.in_chans)
        self.head = init_head(nn.Linear(encoder.embed_dim, out_dim))

    @classmethod
    def from_config(cls, cfg: Any) -> MaskFeat:
        m = cfg.method
        return cls(create_encoder(cfg.model, use_mask_token=True), hog_cell=m.hog_cell,
                   hog_bins=m.hog_bins, **masking_kwargs(m))

    def forward(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> PretrainOutput:
        """images (B, C, H, W); masking: an optional bool (B, L) mask, True = masked."""
        mask = self.sample_mask(images.shape[0], images.device) if masking is None else masking
        pred = self.head(self.encode_patches(images, mask))  # (B, L, HOG dim)
        with torch.no_grad():
            target = hog_patch_targets(images, self.encoder.patch_size, self.hog_cell,
                                       self.hog_bins)
        loss = masked_mse_loss(pred, target, mask)
        return PretrainOutput(loss=loss, pred=pred, mask=mask, target=target)


METHOD = Method(MaskFeatConfig, MaskFeat.from_config)
