"""The training loop every job shares: pretraining, fine-tuning and detection.

A job hands :func:`run_epoch` its forward pass on one micro-batch; the loop around it (stop
checks, the schedule, gradient accumulation, the update and its guards, logging, periodic
checkpoints) is written once, here, so the whole training step reads on one screen.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mim.config import ConfigError
from mim.engine.common import (LoopState, NonFiniteGuard, StopRequest, Throughput, finish_update,
                               record_bad_samples, record_label_issues, resolve_resume,
                               restore_training_state, save_training_state, seed_step,
                               start_tracking)
from mim.engine.tracking import MetricsLog

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
    def for_run(cls, acc, cfg: Any, num_images: int) -> Guards:
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


def loop_budget(acc, cfg: Any, batches_per_epoch: int, num_images: int, remedy: str) -> Budget:
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


def start_loop(acc, cfg: Any, run_dir: Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[Any, Any, LoopState, MetricsLog, bool]:
    """Prepare model and optimizer, resume from ``run.resume`` if asked, start tracking.

    Returns ``(model, optimizer, state, metrics, resumed)``; a resumed log is cut back to the
    lines its checkpoint had seen."""
    model, optimizer = acc.prepare(model, optimizer)
    state, resume_from = LoopState(), resolve_resume(cfg, run_dir)
    if resume_from is not None:
        state = restore_training_state(acc, cfg, resume_from, model, optimizer)
        acc.print(f"resumed from {resume_from} at update {state.step}, epoch {state.epoch}")
    start_tracking(acc, cfg, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process,
                         state if resume_from is not None else None)
    return model, optimizer, state, metrics, resume_from is not None


def run_epoch(acc, cfg: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any, loader: Any, state: LoopState, metrics: MetricsLog, run_dir: Path,
              meta: dict, guards: Guards, forward: MicroForward,
              log_extra: dict[str, Any] | None = None) -> str | None:
    """One epoch of updates from ``state.update_in_epoch``; the reason if it stopped early
    ('max_steps', 'signal'). The loss and the scalars ``forward`` returns are logged averaged over
    the updates counted since the last log line (non-finite ones are skipped)."""
    t, accum = cfg.train, cfg.train.grad_accum_steps
    updates = meta["updates_per_epoch"]
    batches = iter(loader.epoch(state.epoch, start_batch=state.update_in_epoch * accum))
    params = [p for p in model.parameters() if p.requires_grad]
    speed, sums, n_sum = Throughput(), {}, 0
    model.train()
    bar = tqdm(total=updates, initial=state.update_in_epoch, desc=f"epoch {state.epoch}",
               disable=not acc.is_local_main_process, leave=False, dynamic_ncols=True)
    while state.update_in_epoch < updates:
        if t.max_steps and state.step >= t.max_steps:
            bar.close()
            return "max_steps"
        if guards.stop.agreed(acc):
            bar.close()
            return "signal"
        scheduler.step_update(state.step)
        update: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = speed.wait_for(batches)
            record_bad_samples(acc, run_dir, state, batch["bad"], guards.seen_bad,
                               guards.max_bad, guards.max_bad_fraction)
            if state.epoch == 0:  # each sample once: the first epoch reads every one once
                record_label_issues(acc, run_dir, state, batch.get("issues", []), cfg.data.split)
            seed_step(cfg.run.seed, acc.process_index, state.step * accum + micro)
            with acc.no_sync(model) if micro < accum - 1 else nullcontext():
                loss, scalars, n = forward(batch)
                acc.backward(loss / accum)
            for k, v in {"loss": loss, **scalars}.items():
                update[k] = update.get(k, 0.0) + v.detach().float() / accum
            speed.add(n * acc.num_processes)
        counted, grad_norm = finish_update(acc, cfg, optimizer, params, update["loss"], state,
                                           guards.nonfinite, meta["global_batch"])
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
            save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
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
