"""Image transforms (torchvision): MAE pretraining augmentation and the plain evaluation view."""

from __future__ import annotations

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
