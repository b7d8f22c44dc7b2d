"""Detection samples to padded batches: box-aware transforms, per-sample seeding, padding + mask.

Images keep their aspect ratio: each is resized to fit in ``img_size`` x ``img_size`` (times a
random scale during training), flipped with its boxes, and a batch is padded at the bottom and
right only up to its largest image, rounded up to ``size_divisibility`` (the coarsest pyramid
stride). ``mask`` (B, H, W) marks the real pixels (True) against the padding (the NestedTensor
idea of DETR); the model uses it to keep padding out of attention and out of the anchors.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from mim.data.loader import EpochLoader, ShardedEpochSampler, TransformedDataset, sample_seed
from mim.data.sources import UnreadableImage


def _labels_and_crowd(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return sample["labels"], sample["iscrowd"]


def detection_transform(img_size: int, train: bool, mean, std, hflip: float = 0.5,
                        scale_range: tuple[float, float] = (1.0, 1.0),
                        min_box_size: float = 1.0) -> v2.Compose:
    """torchvision v2 ops on ``{"image", "boxes", "labels", "iscrowd"}``: flip (train), fit in
    ``img_size`` x ``img_size`` times a random scale in ``scale_range`` (train; 1 at eval),
    clamp boxes to the image, drop boxes under ``min_box_size`` px, normalise."""
    ops: list[Any] = [v2.ToImage()]
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    scales = tuple(scale_range) if train else (1.0, 1.0)
    ops += [
        v2.ScaleJitter((img_size, img_size), scale_range=scales, antialias=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=min_box_size,
                                 labels_getter=_labels_and_crowd),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


class DetectionDataset(TransformedDataset):
    """``source.load(i)`` through the box-aware transform under the per-sample seed
    ``(seed, epoch, i)``; an unreadable image is replaced and reported as in pretraining. Label
    problems the source finds while parsing the sample (dropped boxes, malformed lines) travel
    with it as ``issues``, for the engine to list."""

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)  # see the sampler
        bad = []
        n = len(self.source)
        for attempt in range(16):
            i = (index + attempt * 7919) % n
            known = len(self.source.issues)
            try:
                img, ann, _ = self.source.load(i)
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                continue
            finally:  # this sample's label issues leave with it; the list does not grow
                issues = self.source.issues[known:]
                del self.source.issues[known:]
            sample = {
                "image": img,
                "boxes": tv_tensors.BoundingBoxes(ann.boxes, format="XYXY",
                                                  canvas_size=(img.height, img.width)),
                "labels": torch.as_tensor(ann.labels, dtype=torch.int64),
                "iscrowd": torch.as_tensor(ann.iscrowd, dtype=torch.bool),
            }
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                out = self.transform(sample)
            return {"image": out["image"].as_subclass(torch.Tensor),
                    "boxes": out["boxes"].as_subclass(torch.Tensor).float(),
                    "labels": out["labels"], "iscrowd": out["iscrowd"],
                    "image_id": ann.image_id, "orig_size": (img.height, img.width),
                    "index": i, "bad": bad, "issues": issues}
        raise RuntimeError(f"16 consecutive unreadable samples from index {index}: {bad[:3]}")


def pad_collate(samples: list[dict[str, Any]], size_divisibility: int) -> dict[str, Any]:
    """Pad to the batch's largest image, rounded up to ``size_divisibility``.

    images (B, C, H, W) zero-padded (zero = the mean colour after normalising), mask (B, H, W)
    True on real pixels, sizes/orig_sizes (B, 2) as (h, w) after/before resizing.
    """
    d = size_divisibility
    H = -(-max(s["image"].shape[1] for s in samples) // d) * d
    W = -(-max(s["image"].shape[2] for s in samples) // d) * d
    B, C = len(samples), samples[0]["image"].shape[0]
    images = torch.zeros(B, C, H, W)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for b, s in enumerate(samples):
        _, h, w = s["image"].shape
        images[b, :, :h, :w] = s["image"]
        mask[b, :h, :w] = True
    return {
        "images": images,
        "mask": mask,
        "targets": [{"boxes": s["boxes"], "labels": s["labels"], "iscrowd": s["iscrowd"]}
                    for s in samples],
        "sizes": torch.tensor([tuple(s["image"].shape[1:]) for s in samples]),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples]),
        "image_ids": torch.tensor([s["image_id"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "bad": [b for s in samples for b in s["bad"]],
        "issues": [x for s in samples for x in s["issues"]],
    }


def build_detection_loader(source: Any, transform: Any, *, batch_size: int, num_workers: int,
                           rank: int, world_size: int, seed: int, size_divisibility: int,
                           shuffle: bool = True, drop_last: bool = True,
                           pin_memory: bool = False) -> EpochLoader:
    """The pretraining loader's sharded, resumable sampling with detection samples."""
    ds = DetectionDataset(source, transform, seed)
    sampler = ShardedEpochSampler(len(ds), batch_size, rank, world_size, seed, shuffle, drop_last)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=partial(pad_collate, size_divisibility=size_divisibility),
                        pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)
    return EpochLoader(ds, sampler, loader)
