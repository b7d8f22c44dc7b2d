"""What ``mim predict`` and ``mim embed`` read, and how each process walks its share of it.

``--images`` is a folder (sub-folders included), a ``.txt`` file with one path per line, several
image paths, a ``save_to_disk``/parquet set or a hub dataset name; all of them become one
:class:`~mim.data.sources.HFImageSource`, as training data does. An image that cannot be read is
not replaced (as in training) but reported with its error, so the caller can list and skip it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mim.config import ConfigError
from mim.data.sources import IMAGE_EXTS, HFImageSource, UnreadableImage, load_local
from mim.engine.run import process_state


def _file_list(files: list[str]) -> HFImageSource:
    import datasets

    table = datasets.Dataset.from_dict(
        {"image": files}, features=datasets.Features({"image": datasets.Image(decode=False)}))
    return HFImageSource(table)


def _saved_splits(path: Path) -> list[str]:
    info = path / "dataset_dict.json"
    return list(json.loads(info.read_text()).get("splits", [])) if info.is_file() else []


def open_images(specs: list[str], split: str = "") -> HFImageSource:
    """The images ``specs`` name (see the module docstring); ``split`` picks a split of a
    dataset with several (default: its only split, or ``train`` for a hub name)."""
    if not specs:
        raise ConfigError("--images: nothing to read")
    if len(specs) == 1:
        spec = Path(specs[0])
        if spec.suffix == ".txt" and spec.is_file():
            lines = [ln.strip() for ln in spec.read_text().splitlines()]
            files = [ln for ln in lines if ln and not ln.startswith("#")]
            if not files:
                raise ConfigError(f"--images: {spec} lists no files")
            base = spec.parent
            return _file_list([str(f if Path(f).is_absolute() else base / f) for f in files])
        if spec.is_dir() or spec.suffix == ".parquet":
            splits = _saved_splits(spec)
            if not split and len(splits) > 1:
                raise ConfigError(f"--split: {spec} has the splits {splits}; name one")
            return HFImageSource(load_local(str(spec), split or (splits[0] if splits else "")))
        if not spec.exists() and spec.suffix.lower() not in IMAGE_EXTS:
            return _hub_dataset(specs[0], split or "train")
    return _file_list([str(s) for s in specs])  # a missing file is listed as unreadable


def _hub_dataset(name: str, split: str) -> HFImageSource:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--images: '{name}' is not a file, folder or loadable dataset "
                          f"({first})") from None
    return HFImageSource(ds)


def run_label_map(source: HFImageSource, class_names: list[str]) -> dict[int, int] | None:
    """Source label -> the run's class index when the inputs carry the run's classes (class
    sub-folders or a labeled set with those names, or bare ids in the run's range); else None."""
    if not source.label_column:
        return None
    names = source.classes
    if names:
        if not set(names) <= set(class_names):
            return None
        return {i: class_names.index(n) for i, n in enumerate(names)}
    ids = set(source.labels())
    return {i: i for i in ids} if ids <= set(range(len(class_names))) else None


@dataclass
class PreparedImage:
    """One input after decoding and preprocessing, or the reason it could not be read."""

    index: int  # position in the inputs
    path: str
    label: Any  # a class id, a detection set's Annotations, or None
    size: tuple[int, int] | None  # (width, height) of the original image
    item: Any = None  # what the model's ``preprocess`` returned
    error: str = ""


class PreparedImages(Dataset):
    """``source.load(i)`` through ``prepare`` for the inputs ``indices``."""

    def __init__(self, source: HFImageSource, indices: list[int],
                 prepare: Callable[[Any], Any]) -> None:
        self.source, self.indices, self.prepare = source, indices, prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> PreparedImage:
        i = self.indices[k]
        try:
            img, label, path = self.source.load(i)
        except UnreadableImage as e:
            return PreparedImage(i, e.path, None, None, error=e.reason)
        return PreparedImage(i, path, label, img.size, self.prepare(img))


def _as_list(batch: list[PreparedImage]) -> list[PreparedImage]:
    return batch


def process_shard(source: HFImageSource, prepare: Callable[[Any], Any],
                  run: Callable[[list[PreparedImage]], list[dict[str, Any]]], *, batch_size: int,
                  num_workers: int, desc: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every process runs ``run`` on the batches of its own inputs (i, i + W, i + 2W, ...: each
    input once, none padded in); returns all processes' rows, in input order, and unreadable
    inputs, on every process. A progress bar on the main process counts its shard's images."""
    state = process_state()
    mine = list(range(state.process_index, len(source), state.num_processes))
    loader = DataLoader(PreparedImages(source, mine, prepare), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_as_list)
    rows: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    with torch.inference_mode(), tqdm(total=len(mine), desc=desc, unit="img",
                                      disable=not state.is_main_process) as bar:
        for batch in loader:
            good = [p for p in batch if not p.error]
            unreadable += [{"path": p.path, "error": p.error} for p in batch if p.error]
            if good:
                rows += run(good)
            bar.update(len(batch))
    if state.num_processes > 1:
        rows, unreadable = gather_object(rows), gather_object(unreadable)
    rows.sort(key=lambda r: r["index"])
    return rows, unreadable


def report_unreadable(unreadable: list[dict[str, str]], total: int) -> int:
    """List unreadable inputs (main process); the exit status: 1 when any, else 0."""
    if not unreadable:
        return 0
    if process_state().is_main_process:
        import sys

        for u in unreadable:
            print(f"unreadable, skipped: {u['path']}: {u['error']}", file=sys.stderr)
        print(f"mim: {len(unreadable)} of {total} images could not be read (listed above); "
              "exit status 1", file=sys.stderr)
    return 1
