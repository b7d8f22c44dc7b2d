"""A labeled set made ready once, probed with any encoder: k-NN top-1 (and a linear probe)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mim.config.probe import ProbeDataConfig
from mim.data import eval_transform
from mim.data.labels import source_labels
from mim.data.splits import TrainVal, holdout_record, train_val_sources
from mim.errors import ConfigError
from mim.models.features import embed, shard_loader
from mim.models.encoder import MaskedEncoder
from mim.probe.classifiers import knn_top1, linear_probe_top1


@dataclass
class ProbeResult:
    top1: float  # k-NN
    k: int
    images: int  # embedded: memory bank + evaluated
    train_images: int
    val_images: int
    seconds: float  # wall time of embedding and classifying, on this process
    linear_top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"top1": round(self.top1, 6), "k": self.k, "images": self.images,
               "train_images": self.train_images, "val_images": self.val_images,
               "seconds": round(self.seconds, 3)}
        if self.linear_top1 is not None:
            out["linear_top1"] = round(self.linear_top1, 6)
        return out


class Probe:
    """The training split of a labeled set is the k-NN memory bank, its validation split (or a
    seeded, class-stratified hold-out) is what is classified. Images are shown as the model sees
    them at evaluation: resized, centre-cropped, normalised with ``mean``/``std``."""

    def __init__(self, d: ProbeDataConfig, image_size: int, mean: Any, std: Any,
                 seed: int = 0) -> None:
        self.d = d
        self.sets: TrainVal = train_val_sources(d, image_size, seed, d.val_fraction,
                                                d.val_split_seed)
        self.train_labels = _labels(self.sets.train, d.split)
        self.val_labels = _labels(self.sets.val, d.val_split)
        self.num_classes = int(max(self.train_labels.max(), self.val_labels.max())) + 1
        tf = eval_transform(image_size, mean, std)
        self.loaders = [shard_loader(s, tf, d.batch_size, d.num_workers)
                        for s in (self.sets.train, self.sets.val)]

    def holdout(self) -> dict[str, Any] | None:
        """Which images were held out as the validation split (None: the data had one)."""
        if not self.sets.held_out:
            return None
        return holdout_record(self.sets, self.d, self.d.val_fraction, self.d.val_split_seed)

    def run(self, encoder: MaskedEncoder, device: torch.device, k: int = 20,
            temperature: float = 0.07, linear_epochs: int = 0, seed: int = 0,
            autocast: Callable[[], Any] = nullcontext) -> ProbeResult:
        """Every process must call this (the features are gathered across processes)."""
        t0 = time.perf_counter()
        train, val = (embed(encoder, loader, len(labels), device, autocast)
                      for loader, labels in zip(self.loaders, (self.train_labels,
                                                               self.val_labels)))
        top1 = knn_top1(train, self.train_labels, val, self.val_labels, k, temperature,
                        self.num_classes)
        linear = None
        if linear_epochs:
            linear = linear_probe_top1(train, self.train_labels, val, self.val_labels,
                                       linear_epochs, seed, self.num_classes)
        n_train, n_val = len(self.train_labels), len(self.val_labels)
        return ProbeResult(top1, min(k, n_train), n_train + n_val, n_train, n_val,
                           time.perf_counter() - t0, linear)


def _labels(source: Any, split: str) -> torch.Tensor:
    labels = source_labels(source)
    if not labels or min(labels) < 0:
        raise ConfigError(f"the probe needs labeled images; the '{split}' split has none "
                          "(class sub-folders, a label column, or data.synthetic=true)")
    return torch.tensor(labels)
