"""What a launch asks for and what it gets: mixed precision (the launcher's unless the config
says otherwise), a process group of the size the environment announces, and the FSDP-safe
ways to reach the model's weights, pictures and optimizer state from every process."""

from __future__ import annotations

import os

from accelerate import Accelerator

from mim.errors import ConfigError

# what ``accelerate launch`` (its config file or --mixed_precision) hands its processes
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def launcher_precision() -> str | None:
    """The launcher's mixed precision, or None where nothing set one (plain python, torchrun)."""
    value = os.environ.get(LAUNCHER_PRECISION, "").strip().lower()
    return value or None


def accelerator_precision(setting: str) -> str | None:
    """``train.mixed_precision`` as ``Accelerator(mixed_precision=...)`` takes it: ``auto`` is
    None, which accelerate resolves to the launcher's setting ('no' where none is set)."""
    return None if setting == "auto" else setting


def resolved_precision(setting: str) -> str:
    """The precision a job without an accelerator (the benchmarks) runs: the same rule."""
    return (launcher_precision() or "no") if setting == "auto" else setting


def precision_note(acc: Accelerator) -> str:
    """The accounting's 'mixed precision' row: what runs, and whose choice it is."""
    got, launcher = acc.mixed_precision, launcher_precision()
    if launcher is None:
        return f"{got} (no launcher setting)"
    if got == launcher:
        return f"{got} (the launcher's)"
    return f"{got} (train.mixed_precision; overrides the launcher's {launcher})"
