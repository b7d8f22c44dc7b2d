"""``mim pretrain`` (and ``mim tokenizer``): a masked-image-modeling method on unlabeled images."""

from __future__ import annotations

from dataclasses import dataclass, field

from mim.config.common import (JobConfig, LoopConfig, OptimConfig, RunConfig, TrackingConfig,
                               validate_common, validate_init)
from mim.config.probe import MonitorConfig
from mim.data.config import DataConfig
from mim.methods import LEGACY_FLAT_KEYS, MethodConfig, method_configs
from mim.models.encoder import ModelConfig
from mim.typed_config import tagged


@dataclass
class TrainConfig(LoopConfig):
    vis_every: int = 1  # epochs between reconstruction grids; 0 = only at the end
    vis_images: int = 8
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    grad_checkpointing: bool = False  # recompute block activations in backward (ViT-L/H memory)


@dataclass
class PretrainConfig(JobConfig):
    init: str = "scratch"  # scratch | mim run/checkpoint | .safetensors | MAE/BEiT .pth | timm:<n>
    init_file: str = ""  # timm:<name> weights from a local file instead of a download
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # the section's dataclass is the one of its method (mim.methods), chosen by method.name
    method: MethodConfig = tagged("name", "mae", method_configs, LEGACY_FLAT_KEYS)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        validate_common(self)
        self.method.check(self.model)
        validate_init(self)
        self.monitor.validate()
