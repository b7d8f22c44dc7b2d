"""Fashion-MNIST IDX files -> a ``save_to_disk`` DatasetDict that ``data.path`` reads.

    python scripts/prepare_fmnist.py [--src ../shared/data/fashion-mnist] [--out runs/data/fmnist]

Writes ``train`` (60,000) and ``test`` (10,000) splits with an ``image`` column (28x28 grayscale
PNG) and a ``label`` ClassLabel carrying the ten class names, in the official order. The output
lives under ``runs/`` (ignored by git); the data is never committed.
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


def build(src: Path, out: Path) -> None:
    import datasets

    missing = [f for pair in FILES.values() for f in pair if not (src / f).is_file()]
    if missing:
        sys.exit(f"prepare_fmnist: {src} lacks {', '.join(missing)} (the Fashion-MNIST IDX files; "
                 "see shared/data/README.md or pass --src)")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(src / images_file, 2051, 16)
        labels = read_idx(src / labels_file, 2049, 8)
        if len(images) != len(labels):
            sys.exit(f"prepare_fmnist: {split}: {len(images)} images but {len(labels)} labels")
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
    args = p.parse_args()
    build(args.src, args.out)


if __name__ == "__main__":
    main()
