"""Training checkpoints: one folder per save, written atomically, readable without pickle.

Layout of ``<run>/checkpoints/step_00000120/``:
  model.safetensors   the whole training model (encoder + method heads), unwrapped
  state.pt            optimizer, scheduler, scaler, RNG, data position, resolved config, format
                      version; tensors and plain Python values only (``weights_only=True`` loads it)

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into
place, so a kill during the write leaves the previous checkpoint as the newest complete one. A
temporary folder is complete once its ``state.pt`` exists (written last, under another name, then
renamed); :func:`recover_checkpoints` adopts a complete one a kill left behind. A re-save of a
step that exists moves the old folder aside before the new one takes its name, and deletes it
only then. A checkpoint that cannot be read is renamed ``step_N.unreadable`` (never deleted) and
the one before it is used.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (exit code 1, one line)."""


class UnsafeCheckpoint(CheckpointError):
    """A file that would need arbitrary unpickling (code execution) to load."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files are truncated, corrupt or not mim's."""


class NonFiniteWeights(CheckpointError):
    """Weights with inf/NaN values, never saved as the newest checkpoint."""


_NAME = re.compile(r"^step_(\d{8})$")
_TMP = re.compile(r"^\.tmp_step_(\d{8})_\d+$")
_ASIDE = re.compile(r"^\.old_step_(\d{8})_\d+$")


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


def check_finite_weights(model_state: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to checkpoint inf/NaN weights: the previous checkpoint stays the newest."""
    for name, t in model_state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeights(f"the weights hold inf/NaN values at update {step} (first: "
                                   f"'{name}'); not saved, the newest checkpoint is the one "
                                   "before. Lower the lr or weight decay and resume")


def save_checkpoint(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(ckpt_root)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_dict_for_save(model_state), str(tmp / "model.safetensors"))
    _fsync_file(tmp / "model.safetensors")
    torch.save({"format_version": FORMAT_VERSION, **train_state}, tmp / "state.pt.part")
    _fsync_file(tmp / "state.pt.part")
    os.rename(tmp / "state.pt.part", tmp / "state.pt")  # the folder is complete from here on
    _fsync_dir(tmp)
    aside = ckpt_root / f".old_step_{step:08d}_{os.getpid()}"
    if final.exists():  # a re-save of the same step (e.g. final == periodic): old one aside first
        os.rename(final, aside)
        _fsync_dir(ckpt_root)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    if aside.exists():
        shutil.rmtree(aside)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "state.pt").is_file()


def recover_checkpoints(ckpt_root: Path) -> list[str]:
    """Put right what a kill during :func:`save_checkpoint` left (the run directory is locked by
    the caller): a complete temporary folder whose step has no checkpoint is adopted (renamed into
    place), one whose step has a checkpoint again is kept as ``step_N.recovered``; a folder set
    aside for a re-save goes back when its replacement never got its name, and is deleted when it
    did; incomplete temporary folders (never a usable checkpoint) are deleted. Temporary folders
    go first, so a re-save killed between its two renames ends with the new copy. Returns what it
    did, one line each."""
    if not ckpt_root.is_dir():
        return []
    done = []
    for folder in sorted(ckpt_root.iterdir(), key=lambda p: not p.name.startswith(".tmp")):
        aside, tmp = _ASIDE.match(folder.name), _TMP.match(folder.name)
        if not (aside or tmp):
            continue
        final = ckpt_root / f"step_{(aside or tmp).group(1)}"
        if tmp and not _complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
        elif tmp or not final.exists():
            target = final if not final.exists() else _free_name(final, ".recovered")
            os.rename(folder, target)
            done.append(f"recovered {target.name} from {folder.name}")
        else:
            shutil.rmtree(folder, ignore_errors=True)  # its replacement is complete and named
    if done:
        _fsync_dir(ckpt_root)
    return done


def _free_name(path: Path, suffix: str) -> Path:
    target, i = path.with_name(path.name + suffix), 1
    while target.exists():
        target, i = path.with_name(f"{path.name}{suffix}{i}"), i + 1
    return target


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
    """(model state, training state); :class:`UnreadableCheckpoint` for a torn or foreign folder,
    :class:`UnsafeCheckpoint` for a pickle that would run code."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    try:
        model_state = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UnreadableCheckpoint(f"{path / 'model.safetensors'} is unreadable "
                                   f"({_first_line(e)})") from None
    try:
        train_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a pickle of objects: bytes that are no pickle at all
            raise UnreadableCheckpoint(f"{path / 'state.pt'} is unreadable (not a torch file: "
                                       f"{_first_line(e)[:120]})") from None
        raise UnsafeCheckpoint(f"{path / 'state.pt'} holds pickled objects other than tensors and "
                               f"plain values; refused without running them "
                               f"({_first_line(e)[:200]})") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails many ways; all mean "unreadable"
        raise UnreadableCheckpoint(f"{path / 'state.pt'} is unreadable ({type(e).__name__}: "
                                   f"{_first_line(e)[:160]})") from None
    _check_train_state(train_state, path / "state.pt")
    return model_state, train_state


_SECTIONS = {"config": dict, "loop": dict, "optimizer": dict, "scheduler": dict}
_LOOP_INTS = ("step", "epoch", "update_in_epoch", "images_seen", "bad_samples")
_LOOP_DICTS = ("extra", "model_ema")  # model_ema: the fine-tuning EMA's tensors (or none)


def _check_train_state(state: Any, path: Path) -> None:
    """The layout :func:`save_checkpoint` writes, so that a foreign or hand-edited file is one
    error here instead of a KeyError deep in the resume."""
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise UnreadableCheckpoint(f"checkpoint {path.parent} has format version {version}, "
                                   f"this mim reads version {FORMAT_VERSION}")
    for key, kind in _SECTIONS.items():
        if not isinstance(state.get(key), kind):
            raise UnreadableCheckpoint(f"{path} is not a mim training state (no '{key}' section)")
    loop = state["loop"]
    if set(loop) - {*_LOOP_INTS, *_LOOP_DICTS} or not all(
            isinstance(loop.get(k, 0), int) for k in _LOOP_INTS) \
            or not all(isinstance(loop.get(k) or {}, dict) for k in _LOOP_DICTS):
        raise UnreadableCheckpoint(f"{path} is not a mim training state (its 'loop' section: "
                                   f"{sorted(loop)[:6]})")
    if not {"state", "param_groups"} <= set(state["optimizer"]):
        raise UnreadableCheckpoint(f"{path} is not a mim training state (its optimizer section)")


def load_weights_into(model: torch.nn.Module, path: Path) -> None:
    """A run's exported weights (``best/`` or the final model) into ``model``; a torn file or
    weights of another model are one :class:`UnreadableCheckpoint` line."""
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise UnreadableCheckpoint(f"{path} does not load into this run's model "
                                   f"({_first_line(e)[:160]})") from None


def load_latest_usable(ckpt_root: Path, set_aside: bool, warn: Callable[[str], None]
                       ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that loads, as ``(path, model state, training state)``; None when
    there is none. Each newer one that does not load is reported through ``warn`` and, when
    ``set_aside`` (the main process), renamed ``step_N.unreadable``. When checkpoints exist (or
    were set aside before) but none loads: :class:`UnreadableCheckpoint`."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return (path, *load_checkpoint(path))
        except UnreadableCheckpoint as e:
            where = path
            if set_aside and path.exists():
                where = _free_name(path, ".unreadable")
                os.rename(path, where)
            warn(f"warning: {e}; set aside as {where.name}, trying the one before")
    unreadable = sorted(p.name for p in ckpt_root.glob("step_*.unreadable*")) \
        if ckpt_root.is_dir() else []
    if unreadable:
        raise UnreadableCheckpoint(f"no usable checkpoint in {ckpt_root} (set aside as unreadable: "
                                   f"{', '.join(unreadable[:3])}); start over with "
                                   "run.resume=none or resume from one with run.resume=<folder>")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
