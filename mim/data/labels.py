"""Labels of a source: class names, and the subset that ``data.label_fraction`` fine-tunes on (the
semi-supervised protocol of few-label evaluations, e.g. 1% / 10%): class-stratified images for
classification, a class-covering fraction of the annotated images for detection."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mim.data.loader import sample_seed
from mim.errors import ConfigError


def source_labels(source: Any) -> list[int]:
    if not hasattr(source, "labels"):
        raise ConfigError(f"the data source {type(source).__name__} has no labels")
    return source.labels()


def class_names(source: Any, num_classes: int) -> list[str]:
    names = getattr(source, "classes", None)
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def stratified_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``round(fraction * n_c)`` (at least 1) samples of every class ``c``.

    Each class draws from its own generator seeded by ``(seed, c)``: the same seed gives the same
    subset, whatever the other classes hold.
    """
    if fraction >= 1.0:
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    chosen: list[int] = []
    for c, idx in sorted(by_class.items()):
        k = max(1, int(round(fraction * len(idx))))
        g = torch.Generator().manual_seed(sample_seed(seed, c, 0x1ABE1))
        pick = torch.randperm(len(idx), generator=g)[:k].tolist()
        chosen += [idx[j] for j in pick]
    return sorted(chosen)


class SubsetSource:
    """The samples ``indices`` of ``source``, renumbered 0..len-1 (labels and classes kept)."""

    def __init__(self, source: Any, indices: list[int]) -> None:
        self.source, self.indices = source, list(indices)
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> list[int]:
        all_labels = source_labels(self.source)
        return [all_labels[i] for i in self.indices]

    def load(self, index: int) -> tuple[Image.Image, int | None, str]:
        return self.source.load(self.indices[index])


def num_classes_of(source: Any, configured: int = 0) -> int:
    """The class count for supervised pretraining: ``configured`` or 1 + the largest label; a clear
    error when the data has no labels (an image folder without classes, a dataset without a
    label column)."""
    try:
        labels = source_labels(source)
    except ConfigError as e:
        raise ConfigError(f"method.name=supervised needs labels: {e}") from None
    if not labels or min(labels) < 0:
        raise ConfigError("method.name=supervised needs labels, and the training data has none "
                          "(or negative ones); point 'data' at a labeled set (or set "
                          "'data.label_column')")
    n = configured or len(getattr(source, "classes", None) or []) or max(labels) + 1
    if max(labels) >= n:
        raise ConfigError(f"the training labels span [0, {max(labels)}] but "
                          f"'method.num_classes' is {n}")
    return n


def covering_subset(image_classes: list[list[int]], fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``round(fraction * n)`` (at least 1) of the ``n`` annotated images, and
    the same fraction of the images without objects, drawn from ``seed`` alone.

    ``image_classes[i]`` lists the classes of image ``i``'s boxes. In one seeded order of the
    images, a greedy cover first takes the image adding the most classes not yet chosen (the
    earliest on ties) until every class of the full set is in a chosen image or the quota is
    reached; the rest of the quota is the next images of the order.
    """
    if fraction >= 1.0:
        return list(range(len(image_classes)))
    g = torch.Generator().manual_seed(sample_seed(seed, 0, 0xDE7EC7))
    order = torch.randperm(len(image_classes), generator=g).tolist()
    annotated = [i for i in order if image_classes[i]]
    empty = [i for i in order if not image_classes[i]]
    quota = max(1, int(round(fraction * len(annotated))))
    classes = {c for cs in image_classes for c in cs}
    chosen: list[int] = []
    covered: set[int] = set()
    while len(chosen) < quota and covered != classes:
        best = max(annotated, key=lambda i: len(set(image_classes[i]) - covered))
        chosen.append(best)
        covered |= set(image_classes[best])
    taken = set(chosen)
    chosen += [i for i in annotated if i not in taken][:quota - len(chosen)]
    chosen += empty[:int(round(fraction * len(empty)))]
    return sorted(chosen)


class DetectionSubset:
    """The images ``indices`` of a detection source, renumbered 0..len-1; classes and category
    ids are the source's. Label issues found while reading an image move to this subset's own
    ``issues``, so a training and a validation subset of one source list theirs apart."""

    def __init__(self, source: Any, indices: list[int]) -> None:
        self.source, self.indices, self.issues = source, list(indices), []
        self.classes, self.category_ids = source.classes, source.category_ids

    def __len__(self) -> int:
        return len(self.indices)

    def _take_issues(self, seen: int) -> None:
        self.issues.extend(self.source.issues[seen:])
        del self.source.issues[seen:]

    def annotations(self, index: int) -> Any:
        seen = len(self.source.issues)
        out = self.source.annotations(self.indices[index])
        self._take_issues(seen)
        return out

    def load(self, index: int) -> tuple[Image.Image, Any, str]:
        seen = len(self.source.issues)
        out = self.source.load(self.indices[index])
        self._take_issues(seen)
        return out
