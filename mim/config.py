"""Typed configuration: dataclass defaults, YAML deltas, dotted ``key=value`` overrides.

The dataclasses below are the single source of truth for every key and its type. A YAML file
holds only what differs from the defaults; the command line overrides either with
``a.b=value``. Everything is validated once, at start-up: an unknown key, a wrong type or an
impossible value raises :class:`ConfigError` naming the key, which the CLI turns into a
one-line message and exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any work starts (exit code 2)."""


class RunError(RuntimeError):
    """A run stopped on purpose by a guard (bad data, divergence); exit code 1, one line."""


# ----------------------------------------------------------------------------- sections


class JobConfig:
    """What every job's config has: a run directory and a plain-data form."""

    run: Any

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # auto | none | a checkpoint directory


@dataclass
class ModelConfig:
    arch: str = "vit_base_patch16_224"  # any timm VisionTransformer name
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # 0 keeps the arch's own value; set them to build tiny models for tests and demos.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    drop_path_rate: float = 0.0
    pos_embed: Literal["sincos", "learned"] = "sincos"  # MAE fixes a 2-D sin-cos table
    init_values: float = 0.0  # layer scale (BEiT uses 0.1); 0 = off


@dataclass
class MethodConfig:
    name: Literal["mae", "simmim", "maskfeat", "beit", "vq_tokenizer", "supervised"] = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # mae and simmim: per-patch normalised pixel targets
    decoder_dim: int = 512  # mae decoder; also the vq_tokenizer's pixel decoder
    decoder_depth: int = 8
    decoder_heads: int = 16
    # BEiT family (simmim, maskfeat, beit): which patches the mask token replaces.
    mask_type: Literal["random", "block"] = "random"
    block_min_patches: int = 16  # smallest block, in patches (BEiT: 16)
    block_max_patches: int = 0  # largest block; 0 = up to the number of patches to mask
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)  # height / width range
    hog_bins: int = 9  # maskfeat: orientation bins over 0-180 degrees
    hog_cell: int = 8  # maskfeat: cell size in pixels; must divide model.patch_size
    tokenizer: str = ""  # beit: a `mim tokenizer` run directory or its tokenizer.safetensors
    codebook_size: int = 8192  # vq_tokenizer: number of codes (beit takes it from its tokenizer)
    code_dim: int = 32  # vq_tokenizer: codes are unit vectors of this size
    code_entropy_weight: float = 0.1  # vq_tokenizer: weight of the codebook-usage entropy loss
    num_classes: int = 0  # supervised: classes of the labeled source; 0 = from its labels


@dataclass
class DataConfig:
    name: str = ""  # a Hugging Face hub dataset name
    path: str = ""  # a local folder: image files, a save_to_disk dataset or parquet files
    synthetic: bool = False  # the built-in procedural image set (no download)
    synthetic_size: int = 2048
    split: str = "train"
    streaming: bool = False  # read data.name as a stream (no full download)
    num_examples: int = 0  # streaming only: examples per epoch when the dataset card lacks it
    image_column: str = ""  # empty: the first image-typed column
    label_column: str = ""  # empty: "label" or "labels" when present
    batch_size: int = 64  # per device
    num_workers: int = 4
    # JPEGs decode at 1/2, 1/4 or 1/8 size (PIL draft) when every random crop keeps full resolution
    reduced_decode: bool = True
    max_bad_fraction: float = 0.01  # stop when more of the dataset than this is unreadable
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ClipGradConfig:
    mode: Literal["norm", "value", "none"] = "none"
    max_norm: float = 1.0
    value: float = 1.0


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: float = 0.0  # an absolute lr; overrides base_lr when > 0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: ClipGradConfig = field(default_factory=ClipGradConfig)


@dataclass
class LoopConfig:
    """The training loop's keys, the same for every job (``train:``)."""

    epochs: int = 800
    max_steps: int = 0  # stop after this many optimizer updates (0 = no limit); schedule unchanged
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 20  # optimizer updates
    save_every: int = 1000  # optimizer updates
    keep_last: int = 2
    max_nonfinite: int = 10  # stop after this many non-finite updates in a row
    dist_timeout_s: int = 600  # a collective waiting longer than this fails (dead peer)


@dataclass
class TrainConfig(LoopConfig):
    vis_every: int = 1  # epochs between reconstruction grids; 0 = only at the end
    vis_images: int = 8
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    grad_checkpointing: bool = False  # recompute block activations in backward (ViT-L/H memory)


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "mim"
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig(JobConfig):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        _validate_common(self)
        _validate_method(self)


# ----------------------------------------------------------------------------- fine-tuning


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


@dataclass
class FinetuneConfig(JobConfig):
    init: str = "scratch"  # scratch | mim run dir | .safetensors | MAE/BEiT .pth | timm:<name>
    init_file: str = ""  # timm:<name> weights from a local file instead of a download
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
        _validate_common(self)
        _validate_finetune(self)


# ----------------------------------------------------------------------------- detection


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
    objects_column: str = "objects"  # hf: a dict column with a box list and a category list
    bbox_key: str = "bbox"
    category_key: str = "category"
    bbox_format: Literal["xywh", "xyxy"] = "xywh"  # hf boxes, in pixels
    synthetic_size: int = 512
    hflip: float = 0.5
    scale_range: tuple[float, float] = (0.5, 1.0)  # scale jitter of the fitted size (1, 1 = off)
    min_box_size: float = 1.0  # px after resizing; smaller (degenerate) boxes are dropped
    eval_batch_size: int = 0  # 0 = data.batch_size


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


@dataclass
class DetectConfig(JobConfig):
    task: Literal["detect"] = "detect"  # marks the file as a detection config
    init: str = "scratch"  # as fine-tuning: scratch | run | file | MAE/BEiT .pth | timm:<name>
    init_file: str = ""  # timm:<name> weights from a local file instead of a download
    run: RunConfig = field(default_factory=RunConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: DetectOptimConfig = field(default_factory=DetectOptimConfig)
    loss: DetectLossConfig = field(default_factory=DetectLossConfig)
    eval: DetectEvalConfig = field(default_factory=DetectEvalConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        _validate_common(self)
        _validate_detect(self)


# ----------------------------------------------------------------------------- comparison


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
    finetune: str = ""  # the downstream fine-tune config file (classification)
    overrides: list[str] = field(default_factory=list)  # key=value over it, for every cell
    # label fraction -> more key=value for its cells (more epochs at 1%, say), alike for every init
    fraction_overrides: dict[float, list[str]] = field(default_factory=dict)
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    metric: Literal["top1", "top5", "macro_f1", "loss"] = "top1"
    score: Literal["final", "best"] = "final"  # best = the best epoch on validation (optimistic)
    allow_resample: bool = False  # accept inits whose pos/patch embeddings need resampling
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        _check(bool(self.run.name) and "/" not in self.run.name,
               f"config key 'run.name' must be a non-empty name without '/', got {self.run.name!r}")
        _check(bool(self.inits), "config key 'inits' must name at least one init (name: init)")
        for name, init in self.inits.items():
            _check(bool(name) and all(c.isalnum() or c in "-_." for c in name),
                   f"config key 'inits.{name}': init names may hold letters, digits, '-_.' only")
            _check(init == "scratch" or init.startswith("timm:") or Path(init).exists(),
                   f"config key 'inits.{name}' must be 'scratch', 'timm:<name>' or an existing "
                   f"path, got {init!r}")
        for name, f in self.init_files.items():
            _check(self.inits.get(name, "").startswith("timm:"),
                   f"config key 'init_files.{name}' goes with a timm:<name> init only")
            _check(Path(f).is_file(), f"config key 'init_files.{name}': no such file: {f}")
        _check(bool(self.finetune) and Path(self.finetune).is_file(),
               f"config key 'finetune' must name a fine-tune config file, got {self.finetune!r}")
        _check(bool(self.label_fractions) and all(0 < f <= 1 for f in self.label_fractions),
               f"config key 'label_fractions' must be values in (0, 1], got {self.label_fractions}")
        _check(len(set(self.label_fractions)) == len(self.label_fractions),
               "config key 'label_fractions' holds a value twice")
        _check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
               f"config key 'seeds' must be distinct seeds, got {self.seeds}")
        for f in self.fraction_overrides:
            _check(f in self.label_fractions, f"config key 'fraction_overrides.{f:g}': {f:g} is "
                   f"not one of the label_fractions {self.label_fractions}")
        for where, items in [("overrides", self.overrides)] + [
                (f"fraction_overrides.{f:g}", v) for f, v in self.fraction_overrides.items()]:
            for item in items:
                key = item.partition("=")[0].strip()
                _check("=" in item and bool(key),
                       f"config key '{where}': '{item}' is not key=value")
                _check(key not in ("init", "init_file", "data.label_fraction", "run.seed",
                                   "run.name", "run.output_dir", "run.resume"),
                       f"config key '{where}': '{key}' is set by the comparison for every cell")


SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig,
                            "detect": DetectConfig, "compare": CompareConfig}


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    job: str = "pretrain",
) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, then type-checked and validated."""
    if job not in SCHEMAS:
        raise ConfigError(f"unknown job '{job}' (choose from {', '.join(SCHEMAS)})")
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        raw = loaded
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    cfg = _build(SCHEMAS[job], raw, prefix="")
    cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(d: dict[str, Any], job: str = "pretrain") -> Any:
    """Rebuild a validated config from its ``to_dict()`` form (as stored in checkpoints)."""
    cfg = _build(SCHEMAS[job], d, prefix="")
    cfg.validate()
    return cfg


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        d = nxt
    d[parts[-1]] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(cls: type, key: str, root: type) -> ConfigError:
    candidates = _all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, raw: Any, prefix: str, root: type | None = None) -> Any:
    root = root or cls
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise _unknown_key(cls, f"{prefix}{k}", root)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        t = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, raw[f.name] if raw[f.name] is not None else {},
                                    key + ".", root)
        else:
            kwargs[f.name] = _coerce(raw[f.name], t, key)
    return cls(**kwargs)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t``; ints widen to floats, nothing else guessed."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    bad = ConfigError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans: map them back onto the string choices
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in args), value)
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}")
                for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        items = [v if elem is Any else _coerce(_parse_item(v), elem, key) for v in value]
        return tuple(items) if origin is tuple else items
    if t is Any:
        return value
    raise bad


def _parse_item(v: Any) -> Any:
    return _parse_scalar(v) if isinstance(v, str) else v


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_common(cfg: Any) -> None:
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    _check(m.img_size > 0, f"config key 'model.img_size' must be positive, got {m.img_size}")
    _check(m.patch_size > 0, f"config key 'model.patch_size' must be positive, got {m.patch_size}")
    _check(m.img_size % m.patch_size == 0,
           f"config key 'model.img_size' ({m.img_size}) must be a multiple of "
           f"'model.patch_size' ({m.patch_size})")
    _check(0.0 <= m.drop_path_rate < 1.0, "config key 'model.drop_path_rate' must be in [0, 1)")
    if hasattr(cfg, "method") and hasattr(cfg.method, "mask_ratio"):
        r = cfg.method.mask_ratio
        _check(0.0 < r < 1.0, f"config key 'method.mask_ratio' must be in (0, 1), got {r}")
    sources = [bool(d.name), bool(d.path), d.synthetic]
    _check(sum(sources) == 1, "exactly one of 'data.name', 'data.path', 'data.synthetic' "
                              f"must be set (got name={d.name!r}, path={d.path!r}, "
                              f"synthetic={d.synthetic})")
    if d.path:
        _check(Path(d.path).exists(), f"config key 'data.path': no such file or folder: {d.path}")
    _check(d.batch_size > 0, f"config key 'data.batch_size' must be positive, got {d.batch_size}")
    _check(d.num_workers >= 0, "config key 'data.num_workers' must be >= 0")
    _check(d.synthetic_size > 0, "config key 'data.synthetic_size' must be positive")
    _check(not d.streaming or bool(d.name),
           "config key 'data.streaming' applies to hub datasets ('data.name') only")
    lo, hi = d.crop_scale
    _check(0.0 < lo <= hi <= 1.0, f"config key 'data.crop_scale' must satisfy 0 < lo <= hi <= 1, "
                                  f"got {d.crop_scale}")
    _check(all(s > 0 for s in d.std), "config key 'data.std' must be positive")
    _check(o.base_lr >= 0 and o.lr >= 0, "config keys 'optim.base_lr'/'optim.lr' must be >= 0")
    _check(o.weight_decay >= 0, "config key 'optim.weight_decay' must be >= 0")
    _check(o.warmup_epochs >= 0, "config key 'optim.warmup_epochs' must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), "config key 'optim.betas' must be in [0, 1)")
    _check(o.clip_grad.max_norm > 0, "config key 'optim.clip_grad.max_norm' must be positive")
    _check(o.clip_grad.value > 0, "config key 'optim.clip_grad.value' must be positive")
    _check(t.epochs > 0, f"config key 'train.epochs' must be positive, got {t.epochs}")
    _check(t.max_steps >= 0, "config key 'train.max_steps' must be >= 0")
    _check(t.grad_accum_steps > 0, "config key 'train.grad_accum_steps' must be positive")
    _check(t.log_every > 0, "config key 'train.log_every' must be positive")
    _check(t.save_every > 0, "config key 'train.save_every' must be positive")
    _check(t.keep_last > 0, "config key 'train.keep_last' must be positive")
    _check(getattr(t, "vis_every", 0) >= 0, "config key 'train.vis_every' must be >= 0")
    _check(t.max_nonfinite > 0, "config key 'train.max_nonfinite' must be positive")
    _check(t.dist_timeout_s > 0, "config key 'train.dist_timeout_s' must be positive")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "config key 'data.max_bad_fraction' must be in [0, 1]")
    _check(cfg.run.resume in ("auto", "none") or Path(cfg.run.resume).exists(),
           f"config key 'run.resume' must be 'auto', 'none' or an existing checkpoint, "
           f"got {cfg.run.resume!r}")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name,
           f"config key 'run.name' must be a non-empty name without '/', got {cfg.run.name!r}")


def _validate_method(cfg: Any) -> None:
    """Method-specific checks (the BEiT family and the tokenizer)."""
    m, model = cfg.method, cfg.model
    grid = (model.img_size // model.patch_size,) * 2
    if m.mask_type == "block":
        _check(m.name in ("simmim", "maskfeat", "beit"),
               f"config key 'method.mask_type': 'block' is for simmim, maskfeat and beit, "
               f"not {m.name!r}")
        _check(m.block_min_patches >= 1, "config key 'method.block_min_patches' must be >= 1")
        _check(m.block_max_patches == 0 or m.block_max_patches >= m.block_min_patches,
               "config key 'method.block_max_patches' must be 0 or >= 'method.block_min_patches'")
        lo, hi = m.block_aspect
        _check(0 < lo <= hi, f"config key 'method.block_aspect' must satisfy 0 < lo <= hi, "
                             f"got {m.block_aspect}")
        from mim.masking import block_shapes, num_masked_patches

        n = num_masked_patches(grid[0] * grid[1], m.mask_ratio)
        _check(bool(block_shapes(grid, m.block_min_patches, m.block_max_patches or n,
                                 m.block_aspect)),
               f"config key 'method.block_min_patches': no block of {m.block_min_patches}.."
               f"{m.block_max_patches or n} patches with aspect in {tuple(m.block_aspect)} fits "
               f"the {grid[0]}x{grid[1]} patch grid")
    _check(m.num_classes >= 0, "config key 'method.num_classes' must be >= 0")
    if m.name == "maskfeat":
        _check(m.hog_bins >= 1, f"config key 'method.hog_bins' must be >= 1, got {m.hog_bins}")
        _check(m.hog_cell >= 1 and model.patch_size % m.hog_cell == 0,
               f"config key 'method.hog_cell' ({m.hog_cell}) must divide 'model.patch_size' "
               f"({model.patch_size})")
    if m.name == "vq_tokenizer":
        _check(m.codebook_size >= 2, "config key 'method.codebook_size' must be >= 2")
        _check(m.code_dim >= 1, "config key 'method.code_dim' must be >= 1")
        _check(m.code_entropy_weight >= 0, "config key 'method.code_entropy_weight' must be >= 0")
    if m.name == "vq_tokenizer":
        _check(m.decoder_depth >= 1, "config key 'method.decoder_depth' must be >= 1")
        _check(m.decoder_heads >= 1 and m.decoder_dim % m.decoder_heads == 0,
               f"config key 'method.decoder_dim' ({m.decoder_dim}) must be a multiple of "
               f"'method.decoder_heads' ({m.decoder_heads})")
    if m.name == "beit":
        _check(bool(m.tokenizer), "config key 'method.tokenizer' must name a tokenizer "
                                  "(train one with `mim tokenizer --config ...`)")
        from mim.models.tokenizer import read_tokenizer_meta

        try:
            meta = read_tokenizer_meta(m.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'method.tokenizer': {e}") from None
        tm = meta["model"]
        _check((tm["img_size"], tm["patch_size"]) == (model.img_size, model.patch_size),
               f"config key 'method.tokenizer': the tokenizer works on {tm['img_size']} px images "
               f"with {tm['patch_size']} px patches, the model on {model.img_size} / "
               f"{model.patch_size}")
        _check(tm["in_chans"] == model.in_chans,
               f"config key 'method.tokenizer': the tokenizer takes {tm['in_chans']} channels, "
               f"the model {model.in_chans}")


def _validate_init(cfg: Any) -> None:
    init = cfg.init
    _check(init == "scratch" or init.startswith("timm:") or Path(init).exists(),
           f"config key 'init' must be 'scratch', 'timm:<name>' or an existing path, got {init!r}")
    _check(not cfg.init_file or init.startswith("timm:"),
           "config key 'init_file' goes with init=timm:<name> only")
    _check(not cfg.init_file or Path(cfg.init_file).is_file(),
           f"config key 'init_file': no such file: {cfg.init_file}")


def _validate_finetune(cfg: Any) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _validate_init(cfg)
    _check(m.num_classes >= 0, "config key 'model.num_classes' must be >= 0")
    _check(m.head_init_std > 0, "config key 'model.head_init_std' must be positive")
    _check(cfg.tune.blocks >= 1, "config key 'tune.blocks' must be >= 1")
    if cfg.tune.mode == "linear":
        _check(m.drop_path_rate == 0 and cfg.dropout.rate == 0,
               "tune.mode=linear freezes the encoder: 'model.drop_path_rate' and 'dropout.rate' "
               "must be 0")
    _check(0 < d.label_fraction <= 1,
           f"config key 'data.label_fraction' must be in (0, 1], got {d.label_fraction}")
    _check(bool(d.val_split), "config key 'data.val_split' must be set")
    _check(0 <= d.reprob <= 1 and 0 <= d.hflip <= 1,
           "config keys 'data.reprob'/'data.hflip' must be in [0, 1]")
    _check(0 < d.eval_crop_pct <= 1, "config key 'data.eval_crop_pct' must be in (0, 1]")
    _check(d.eval_batch_size >= 0, "config key 'data.eval_batch_size' must be >= 0")
    _check(0 < o.layer_decay <= 1, f"config key 'optim.layer_decay' must be in (0, 1], "
                                   f"got {o.layer_decay}")
    _check(0 <= cfg.loss.label_smoothing < 1, "config key 'loss.label_smoothing' must be in [0, 1)")
    _check(cfg.loss.gamma >= 0, "config key 'loss.gamma' must be >= 0")
    _check(all(a >= 0 for a in cfg.loss.alpha), "config key 'loss.alpha' must be >= 0")
    _check(not cfg.loss.alpha or cfg.loss.name == "focal",
           "config key 'loss.alpha' weights the focal loss: set loss.name=focal")
    _check(not (cfg.loss.alpha and m.num_classes and len(cfg.loss.alpha) != m.num_classes),
           f"config key 'loss.alpha' needs one weight per class ({m.num_classes})")
    mx = cfg.mixup
    _check(mx.mixup_alpha >= 0 and mx.cutmix_alpha >= 0,
           "config keys 'mixup.mixup_alpha'/'mixup.cutmix_alpha' must be >= 0")
    _check(0 <= mx.prob <= 1 and 0 <= mx.switch_prob <= 1,
           "config keys 'mixup.prob'/'mixup.switch_prob' must be in [0, 1]")
    if mx.mixup_alpha > 0 or mx.cutmix_alpha > 0:
        _check(d.batch_size % 2 == 0, "mixup/cutmix pairs images: 'data.batch_size' must be even")
    dr = cfg.dropout
    _check(0 <= dr.rate < 1, f"config key 'dropout.rate' must be in [0, 1), got {dr.rate}")
    _check(dr.schedule == "constant" or 0 < dr.epochs < t.epochs,
           f"config key 'dropout.epochs' must be in (0, train.epochs) for the "
           f"'{dr.schedule}' schedule, got {dr.epochs}")
    _check(t.eval_every > 0, "config key 'train.eval_every' must be positive")


def _validate_detect(cfg: Any) -> None:
    m, d, o, lo, ev = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.eval
    _validate_init(cfg)
    _check(m.num_classes >= 0, "config key 'model.num_classes' must be >= 0")
    _check(m.pyramid_dim > 0, "config key 'model.pyramid_dim' must be positive")
    scales = m.pyramid_scales
    _check(len(scales) > 0 and all(s in (4.0, 2.0, 1.0, 0.5, 0.25, 0.125) for s in scales),
           f"config key 'model.pyramid_scales' must hold powers of two in [1/8, 4], got {scales}")
    _check(list(scales) == sorted(set(scales), reverse=True),
           "config key 'model.pyramid_scales' must be strictly decreasing (finest level first)")
    for s in scales:
        _check(m.patch_size / s == int(m.patch_size / s),
               f"config key 'model.pyramid_scales': {s} gives a fractional stride with "
               f"patch_size {m.patch_size}")
    largest_stride = int(m.patch_size / min(scales))
    _check(m.img_size % largest_stride == 0,
           f"config key 'model.img_size' ({m.img_size}) must be a multiple of the largest pyramid "
           f"stride ({largest_stride} = patch_size / min(pyramid_scales))")
    _check(m.anchor_scale > 0 and m.anchor_octaves >= 1 and len(m.anchor_ratios) > 0
           and all(r > 0 for r in m.anchor_ratios),
           "config keys 'model.anchor_scale'/'anchor_octaves'/'anchor_ratios' must be positive")
    _check(0 <= d.hflip <= 1, "config key 'data.hflip' must be in [0, 1]")
    s_lo, s_hi = d.scale_range
    _check(0 < s_lo <= s_hi <= 1, "config key 'data.scale_range' must satisfy 0 < lo <= hi <= 1 "
                                  f"(scale jitter that enlarges past img_size needs a crop; not "
                                  f"supported), got {d.scale_range}")
    _check(d.min_box_size >= 0, "config key 'data.min_box_size' must be >= 0")
    _check(d.eval_batch_size >= 0, "config key 'data.eval_batch_size' must be >= 0")
    _check(bool(d.val_split), "config key 'data.val_split' must be set")
    _check(0 < o.layer_decay <= 1, f"config key 'optim.layer_decay' must be in (0, 1], "
                                   f"got {o.layer_decay}")
    _check(lo.focal_alpha < 1, "config key 'loss.focal_alpha' must be < 1 (negative = no weight)")
    _check(lo.focal_gamma >= 0, "config key 'loss.focal_gamma' must be >= 0")
    _check(lo.box_weight >= 0, "config key 'loss.box_weight' must be >= 0")
    _check(0 < lo.bg_iou <= lo.fg_iou <= 1,
           f"config keys 'loss.bg_iou'/'loss.fg_iou' must satisfy 0 < bg_iou <= fg_iou <= 1, "
           f"got {lo.bg_iou}, {lo.fg_iou}")
    _check(0 <= ev.score_thresh < 1 and 0 <= ev.pr_score_thresh < 1,
           "config keys 'eval.score_thresh'/'eval.pr_score_thresh' must be in [0, 1)")
    _check(0 < ev.nms_iou <= 1, "config key 'eval.nms_iou' must be in (0, 1]")
    _check(ev.max_detections > 0 and ev.topk_candidates > 0,
           "config keys 'eval.max_detections'/'eval.topk_candidates' must be positive")
    _check(ev.vis_images >= 0, "config key 'eval.vis_images' must be >= 0")
    _check(cfg.train.eval_every > 0, "config key 'train.eval_every' must be positive")
