"""Pieces every job shares: the accelerator, the run directory, optimizer and schedule, clipping,
accounting, and the checkpoint state of a training loop."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.flop_counter import FlopCounterMode

from mim.config import ConfigError, RunError, save_config
from mim.data.loader import sample_seed
from mim.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mim.engine.tracking import tracker_init_kwargs


def process_state() -> PartialState:
    """This process's place in the launch, usable before any ``Accelerator``. ``PartialState()``
    alone ignores ``ACCELERATE_USE_CPU``, so in a multi-process CPU launch each process would
    think it runs alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def make_accelerator(cfg: Any) -> Accelerator:
    backend = cfg.tracking.backend
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       log_with=None if backend == "none" else backend,
                       project_dir=str(cfg.run_dir), kwargs_handlers=[timeout])


def run_job(cfg: Any, body: Callable[[Accelerator, Any, Path], Path]) -> Path:
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


def prepare_run_dir(acc: Accelerator, cfg: Any) -> Path:
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
        save_config(cfg, run_dir / "config.yaml")
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


class StopRequest:
    """SIGTERM (how clusters preempt) and SIGINT become a flag checked between updates; every
    process agrees on the flag, saves a checkpoint and exits (status 143) before the grace period."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

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


def start_tracking(acc: Accelerator, cfg: Any, run_dir: Path) -> None:
    if cfg.tracking.backend == "none":
        return
    acc.init_trackers(cfg.tracking.project, config=cfg.to_dict(),
                      init_kwargs=tracker_init_kwargs(cfg, run_dir))


def seed_step(seed: int, rank: int, micro_step: int) -> None:
    """Reseed every RNG a step draws from (masks, drop path, timm's numpy-drawn mixup) as a pure
    function of its position, so a resumed run repeats the uninterrupted one exactly."""
    s = sample_seed(seed, rank, micro_step, 0xC0DE)
    torch.manual_seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)


def build_optimizer(model: torch.nn.Module, cfg: Any, lr: float, **kw: Any) -> torch.optim.Optimizer:
    """AdamW (or ``optim.optimizer`` where the config has one); no weight decay on norms, biases,
    position and class/mask tokens (timm's groups); ``layer_decay=`` goes through to timm.

    Adam-family optimizers use torch's fused kernel (one pass over all parameters; on CPU 5-10x
    faster than the per-tensor or foreach ones, see docs/benchmarks.md) on CUDA and CPU, unless
    ``kw`` chooses; a fused optimizer can also skip a step on the device (:func:`step_if_finite`).
    """
    name = getattr(cfg.optim, "optimizer", "adamw")
    if "adam" in name:
        kw.setdefault("betas", tuple(cfg.optim.betas))
        device = next(model.parameters()).device.type
        if name in ("adam", "adamw") and device in ("cuda", "cpu") and "foreach" not in kw:
            kw.setdefault("fused", True)
    return create_optimizer_v2(model, name, lr=lr, weight_decay=cfg.optim.weight_decay, **kw)


def apply_speed_options(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """``train.grad_checkpointing`` and ``train.compile``, applied in place once after the model is
    built, so parameter names, state dicts and checkpoints do not change.

    Compilation is regional: every transformer block is compiled on its own and the blocks of one
    stack share the compiled code (one graph for the encoder's token count, one for the
    decoder's), which compiles in a fraction of the whole-model time, composes with activation
    checkpointing, and keeps the mask draws in eager mode, so the losses match
    ``train.compile=false`` up to float rounding."""
    if cfg.train.grad_checkpointing:
        for part in model.modules():
            if part is not model and hasattr(part, "set_grad_checkpointing"):
                part.set_grad_checkpointing(True)
    if cfg.train.compile:
        for block in transformer_blocks(model):
            block.compile(dynamic=False)  # encoder and decoder token counts: two static graphs
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module held in a ``blocks`` container (timm ViT blocks, MAE decoder blocks)."""
    return [b for name, m in model.named_modules() if name.split(".")[-1] == "blocks"
            for b in m.children()]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_updates: int,
                    updates_per_epoch: int) -> CosineLRScheduler:
    """Per-update linear warmup from 0, then cosine to ``optim.min_lr`` at the last update."""
    warmup = min(int(round(cfg.optim.warmup_epochs * updates_per_epoch)), max(total_updates - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_updates - warmup, 1),
                             lr_min=cfg.optim.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)


def finish_update(acc: Accelerator, cfg: Any, optimizer: torch.optim.Optimizer,
                  params: list[torch.nn.Parameter], loss: torch.Tensor, state: "LoopState",
                  nonfinite: "NonFiniteGuard", global_batch: int) -> tuple[bool, torch.Tensor]:
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


@dataclass
class LoopState:
    """Where a training loop stands; saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    update_in_epoch: int = 0  # updates done within ``epoch``
    images_seen: int = 0
    bad_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_resume(cfg: Any, run_dir: Path) -> Path | None:
    mode = cfg.run.resume
    if mode == "none":
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    return Path(mode)


def save_training_state(acc: Accelerator, cfg: Any, run_dir: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any, state: LoopState) -> None:
    model_state = acc.get_state_dict(model)
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else {}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        log = run_dir / "metrics.jsonl"  # how much of the log this checkpoint has seen
        state.extra["metrics_lines"] = (sum(1 for ln in log.read_text().splitlines() if ln.strip())
                                        if log.exists() else 0)
        train_state = {
            "config": cfg.to_dict(),
            "loop": {k: v for k, v in state.__dict__.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler,
            "rng": rng,
            "num_processes": acc.num_processes,
        }
        save_checkpoint(run_dir / "checkpoints", state.step, model_state, train_state,
                        cfg.train.keep_last)
    acc.wait_for_everyone()


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def restore_training_state(acc: Accelerator, cfg: Any, path: Path, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> LoopState:
    model_state, train_state = load_checkpoint(path)
    # The schedule is recomputed from the current config (a pure function of the update index),
    # so a resume that changes train.epochs follows the new schedule; say what changed.
    changed = config_diff(train_state["config"], cfg.to_dict())
    changed = [c for c in changed if not c.startswith(("run.resume", "train.max_steps"))]
    try:
        missing, unexpected = acc.unwrap_model(model).load_state_dict(model_state, strict=False)
    except RuntimeError as e:  # tensor shapes differ
        missing, unexpected = [str(e).splitlines()[-1].strip()], []
    missing = [k for k in missing if not k.endswith("decoder.pos_embed")]
    if missing or unexpected:
        arch = sorted((c for c in changed if c.startswith(("model.", "method."))
                       and ": None -> " not in c),  # keys the old config did not have yet
                      key=lambda c: not c.startswith("model."))
        raise ConfigError(f"{path} holds another model than this config's ("
                          + ("; ".join(arch[:4]) if arch else
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
                          + f"); give the run a new 'run.name' or delete {cfg.run_dir}")
    optimizer.load_state_dict(train_state["optimizer"])
    if changed:
        acc.print("note: resuming with a changed config: " + "; ".join(changed))
    if acc.scaler is not None and train_state.get("scaler"):
        acc.scaler.load_state_dict(train_state["scaler"])
    if train_state.get("num_processes") != acc.num_processes:
        acc.print(f"note: checkpoint was written by {train_state.get('num_processes')} processes, "
                  f"resuming on {acc.num_processes}; the data order within the epoch changes")
    loop = train_state["loop"]
    return LoopState(**loop)


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
    width = max(len(k) for k, _ in rows)
    acc.print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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


def record_label_issues(acc: Accelerator, run_dir: Path, state: LoopState, issues: list[str],
                        split: str) -> None:
    """List label problems found while loading (dropped boxes, malformed lines) in
    data_issues.jsonl, the way validation's are listed at start-up; the first one is printed."""
    if not issues:
        return
    if not state.extra.get("warned_label_issues"):
        acc.print(f"warning: {issues[0]} ('{split}' split); all are listed in data_issues.jsonl")
        state.extra["warned_label_issues"] = True
    with open(run_dir / "data_issues.jsonl", "a") as f:
        f.writelines(json.dumps({"split": split, "issue": issue, "rank": acc.process_index,
                                 "step": state.step}) + "\n" for issue in issues)


def record_bad_samples(acc: Accelerator, run_dir: Path, state: LoopState, bad: list,
                       seen: set, max_bad: int | None = None, max_fraction: float = 0.0) -> None:
    """Count each unreadable file once and list it in data_issues.jsonl (path, error, rank);
    more than ``max_bad`` on this process stops the run."""
    new = [(p, err) for p, err in bad if p not in seen]
    if not new:
        return
    seen.update(p for p, _ in new)
    state.bad_samples += len(new)
    with open(run_dir / "data_issues.jsonl", "a") as f:
        for path, err in new:
            f.write(json.dumps({"rank": acc.process_index, "path": path, "error": err,
                                "step": state.step}) + "\n")
    acc.print(f"warning: skipped unreadable image {new[0][0]} ({new[0][1]}); "
              f"{state.bad_samples} so far, listed in data_issues.jsonl")
    if max_bad is not None and state.bad_samples > max_bad:
        raise RunError(f"{state.bad_samples} unreadable images, more than data.max_bad_fraction="
                       f"{max_fraction} of the data; see {run_dir}/data_issues.jsonl")
