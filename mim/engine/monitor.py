"""The representation monitor of a pretraining run (``monitor:``; off by default).

Before the first update and every ``monitor.every`` epochs, the current encoder embeds the
monitor's labeled set and the run logs its k-NN top-1 (and, with ``monitor.linear_epochs``, a
linear probe's) to ``metrics.jsonl``, wandb and the progress line, with its cost in seconds.
Every process takes part (each embeds its share of the images); the probe draws no number from
the training generators (they are saved and restored around it), so a resumed run still repeats
the uninterrupted one. ``monitor.keep_best`` keeps the best-by-k-NN encoder as
``encoder_best.safetensors`` (the best value travels in the checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mim.config import PretrainConfig
from mim.data.loader import sample_seed, seeded_rngs
from mim.engine.run import write_json
from mim.engine.tracking import MetricsLog
from mim.probe.probe import Probe

BEST_FILE = "encoder_best.safetensors"


class Monitor:
    def __init__(self, acc, cfg: PretrainConfig, run_dir: Path) -> None:
        self.m, self.seed, self.run_dir = cfg.monitor, cfg.run.seed, run_dir
        self.probe = Probe(self.m.data, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                           cfg.run.seed)
        held = self.probe.holdout()
        if held is not None and acc.is_main_process:
            write_json(run_dir / "monitor_val_split.json", held)

    @classmethod
    def for_run(cls, acc, cfg: PretrainConfig, run_dir: Path) -> Monitor | None:
        return cls(acc, cfg, run_dir) if cfg.monitor.every else None

    def accounting(self) -> tuple[str, str]:
        p = self.probe
        held = " (held out of its train split)" if p.sets.held_out else ""
        return ("monitor", f"k-NN (k={self.m.k}) every {self.m.every} epochs on "
                           f"{len(p.train_labels)} + {len(p.val_labels)} labeled images{held}")

    def after_epochs(self, acc, model: torch.nn.Module, state: Any, metrics: MetricsLog,
                     epochs_done: int, export: Any) -> None:
        """Probe after ``epochs_done`` epochs (0: the init, before the first update) when due.
        ``export(acc, model, path)`` writes the encoder file ``keep_best`` keeps."""
        if epochs_done % self.m.every:
            return
        net = acc.unwrap_model(model)
        with seeded_rngs(sample_seed(self.seed, epochs_done, 0x3011)):
            result = self.probe.run(net.encoder, acc.device, self.m.k, self.m.temperature,
                                    self.m.linear_epochs, self.seed + epochs_done, acc.autocast)
        rec = {"step": state.step, "epoch": epochs_done, "knn_top1": result.top1,
               "knn_seconds": result.seconds}
        if result.linear_top1 is not None:
            rec["linear_top1"] = result.linear_top1
        metrics.write(rec)
        acc.log({f"monitor/{k}": v for k, v in rec.items() if k != "step"}, step=state.step)
        linear = (f", linear probe {result.linear_top1:.4f}" if result.linear_top1 is not None
                  else "")
        acc.print(f"monitor: epoch {epochs_done}: knn_top1 {result.top1:.4f}{linear} "
                  f"({result.images} images, {result.seconds:.1f} s)")
        if self.m.keep_best and result.top1 > state.extra.get("monitor_best", -1.0):
            state.extra.update(monitor_best=result.top1, monitor_best_epoch=epochs_done)
            tmp = self.run_dir / f".{BEST_FILE}.tmp"
            export(acc, model, tmp)  # every process: the state is gathered under FSDP
            if acc.is_main_process:
                os.replace(tmp, self.run_dir / BEST_FILE)
            acc.wait_for_everyone()
