"""The spine the BEiT family shares: keep every patch, swap the masked ones for a mask token.

SimMIM, MaskFeat and BEiT differ only in what they predict for the masked patches (pixels, HOG,
visual tokens); the masking, the encoder call and the head placement live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mim.masking import (BlockwiseMaskGenerator, block_shapes, num_masked_patches,
                         random_masking)
from mim.methods.base import MethodConfig, Pretrainer, check_mask_ratio, require
from mim.models.encoder import MaskedEncoder, ModelConfig


@dataclass
class MaskConfig(MethodConfig):
    """The keys of every mask-token method: which patches the mask token replaces."""

    mask_ratio: float = 0.75
    mask_type: Literal["random", "block"] = "random"
    block_min_patches: int = 16  # smallest block, in patches (BEiT: 16)
    block_max_patches: int = 0  # largest block; 0 = up to the number of patches to mask
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)  # height / width range

    def check(self, model: ModelConfig) -> None:
        check_mask_ratio(self.mask_ratio)
        if self.mask_type != "block":
            return
        grid = (model.img_size // model.patch_size,) * 2
        require(self.block_min_patches >= 1, "config key 'method.block_min_patches' must be >= 1")
        require(self.block_max_patches == 0 or self.block_max_patches >= self.block_min_patches,
                "config key 'method.block_max_patches' must be 0 or >= "
                "'method.block_min_patches'")
        lo, hi = self.block_aspect
        require(0 < lo <= hi, f"config key 'method.block_aspect' must satisfy 0 < lo <= hi, "
                              f"got {self.block_aspect}")
        n = num_masked_patches(grid[0] * grid[1], self.mask_ratio)
        largest = self.block_max_patches or n
        require(bool(block_shapes(grid, self.block_min_patches, largest, self.block_aspect)),
                f"config key 'method.block_min_patches': no block of {self.block_min_patches}.."
                f"{largest} patches with aspect in {tuple(self.block_aspect)} fits the "
                f"{grid[0]}x{grid[1]} patch grid")


def masking_kwargs(method: MaskConfig) -> dict[str, Any]:
    """The masking arguments of :class:`MaskedPredictionModel` from a :class:`MaskConfig`."""
    return {"mask_ratio": method.mask_ratio, "mask_type": method.mask_type,
            "block_min_patches": method.block_min_patches,
            "block_max_patches": method.block_max_patches,
            "block_aspect": tuple(method.block_aspect)}


class MaskedPredictionModel(Pretrainer):
    """Base of the mask-token methods: subclasses add a head and a target in ``forward``.

    Every sample gets exactly ``num_masked`` masked patches, from uniform random masking (on
    the device) or BEiT's blockwise masks (a CPU loop, then copied to the device).
    """

    def __init__(self, encoder: MaskedEncoder, mask_ratio: float, mask_type: str = "random",
                 block_min_patches: int = 16, block_max_patches: int = 0,
                 block_aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> None:
        super().__init__()
        if encoder.mask_token is None:
            raise ValueError("the BEiT-family methods need an encoder built with a mask token")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.num_masked = num_masked_patches(encoder.num_patches, mask_ratio)
        self.block_masks = None
        if mask_type == "block":
            self.block_masks = BlockwiseMaskGenerator(
                encoder.grid_size, self.num_masked, block_min_patches, block_max_patches,
                block_aspect)
        elif mask_type != "random":
            raise ValueError(f"unknown mask type {mask_type!r} (random | block)")

    def sample_mask(self, batch_size: int, device: torch.device | str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool (B, L), True = masked. A CPU ``generator`` gives masks that repeat exactly."""
        if self.block_masks is not None:
            return self.block_masks(batch_size, device, generator)
        where = "cpu" if generator is not None else device
        mask = random_masking(batch_size, self.encoder.num_patches, self.mask_ratio, where,
                              generator=generator).mask
        return mask.to(device)

    def encode_patches(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, L, D) of the encoder run with the masked patches replaced."""
        tokens = self.encoder(images, mask=mask)
        return tokens[:, self.encoder.num_prefix_tokens:]


def init_head(head: nn.Linear) -> nn.Linear:
    """Truncated-normal(0.02) weights and zero bias, as the BEiT and SimMIM heads."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head
