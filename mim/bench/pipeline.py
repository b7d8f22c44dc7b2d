"""The input pipeline alone (decode + MAE augmentation, images/s per worker) against torchvision's
``ImageFolder`` with the same transforms, and the share of a real run's time spent waiting for data.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mim.bench.measure import time_interleaved
from mim.data.loader import TransformedDataset, collate, sample_seed
from mim.data.sources import HFImageSource, load_local, min_decode_size
from mim.data.synthetic import synthetic_image
from mim.data.transforms import pretrain_transform


def _write_jpeg(path: Path, index: int, size: tuple[int, int], seed: int) -> None:
    w, h = size
    img, _ = synthetic_image(index, max(w, h), seed)
    arr = np.asarray(img.resize((w, h)), dtype=np.float32)
    arr += np.random.default_rng([seed, index]).normal(0.0, 10.0, size=arr.shape)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of ``size`` (width, height) in ``root/images/``: a synthetic
    scene plus sensor-like noise, so files are about as large as photos of that size (a smooth
    image would decode unrealistically fast). Written by all CPUs when there are many."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:05d}.jpg", i) for i in range(count)
            if not (folder / f"{i:05d}.jpg").exists()]
    workers = min(os.cpu_count() or 1, 16)
    if len(todo) < 128 or workers < 4:
        for path, i in todo:
            _write_jpeg(path, i, size, seed)
        return root
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpeg, [p for p, _ in todo], [i for _, i in todo],
                      [size] * len(todo), [seed] * len(todo), chunksize=16))
    return root


@dataclass
class PipelineRow:
    name: str
    images_per_s: float
    ratio_to_imagefolder: float


class SeededImageFolder(Dataset):
    """torchvision's ImageFolder with its transforms, keyed by ``(epoch, index)`` like mim's
    dataset and drawing from the global generator seeded with mim's per-sample seed: every loader
    then crops the same boxes (the cost of a bicubic resize depends on the crop size, so
    different draws would bias the comparison). The seeding costs about 1 us a sample."""

    def __init__(self, root: str, transform: Callable, seed: int) -> None:
        from torchvision.datasets import ImageFolder

        self.folder, self.seed = ImageFolder(root, transform=transform), seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
        return self.folder[i][0]


class EpochKeys(Sampler[tuple[int, int]]):
    """``(epoch, index)`` for every index, in order; ``epoch`` is advanced by the caller."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


def pipeline_contenders(root: Path, img_size: int, crop_scale: tuple[float, float],
                        mean, std, seed: int = 0) -> dict[str, Dataset]:
    """Datasets keyed by ``(epoch, index)`` over the same files: torchvision's ImageFolder with
    the transforms written the torchvision way, mim's folder source (reduced-size JPEG decode on,
    and off) and mim's in-memory source (the encoded bytes in a ``datasets`` table, as a hub
    dataset holds them)."""
    import datasets
    from torchvision import transforms as T

    tv_tf = T.Compose([
        T.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    tf = pretrain_transform(img_size, crop_scale, mean, std)
    min_decode = min_decode_size(img_size, crop_scale[0])
    folder = load_local(str(root), "train")
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": Path(f["path"]).read_bytes(), "path": None}
                   for f in folder["image"]]},
        features=datasets.Features({"image": datasets.Image(decode=False)}))
    return {
        "torchvision ImageFolder": SeededImageFolder(str(root), tv_tf, seed),
        "mim folder": TransformedDataset(HFImageSource(folder, min_decode=min_decode), tf, seed),
        "mim folder, full-size decode": TransformedDataset(HFImageSource(folder), tf, seed),
        "mim in-memory": TransformedDataset(HFImageSource(table, min_decode=min_decode), tf,
                                            seed),
    }


def sample_tensor(ds: Dataset, key: tuple[int, int]) -> torch.Tensor:
    x = ds[key]
    return x["image"] if isinstance(x, dict) else x


def bench_pipeline(root: Path, img_size: int, crop_scale: tuple[float, float], mean, std,
                   rounds: int = 5, budget_s: float = 60.0, batch_size: int = 16
                   ) -> list[PipelineRow]:
    """Images/s of one DataLoader worker (a persistent worker process, one thread, batches sent
    to the main process) for each dataset, interleaved over rounds of one epoch each."""
    sets = pipeline_contenders(root, img_size, crop_scale, mean, std)
    calls = {}
    for name, ds in sets.items():
        keys = EpochKeys(len(ds))
        loader = DataLoader(ds, batch_size=batch_size, sampler=keys, num_workers=1,
                            persistent_workers=True, prefetch_factor=4,
                            collate_fn=collate if isinstance(ds, TransformedDataset) else None)

        def one_epoch(loader=loader, keys=keys) -> None:
            for _ in loader:
                pass
            keys.epoch += 1

        calls[name] = one_epoch
    t = time_interleaved(calls, torch.device("cpu"), warmup=1, rounds=rounds, budget_s=budget_s)
    calls.clear()  # ends the workers
    n, base = len(next(iter(sets.values()))), "torchvision ImageFolder"
    return [PipelineRow(name, n / t.median(name), t.ratio(base, name)) for name in sets]


@dataclass
class RealRun:
    images_per_s: float
    data_wait: float  # share of wall time the loop waited on the loader
    windows: int


def real_run_data_wait(cfg: Any, data_path: Path, steps: int, log_every: int,
                       workdir: Path) -> RealRun:
    """A short real ``mim pretrain`` on ``data_path``; reads metrics.jsonl and averages the
    logging windows after the first (which holds worker start-up and warm-up)."""
    from mim.config import config_from_dict
    from mim.engine.pretrain import pretrain

    d = cfg.to_dict()
    d["data"].update(path=str(data_path), synthetic=False, name="")
    d["run"].update(output_dir=str(workdir), name="data-wait", resume="none")
    d["train"].update(max_steps=steps, log_every=log_every, save_every=10 ** 9, vis_every=0,
                      epochs=1000)
    d["tracking"]["backend"] = "none"
    run_cfg = config_from_dict(d)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run_dir = pretrain(run_cfg)
    except Exception:
        print(log.getvalue()[-4000:])
        raise
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    later = recs[1:] or recs
    return RealRun(images_per_s=sum(r["images_per_s"] for r in later) / len(later),
                   data_wait=sum(r["data_wait"] for r in later) / len(later), windows=len(later))
