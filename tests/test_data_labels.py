"""data.label_fraction: class-stratified and the same subset for the same seed."""

from collections import Counter

from mim.data.labels import SubsetSource, stratified_subset
from mim.data.synthetic import SyntheticShapes


def test_stratified_and_reproducible():
    labels = [c for c in range(4) for _ in range(100 * (c + 1))]  # 100, 200, 300, 400
    a = stratified_subset(labels, 0.1, seed=3)
    assert Counter(labels[i] for i in a) == {0: 10, 1: 20, 2: 30, 3: 40}
    assert a == stratified_subset(labels, 0.1, seed=3)
    assert a != stratified_subset(labels, 0.1, seed=4)
    tiny = stratified_subset(labels, 0.001, seed=3)  # every class keeps at least one label
    assert Counter(labels[i] for i in tiny) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert stratified_subset(labels, 1.0, seed=3) == list(range(len(labels)))


def test_synthetic_labels_without_drawing_images():
    source = SyntheticShapes(64, 32, seed=5)
    labels = source.labels()
    assert labels == [source.load(i)[1] for i in range(64)]
    keep = stratified_subset(labels, 0.5, seed=0)
    sub = SubsetSource(source, keep)
    assert sub.labels() == [labels[i] for i in keep] and len(sub) == len(keep)
    assert sub.load(0)[2] == f"synthetic:{keep[0]}"
