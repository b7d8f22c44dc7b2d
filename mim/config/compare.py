"""``mim compare``: every init x label fraction x seed fine-tuned with one recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mim.config.common import JobConfig, TrackingConfig, check


@dataclass
class CompareRunConfig:
    name: str = "compare"
    output_dir: str = "runs"


@dataclass
class CompareConfig(JobConfig):
    """``mim compare``: every init x label fraction x seed fine-tuned with one recipe."""

    run: CompareRunConfig = field(default_factory=CompareRunConfig)
    # name -> init, as the fine-tune key 'init' takes it: scratch | a run dir | file | timm:<name>
    inits: dict[str, str] = field(default_factory=dict)
    init_files: dict[str, str] = field(default_factory=dict)  # name -> local file for timm:<name>
    finetune: str = ""  # the downstream fine-tune config file (classification or detection)
    overrides: list[str] = field(default_factory=list)  # key=value over it, for every cell
    # label fraction -> more key=value for its cells (more epochs at 1%, say), alike for every init
    fraction_overrides: dict[float, list[str]] = field(default_factory=dict)
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # auto: top1 for a classification recipe, map for a detection one (task: detect)
    metric: Literal["auto", "top1", "top5", "macro_f1", "loss", "map", "map_50", "map_75",
                    "mar_100", "mean_iou"] = "auto"
    score: Literal["final", "best"] = "final"  # best = the best epoch on validation (optimistic)
    allow_resample: bool = False  # accept inits whose pos/patch embeddings need resampling
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        check(bool(self.inits), "config key 'inits' must name at least one init (name: init)")
        for name, init in self.inits.items():
            check(bool(name) and all(c.isalnum() or c in "-_." for c in name),
                   f"config key 'inits.{name}': init names may hold letters, digits, '-_.' only")
            check(init == "scratch" or init.startswith("timm:") or Path(init).exists(),
                   f"config key 'inits.{name}' must be 'scratch', 'timm:<name>' or an existing "
                   f"path, got {init!r}")
        for name, f in self.init_files.items():
            check(self.inits.get(name, "").startswith("timm:"),
                   f"config key 'init_files.{name}' goes with a timm:<name> init only")
            check(Path(f).is_file(), f"config key 'init_files.{name}': no such file: {f}")
        check(bool(self.finetune) and Path(self.finetune).is_file(),
               f"config key 'finetune' must name a fine-tune config file, got {self.finetune!r}")
        check(bool(self.label_fractions) and all(0 < f <= 1 for f in self.label_fractions),
               f"config key 'label_fractions' must be values in (0, 1], got {self.label_fractions}")
        check(len(set(self.label_fractions)) == len(self.label_fractions),
               "config key 'label_fractions' holds a value twice")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
               f"config key 'seeds' must be distinct seeds, got {self.seeds}")
        for f in self.fraction_overrides:
            check(f in self.label_fractions, f"config key 'fraction_overrides.{f:g}': {f:g} is "
                   f"not one of the label_fractions {self.label_fractions}")
        for where, items in [("overrides", self.overrides)] + [
                (f"fraction_overrides.{f:g}", v) for f, v in self.fraction_overrides.items()]:
            for item in items:
                key = item.partition("=")[0].strip()
                check("=" in item and bool(key),
                       f"config key '{where}': '{item}' is not key=value")
                check(key not in ("init", "init_file", "data.label_fraction", "run.seed",
                                   "run.name", "run.output_dir", "run.resume"),
                       f"config key '{where}': '{key}' is set by the comparison for every cell")
