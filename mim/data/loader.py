"""From an image source to per-process batches, reproducibly.

Two choices make a run resumable to the exact loss sequence and independent of worker count:
- the sample order of epoch ``e`` is a permutation drawn from ``(seed, e)``; process ``r`` of
  ``W`` takes every W-th index of it, and a resumed epoch starts at its saved batch offset;
- the random augmentation of sample ``i`` in epoch ``e`` is drawn from generators seeded by
  ``(seed, e, i)`` (torch, numpy and ``random``), never from a worker's global state.
A sample that cannot be decoded is replaced by another one and reported (path and error) in the
batch's ``bad`` list, so the engine can count and log it.

The sampler yields ``(epoch, index)`` pairs, so the epoch travels with every index to the worker
that loads it: workers can persist across epochs (no respawn, no re-import) and still draw each
epoch's augmentation.
"""

from __future__ import annotations

import random
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from mim.errors import RunError
from mim.data.sources import UnreadableImage


def sample_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SplitMix64-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch, numpy and Python's ``random`` for a block, then restore them: timm's
    RandAugment and random erasing draw from the latter two.

    In a loader worker nothing else draws from these generators, so they are only seeded: saving
    and restoring numpy's and ``random``'s states costs ~0.25 ms, 5% of decoding a photo."""
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (what transforms draw from): torch.manual_seed would also queue
        # a CUDA seeding with a stack trace in a process without CUDA, ~0.7 ms per sample.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TransformedDataset(Dataset):
    """Applies ``transform`` to ``source.load(i)`` under a per-sample seed."""

    def __init__(self, source: Any, transform: Callable, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """A decoded, augmented sample; ``key`` is ``(epoch, index)`` or an index (of the epoch
        last set on ``self.epoch``). An unreadable sample is replaced by a deterministic stand-in
        (so every batch keeps its size and every process its step count) and reported in 'bad'."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        bad = []
        n = len(self.source)
        for attempt in range(16):
            i = (index + attempt * 7919) % n
            try:
                img, label, path = self.source.load(i)
                with seeded_rngs(sample_seed(self.seed, epoch, i)):
                    x = self.transform(img)
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                continue
            return {"image": x, "label": -1 if label is None else int(label), "index": i,
                    "bad": bad}
        raise RunError(f"16 unreadable images in a row from sample {index} (first: {bad[0][0]}: "
                       f"{bad[0][1][:120]}); the data is mostly unreadable")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "bad": [b for s in samples for b in s["bad"]],
    }


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """This process's share of a seeded epoch permutation, from batch ``start_batch`` on, as
    ``(epoch, index)`` pairs.

    With ``drop_last`` every process gets exactly ``len(dataset) // (W * B)`` batches, so all
    processes make the same number of steps.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.n, self.bs, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // (self.world * self.bs)
        return -(-self.n // (self.world * self.bs))

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x5A3))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: self.batches_per_epoch() * self.world * self.bs]
        mine = order[self.rank :: self.world]
        return mine[self.start_batch * self.bs :]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._indices()])

    def __len__(self) -> int:
        return len(self._indices())


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which checkpoints and then ends them
    (a cluster's SIGTERM to the whole process group must not kill the loader mid-batch)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class EpochLoader:
    """A DataLoader whose sampler can be moved to (epoch, batch offset) before iterating."""

    dataset: TransformedDataset
    sampler: ShardedEpochSampler
    loader: DataLoader

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        self.dataset.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch)
        return self.loader

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()


class StreamingShard(IterableDataset):
    """This process's part of a streaming source for one epoch, from a given example on.

    The stream is split between processes (``split_dataset_by_node``) and shuffled with a buffer
    seeded by ``(seed, epoch)``; sample ``k`` of the shard is augmented under seed
    ``(seed, epoch, rank, k)``. An unreadable example is skipped and reported with the next one.
    If the shard runs short (uneven shards, skipped files) it starts over, so every process makes
    the same number of steps.
    """

    def __init__(self, source: Any, transform: Callable, seed: int, rank: int, world: int,
                 num_samples: int, shuffle_buffer: int = 10_000) -> None:
        from datasets.distributed import split_dataset_by_node

        self.source, self.transform, self.seed, self.rank = source, transform, seed, rank
        ds = split_dataset_by_node(source.ds, rank=rank, world_size=world)
        self.ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.num_samples, self.epoch, self.start = num_samples, 0, 0

    def __iter__(self):
        self.ds.set_epoch(self.epoch)
        stream, k, bad = self.ds.skip(self.start), self.start, []
        while k < self.num_samples:
            produced = False
            for row in stream:
                try:
                    img, label, _ = self.source.decode(row, k)
                except UnreadableImage as e:
                    bad.append((e.path, e.reason))
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(
                        sample_seed(self.seed, self.epoch, self.rank, k))
                    x = self.transform(img)
                yield {"image": x, "label": -1 if label is None else int(label), "index": k,
                       "bad": bad}
                produced, bad, k = True, [], k + 1
                if k >= self.num_samples:
                    return
            if not produced:
                raise RuntimeError("the streaming dataset yielded no readable image")
            stream = self.ds  # ran short: start the shard over


class StreamingEpochLoader:
    """Same interface as :class:`EpochLoader` for streaming sources (one loader worker: a
    stream cannot be split between workers without changing its order)."""

    def __init__(self, source: Any, transform: Callable, batch_size: int, num_workers: int,
                 rank: int, world_size: int, seed: int, pin_memory: bool) -> None:
        self.bs = batch_size
        self.per_epoch = len(source) // (world_size * batch_size)
        self.shard = StreamingShard(source, transform, seed, rank, world_size,
                                    self.per_epoch * batch_size)
        self.loader = DataLoader(self.shard, batch_size=batch_size, collate_fn=collate,
                                 num_workers=min(num_workers, 1), pin_memory=pin_memory,
                                 worker_init_fn=_ignore_stop_signals)

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        self.shard.epoch, self.shard.start = epoch, start_batch * self.bs
        return self.loader

    @property
    def batches_per_epoch(self) -> int:
        return self.per_epoch


def build_epoch_loader(source: Any, transform: Callable, *, batch_size: int, num_workers: int,
                       rank: int, world_size: int, seed: int, shuffle: bool = True,
                       drop_last: bool = True, pin_memory: bool = False):
    if hasattr(source, "decode"):  # a streaming source
        return StreamingEpochLoader(source, transform, batch_size, num_workers, rank, world_size,
                                    seed, pin_memory)
    ds = TransformedDataset(source, transform, seed)
    sampler = ShardedEpochSampler(len(ds), batch_size, rank, world_size, seed, shuffle, drop_last)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate, pin_memory=pin_memory, drop_last=False,
                        worker_init_fn=_ignore_stop_signals,
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None)
    return EpochLoader(ds, sampler, loader)
