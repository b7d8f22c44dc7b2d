"""The training loop every job shares: pretraining, fine-tuning and detection.

A job hands :func:`run_epoch` its forward pass on one micro-batch; the loop around it (stop
checks, the schedule, gradient accumulation, the update with its clipping and non-finite guard,
logging, periodic checkpoints) is written once, here, so one training step reads in one file.
"""

from __future__ import annotations

import random
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mim.config import JobConfig, save_config
from mim.data.loader import sample_seed
from mim.engine.accounting import Throughput
from mim.engine.data_issues import record_bad_samples, record_label_issues
from mim.engine.run import start_tracking
from mim.engine.state import (LoopState, resolve_resume, restore_training_state,
                              save_training_state)
from mim.engine.tracking import MetricsLog
from mim.errors import ConfigError, RunError

C = TypeVar("C", bound=JobConfig)

# batch -> (loss, scalars logged beside it, number of images); the job's autocast scope is its own
MicroForward = Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


@dataclass
class Guards:
    """What stops or skips work: bad samples, non-finite updates, SIGTERM/SIGINT."""

    seen_bad: set[str]
    max_bad: int
    max_bad_fraction: float
    nonfinite: NonFiniteGuard
    stop: StopRequest

    @classmethod
    def for_run(cls, acc, cfg: JobConfig, num_images: int) -> Guards:
        fraction = cfg.data.max_bad_fraction
        return cls(seen_bad=set(), max_bad=int(fraction * num_images / acc.num_processes),
                   max_bad_fraction=fraction, nonfinite=NonFiniteGuard(cfg.train.max_nonfinite),
                   stop=StopRequest())


@dataclass
class Budget:
    updates_per_epoch: int
    total_updates: int
    global_batch: int
    lr: float  # optim.lr, else optim.base_lr x global batch / 256


@dataclass
class Loop(Generic[C]):
    """The running loop: what :func:`train` built, handed to every hook of the job."""

    acc: Accelerator
    cfg: C
    run_dir: Path
    model: torch.nn.Module  # prepared by accelerate (DDP / FSDP wrapped where launched so)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: LoopState
    metrics: MetricsLog
    budget: Budget
    guards: Guards
    saved_step: int = -1  # the update of the newest checkpoint this process wrote

    def save(self) -> None:
        """A checkpoint of the loop as it stands (every process calls it)."""
        save_training_state(self.acc, self.cfg, self.run_dir, self.model, self.optimizer,
                            self.scheduler, self.state)
        self.saved_step = self.state.step


def loop_budget(acc, cfg: JobConfig, batches_per_epoch: int, num_images: int, remedy: str) -> Budget:
    """The run's updates, global batch and learning rate; too few images is a config error
    (``remedy`` says which key to change)."""
    d, accum = cfg.data, cfg.train.grad_accum_steps
    updates = batches_per_epoch // accum
    if updates == 0:
        raise ConfigError(f"{num_images} training images are fewer than one global batch "
                          f"({d.batch_size} x {acc.num_processes} processes x {accum} "
                          f"accumulation); {remedy}")
    global_batch = d.batch_size * acc.num_processes * accum
    return Budget(updates, cfg.train.epochs * updates, global_batch,
                  cfg.optim.lr or cfg.optim.base_lr * global_batch / 256)


def start_loop(acc, cfg: JobConfig, run_dir: Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[Any, Any, LoopState, MetricsLog, bool]:
    """Prepare model and optimizer, resume from ``run.resume`` if asked, start tracking.

    Returns ``(model, optimizer, state, metrics, resumed)``; a resumed log is cut back to the
    lines its checkpoint had seen."""
    model, optimizer = acc.prepare(model, optimizer)
    state, resume_from = LoopState(), resolve_resume(acc, cfg, run_dir)
    if resume_from is not None:
        state = restore_training_state(acc, cfg, resume_from, model, optimizer)
        acc.print(f"resumed from {resume_from[0]} at update {state.step}, epoch {state.epoch}")
    if acc.is_main_process:  # only now: a refused resume leaves the run directory as it was
        save_config(cfg, run_dir / "config.yaml")
    start_tracking(acc, cfg, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process,
                         state if resume_from is not None else None)
    return model, optimizer, state, metrics, resume_from is not None


def run_epoch(loop: Loop, loader: Any, forward: MicroForward,
              log_extra: dict[str, Any] | None = None,
              after_update: Callable[[int], None] | None = None) -> str | None:
    """One epoch of updates from ``loop.state.update_in_epoch``; the reason if it stopped early
    ('max_steps', 'signal'). The loss and the scalars ``forward`` returns are logged averaged over
    the updates counted since the last log line (non-finite ones are skipped). ``after_update``
    gets the number of updates done after each one (an EMA's hook)."""
    acc, cfg, model, optimizer = loop.acc, loop.cfg, loop.model, loop.optimizer
    state, guards, metrics, run_dir = loop.state, loop.guards, loop.metrics, loop.run_dir
    t, accum = cfg.train, cfg.train.grad_accum_steps
    updates = loop.budget.updates_per_epoch
    batches = iter(loader.epoch(state.epoch, start_batch=state.update_in_epoch * accum))
    params = [p for p in model.parameters() if p.requires_grad]
    speed, sums, n_sum = Throughput(), {}, 0
    model.train()
    bar = tqdm(total=updates, initial=state.update_in_epoch, desc=f"epoch {state.epoch}",
               disable=not acc.is_local_main_process, leave=False, dynamic_ncols=True)
    try:  # the bar's line is cleared however the epoch ends (an error prints after it)
        while state.update_in_epoch < updates:
            if t.max_steps and state.step >= t.max_steps:
                return "max_steps"
            if guards.stop.agreed(acc):
                return "signal"
            loop.scheduler.step_update(state.step)
            update: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                batch = speed.wait_for(batches)
                record_bad_samples(acc, run_dir, state, batch["bad"], guards.seen_bad,
                                   guards.max_bad, guards.max_bad_fraction)
                if state.epoch == 0:  # each sample once: the first epoch reads every one once
                    record_label_issues(acc, run_dir, state, batch.get("issues", []),
                                        cfg.data.split)
                seed_step(cfg.run.seed, acc.process_index, state.step * accum + micro)
                with acc.no_sync(model) if micro < accum - 1 else nullcontext():
                    loss, scalars, n = forward(batch)
                    acc.backward(loss / accum)
                for k, v in {"loss": loss, **scalars}.items():
                    update[k] = update.get(k, 0.0) + v.detach().float() / accum
                speed.add(n * acc.num_processes)
            counted, grad_norm = finish_update(acc, cfg, optimizer, params, update["loss"], state,
                                               guards.nonfinite, loop.budget.global_batch)
            if after_update is not None:
                after_update(state.step)
            for k, v in update.items():  # every process has the same keys, counted or not
                sums[k] = sums.get(k, torch.zeros((), device=acc.device)) + (v if counted else 0.0)
            n_sum += int(counted)
            bar.update(1)
            if state.step % t.log_every == 0 or state.update_in_epoch == updates:
                keys = list(sums)
                total = acc.reduce(torch.stack([sums[k] for k in keys]
                                               + [torch.tensor(float(n_sum), device=acc.device)]),
                                   reduction="sum")
                num = total[-1].item()
                rec = {"step": state.step, "epoch": state.epoch + state.update_in_epoch / updates}
                rec.update({k: total[i].item() / num if num else float("nan")
                            for i, k in enumerate(keys)})
                rec.update({"lr": max(g["lr"] for g in optimizer.param_groups),
                            "grad_norm": float(grad_norm), "images_per_s": speed.read(),
                            "data_wait": speed.data_wait, "bad_samples": state.bad_samples,
                            **(log_extra or {})})
                metrics.write(rec)
                acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=state.step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                sums, n_sum = {}, 0
            if state.step % t.save_every == 0 and guards.nonfinite.in_row == 0:
                loop.save()
    finally:
        bar.close()
    return None


def report_stop(acc, stopped: str | None, state: LoopState, guards: Guards) -> None:
    """After the checkpoint of an early stop: say so; a signal exits with 143 (128 + SIGTERM)."""
    if stopped == "signal":
        acc.print(f"interrupted by signal {guards.stop.signum} at update {state.step}; checkpoint "
                  "saved, resume with run.resume=auto")
        raise SystemExit(143)
    if stopped:
        acc.print(f"stopped at update {state.step} (train.max_steps); resume with run.resume=auto")


# ----------------------------------------------------------------------------- the update


class StopRequest:
    """SIGTERM (how clusters preempt), SIGINT and SIGUSR1 (SLURM's warning before the end, see
    scripts/slurm/) become a flag checked between updates; every process agrees on the flag,
    saves a checkpoint and exits (status 143) before the grace period."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self, acc: Accelerator) -> bool:
        flag = float(self.signum is not None)
        if acc.num_processes > 1:
            flag = acc.reduce(torch.tensor(flag, device=acc.device), reduction="sum").item()
        return flag > 0

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class NonFiniteGuard:
    """Counts non-finite updates; too many in a row stop the run, leaving the last checkpoint
    (written before the divergence) as the one to resume from."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_row, self.total = limit, 0, 0

    def update(self, finite: bool, step: int) -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise RunError(f"{self.in_row} non-finite updates in a row (last at update {step}); "
                           "stopped. Resume from the last checkpoint with a lower lr, "
                           "optim.clip_grad.mode=norm or train.mixed_precision=bf16")


def seed_step(seed: int, rank: int, micro_step: int) -> None:
    """Reseed every RNG a step draws from (masks, drop path, timm's numpy-drawn mixup) as a pure
    function of its position, so a resumed run repeats the uninterrupted one exactly."""
    s = sample_seed(seed, rank, micro_step, 0xC0DE)
    torch.manual_seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)


def finish_update(acc: Accelerator, cfg: JobConfig, optimizer: torch.optim.Optimizer,
                  params: list[torch.nn.Parameter], loss: torch.Tensor, state: LoopState,
                  nonfinite: NonFiniteGuard, global_batch: int) -> tuple[bool, torch.Tensor]:
    """The end of every engine's update, after the backward passes: clip; step unless the
    gradient is non-finite (under fp16 the loss scaler skips and rescales itself); count a
    non-finite update; zero the gradients; advance ``state``. Returns whether the update's loss
    and gradient were both finite (so its loss counts in the logged average) and the pre-clip
    gradient norm."""
    grad_norm = clip_gradients(acc, params, cfg.optim.clip_grad)
    # grad_norm is the same on every process (after the all-reduce): it decides the step everywhere
    finite, loss_ok = torch.isfinite(torch.stack([grad_norm.detach().float().reshape(()),
                                                  loss.detach().float().reshape(())])).tolist()
    if finite or acc.scaler is not None:
        optimizer.step()
    if not finite:
        acc.print(f"warning: non-finite loss or gradient at update {state.step}; skipped")
    nonfinite.update(finite, state.step)
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.update_in_epoch += 1
    state.images_seen += global_batch
    return finite and loss_ok, grad_norm


def clip_gradients(acc: Accelerator, params: list[torch.nn.Parameter], clip: Any) -> torch.Tensor:
    """Clip after backward, before the step; returns the global L2 norm *before* clipping.

    Gradients are unscaled exactly once (accelerate's clip_grad_norm_), which is what makes this
    safe under fp16 loss scaling.
    """
    if clip.mode == "norm":
        return acc.clip_grad_norm_(params, clip.max_norm)
    norm = acc.clip_grad_norm_(params, float("inf"))
    if clip.mode == "value":
        torch.nn.utils.clip_grad_value_(params, clip.value)
    return norm


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all().item())


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """``optimizer.step()`` unless ``grad_norm`` is inf/nan; returns 1 if skipped, else 0, as a
    tensor on the gradients' device.

    A fused torch optimizer takes the decision on the device (its ``found_inf`` input, the one
    ``GradScaler`` uses, also undoes the step count), so the step needs no host synchronisation;
    others (and fp16, whose GradScaler owns that input) read the flag on the host."""
    nonfinite = (~torch.isfinite(grad_norm)).to(torch.float32).reshape(())
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if inner.defaults.get("fused") and getattr(optimizer, "scaler", None) is None:
        inner.found_inf = nonfinite
        try:
            optimizer.step()
        finally:
            inner.__dict__.pop("found_inf", None)
    elif not nonfinite.item():
        optimizer.step()
    return nonfinite
