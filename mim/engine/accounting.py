"""What a run costs: FLOPs per image, throughput, and the table printed at the start."""

from __future__ import annotations

import time
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from mim.engine.distributed import precision_note


def count_flops(model: torch.nn.Module, example: torch.Tensor, **forward_kwargs: Any) -> int:
    """Forward FLOPs per image of the training forward, counted by torch's FlopCounterMode.

    Fused attention kernels are switched to timm's explicit matmul path while counting: the
    counter does not see inside the CPU SDPA kernel, and both paths do the same matmuls.
    """
    was_training = model.training
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in fused:
        m.fused_attn = False
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), \
                FlopCounterMode(display=False) as counter:
            model(example, **forward_kwargs)
    finally:
        for m in fused:
            m.fused_attn = True
        model.train(was_training)
    return int(counter.get_total_flops() // example.shape[0])


def fmt_count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}E"


class Throughput:
    """Images per second and the share of wall time spent waiting for the data loader over a
    logging window (host clock; synchronises CUDA when read)."""

    def __init__(self) -> None:
        self.t0, self.images, self.waited = time.perf_counter(), 0, 0.0
        self.data_wait = 0.0  # of the window last read

    def add(self, n: int) -> None:
        self.images += n

    def wait_for(self, batches: Any) -> Any:
        """``next(batches)``, timed."""
        t = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - t
        return batch

    def read(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        rate = self.images / dt if dt > 0 else 0.0
        self.data_wait = self.waited / dt if dt > 0 else 0.0
        self.t0, self.images, self.waited = time.perf_counter(), 0, 0.0
        return rate


def print_accounting(acc: Accelerator, rows: list[tuple[str, Any]]) -> None:
    rows = [*rows, ("mixed precision", precision_note(acc))]
    width = max(len(k) for k, _ in rows)
    acc.print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
