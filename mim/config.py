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


# ----------------------------------------------------------------------------- sections


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
    name: Literal["mae"] = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


@dataclass
class DataConfig:
    name: str = ""  # a Hugging Face hub dataset name
    path: str = ""  # a local folder: image files, a save_to_disk dataset or parquet files
    synthetic: bool = False  # the built-in procedural image set (no download)
    synthetic_size: int = 2048
    split: str = "train"
    streaming: bool = False  # hub datasets only
    image_column: str = ""  # empty: the first image-typed column
    label_column: str = ""  # empty: "label" or "labels" when present
    batch_size: int = 64  # per device
    num_workers: int = 4
    # JPEGs decode at 1/2, 1/4 or 1/8 size (PIL draft) when every random crop keeps full resolution
    reduced_decode: bool = True
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
class TrainConfig:
    epochs: int = 800
    max_steps: int = 0  # stop after this many optimizer updates (0 = no limit); schedule unchanged
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 20  # optimizer updates
    save_every: int = 1000  # optimizer updates
    keep_last: int = 2
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
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        _validate_common(self)


SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig}


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
    """Check ``value`` against the annotation ``t``; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    bad = ConfigError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
    if origin is Literal:
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
    _check(t.vis_every >= 0, "config key 'train.vis_every' must be >= 0")
    _check(cfg.run.resume in ("auto", "none") or Path(cfg.run.resume).exists(),
           f"config key 'run.resume' must be 'auto', 'none' or an existing checkpoint, "
           f"got {cfg.run.resume!r}")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name,
           f"config key 'run.name' must be a non-empty name without '/', got {cfg.run.name!r}")
