"""Fashion-MNIST garments on larger canvases -> a COCO-format detection set that ``data.path``
reads with ``data.format=coco``.

    python scripts/make_fmnist_detection.py [--src ../shared/data/fashion-mnist]
        [--out runs/data/fmnist-det] [--canvas 56] [--train 4000] [--val 500]

Each canvas (grayscale, ``--canvas`` px square) carries 0-3 garments, each a Fashion-MNIST image
scaled by a random factor in [``--min-scale``, ``--max-scale``] and placed where it does not
touch another one; the background is faint noise. A garment's box is the exact extent of its
nonzero pixels after scaling, its ``area`` the number of those pixels (COCO's segment area).
Training canvases use the 60,000 training images, validation canvases the 10,000 test images,
so no garment is in both. The output goes under ``runs/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEFAULT_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """IDX images (N, 28, 28) or labels (N,), as in the Fashion-MNIST README."""
    raw = gzip.open(path).read()
    magic, count = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == 2051:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8)[:count]
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic})")


def make_canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int,
                scales: tuple[float, float]) -> tuple[np.ndarray, list[dict]]:
    canvas = rng.integers(0, 24, (size, size)).astype(np.uint8)
    taken = np.zeros((size, size), bool)
    objects = []
    for _ in range(int(rng.choice(4, p=[0.05, 0.35, 0.35, 0.25]))):
        k = int(rng.integers(len(images)))
        side = max(6, int(round(28 * rng.uniform(*scales))))
        garment = np.asarray(Image.fromarray(images[k]).resize((side, side), Image.BILINEAR))
        ys, xs = np.nonzero(garment > 0)
        if len(ys) == 0:
            continue
        garment = garment[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # tight crop
        h, w = garment.shape
        for _attempt in range(20):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if not taken[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1].any():
                break
        else:
            continue
        on = garment > 0
        region = canvas[y:y + h, x:x + w]
        region[on] = np.maximum(region[on], garment[on])
        taken[y:y + h, x:x + w] = True
        objects.append({"category_id": int(labels[k]) + 1, "bbox": [x, y, w, h],
                        "area": int(on.sum()), "iscrowd": 0})
    return canvas, objects


def build(src: Path, out: Path, size: int, counts: dict[str, int], scales: tuple[float, float],
          seed: int) -> None:
    missing = [f for pair in FILES.values() for f in pair if not (src / f).is_file()]
    if missing:
        sys.exit(f"make_fmnist_detection: {src} lacks {', '.join(missing)} (the Fashion-MNIST "
                 "IDX files; see shared/data/README.md or pass --src)")
    for split, (images_file, labels_file) in FILES.items():
        images, labels = read_idx(src / images_file), read_idx(src / labels_file)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
        for i in range(counts[split]):
            canvas, objects = make_canvas(rng, images, labels, size, scales)
            name = f"{i:06d}.png"
            Image.fromarray(canvas).save(folder / name)
            coco["images"].append({"id": i + 1, "file_name": name, "width": size,
                                   "height": size})
            for obj in objects:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1,
                                            "image_id": i + 1, **obj})
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        print(f"{split}: {counts[split]} canvases, {len(coco['annotations'])} garments")
    print(f"wrote {out} (use data.path={out} data.format=coco data.split=train "
          "data.val_split=val)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder of the four .gz files")
    p.add_argument("--out", type=Path, default=Path("runs/data/fmnist-det"))
    p.add_argument("--canvas", type=int, default=56, help="canvas side in pixels")
    p.add_argument("--train", type=int, default=4000, help="training canvases")
    p.add_argument("--val", type=int, default=500, help="validation canvases")
    p.add_argument("--min-scale", type=float, default=0.5, help="garment scale range, low")
    p.add_argument("--max-scale", type=float, default=1.0, help="garment scale range, high")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not 0 < a.min_scale <= a.max_scale or 28 * a.max_scale > a.canvas:
        sys.exit("make_fmnist_detection: need 0 < --min-scale <= --max-scale and garments "
                 "(28 px x --max-scale) no larger than --canvas")
    build(a.src, a.out, a.canvas, {"train": a.train, "val": a.val}, (a.min_scale, a.max_scale),
          a.seed)


if __name__ == "__main__":
    main()
