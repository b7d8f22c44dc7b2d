"""A training loop's state and its save and resume (the checkpoint's ``state.pt`` side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from mim.checkpoint import (NonFiniteWeights, check_finite_weights, load_checkpoint,
                            load_latest_usable, save_checkpoint)
from mim.config import JobConfig
from mim.engine.distributed import load_model_state, load_optimizer_state, optimizer_state
from mim.errors import ConfigError


@dataclass
class LoopState:
    """Where a training loop stands; saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    update_in_epoch: int = 0  # updates done within ``epoch``
    images_seen: int = 0
    bad_samples: int = 0
    # a model EMA's weights (train.ema_decay): the EMA's own tensors, which timm moves in place
    model_ema: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_resume(acc: Accelerator, cfg: JobConfig, run_dir: Path
                   ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint to resume from, loaded: ``run.resume=auto`` takes the newest that loads
    (newer unreadable ones are reported and set aside), a folder must load."""
    mode = cfg.run.resume
    if mode == "none":
        return None
    if mode == "auto":
        return load_latest_usable(run_dir / "checkpoints", acc.is_main_process, acc.print)
    return (Path(mode), *load_checkpoint(Path(mode)))


def save_training_state(acc: Accelerator, cfg: JobConfig, run_dir: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any, state: LoopState) -> None:
    model_state = acc.get_state_dict(model)  # every process: FSDP gathers the shards
    _agree_finite_weights(acc, model_state, state.step)
    optim_state, optim_format = optimizer_state(acc, model, optimizer)
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
            "optimizer": optim_state,
            "optimizer_format": optim_format,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler,
            "rng": rng,
            "num_processes": acc.num_processes,
        }
        save_checkpoint(run_dir / "checkpoints", state.step, model_state, train_state,
                        cfg.train.keep_last)
    acc.wait_for_everyone()


def _agree_finite_weights(acc: Accelerator, model_state: dict[str, torch.Tensor],
                          step: int) -> None:
    """Every process stops if any process's copy of the weights (all of it under DDP; only rank
    0's gathered copy under FSDP, the others hold an empty dict) is not finite."""
    try:
        check_finite_weights(model_state, step)
        bad, error = 0.0, None
    except NonFiniteWeights as e:
        bad, error = 1.0, e
    if acc.num_processes > 1:
        bad = acc.reduce(torch.tensor(bad, device=acc.device), reduction="sum").item()
    if error is not None:
        raise error
    if bad:
        raise NonFiniteWeights(f"another process found inf/NaN weights at update {step}; "
                               "not saved")


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


def restore_training_state(acc: Accelerator, cfg: JobConfig, loaded: tuple[Path, dict, dict],
                           model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
    path, model_state, train_state = loaded
    # The schedule is recomputed from the current config (a pure function of the update index),
    # so a resume that changes train.epochs follows the new schedule; say what changed.
    changed = config_diff(train_state["config"], cfg.to_dict())
    changed = [c for c in changed if not c.startswith(("run.resume", "train.max_steps"))
               and not (c.startswith("method.") and c.endswith(" -> None"))]  # flat old section
    try:
        missing, unexpected = load_model_state(acc, model, model_state)
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
    load_optimizer_state(acc, model, optimizer, train_state["optimizer"],
                         train_state.get("optimizer_format", "by_index"))
    if changed:
        acc.print("note: resuming with a changed config: " + "; ".join(changed))
    if acc.scaler is not None and train_state.get("scaler"):
        acc.scaler.load_state_dict(train_state["scaler"])
    if train_state.get("num_processes") != acc.num_processes:
        acc.print(f"note: checkpoint was written by {train_state.get('num_processes')} processes, "
                  f"resuming on {acc.num_processes}; the data order within the epoch changes")
    loop = train_state["loop"]
    return LoopState(**loop)


def start_model_ema(acc: Accelerator, decay: float, model: torch.nn.Module,
                    state: LoopState) -> ModelEmaV3 | None:
    """``train.ema_decay`` (fine-tuning, detection): timm's EMA of the model, for the job's
    ``after_update`` hook; None when ``decay`` is 0. ``state.model_ema`` holds its very tensors (timm moves them in place), so every checkpoint
    saves them and a resume continues them."""
    if not decay:
        return None
    ema = ModelEmaV3(acc.unwrap_model(model), decay=decay)
    if state.model_ema:
        ema.module.load_state_dict(state.model_ema)
    elif state.step:
        acc.print("note: the checkpoint holds no model EMA; it starts from the resumed weights")
    state.model_ema = ema.module.state_dict()
    return ema
