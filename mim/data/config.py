"""The ``data:`` section every job shares: where the images are and how they are batched."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    name: str = ""  # a Hugging Face hub dataset name
    path: str = ""  # a local folder: image files, a save_to_disk dataset or parquet files
    synthetic: bool = False  # the built-in procedural image set (no download)
    synthetic_size: int = 2048
    split: str = "train"
    streaming: bool = False  # read data.name as a stream (no full download)
    num_examples: int = 0  # streaming only: examples per epoch when the dataset card lacks it
    image_column: str = ""  # empty: the first image-typed column
    label_column: str = ""  # empty: "label" or "labels" when present
    batch_size: int = 64  # per device
    num_workers: int = 4
    # JPEGs decode at 1/2, 1/4 or 1/8 size (PIL draft) when every random crop keeps full resolution
    reduced_decode: bool = True
    max_bad_fraction: float = 0.01  # stop when more of the dataset than this is unreadable
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
