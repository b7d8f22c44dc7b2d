"""Image transforms: MAE pretraining augmentation, timm's fine-tuning augmentation and the
plain evaluation view."""

from __future__ import annotations

from typing import Any

from timm.data import create_transform
from torchvision import transforms as T


def pretrain_transform(img_size: int, crop_scale: tuple[float, float], mean, std) -> T.Compose:
    """RandomResizedCrop(scale) + horizontal flip + normalise, as MAE pretraining."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(img_size: int, mean, std, crop_pct: float = 1.0) -> T.Compose:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalise."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, crop_scale: tuple[float, float], mean, std,
                       hflip: float = 0.5, auto_augment: str = "", reprob: float = 0.0) -> Any:
    """timm's training transform as MAE fine-tuning: RandomResizedCrop(scale), flip, optional
    RandAugment (``auto_augment``) and random erasing (``reprob``), normalise."""
    return create_transform(img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip,
                            color_jitter=0.0, auto_augment=auto_augment or None,
                            interpolation="bicubic", mean=tuple(mean), std=tuple(std),
                            re_prob=reprob, re_mode="pixel", re_count=1)
