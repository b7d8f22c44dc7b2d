"""Patchify / unpatchify with einops, pixel order ``(p q c)`` within a patch (as MAE and lightly)."""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C) with L = (H/p) * (W/p), patches in row-major order."""
    _, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {patch_size}")
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int],
               channels: int = 3) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    gh, gw = grid_size
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)",
                     h=gh, w=gw, p=patch_size, q=patch_size, c=channels)
