"""Image transforms: MAE pretraining augmentation, timm's fine-tuning augmentation and the
plain evaluation view."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T


class ToNormalizedTensor:
    """PIL image -> normalised float tensor (C, H, W): the values of ``ToTensor`` + ``Normalize``
    bit for bit (the same divide, subtract, divide, in place on one buffer instead of three
    allocations; about 0.08 ms less per 224 px sample, see docs/benchmarks.md)."""

    def __init__(self, mean, std) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._fallback = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode not in ("RGB", "L"):
            return self._fallback(img)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))
        x = x.unsqueeze(-1) if x.ndim == 2 else x
        x = x.permute(2, 0, 1).contiguous().to(torch.float32)
        return x.div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"{type(self).__name__}(mean={mean}, std={std})"


def pretrain_transform(img_size: int, crop_scale: tuple[float, float], mean, std) -> T.Compose:
    """RandomResizedCrop(scale) + horizontal flip + normalise, as MAE pretraining."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        ToNormalizedTensor(mean, std),
    ])


def eval_transform(img_size: int, mean, std, crop_pct: float = 1.0) -> T.Compose:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalise."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        ToNormalizedTensor(mean, std),
    ])


def finetune_transform(img_size: int, crop_scale: tuple[float, float], mean, std,
                       hflip: float = 0.5, auto_augment: str = "", reprob: float = 0.0) -> Any:
    """timm's training transform as MAE fine-tuning: RandomResizedCrop(scale), flip, optional
    RandAugment (``auto_augment``) and random erasing (``reprob``), normalise."""
    return create_transform(img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip,
                            color_jitter=0.0, auto_augment=auto_augment or None,
                            interpolation="bicubic", mean=tuple(mean), std=tuple(std),
                            re_prob=reprob, re_mode="pixel", re_count=1)
