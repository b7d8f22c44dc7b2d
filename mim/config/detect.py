"""``mim finetune`` of a detection config: ViT + simple feature pyramid + RetinaNet."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mim.config.common import (ClipGradConfig, JobConfig, LoopConfig, OptimConfig, RunConfig,
                               TrackingConfig, check, validate_common, validate_init)
from mim.data.config import DataConfig
from mim.models.encoder import ModelConfig


@dataclass
class DetectModelConfig(ModelConfig):
    """ViT + simple feature pyramid + RetinaNet head. ``img_size`` is the largest input side:
    images are resized to fit in it and a batch is padded only up to its largest image."""

    img_size: int = 512
    pos_embed: Literal["sincos", "learned"] = "learned"  # learnable; the init overwrites it
    num_classes: int = 0  # 0 = the number of classes of the training set
    pyramid_dim: int = 256
    # Pyramid levels as multiples of the patch grid (ViTDet): 2 = deconvolution, 0.5 = pooling.
    # With 16 px patches (2, 1, 0.5, 0.25) gives strides 8, 16, 32, 64.
    pyramid_scales: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25)
    anchor_scale: float = 4.0  # anchor side = anchor_scale x stride (RetinaNet)
    anchor_octaves: int = 3  # sizes per level: 2^(i/octaves), i < octaves
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass
class DetectDataConfig(DataConfig):
    format: Literal["coco", "yolo", "hf"] = "coco"  # how data.path / data.name is laid out
    split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.1  # no val_split: a hold-out of 'split', as fine-tuning's
    val_split_seed: int = 0
    objects_column: str = "objects"  # hf: a dict column with a box list and a category list
    bbox_key: str = "bbox"
    category_key: str = "category"
    bbox_format: Literal["xywh", "xyxy"] = "xywh"  # hf boxes, in pixels
    synthetic_size: int = 512
    hflip: float = 0.5
    scale_range: tuple[float, float] = (0.5, 1.0)  # scale jitter of the fitted size (1, 1 = off)
    min_box_size: float = 1.0  # px after resizing; smaller (degenerate) boxes are dropped
    eval_batch_size: int = 0  # 0 = data.batch_size
    label_fraction: float = 1.0  # seeded fraction of the annotated training images, classes kept


@dataclass
class DetectOptimConfig(OptimConfig):
    base_lr: float = 4.0e-4  # lr = base_lr * global_batch / 256 (ViTDet: 1e-4 at batch 64)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    layer_decay: float = 0.7  # block i (0-based) gets lr x decay^(depth - i), the embeddings
    # decay^(depth + 1), the pyramid and head the full lr (ViTDet ViT-B: 0.7); 1 = off
    clip_grad: ClipGradConfig = field(default_factory=lambda: ClipGradConfig(mode="norm"))


@dataclass
class DetectLossConfig:
    focal_alpha: float = 0.25  # weight of positives in the sigmoid focal loss; < 0 = none
    focal_gamma: float = 2.0
    box: Literal["giou", "l1"] = "giou"  # giou on decoded boxes, l1 on encoded deltas
    box_weight: float = 1.0
    fg_iou: float = 0.5  # anchors with IoU >= fg_iou to a box are positives ...
    bg_iou: float = 0.4  # ... below bg_iou negatives, between them ignored


@dataclass
class DetectEvalConfig:
    score_thresh: float = 0.05  # kept for the COCO metrics (the whole precision/recall curve)
    nms_iou: float = 0.5
    max_detections: int = 100
    topk_candidates: int = 1000  # per image, before NMS
    pr_score_thresh: float = 0.3  # operating point of precision_50/recall_50 and the pictures
    vis_images: int = 4


@dataclass
class DetectTrainConfig(LoopConfig):
    epochs: int = 12
    keep_last: int = 1
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    ema_decay: float = 0.0  # > 0: keep a model EMA (timm's) and evaluate and save it; 0 = off


@dataclass
class DetectConfig(JobConfig):
    task: Literal["detect"] = "detect"  # marks the file as a detection config
    init: str = "scratch"  # as fine-tuning: scratch | run | file | MAE/BEiT .pth | timm:<name>
    init_file: str = ""  # timm:<name> weights from a local file instead of a download
    init_strict: bool = True  # an init filling < half of the encoder's tensors is an error
    run: RunConfig = field(default_factory=RunConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: DetectOptimConfig = field(default_factory=DetectOptimConfig)
    loss: DetectLossConfig = field(default_factory=DetectLossConfig)
    eval: DetectEvalConfig = field(default_factory=DetectEvalConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        validate_common(self)
        validate_detect(self)


def validate_detect(cfg: DetectConfig) -> None:
    m, d, o, lo, ev = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.eval
    validate_init(cfg)
    check(0 < d.label_fraction <= 1,
          f"config key 'data.label_fraction' must be in (0, 1], got {d.label_fraction}")
    check(m.num_classes >= 0, "config key 'model.num_classes' must be >= 0")
    check(m.pyramid_dim > 0, "config key 'model.pyramid_dim' must be positive")
    scales = m.pyramid_scales
    check(len(scales) > 0 and all(s in (4.0, 2.0, 1.0, 0.5, 0.25, 0.125) for s in scales),
           f"config key 'model.pyramid_scales' must hold powers of two in [1/8, 4], got {scales}")
    check(list(scales) == sorted(set(scales), reverse=True),
           "config key 'model.pyramid_scales' must be strictly decreasing (finest level first)")
    for s in scales:
        check(m.patch_size / s == int(m.patch_size / s),
               f"config key 'model.pyramid_scales': {s} gives a fractional stride with "
               f"patch_size {m.patch_size}")
    largest_stride = int(m.patch_size / min(scales))
    check(m.img_size % largest_stride == 0,
           f"config key 'model.img_size' ({m.img_size}) must be a multiple of the largest pyramid "
           f"stride ({largest_stride} = patch_size / min(pyramid_scales))")
    check(m.anchor_scale > 0 and m.anchor_octaves >= 1 and len(m.anchor_ratios) > 0
           and all(r > 0 for r in m.anchor_ratios),
           "config keys 'model.anchor_scale'/'anchor_octaves'/'anchor_ratios' must be positive")
    check(0 <= d.hflip <= 1, "config key 'data.hflip' must be in [0, 1]")
    s_lo, s_hi = d.scale_range
    check(0 < s_lo <= s_hi <= 1, "config key 'data.scale_range' must satisfy 0 < lo <= hi <= 1 "
                                  f"(scale jitter that enlarges past img_size needs a crop; not "
                                  f"supported), got {d.scale_range}")
    check(d.min_box_size >= 0, "config key 'data.min_box_size' must be >= 0")
    check(d.eval_batch_size >= 0, "config key 'data.eval_batch_size' must be >= 0")
    check(bool(d.val_split), "config key 'data.val_split' must be set")
    check(0 < d.val_fraction < 1,
          f"config key 'data.val_fraction' must be in (0, 1), got {d.val_fraction}")
    check(0 <= cfg.train.ema_decay < 1,
          f"config key 'train.ema_decay' must be in [0, 1), got {cfg.train.ema_decay}")
    check(0 < o.layer_decay <= 1, f"config key 'optim.layer_decay' must be in (0, 1], "
                                   f"got {o.layer_decay}")
    check(lo.focal_alpha < 1, "config key 'loss.focal_alpha' must be < 1 (negative = no weight)")
    check(lo.focal_gamma >= 0, "config key 'loss.focal_gamma' must be >= 0")
    check(lo.box_weight >= 0, "config key 'loss.box_weight' must be >= 0")
    check(0 < lo.bg_iou <= lo.fg_iou <= 1,
           f"config keys 'loss.bg_iou'/'loss.fg_iou' must satisfy 0 < bg_iou <= fg_iou <= 1, "
           f"got {lo.bg_iou}, {lo.fg_iou}")
    check(0 <= ev.score_thresh < 1 and 0 <= ev.pr_score_thresh < 1,
           "config keys 'eval.score_thresh'/'eval.pr_score_thresh' must be in [0, 1)")
    check(0 < ev.nms_iou <= 1, "config key 'eval.nms_iou' must be in (0, 1]")
    check(ev.max_detections > 0 and ev.topk_candidates > 0,
           "config keys 'eval.max_detections'/'eval.topk_candidates' must be positive")
    check(ev.vis_images >= 0, "config key 'eval.vis_images' must be >= 0")
    check(cfg.train.eval_every > 0, "config key 'train.eval_every' must be positive")
