"""Fashion-MNIST IDX files -> a ``save_to_disk`` DatasetDict that ``data.path`` reads.

    python scripts/prepare_fmnist.py [--src ../shared/data/fashion-mnist] [--out runs/data/fmnist]
    python scripts/prepare_fmnist.py --classes 5,6,7,8,9 --out runs/data/fmnist-5to9
    python scripts/prepare_fmnist.py --max-train 20000 --out runs/data/fmnist-20k

Writes ``train`` (60,000) and ``test`` (10,000) splits with an ``image`` column (28x28 grayscale
PNG) and a ``label`` ClassLabel carrying the ten class names, in the official order. With
``--classes``, only the images of those classes, relabelled 0..k-1 in the order given (the
ClassLabel names follow), so two disjoint class sets make a labeled source task and a target task.
With ``--max-train N``, only the first N training images (a smaller labeled source, CPU-sized).
The output lives under ``runs/`` (ignored by git); the data is never committed.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEFAULT_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"


def read_idx(path: Path, magic: int, offset: int) -> np.ndarray:
    raw = gzip.open(path).read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    count = int.from_bytes(raw[4:8], "big")
    data = np.frombuffer(raw, np.uint8, offset=offset)
    return data.reshape(count, 28, 28) if magic == 2051 else data[:count]


def build(src: Path, out: Path, classes: list[int] | None = None, max_train: int = 0) -> None:
    import datasets

    missing = [f for pair in FILES.values() for f in pair if not (src / f).is_file()]
    if missing:
        sys.exit(f"prepare_fmnist: {src} lacks {', '.join(missing)} (the Fashion-MNIST IDX files; "
                 "see shared/data/README.md or pass --src)")
    classes = list(range(len(CLASSES))) if classes is None else classes
    if len(set(classes)) != len(classes) or not all(0 <= c < len(CLASSES) for c in classes):
        sys.exit(f"prepare_fmnist: --classes must be distinct values in 0..9, got {classes}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=[CLASSES[c] for c in classes])})
    relabel = np.full(len(CLASSES), -1, np.int64)
    relabel[classes] = np.arange(len(classes))
    splits = {}
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(src / images_file, 2051, 16)
        labels = read_idx(src / labels_file, 2049, 8)
        if len(images) != len(labels):
            sys.exit(f"prepare_fmnist: {split}: {len(images)} images but {len(labels)} labels")
        keep = relabel[labels] >= 0
        if split == "train" and max_train:
            keep &= np.arange(len(labels)) < max_train
        images, labels = images[keep], relabel[labels[keep]]
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images), "label": labels.astype(np.int64).tolist()}, features=features)
        print(f"{split}: {len(labels)} images, per class {np.bincount(labels).tolist()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    print(f"wrote {out} (use data.path={out} data.split=train data.val_split=test)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder of the four .gz files")
    p.add_argument("--out", type=Path, default=Path("runs/data/fmnist"))
    p.add_argument("--classes", help="comma list of class ids (0-9) to keep, relabelled in order")
    p.add_argument("--max-train", type=int, default=0,
                   help="keep only the first N training images (0 = all)")
    args = p.parse_args()
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    build(args.src, args.out, classes, args.max_train)


if __name__ == "__main__":
    main()
