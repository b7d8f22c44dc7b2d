"""Training and validation sources of a labeled set, with a held-out split when it has none.

A dataset without its validation split gets a class-stratified hold-out of ``val_fraction`` of
the training split instead of an error. The hold-out is drawn from ``val_split_seed`` (not the
run's seed), so every run on the same data (every cell of a ``mim compare``, every seed) is scored
on the same images; ``holdout_record`` lists them for the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mim.data.labels import DetectionSubset, SubsetSource, source_labels
from mim.data.loader import sample_seed
from mim.data.sources import build_source
from mim.errors import ConfigError


def has_split(d: Any, split: str) -> bool:
    """Whether the source ``d`` names (a ``DataConfig``) holds ``split``."""
    if d.synthetic:
        return True
    fmt = getattr(d, "format", "hf")  # detection data
    if fmt == "coco":
        return (Path(d.path) / "annotations" / f"instances_{split}.json").is_file()
    if fmt == "yolo":
        return any((Path(d.path) / sub / split).is_dir() for sub in ("images", "."))
    if d.path:
        p = Path(d.path)
        if (p / "dataset_dict.json").is_file():
            import json

            return split in json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if p.is_dir() and (p / split).is_dir():
            return True
        return any(f.stem == split or f.name.startswith(f"{split}-")
                   or split in f.relative_to(p).parts[:-1] for f in p.rglob("*.parquet"))
    import datasets

    try:
        return split in datasets.get_dataset_split_names(d.name)
    except Exception:  # noqa: BLE001 - offline or unknown: let the load say what is wrong
        return True


def stratified_holdout(labels: list[int], fraction: float, seed: int
                       ) -> tuple[list[int], list[int]]:
    """(kept, held out) sorted indices: ``round(fraction * n_c)`` of every class ``c`` held out
    (at least 1 where the class has 2 or more), each class from its own generator seeded by
    ``(seed, c)``."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    held: list[int] = []
    for c, idx in sorted(by_class.items()):
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        g = torch.Generator().manual_seed(sample_seed(seed, c, 0x4E1D))
        held += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


@dataclass
class TrainVal:
    train: Any
    val: Any
    held_out: list[int] = field(default_factory=list)  # indices of ``split`` held out, if any


def train_val_sources(d: Any, image_size: int, seed: int, fraction: float,
                      split_seed: int) -> TrainVal:
    """``d.split`` and ``d.val_split`` of the data, or ``d.split`` cut by a class-stratified,
    seeded hold-out of ``fraction`` when the data has no ``d.val_split``."""
    full = build_source(d, image_size=image_size, seed=seed)
    if has_split(d, d.val_split):
        return TrainVal(full, build_source(d, image_size=image_size, seed=seed, split=d.val_split))
    labels = source_labels(full)
    if not labels or min(labels) < 0:
        raise ConfigError(f"the data has no '{d.val_split}' split and no labels to hold out a "
                          "stratified validation set from")
    keep, held = stratified_holdout(labels, fraction, split_seed)
    return TrainVal(SubsetSource(full, keep), SubsetSource(full, held), held)


def holdout_record(tv: TrainVal, d: Any, fraction: float, split_seed: int) -> dict[str, Any]:
    """What ``val_split.json`` says: which images of ``d.split`` were held out, and why."""
    source = tv.val.source
    paths = [_path_of(source, i) for i in tv.held_out]
    return {"split": d.split, "missing_split": d.val_split, "val_fraction": fraction,
            "val_split_seed": split_seed, "images": len(tv.held_out), "indices": tv.held_out,
            "files": paths if all(paths) else []}


def _path_of(source: Any, index: int) -> str:
    """The file of image ``index`` where the source knows it without decoding ("" otherwise)."""
    if getattr(source, "_images", None) is not None:  # a datasets table
        cell = source._images[int(index)].as_py()
        return (cell.get("path") or "") if isinstance(cell, dict) else str(cell)
    if hasattr(source, "files"):  # YOLO
        return str(source.files[index])
    if hasattr(source, "coco"):
        return str(source.image_dir / source.coco.imgs[source.image_ids[index]]["file_name"])
    return ""


def detection_train_val(d: Any, image_size: int, seed: int) -> TrainVal:
    """As :func:`train_val_sources` for detection data; an image is stratified by its most
    frequent class (images without objects form one more group)."""
    from mim.data.detection_sources import build_detection_source

    full = build_detection_source(d, image_size, seed, d.split)
    if has_split(d, d.val_split):
        return TrainVal(full, build_detection_source(d, image_size, seed, d.val_split))
    groups = []
    for i in range(len(full)):
        labels = [int(v) for v in full.annotations(i).labels]
        groups.append(max(set(labels), key=lambda c: (labels.count(c), -c)) if labels else -1)
    full.issues.clear()  # read here for the grouping; the training loop lists its own
    keep, held = stratified_holdout(groups, d.val_fraction, d.val_split_seed)
    return TrainVal(DetectionSubset(full, keep), DetectionSubset(full, held), held)
