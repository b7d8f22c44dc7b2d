"""Typed configuration: dataclass defaults, YAML deltas, dotted ``key=value`` overrides.

The dataclasses of this package (one module per job, the shared sections in ``common``) and of
the method files (``mim.methods``) are the single source of truth for every key and its type;
the generic loader is :mod:`mim.typed_config`. A YAML file
holds only what differs from the defaults; the command line overrides either with
``a.b=value``. Everything is validated once, at start-up: an unknown key, a wrong type or an
impossible value raises :class:`ConfigError` naming the key, which the CLI turns into a
one-line message and exit code 2 before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mim.config.common import (ClipGradConfig, JobConfig, LoopConfig, OptimConfig, RunConfig,
                               TrackingConfig, check_bounded_sizes, check_run_name)
from mim.config.compare import CompareConfig, CompareRunConfig
from mim.config.detect import (DetectConfig, DetectDataConfig, DetectEvalConfig,
                               DetectLossConfig, DetectModelConfig, DetectOptimConfig,
                               DetectTrainConfig)
from mim.config.finetune import (ClassifierModelConfig, DropoutConfig, FinetuneConfig,
                                 FinetuneDataConfig, FinetuneOptimConfig, FinetuneTrainConfig,
                                 LossConfig, MixupConfig, TuneConfig)
from mim.config.pretrain import PretrainConfig, TrainConfig
from mim.config.probe import KnnConfig, MonitorConfig, ProbeDataConfig
from mim.data.config import DataConfig
from mim.errors import ConfigError, RunError
from mim.methods import MethodConfig
from mim.models.encoder import ModelConfig
from mim.typed_config import apply_overrides, build, check_finite_floats, read_yaml

SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig,
                            "detect": DetectConfig, "compare": CompareConfig,
                            "knn": KnnConfig}


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    job: str = "pretrain",
) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, then type-checked and validated."""
    if job not in SCHEMAS:
        raise ConfigError(f"unknown job '{job}' (choose from {', '.join(SCHEMAS)})")
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []), job)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def finetune_task(config: str | Path | None, overrides: list[str]) -> str:
    """The ``task`` a fine-tuning config names (YAML ``task:`` or a ``task=`` override);
    "classify" when it names none."""
    task = "classify"
    if config and Path(config).is_file():
        raw = read_yaml(config)  # a file it cannot read is one ConfigError
        if isinstance(raw, dict) and "task" in raw:
            task = str(raw["task"])
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "task":
            task = value.strip()
    if task not in ("classify", "detect"):
        raise ConfigError(f"config key 'task' must be 'detect' (or absent for classification), "
                          f"got {task!r}")
    return task


def config_from_dict(d: dict[str, Any], job: str = "pretrain") -> Any:
    """Rebuild a validated config from its ``to_dict()`` form (as stored in checkpoints)."""
    cfg = build(SCHEMAS[job], d)
    check_finite_floats(cfg)
    if isinstance(cfg, JobConfig):  # `mim knn` has no run directory
        check_run_name(cfg.run.name)
    check_bounded_sizes(cfg)
    cfg.validate()
    return cfg


__all__ = ["ClassifierModelConfig", "ClipGradConfig", "CompareConfig", "CompareRunConfig",
           "ConfigError", "DataConfig", "DetectConfig", "DetectDataConfig", "DetectEvalConfig",
           "DetectLossConfig", "DetectModelConfig", "DetectOptimConfig", "DetectTrainConfig",
           "DropoutConfig", "FinetuneConfig", "FinetuneDataConfig", "FinetuneOptimConfig",
           "FinetuneTrainConfig", "JobConfig", "KnnConfig", "LoopConfig", "LossConfig",
           "MethodConfig", "MixupConfig", "ModelConfig", "MonitorConfig", "OptimConfig",
           "PretrainConfig", "ProbeDataConfig", "RunConfig",
           "RunError", "SCHEMAS", "TrackingConfig", "TrainConfig", "TuneConfig",
           "config_from_dict", "finetune_task", "load_config", "save_config"]
