"""``mim finetune``: a classifier from an init, fully, partially or as a linear probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mim.config.common import (JobConfig, LoopConfig, OptimConfig, RunConfig, TrackingConfig,
                               check, validate_common, validate_init)
from mim.data.config import DataConfig
from mim.models.encoder import ModelConfig


@dataclass
class ClassifierModelConfig(ModelConfig):
    """The timm ViT as a classifier; the head options mirror timm's VisionTransformer."""

    pos_embed: Literal["sincos", "learned"] = "learned"  # learnable; the init overwrites it
    num_classes: int = 0  # 0 = the number of classes of the training set
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm (MAE)
    head_batchnorm: bool = False  # BatchNorm1d(affine=False) before the head (MAE linear probe)
    head_init_std: float = 2.0e-5  # head weights ~ trunc_normal(std) (MAE: 2e-5; probe 0.01)


@dataclass
class TuneConfig:
    mode: Literal["full", "linear", "partial"] = "full"  # linear: frozen encoder
    blocks: int = 1  # partial: the last k blocks train (with the final norm and the head)


@dataclass
class FinetuneDataConfig(DataConfig):
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop as timm/MAE fine-tuning
    val_split: str = "validation"  # evaluated every train.eval_every epochs
    # no val_split in the data: a class-stratified hold-out of this fraction of 'split', drawn
    # from val_split_seed (not run.seed: every seed and compare cell scores the same images)
    val_fraction: float = 0.1
    val_split_seed: int = 0
    label_fraction: float = 1.0  # class-stratified fraction of the training labels
    auto_augment: str = ""  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (MAE)
    reprob: float = 0.0  # random erasing probability (MAE: 0.25)
    hflip: float = 0.5
    eval_crop_pct: float = 1.0  # eval: resize to img_size / crop_pct, centre crop (MAE: 0.875)
    eval_batch_size: int = 0  # 0 = data.batch_size


@dataclass
class FinetuneOptimConfig(OptimConfig):
    optimizer: Literal["adamw", "lars"] = "adamw"  # lars: MAE's linear probe
    base_lr: float = 1.0e-3  # lr = base_lr * global_batch / 256
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    layer_decay: float = 1.0  # layer-wise lr decay (MAE ViT-B: 0.65-0.75); 1 = off


@dataclass
class LossConfig:
    name: Literal["ce", "focal"] = "ce"  # ce: soft-target CE under mixup
    label_smoothing: float = 0.0
    gamma: float = 2.0  # focal
    alpha: list[float] = field(default_factory=list)  # focal: one weight per class; [] = none


@dataclass
class MixupConfig:
    mixup_alpha: float = 0.0  # 0 and cutmix_alpha 0: off
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"


@dataclass
class DropoutConfig:
    """Dropout and drop-path schedule of Liu et al. 2023, "Dropout Reduces Underfitting"."""

    rate: float = 0.0  # dropout after attention/MLP projections and position embedding
    schedule: Literal["constant", "early", "late"] = "constant"  # scales rate and drop_path
    epochs: int = 0  # E: early = on for epochs [0, E); late = on from epoch E


@dataclass
class FinetuneTrainConfig(LoopConfig):
    epochs: int = 100
    keep_last: int = 1  # a checkpoint is also written every epoch
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    best_metric: Literal["top1", "top5", "macro_f1", "loss"] = "top1"
    ema_decay: float = 0.0  # > 0: keep a model EMA (timm's) and evaluate and export it; 0 = off


@dataclass
class FinetuneConfig(JobConfig):
    init: str = "scratch"  # scratch | mim run dir | .safetensors | MAE/BEiT .pth | timm:<name>
    init_file: str = ""  # timm:<name> weights from a local file instead of a download
    init_strict: bool = True  # an init filling < half of the encoder's tensors is an error
    run: RunConfig = field(default_factory=RunConfig)
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        validate_common(self)
        validate_finetune(self)


def validate_finetune(cfg: FinetuneConfig) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    validate_init(cfg)
    check(m.num_classes >= 0, "config key 'model.num_classes' must be >= 0")
    check(m.head_init_std > 0, "config key 'model.head_init_std' must be positive")
    check(cfg.tune.blocks >= 1, "config key 'tune.blocks' must be >= 1")
    if cfg.tune.mode == "linear":
        check(m.drop_path_rate == 0 and cfg.dropout.rate == 0,
               "tune.mode=linear freezes the encoder: 'model.drop_path_rate' and 'dropout.rate' "
               "must be 0")
    check(0 < d.label_fraction <= 1,
           f"config key 'data.label_fraction' must be in (0, 1], got {d.label_fraction}")
    check(bool(d.val_split), "config key 'data.val_split' must be set")
    check(0 < d.val_fraction < 1,
          f"config key 'data.val_fraction' must be in (0, 1), got {d.val_fraction}")
    check(0 <= d.reprob <= 1 and 0 <= d.hflip <= 1,
           "config keys 'data.reprob'/'data.hflip' must be in [0, 1]")
    check(0 < d.eval_crop_pct <= 1, "config key 'data.eval_crop_pct' must be in (0, 1]")
    check(d.eval_batch_size >= 0, "config key 'data.eval_batch_size' must be >= 0")
    check(0 < o.layer_decay <= 1, f"config key 'optim.layer_decay' must be in (0, 1], "
                                   f"got {o.layer_decay}")
    check(0 <= cfg.loss.label_smoothing < 1, "config key 'loss.label_smoothing' must be in [0, 1)")
    check(cfg.loss.gamma >= 0, "config key 'loss.gamma' must be >= 0")
    check(all(a >= 0 for a in cfg.loss.alpha), "config key 'loss.alpha' must be >= 0")
    check(not cfg.loss.alpha or cfg.loss.name == "focal",
           "config key 'loss.alpha' weights the focal loss: set loss.name=focal")
    check(not (cfg.loss.alpha and m.num_classes and len(cfg.loss.alpha) != m.num_classes),
           f"config key 'loss.alpha' needs one weight per class ({m.num_classes})")
    mx = cfg.mixup
    check(mx.mixup_alpha >= 0 and mx.cutmix_alpha >= 0,
           "config keys 'mixup.mixup_alpha'/'mixup.cutmix_alpha' must be >= 0")
    check(0 <= mx.prob <= 1 and 0 <= mx.switch_prob <= 1,
           "config keys 'mixup.prob'/'mixup.switch_prob' must be in [0, 1]")
    if mx.mixup_alpha > 0 or mx.cutmix_alpha > 0:
        check(d.batch_size % 2 == 0, "mixup/cutmix pairs images: 'data.batch_size' must be even")
    dr = cfg.dropout
    check(0 <= dr.rate < 1, f"config key 'dropout.rate' must be in [0, 1), got {dr.rate}")
    check(dr.schedule == "constant" or 0 < dr.epochs < t.epochs,
           f"config key 'dropout.epochs' must be in (0, train.epochs) for the "
           f"'{dr.schedule}' schedule, got {dr.epochs}")
    check(t.eval_every > 0, "config key 'train.eval_every' must be positive")
    check(0 <= t.ema_decay < 1,
          f"config key 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
