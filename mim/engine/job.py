"""One skeleton for every training job (pretraining, fine-tuning, detection).

:func:`train` does what the three jobs share, in one order: the budget, the optimizer and its
schedule, the accounting table, resume and tracking, the guards, the epochs, the last checkpoint
and the stop report. A job (:class:`TrainingJob`) supplies only what is its own: its model and
data, its forward pass, what happens at the end of an epoch (evaluation, pictures) and at the end
of the run (exports, ``summary.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

import torch
from accelerate import Accelerator

from mim.config import JobConfig
from mim.data.loader import EpochLoader
from mim.engine.accounting import print_accounting
from mim.engine.loop import (Budget, Guards, Loop, loop_budget, report_stop, run_epoch,
                             start_loop)
from mim.engine.optim import build_optimizer, build_scheduler
from mim.engine.run import check_disk_space

C = TypeVar("C", bound=JobConfig)


class TrainingJob(Generic[C]):
    """What a job tells :func:`train`. The constructor builds the model and the data; the hooks
    run in this order: :meth:`flops`, :meth:`prepare`, :meth:`accounting`, :meth:`notes`, then
    (after the resume) :meth:`started`, per epoch :meth:`epoch_begins`, the updates
    (:meth:`forward`, :meth:`after_update`), :meth:`epoch_ends`, and once the run is complete
    :meth:`finish`."""

    model: torch.nn.Module  # not yet prepared
    loader: EpochLoader  # the training data
    num_images: int  # training images (the budget's check and the bad-sample guard)
    remedy: str = "lower 'data.batch_size'"  # the key to change when no global batch fits
    checkpoint_each_epoch: bool = False  # besides every ``train.save_every`` updates

    def __init__(self, acc: Accelerator, cfg: C, run_dir: Path) -> None:
        self.acc, self.cfg, self.run_dir = acc, cfg, run_dir

    def flops(self) -> int:
        """Forward FLOPs per image of the training forward."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model before the optimizer is built over it (speed options, device)."""
        return model

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_optimizer` (layer decay)."""
        return {}

    def accounting(self, budget: Budget, flops: int) -> list[tuple[str, Any]]:
        """The rows of the table printed before the first update."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines printed after the table (what the init loaded, data issues)."""
        return []

    def started(self, loop: Loop[C], resumed: bool) -> None:
        """After the resume: state that lives beside the loop (an EMA, the best so far)."""

    def forward(self, loop: Loop[C], batch: dict) -> tuple[torch.Tensor, dict, int]:
        """One micro-batch: (loss, scalars logged beside it, number of images)."""
        raise NotImplementedError

    def epoch_begins(self, loop: Loop[C]) -> dict[str, Any]:
        """Before the epoch's first update; returns values logged with every train line."""
        return {}

    def after_update(self, loop: Loop[C]) -> Callable[[int], None] | None:
        """Called with the update count after every optimizer update (an EMA's hook)."""
        return None

    def epoch_ends(self, loop: Loop[C], epoch: int) -> None:
        """After the last update of epoch ``epoch`` (1-based) and before its checkpoint."""

    def finish(self, loop: Loop[C]) -> None:
        """Once every epoch is done: exports and ``summary.json``."""


def train(job: TrainingJob[C]) -> Path:
    """Run ``job`` from its start or its last checkpoint to the end or an early stop."""
    acc, cfg, run_dir = job.acc, job.cfg, job.run_dir
    budget = loop_budget(acc, cfg, job.loader.batches_per_epoch, job.num_images, job.remedy)
    flops = job.flops()
    if acc.is_main_process:
        check_disk_space(run_dir, job.model, cfg.train.keep_last)
    model = job.prepare(job.model)
    optimizer = build_optimizer(model, cfg, budget.lr, **job.optimizer_options())
    scheduler = build_scheduler(optimizer, cfg, budget.total_updates, budget.updates_per_epoch)
    print_accounting(acc, job.accounting(budget, flops))
    for line in job.notes():
        acc.print(line)
    model, optimizer, state, metrics, resumed = start_loop(acc, cfg, run_dir, model, optimizer)
    if state.step >= budget.total_updates:
        acc.print(f"run already complete ({state.step} updates)")
    loop = Loop(acc, cfg, run_dir, model, optimizer, scheduler, state, metrics, budget,
                Guards.for_run(acc, cfg, job.num_images), saved_step=state.step if resumed else -1)
    stopped = None
    try:
        job.started(loop, resumed)
        while state.epoch < cfg.train.epochs:
            stopped = run_epoch(loop, job.loader, lambda batch: job.forward(loop, batch),
                                log_extra=job.epoch_begins(loop),
                                after_update=job.after_update(loop))
            if stopped:
                break
            job.epoch_ends(loop, state.epoch + 1)
            state.epoch, state.update_in_epoch = state.epoch + 1, 0
            if job.checkpoint_each_epoch and loop.guards.nonfinite.in_row == 0:
                loop.save()
    finally:
        loop.guards.stop.restore()
    if loop.saved_step != state.step:
        loop.save()
    report_stop(acc, stopped, state, loop.guards)
    if not stopped:
        job.finish(loop)
    acc.wait_for_everyone()
    return run_dir
