"""Data: image sources (hub, folder, synthetic), transforms, reproducible sharded loading."""

from mim.data.loader import EpochLoader, build_epoch_loader, sample_seed
from mim.data.sources import build_source, decode_image, to_rgb
from mim.data.transforms import eval_transform, pretrain_transform

__all__ = ["EpochLoader", "build_epoch_loader", "build_source", "decode_image", "eval_transform",
           "pretrain_transform", "sample_seed", "to_rgb"]
