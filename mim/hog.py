"""Histograms of oriented gradients (Dalal & Triggs 2005) in batched torch ops, on any device.

MaskFeat (Wei et al. 2021, arXiv 2112.09133) predicts the HOG of each masked patch. The layout
follows scikit-image's ``hog`` with ``cells_per_block=(1, 1), block_norm='L2'`` so it can be
checked against it: central-difference gradients ``[-1, 0, 1]`` (zero on the image border),
unsigned orientations in ``[0, 180)`` split into ``bins`` equal bins (hard assignment, weighted
by the gradient magnitude), averaged over non-overlapping square cells, and each cell's
histogram L2-normalised. Each colour channel gets its own histograms, as in MaskFeat. Not
ported from MaskFeat: its Sobel filter and Gaussian weighting within a patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def hog_cells(images: torch.Tensor, cell: int, bins: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, H, W) -> per-cell histograms (B, C, bins, H / cell, W / cell), L2-normalised."""
    H, W = images.shape[-2:]
    if H % cell or W % cell:
        raise ValueError(f"image size {H}x{W} is not a multiple of the HOG cell {cell}")
    x = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    gy = F.pad(x[:, :, 2:, :] - x[:, :, :-2, :], (0, 0, 1, 1))
    gx = F.pad(x[:, :, :, 2:] - x[:, :, :, :-2], (1, 1, 0, 0))
    magnitude = torch.hypot(gx, gy)
    degrees = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    index = torch.floor(degrees * (bins / 180.0)).long().clamp_(0, bins - 1)
    hist = torch.stack([F.avg_pool2d(magnitude * (index == k), cell) for k in range(bins)], dim=2)
    return hist / torch.sqrt(hist.pow(2).sum(dim=2, keepdim=True) + eps ** 2)


def hog_patch_targets(images: torch.Tensor, patch_size: int, cell: int,
                      bins: int = 9) -> torch.Tensor:
    """HOG per patch: (B, C, H, W) -> (B, L, (p/cell)^2 * C * bins), patches in row-major order."""
    if patch_size % cell:
        raise ValueError(f"HOG cell {cell} does not divide the patch size {patch_size}")
    hist = hog_cells(images, cell, bins)
    k = patch_size // cell
    return rearrange(hist, "b c n (h i) (w j) -> b (h w) (i j c n)", i=k, j=k)


def hog_dim(patch_size: int, cell: int, bins: int, channels: int) -> int:
    """Length of one patch's HOG vector from :func:`hog_patch_targets`."""
    return (patch_size // cell) ** 2 * channels * bins
