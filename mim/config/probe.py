"""The representation probes: ``monitor:`` of a pretraining and ``mim knn``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim.config.common import check, validate_init
from mim.data.config import DataConfig
from mim.models.encoder import ModelConfig
from mim.typed_config import plain


@dataclass
class ProbeDataConfig(DataConfig):
    """A labeled set the k-NN / linear probe embeds: its ``split`` is the probe's memory bank,
    ``val_split`` what it classifies; a source without ``val_split`` gives a class-stratified
    hold-out of ``val_fraction`` of ``split`` (seeded by ``val_split_seed``)."""

    synthetic_size: int = 1024
    val_split: str = "val"
    val_fraction: float = 0.2
    val_split_seed: int = 0
    batch_size: int = 128
    num_workers: int = 2


@dataclass
class MonitorConfig:
    """The representation monitor of a pretraining: a k-NN probe every ``every`` epochs."""

    every: int = 0  # epochs between probes; 0 = off
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    k: int = 20  # neighbours (DINO)
    temperature: float = 0.07  # vote weight exp(cosine / T) (DINO)
    linear_epochs: int = 0  # > 0: also a linear probe trained this many epochs on the features
    keep_best: bool = False  # keep the best-by-k-NN encoder as encoder_best.safetensors

    def validate(self, prefix: str = "monitor.") -> None:
        check(self.every >= 0, f"config key '{prefix}every' must be >= 0, got {self.every}")
        validate_probe(self.k, self.temperature, self.linear_epochs, prefix)
        check(not self.keep_best or self.every > 0,
              f"config key '{prefix}keep_best' needs the monitor on ('{prefix}every' > 0)")
        if self.every:
            validate_probe_data(self.data, f"{prefix}data.")


@dataclass
class KnnConfig:
    """`mim knn`: the monitor's probe as a command on any init (model keys default to the
    init's own run when it is a mim run)."""

    init: str = "scratch"
    init_file: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    k: int = 20
    temperature: float = 0.07
    linear_epochs: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    def validate(self) -> None:
        validate_init(self)
        validate_probe_data(self.data, "data.")
        validate_probe(self.k, self.temperature, self.linear_epochs, "")
        check(self.model.img_size % self.model.patch_size == 0,
              "config key 'model.img_size' must be a multiple of 'model.patch_size'")


def validate_probe(k: int, temperature: float, linear_epochs: int, prefix: str) -> None:
    check(k >= 1, f"config key '{prefix}k' must be >= 1, got {k}")
    check(temperature > 0, f"config key '{prefix}temperature' must be positive")
    check(linear_epochs >= 0, f"config key '{prefix}linear_epochs' must be >= 0")


def validate_probe_data(d: ProbeDataConfig, prefix: str) -> None:
    check(sum([bool(d.name), bool(d.path), d.synthetic]) == 1,
          f"exactly one of '{prefix}name', '{prefix}path', '{prefix}synthetic' must be set "
          f"(got name={d.name!r}, path={d.path!r}, synthetic={d.synthetic})")
    check(not d.path or Path(d.path).exists(),
          f"config key '{prefix}path': no such file or folder: {d.path}")
    check(0 < d.val_fraction < 1,
          f"config key '{prefix}val_fraction' must be in (0, 1), got {d.val_fraction}")
    check(d.batch_size > 0, f"config key '{prefix}batch_size' must be positive")
    check(d.num_workers >= 0, f"config key '{prefix}num_workers' must be >= 0")
    check(not d.streaming, f"config key '{prefix}streaming': the probe needs a map-style set")
