"""Where images come from: a Hugging Face hub dataset, a local folder, or the synthetic set.

Every source answers ``len()`` and ``load(i) -> (PIL image, label or None, path)``. Images are
decoded here, not by ``datasets``, so that a corrupt file raises in ``load`` and the loader can
skip and count it instead of crashing the run.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from mim.data.config import DataConfig
from mim.data.synthetic import SyntheticShapes
from mim.errors import ConfigError

_EXIF_ORIENTATION = 0x0112


class UnreadableImage(Exception):
    """An image that cannot be decoded; carries its path so the loader can report it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-rotate, then make RGB: grayscale/CMYK/palette/16-bit/RGBA (on black) all become RGB."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype("uint8"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def reduced_decode(img: Image.Image, min_side: int, min_area: int) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale image (PIL ``draft``, decoded in the DCT
    domain, several times faster) when that still has at least ``min_side`` pixels on its short
    side and ``min_area`` pixels in all. A no-op for other formats and for small images."""
    if img.format != "JPEG" or min_side <= 0:
        return
    w, h = img.size
    for s in (8, 4, 2):
        rw, rh = -(-w // s), -(-h // s)
        if min(rw, rh) >= min_side and rw * rh >= min_area:
            img.draft(None, (w // s, h // s))
            return


def decode_image(value: Any, min_side: int = 0, min_area: int = 0) -> Image.Image:
    """Decode an image cell of a ``datasets`` table (``Image(decode=False)`` dict, path, PIL).

    ``min_side``/``min_area`` > 0 allow a reduced-size JPEG decode (:func:`reduced_decode`)."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            img = Image.open(value["path"])
        else:
            raise ValueError("empty image cell")
    elif isinstance(value, (str, Path)):
        img = Image.open(value)
    else:
        raise ValueError(f"cannot decode an image from {type(value).__name__}")
    reduced_decode(img, min_side, min_area)
    img.load()
    return to_rgb(img)


class HFImageSource:
    """A map-style ``datasets.Dataset`` with an image column (and maybe a label column)."""

    def __init__(self, ds: Any, image_column: str = "", label_column: str = "",
                 min_decode: tuple[int, int] = (0, 0)) -> None:
        import datasets

        self.min_decode = min_decode  # (short side, area) a reduced JPEG decode must keep
        self.image_column = image_column or _find_image_column(ds)
        if self.image_column not in ds.column_names:
            raise ConfigError(f"config key 'data.image_column': no column '{self.image_column}' "
                              f"(columns: {ds.column_names})")
        feature = ds.features.get(self.image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.label_column = label_column or next(
            (c for c in ("label", "labels") if c in ds.column_names), "")
        if self.label_column and self.label_column not in ds.column_names:
            raise ConfigError(f"config key 'data.label_column': no column '{self.label_column}'")
        self.classes: list[str] | None = None
        if self.label_column:
            f = ds.features[self.label_column]
            self.classes = list(f.names) if isinstance(f, datasets.ClassLabel) else None
        if getattr(ds, "_indices", None) is not None:  # a select/shuffle/filter view
            ds = ds.flatten_indices()
        self.ds = ds
        self._bind_columns()

    def _bind_columns(self) -> None:
        # Rows are read straight from the Arrow columns: ~3 us a row against ~100 us through
        # ``ds[i]`` and its formatting (per-sample overhead that every worker pays).
        self._images = self.ds.data.column(self.image_column)
        self._labels = self.ds.data.column(self.label_column) if self.label_column else None

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: pickle the dataset, not rows
        return {k: v for k, v in self.__dict__.items() if k not in ("_images", "_labels")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_columns()

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> list[int]:
        if not self.label_column:
            raise ConfigError("the dataset has no label column ('label'/'labels'); "
                              "set 'data.label_column'")
        return [int(v) for v in self.ds[self.label_column]]

    def load(self, index: int) -> tuple[Image.Image, int | None, str]:
        cell = self._images[int(index)].as_py()
        path = cell.get("path") if isinstance(cell, dict) else str(cell)
        label = self._labels[int(index)].as_py() if self._labels is not None else None
        path = path or f"row:{index}"
        try:
            return decode_image(cell, *self.min_decode), label, path
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
            raise UnreadableImage(path, f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e


def _find_image_column(ds: Any) -> str:
    import datasets

    for name, f in ds.features.items():
        if isinstance(f, datasets.Image):
            return name
    for name in ("image", "img", "pixel_values", "images"):
        if name in ds.column_names:
            return name
    raise ConfigError(f"no image column found (columns: {ds.column_names}); "
                      "set 'data.image_column'")


def _pick_split(ds: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ConfigError(f"config key 'data.split': {where} has no split '{split}' "
                              f"(splits: {list(ds)})")
        return ds[split]
    return ds


def load_local(path: str, split: str) -> Any:
    """A folder of images (any sub-folders), a ``save_to_disk`` dataset, or parquet files."""
    import datasets

    p = Path(path)
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() \
            or (p / "state.json").exists():
        with dataset_errors(p, "a save_to_disk dataset"):
            return _pick_split(datasets.load_from_disk(str(p)), split, str(p))
    parquet = [str(f) for f in sorted(p.rglob("*.parquet"))] if p.is_dir() else (
        [str(p)] if p.suffix == ".parquet" else [])
    if parquet:
        # hub layout: <split>-*.parquet files or a <split>/ folder; otherwise one split of all
        named = [f for f in parquet if Path(f).stem == split or Path(f).name.startswith(
                 f"{split}-") or split in Path(f).relative_to(p).parts[:-1]] if p.is_dir() else []
        with dataset_errors(p, "parquet files"):
            return datasets.load_dataset("parquet", data_files=named or parquet, split="train")
    if not p.is_dir():
        raise ConfigError(f"config key 'data.path': {p} is not a folder or a parquet file")
    if (p / split).is_dir():  # <path>/<split>/... layouts (train/, val/, test/)
        p = p / split
    files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
    if not files:
        raise ConfigError(f"config key 'data.path': no image files under {p}")
    # Class sub-folders give labels (the imagefolder convention) when every file has one.
    rel = [Path(f).relative_to(p) for f in files]
    table: dict[str, Any] = {"image": files}
    features = {"image": datasets.Image(decode=False)}
    if all(len(r.parts) == 2 for r in rel):
        names = sorted({r.parts[0] for r in rel})
        if len(names) > 1:
            table["label"] = [names.index(r.parts[0]) for r in rel]
            features["label"] = datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict(table, features=datasets.Features(features))


@contextlib.contextmanager
def dataset_errors(path: Path, kind: str) -> Iterator[None]:
    """Whatever ``datasets``/pyarrow raise on a corrupt, truncated or foreign file (ArrowInvalid,
    JSON and Unicode errors, missing shards...) becomes one ConfigError naming the folder."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the libraries raise many kinds; all mean "unreadable"
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"config key 'data.path': {path} is not readable as {kind} "
                          f"({type(e).__name__}: {first})") from None


def min_decode_size(image_size: int, min_crop_scale: float,
                    eval_crop_pct: float = 1.0) -> tuple[int, int]:
    """(short side, area) a decoded image needs so that every crop RandomResizedCrop can draw
    (area fraction >= ``min_crop_scale``, aspect ratio within 3/4..4/3) still has at least
    ``image_size`` pixels on each side, and the evaluation view (short side resized to
    ``image_size / eval_crop_pct``) is never upsampled: a reduced-size decode then never
    upsamples what the full-size decode would not have."""
    side = max(image_size, math.ceil(image_size / eval_crop_pct))
    return side, int(image_size * image_size / (min_crop_scale * 0.75)) + 1


def build_source(cfg: DataConfig, image_size: int, seed: int = 0, split: str | None = None):
    """The image source the config names, for ``split`` (default ``cfg.split``)."""
    split = split or cfg.split
    min_decode = (min_decode_size(image_size, cfg.crop_scale[0],
                                  getattr(cfg, "eval_crop_pct", 1.0))
                  if cfg.reduced_decode else (0, 0))
    if cfg.synthetic:
        n = cfg.synthetic_size if split == cfg.split else max(cfg.synthetic_size // 4, 64)
        # Other splits draw from a disjoint seed so train and validation never share images.
        return SyntheticShapes(n, image_size, seed=seed if split == cfg.split else seed + 10_000)
    if cfg.path:
        return HFImageSource(load_local(cfg.path, split), cfg.image_column, cfg.label_column,
                             min_decode)
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=split, streaming=cfg.streaming)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'data.name': dataset '{cfg.name}' not found ({e})") from None
    if cfg.streaming:
        return StreamingImageSource(ds, split, cfg, min_decode)
    return HFImageSource(ds, cfg.image_column, cfg.label_column, min_decode)


class StreamingImageSource:
    """A streaming ``datasets.IterableDataset`` (large hub sets read without a full download).

    The epoch length comes from the dataset card (``info.splits``) or ``data.num_examples``.
    """

    def __init__(self, ds: Any, split: str, cfg: DataConfig,
                 min_decode: tuple[int, int] = (0, 0)) -> None:
        import datasets

        self.min_decode = min_decode

        n = cfg.num_examples
        if not n and ds.info.splits and split in ds.info.splits:
            n = ds.info.splits[split].num_examples or 0
        if not n:
            raise ConfigError("config key 'data.num_examples': the streaming dataset does not say "
                              "how many examples it has; set data.num_examples")
        features = ds.features or {}
        self.image_column = cfg.image_column or next(
            (k for k, f in features.items() if isinstance(f, datasets.Image)), "image")
        self.label_column = cfg.label_column or ("label" if "label" in features else "")
        if self.image_column in features and isinstance(features[self.image_column],
                                                        datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds, self.num_examples, self.classes = ds, int(n), None

    def __len__(self) -> int:
        return self.num_examples

    def decode(self, row: dict[str, Any], position: int) -> tuple[Image.Image, int | None, str]:
        cell = row[self.image_column]
        path = (cell.get("path") if isinstance(cell, dict) else None) or f"stream:{position}"
        label = row[self.label_column] if self.label_column else None
        try:
            return decode_image(cell, *self.min_decode), label, path
        except Exception as e:  # noqa: BLE001
            raise UnreadableImage(path, f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e
