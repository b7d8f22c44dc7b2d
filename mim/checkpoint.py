"""Training checkpoints: one folder per save, written atomically, readable without pickle.

Layout of ``<run>/checkpoints/step_00000120/``:
  model.safetensors   the whole training model (encoder + method heads), unwrapped
  state.pt            optimizer, scheduler, scaler, RNG, data position, resolved config, format
                      version; tensors and plain Python values only (``weights_only=True`` loads it)

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into
place, so a kill during the write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class UnsafeCheckpoint(ValueError):
    """A file that would need arbitrary unpickling (code execution) to load."""
_NAME = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def state_dict_for_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_dict_for_save(model_state), str(tmp / "model.safetensors"))
    torch.save({"format_version": FORMAT_VERSION, **train_state}, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. final == periodic)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and (p / "model.safetensors").is_file() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.is_file():
        path = path.parent
    model_state = load_file(str(path / "model.safetensors"))
    try:
        train_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{path / 'state.pt'} holds pickled objects other than tensors and "
                               f"plain values; refused without running them "
                               f"({str(e).splitlines()[0][:200]})") from None
    version = train_state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {version}, "
                         f"this mim reads version {FORMAT_VERSION}")
    return model_state, train_state
