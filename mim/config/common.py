"""The sections and checks every job's config shares: run, optimizer, loop, tracking."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mim.errors import ConfigError
from mim.typed_config import plain


class JobConfig:
    """What every job's config has: a run directory and a plain-data form."""

    run: Any

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # auto | none | a checkpoint directory


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
    # auto: the launcher's (accelerate launch's config or --mixed_precision; 'no' without one)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = 20  # optimizer updates
    save_every: int = 1000  # optimizer updates
    keep_last: int = 2
    max_nonfinite: int = 10  # stop after this many non-finite updates in a row
    dist_timeout_s: int = 600  # a collective waiting longer than this fails (dead peer)


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "mim"
    group: str = ""
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # wandb: the final model files as a "model" artifact of the run


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_run_name(name: str) -> None:
    """``run.name`` is one folder inside ``run.output_dir``: a single path component that is not
    '.' or '..' (which would put the run into ``output_dir`` itself or its parent)."""
    check(bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")
          and name.strip() == name,
          f"config key 'run.name' must be one folder name (not '.', '..' or empty; no '/', '\\', "
          f"NUL or surrounding spaces), got {name!r}")


MAX_TOKENS = 2**18  # patches per image (a 512 x 512 grid)
MAX_EXAMPLES = 10**8  # data.synthetic_size / data.num_examples


def check_bounded_sizes(cfg: Any) -> None:
    """Sizes that would exhaust memory or time while the run is built, before any message:
    a patch grid beyond MAX_TOKENS, a ViT whose fp32 weights alone exceed this machine's memory,
    a synthetic or streaming epoch beyond MAX_EXAMPLES images."""
    m, d = getattr(cfg, "model", None), getattr(cfg, "data", None)
    if m is not None and m.patch_size > 0:
        tokens = (m.img_size // m.patch_size) ** 2
        check(tokens <= MAX_TOKENS, f"config key 'model.img_size': {m.img_size} px in "
                                    f"{m.patch_size} px patches is {tokens} patches per image, "
                                    f"more than {MAX_TOKENS}")
        if m.embed_dim or m.depth:
            weights = 4 * 12 * (m.depth or 12) * (m.embed_dim or 768) ** 2
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            check(weights <= memory, f"config keys 'model.embed_dim'/'model.depth': a ViT of "
                                     f"about {weights / 2**30:.0f} GiB of weights does not fit "
                                     f"in this machine's {memory / 2**30:.0f} GiB")
    if d is not None:
        for key in ("synthetic_size", "num_examples"):
            check(getattr(d, key, 0) <= MAX_EXAMPLES,
                  f"config key 'data.{key}' must be at most {MAX_EXAMPLES}")


def validate_common(cfg: JobConfig) -> None:
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    check(m.img_size > 0, f"config key 'model.img_size' must be positive, got {m.img_size}")
    check(m.patch_size > 0, f"config key 'model.patch_size' must be positive, got {m.patch_size}")
    check(m.img_size % m.patch_size == 0,
           f"config key 'model.img_size' ({m.img_size}) must be a multiple of "
           f"'model.patch_size' ({m.patch_size})")
    check(0.0 <= m.drop_path_rate < 1.0, "config key 'model.drop_path_rate' must be in [0, 1)")
    sources = [bool(d.name), bool(d.path), d.synthetic]
    check(sum(sources) == 1, "exactly one of 'data.name', 'data.path', 'data.synthetic' "
                              f"must be set (got name={d.name!r}, path={d.path!r}, "
                              f"synthetic={d.synthetic})")
    if d.path:
        check(Path(d.path).exists(), f"config key 'data.path': no such file or folder: {d.path}")
    check(d.batch_size > 0, f"config key 'data.batch_size' must be positive, got {d.batch_size}")
    check(d.num_workers >= 0, "config key 'data.num_workers' must be >= 0")
    check(d.synthetic_size > 0, "config key 'data.synthetic_size' must be positive")
    check(not d.streaming or bool(d.name),
           "config key 'data.streaming' applies to hub datasets ('data.name') only")
    lo, hi = d.crop_scale
    check(0.0 < lo <= hi <= 1.0, f"config key 'data.crop_scale' must satisfy 0 < lo <= hi <= 1, "
                                  f"got {d.crop_scale}")
    check(all(s > 0 for s in d.std), "config key 'data.std' must be positive")
    check(o.base_lr >= 0 and o.lr >= 0, "config keys 'optim.base_lr'/'optim.lr' must be >= 0")
    check(o.weight_decay >= 0, "config key 'optim.weight_decay' must be >= 0")
    check(o.warmup_epochs >= 0, "config key 'optim.warmup_epochs' must be >= 0")
    check(all(0 <= b < 1 for b in o.betas), "config key 'optim.betas' must be in [0, 1)")
    check(o.clip_grad.max_norm > 0, "config key 'optim.clip_grad.max_norm' must be positive")
    check(o.clip_grad.value > 0, "config key 'optim.clip_grad.value' must be positive")
    check(t.epochs > 0, f"config key 'train.epochs' must be positive, got {t.epochs}")
    check(t.max_steps >= 0, "config key 'train.max_steps' must be >= 0")
    check(t.grad_accum_steps > 0, "config key 'train.grad_accum_steps' must be positive")
    check(t.log_every > 0, "config key 'train.log_every' must be positive")
    check(t.save_every > 0, "config key 'train.save_every' must be positive")
    check(t.keep_last > 0, "config key 'train.keep_last' must be positive")
    check(getattr(t, "vis_every", 0) >= 0, "config key 'train.vis_every' must be >= 0")
    check(t.max_nonfinite > 0, "config key 'train.max_nonfinite' must be positive")
    check(t.dist_timeout_s > 0, "config key 'train.dist_timeout_s' must be positive")
    check(0.0 <= d.max_bad_fraction <= 1.0, "config key 'data.max_bad_fraction' must be in [0, 1]")
    check(cfg.run.resume in ("auto", "none") or Path(cfg.run.resume).exists(),
           f"config key 'run.resume' must be 'auto', 'none' or an existing checkpoint, "
           f"got {cfg.run.resume!r}")


def validate_init(cfg: Any) -> None:
    init = cfg.init
    check(init == "scratch" or init.startswith("timm:") or Path(init).exists(),
           f"config key 'init' must be 'scratch', 'timm:<name>' or an existing path, got {init!r}")
    check(not cfg.init_file or init.startswith("timm:"),
           "config key 'init_file' goes with init=timm:<name> only")
    check(not cfg.init_file or Path(cfg.init_file).is_file(),
           f"config key 'init_file': no such file: {cfg.init_file}")
