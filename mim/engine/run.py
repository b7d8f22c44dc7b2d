"""Run setup every job shares: the accelerator, the run directory and its lock, tracking."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

from mim.checkpoint import recover_checkpoints
from mim.config import JobConfig
from mim.engine.distributed import accelerator_precision, check_launch
from mim.engine.tracking import tracker_init_kwargs
from mim.errors import ConfigError


def process_state(timeout_s: int | None = None) -> PartialState:
    """This process's place in the launch, usable before any ``Accelerator``. ``PartialState()``
    alone ignores ``ACCELERATE_USE_CPU``, so in a multi-process CPU launch each process would
    think it runs alone. A launch that did not form its group stops here (:func:`check_launch`);
    ``timeout_s`` bounds every collective of the group this call starts."""
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    check_launch()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **timeout)
    check_launch(state)
    return state


def make_accelerator(cfg: JobConfig) -> Accelerator:
    process_state(cfg.train.dist_timeout_s)
    backend = cfg.tracking.backend
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    return Accelerator(mixed_precision=accelerator_precision(cfg.train.mixed_precision),
                       log_with=None if backend == "none" else backend,
                       project_dir=str(cfg.run_dir), kwargs_handlers=[timeout])


def run_job(cfg: JobConfig, body: Callable[[Accelerator, JobConfig, Path], Path]) -> Path:
    """The accelerator, the run directory and its lock around one job's ``body(acc, cfg,
    run_dir)``; tracking ends and the lock is dropped however the body ends. The process group
    stays up (unlike ``Accelerator.end_training``): ``mim compare`` runs job after job in it, and
    the CLI tears it down when the command ends."""
    acc = make_accelerator(cfg)
    run_dir = prepare_run_dir(acc, cfg)
    try:
        return body(acc, cfg, run_dir)
    finally:
        for tracker in acc.trackers:
            tracker.finish()
        RunLock.release(run_dir)


def prepare_run_dir(acc: Accelerator, cfg: JobConfig) -> Path:
    """Create and lock the run directory; nothing else is written into it here: its config.yaml
    and log are written by :func:`mim.engine.loop.start_loop` once a resume has been accepted."""
    run_dir = cfg.run_dir
    if acc.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"config key 'run.output_dir': cannot write to {run_dir} ({e})")
        RunLock.acquire(run_dir)
        recover_checkpoints(run_dir / "checkpoints")
    acc.wait_for_everyone()
    return run_dir


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` held for the life of the process, so a second run
    cannot write into a live run's directory. The kernel drops it when the process dies."""

    _held: dict[str, int] = {}

    @classmethod
    def acquire(cls, run_dir: Path) -> None:
        key = str(run_dir.resolve())
        if key in cls._held:
            return
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use by another live run "
                              f"(pid {owner}); choose another 'run.name'") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        cls._held[key] = fd

    @classmethod
    def release(cls, run_dir: Path) -> None:
        fd = cls._held.pop(str(run_dir.resolve()), None)
        if fd is not None:
            os.close(fd)


def check_disk_space(path: Path, model: torch.nn.Module, keep_last: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints (weights + 2 AdamW moments)."""
    need = sum(p.numel() * 4 * 3 for p in model.parameters()) * (keep_last + 1)
    free = shutil.disk_usage(path).free
    if free < need:
        raise ConfigError(f"config key 'run.output_dir': {free / 2**20:.0f} MiB free at {path}, "
                          f"checkpoints need about {need / 2**20:.0f} MiB "
                          f"({keep_last + 1} x model + optimizer state)")


def start_tracking(acc: Accelerator, cfg: JobConfig, run_dir: Path) -> None:
    if cfg.tracking.backend == "none":
        return
    acc.init_trackers(cfg.tracking.project, config=cfg.to_dict(),
                      init_kwargs=tracker_init_kwargs(cfg, run_dir))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` whole or not at all: a kill mid-write leaves the old file (summary.json is
    what marks a run, or a compare cell, finished)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
