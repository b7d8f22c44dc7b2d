"""Run directory, metrics.jsonl and experiment tracking (wandb / tensorboard via accelerate)."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mim.config import JobConfig


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def tracker_init_kwargs(cfg: JobConfig, run_dir: Path) -> dict[str, Any]:
    """wandb: name, group, tags, run directory; offline when no API key is set (never a prompt)."""
    if cfg.tracking.backend != "wandb":
        return {}
    if not wandb_has_credentials() and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    kw: dict[str, Any] = {"name": cfg.run.name, "dir": str(run_dir), "tags": list(cfg.tracking.tags)}
    if cfg.tracking.group:
        kw["group"] = cfg.tracking.group
    return {"wandb": kw}


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool, resume: Any = None) -> None:
        """``resume``: the restored ``LoopState`` (None: a fresh run). The log is cut back to the
        lines it had when that checkpoint was written, so an evaluation logged after the
        checkpoint and repeated after the resume appears once."""
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume is None:
            path.write_text("")
        elif path.exists():  # drop lines logged after the checkpoint we resume from
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            keep_lines = resume.extra.get("metrics_lines")
            if keep_lines is not None:
                lines = lines[:keep_lines]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def log_model_artifact(acc: Accelerator, cfg: JobConfig, files: list[Path]) -> None:
    """``tracking.log_model=true``: the final model files as one wandb artifact of type
    "model" named ``<run.name>-model`` (offline runs keep it in their wandb folder until
    ``wandb sync``). Main process only; nothing for other backends."""
    if not cfg.tracking.log_model:
        return
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            import wandb

            artifact = wandb.Artifact(f"{cfg.run.name}-model", type="model",
                                      metadata={"run_dir": str(cfg.run_dir)})
            for f in files:
                artifact.add_file(str(f))
            tracker.run.log_artifact(artifact)
