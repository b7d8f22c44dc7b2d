"""Where detection images and boxes come from: COCO JSON, YOLO txt, a Hugging Face dataset with a
box column, or the built-in synthetic shapes.

Every source answers ``len()``, ``classes`` (names, contiguous label order), ``category_ids``
(the dataset's own id of each label, used in COCO files), ``annotations(i)`` (boxes without
decoding the image) and ``load(i) -> (PIL image, Annotations, path)``. Boxes are ``xyxy`` in the
original image's pixels. Images without objects are kept (all-background images); crowd regions
are kept with ``iscrowd`` so evaluation can ignore them; degenerate boxes (no width or height)
are dropped and listed in ``issues``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mim.data.annotation_checks import read_coco_instances, read_yolo_rows
from mim.errors import ConfigError
from mim.data.sources import (IMAGE_EXTS, UnreadableImage, _find_image_column, _pick_split,
                              decode_image, load_local, to_rgb)
from mim.data.synthetic import CLASSES as SHAPE_CLASSES
from mim.data.synthetic import draw_shape
from mim.typed_config import load_yaml, read_text


@dataclass
class Annotations:
    """One image's objects: boxes (N, 4) xyxy pixels, labels (N,) contiguous class indices,
    iscrowd (N,) bool, area (N,) (COCO's segment area when known, else box area)."""

    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray


def make_annotations(image_id: int, width: int, height: int, boxes: Any, labels: Any,
                     iscrowd: Any = None, area: Any = None, issues: list[str] | None = None,
                     where: str = "") -> Annotations:
    """Clip boxes to the image and drop the degenerate ones (recorded in ``issues``)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(b)
    lab = np.asarray(labels, dtype=np.int64).reshape(n)
    crowd = np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool).reshape(n)
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    if issues is not None and not ok.all():
        issues.append(f"{where}: {int((~ok).sum())} degenerate box(es) dropped")
    box_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ar = box_area if area is None else np.asarray(area, np.float32).reshape(n)
    return Annotations(image_id, int(width), int(height), b[ok], lab[ok], crowd[ok], ar[ok])


def xywh_to_xyxy(b: Any) -> np.ndarray:
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


class DetectionSource:
    """Shared behaviour; subclasses set ``classes``, ``category_ids`` and implement
    ``annotations`` and ``_image``."""

    classes: list[str]
    category_ids: list[int]

    def __init__(self) -> None:
        self.issues: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def annotations(self, index: int) -> Annotations:
        raise NotImplementedError

    def _image(self, index: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, Annotations, str]:
        img, path = self._image(index)
        return img, self.annotations(index), path


def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
        raise UnreadableImage(path, f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e


def _image_dir(root: Path, split: str) -> Path:
    for d in (root / "images" / split, root / split):
        if d.is_dir():
            return d
    raise ConfigError(f"config key 'data.path': no image folder for split '{split}' "
                      f"(looked for {root / 'images' / split} and {root / split})")


class CocoSource(DetectionSource):
    """``<path>/annotations/instances_<split>.json`` with images in ``<path>/images/<split>/``
    or ``<path>/<split>/``; category ids are kept, labels follow the sorted category ids."""

    def __init__(self, root: str, split: str) -> None:
        super().__init__()
        from pycocotools.coco import COCO

        r = Path(root)
        ann = r / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise ConfigError(f"config key 'data.path': no COCO annotation file {ann} "
                              f"(data.format=coco expects annotations/instances_<split>.json)")
        gt, self._bad = read_coco_instances(ann)  # unusable annotations: listed, skipped
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = gt
            self.coco.createIndex()
        self.image_dir = _image_dir(r, split)
        self.image_ids = sorted(self.coco.getImgIds())
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.classes = [c["name"] for c in cats]
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, index: int) -> Annotations:
        img_id = self.image_ids[index]
        self.issues.extend(self._bad.get(img_id, []))
        info = self.coco.imgs[img_id]
        anns = self.coco.imgToAnns.get(img_id, [])
        return make_annotations(
            img_id, info["width"], info["height"], xywh_to_xyxy([a["bbox"] for a in anns]),
            [self._label[a["category_id"]] for a in anns], [a.get("iscrowd", 0) for a in anns],
            [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], self.issues,
            info.get("file_name", str(img_id)))

    def _image(self, index: int) -> tuple[Image.Image, str]:
        path = str(self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"])
        return _open(path), path


def _yolo_classes(root: Path) -> list[str]:
    names: Any = None
    if (root / "classes.txt").is_file():
        names = [ln.strip() for ln in read_text(root / "classes.txt", "YOLO class file")
                 .splitlines() if ln.strip()]
    elif (root / "data.yaml").is_file():
        spec = load_yaml(root / "data.yaml", "YOLO data file")
        names = spec.get("names") if isinstance(spec, dict) else None
        names = [names[k] for k in sorted(names)] if isinstance(names, dict) else names
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ConfigError(f"config key 'data.path': {root} has neither classes.txt nor data.yaml "
                      "with a non-empty 'names' list or mapping (YOLO class names)")


class YoloSource(DetectionSource):
    """``<path>/images/<split>/*.jpg`` with ``<path>/labels/<split>/<stem>.txt`` lines
    ``class cx cy w h`` (normalised); an image without a label file has no objects. Image ids
    are 1 + the index in file-name order; category ids are 1 + the class index."""

    def __init__(self, root: str, split: str) -> None:
        super().__init__()
        r = Path(root)
        self.image_dir = _image_dir(r, split)
        self.label_dir = r / "labels" / split
        self.files = sorted(f for f in self.image_dir.iterdir()
                            if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if not self.files:
            raise ConfigError(f"config key 'data.path': no images in {self.image_dir}")
        self.classes = _yolo_classes(r)
        self.category_ids = list(range(1, len(self.classes) + 1))
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            try:
                with Image.open(self.files[index]) as im:  # reads the header only
                    self._sizes[index] = im.size
            except Exception as e:  # noqa: BLE001
                raise UnreadableImage(str(self.files[index]), str(e)[:300]) from e
        return self._sizes[index]

    def annotations(self, index: int) -> Annotations:
        w, h = self._size(index)
        label_file = self.label_dir / (self.files[index].stem + ".txt")
        rows = []
        if label_file.is_file():
            for c, cx, cy, bw, bh in read_yolo_rows(label_file, len(self.classes), self.issues):
                rows.append((c, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                             (cy + bh / 2) * h))
        labels = [r[0] for r in rows]
        return make_annotations(index + 1, w, h, [r[1:] for r in rows], labels,
                                issues=self.issues, where=str(label_file))

    def _image(self, index: int) -> tuple[Image.Image, str]:
        path = str(self.files[index])
        img = _open(path)
        self._sizes[index] = img.size
        return img, path


class HFDetectionSource(DetectionSource):
    """A ``datasets.Dataset`` with an image column and an objects column holding boxes
    (``data.bbox_key``, pixels, ``data.bbox_format``) and categories (``data.category_key``,
    a ClassLabel gives the names); optional ``iscrowd`` and ``area`` keys are used."""

    def __init__(self, ds: Any, cfg: Any) -> None:
        super().__init__()
        import datasets

        self.image_column = cfg.image_column or _find_image_column(ds)
        self.objects_column, self.bbox_key, self.category_key = (
            cfg.objects_column, cfg.bbox_key, cfg.category_key)
        self.bbox_format = cfg.bbox_format
        if self.objects_column not in ds.column_names:
            raise ConfigError(f"config key 'data.objects_column': no column "
                              f"'{self.objects_column}' (columns: {ds.column_names})")
        feature = ds.features[self.image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds = ds
        obj = ds.features[self.objects_column]
        obj = getattr(obj, "feature", obj)  # List({...}) or {...: List(...)}
        cat = obj.get(self.category_key) if isinstance(obj, dict) else None
        if cat is None:
            raise ConfigError(f"config key 'data.category_key': the objects column has no "
                              f"'{self.category_key}' entry")
        cat = getattr(cat, "feature", cat)
        if isinstance(cat, datasets.ClassLabel):
            self.classes = list(cat.names)
        else:
            self.classes = [f"class_{i}" for i in range(self._largest_category() + 1)]
        self.category_ids = list(range(1, len(self.classes) + 1))
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.ds)

    def _largest_category(self) -> int:
        try:
            return int(max((max(r) for r in (self._objects(i)[1] for i in range(len(self.ds)))
                            if len(r)), default=0))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"config key 'data.category_key': the '{self.category_key}' "
                              f"entries are not integer class ids ({type(e).__name__})") from None

    def _objects(self, index: int) -> tuple[list, list, list | None, list | None]:
        obj = self.ds[int(index)][self.objects_column]
        if isinstance(obj, list):  # a list of per-object dicts
            obj = {k: [o[k] for o in obj] for k in (obj[0] if obj else {})}
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: d)
        return (get(self.bbox_key, []) or [], get(self.category_key, []) or [],
                get("iscrowd"), get("area"))

    def annotations(self, index: int) -> Annotations:
        w, h = self._size(index)
        try:
            boxes, cats, crowd, area = self._objects(index)
            if self.bbox_format == "xywh":
                boxes = xywh_to_xyxy(boxes)
            return make_annotations(index + 1, w, h, boxes, cats, crowd, area, self.issues,
                                    f"row {index}")
        except (KeyError, TypeError, ValueError, IndexError) as e:  # a malformed objects cell
            self.issues.append(f"row {index}: objects column '{self.objects_column}' is not "
                               f"boxes and categories ({type(e).__name__}); its boxes skipped")
            return make_annotations(index + 1, w, h, [], [])

    def _size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            self._sizes[index] = self._image(index)[0].size
        return self._sizes[index]

    def _image(self, index: int) -> tuple[Image.Image, str]:
        cell = self.ds[int(index)][self.image_column]
        path = (cell.get("path") if isinstance(cell, dict) else None) or f"row:{index}"
        try:
            img = decode_image(cell)
        except Exception as e:  # noqa: BLE001
            raise UnreadableImage(path, f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e
        self._sizes[index] = img.size
        return img, path


class SyntheticDetection(DetectionSource):
    """The built-in detection set: 0-3 non-overlapping shapes (10 kinds) on a gradient canvas
    whose sides vary in [0.6, 1] x ``image_size``, with boxes measured from the drawn pixels.
    Image ``i`` depends only on ``(seed, i)``; about one image in ten is empty."""

    def __init__(self, size: int, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.size, self.image_size, self.seed = size, image_size, seed
        self.classes = list(SHAPE_CLASSES)
        self.category_ids = list(range(1, len(self.classes) + 1))

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> tuple[Image.Image, Annotations]:
        rng = np.random.default_rng([self.seed, index, 0xDE7])
        s = self.image_size
        w, h = (int(s * f) for f in rng.uniform(0.6, 1.0, 2))
        c0, c1 = rng.integers(0, 256, (2, 3))
        t = np.linspace(0.0, 1.0, w)[None, :, None]
        img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8).repeat(h, axis=0))
        taken = np.zeros((h, w), bool)
        boxes, labels = [], []
        n = int(rng.choice(4, p=[0.1, 0.4, 0.3, 0.2]))
        for _ in range(n):
            for _attempt in range(10):
                half = min(w, h) * rng.uniform(0.1, 0.22)
                cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
                x0, y0, x1, y1 = (int(v) for v in (cx - half, cy - half, cx + half + 1,
                                                   cy + half + 1))
                if not taken[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1].any():
                    break
            else:
                continue
            label = int(rng.integers(len(self.classes)))
            mask = Image.new("L", (w, h), 0)
            draw_shape(ImageDraw.Draw(mask), self.classes[label], cx, cy, half, (255,))
            bbox = mask.getbbox()  # exact extent of the drawn pixels, (x0, y0, x1, y1)
            if bbox is None:
                continue
            color = tuple(int(v) for v in (255 - (c0 + c1) // 2 + rng.integers(-40, 41, 3)) % 256)
            img.paste(Image.new("RGB", (w, h), color), mask=mask)
            taken[y0:y1, x0:x1] = True
            boxes.append(bbox)
            labels.append(label)
        return img, make_annotations(index + 1, w, h, boxes, labels)

    def annotations(self, index: int) -> Annotations:
        return self.render(index)[1]

    def load(self, index: int) -> tuple[Image.Image, Annotations, str]:
        img, ann = self.render(index)
        return img, ann, f"synthetic-det:{index}"


def build_detection_source(cfg: Any, image_size: int, seed: int, split: str) -> DetectionSource:
    """The source ``cfg`` (a DetectDataConfig) names, for ``split``."""
    if cfg.synthetic:
        if split == cfg.split:
            return SyntheticDetection(cfg.synthetic_size, image_size, seed)
        return SyntheticDetection(max(cfg.synthetic_size // 4, 32), image_size, seed + 10_000)
    if cfg.format == "coco":
        return CocoSource(cfg.path, split) if cfg.path else _need_path("coco")
    if cfg.format == "yolo":
        return YoloSource(cfg.path, split) if cfg.path else _need_path("yolo")
    if cfg.path:
        return HFDetectionSource(load_local(cfg.path, split), cfg)
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'data.name': cannot load '{cfg.name}' split '{split}' "
                          f"({str(e).splitlines()[0]})") from None
    return HFDetectionSource(_pick_split(ds, split, cfg.name), cfg)


def _need_path(fmt: str) -> DetectionSource:
    raise ConfigError(f"data.format={fmt} reads a local folder: set 'data.path'")


def coco_ground_truth(source: DetectionSource) -> dict[str, Any]:
    """The source's boxes as a COCO instances dict (the ``ground_truth.json`` of a run)."""
    images, anns = [], []
    for i in range(len(source)):
        a = source.annotations(i)
        images.append({"id": a.image_id, "width": a.width, "height": a.height})
        for box, label, crowd, area in zip(a.boxes, a.labels, a.iscrowd, a.area):
            x0, y0, x1, y1 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": a.image_id,
                         "category_id": source.category_ids[int(label)],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                         "iscrowd": int(crowd)})
    cats = [{"id": cid, "name": name} for cid, name in zip(source.category_ids, source.classes)]
    return {"images": images, "annotations": anns, "categories": cats}
