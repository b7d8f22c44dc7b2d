"""The exceptions every floor raises and the CLI turns into one line (kept low, import-free)."""

from __future__ import annotations

from mim.typed_config import ConfigError


class RunError(RuntimeError):
    """A run stopped on purpose by a guard (bad data, divergence); exit code 1, one line."""


__all__ = ["ConfigError", "RunError"]
