"""Fine-tuning a ViT classifier as a :class:`~mim.engine.job.TrainingJob`: its data, loss, forward
pass and per-epoch evaluation.

Evaluation, the best checkpoint and re-evaluation of a finished run live in
:mod:`mim.engine.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from mim.data import EpochLoader, build_epoch_loader, eval_transform
from mim.data.labels import SubsetSource, class_names, source_labels, stratified_subset
from mim.data.splits import holdout_record, train_val_sources
from mim.data.transforms import finetune_transform
from mim.config import FinetuneConfig
from mim.engine.accounting import count_flops, fmt_count
from mim.engine.evaluate import BestKeeper, evaluate, log_eval, write_finetune_summary
from mim.engine.job import TrainingJob, train
from mim.engine.loop import Budget, Loop
from mim.engine.run import run_job, write_json
from mim.engine.state import start_model_ema
from mim.errors import ConfigError
from mim.losses import softmax_focal_loss
from mim.models.classifier import DropoutSchedule, build_classifier


@dataclass
class ClassificationData:
    train: EpochLoader
    val: EpochLoader
    num_classes: int
    class_names: list[str]
    train_images: int  # after label_fraction
    all_train_images: int
    val_images: int
    held_out: dict | None = None  # the validation images held out of the training split


def build_classification_data(cfg: FinetuneConfig, rank: int, world_size: int) -> ClassificationData:
    """Training loader on a class-stratified ``label_fraction`` and a validation loader that
    shards the ``val_split`` exactly (no padding, no repeated sample)."""
    d, m = cfg.data, cfg.model
    sets = train_val_sources(d, m.img_size, cfg.run.seed, d.val_fraction, d.val_split_seed)
    full, val = sets.train, sets.val
    labels = source_labels(full)
    num_classes = m.num_classes or len(getattr(full, "classes", None) or []) or max(labels) + 1
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ConfigError(f"training labels span [{min(labels)}, {max(labels)}] but "
                          f"'model.num_classes' is {num_classes}")
    keep = stratified_subset(labels, d.label_fraction, cfg.run.seed)
    train = full if len(keep) == len(full) else SubsetSource(full, keep)
    _check_val_split(d, full, val)
    val_labels = source_labels(val)
    if val_labels and (min(val_labels) < 0 or max(val_labels) >= num_classes):
        raise ConfigError(f"'{d.val_split}' labels span [{min(val_labels)}, {max(val_labels)}], "
                          f"outside the {num_classes} training classes")
    common = dict(num_workers=d.num_workers, rank=rank, world_size=world_size, seed=cfg.run.seed,
                  pin_memory=torch.cuda.is_available())
    train_loader = build_epoch_loader(
        train, finetune_transform(m.img_size, d.crop_scale, d.mean, d.std, d.hflip,
                                  d.auto_augment, d.reprob),
        batch_size=d.batch_size, **common)
    val_loader = build_epoch_loader(
        val, eval_transform(m.img_size, d.mean, d.std, crop_pct=d.eval_crop_pct),
        batch_size=d.eval_batch_size or d.batch_size, shuffle=False, drop_last=False, **common)
    held = holdout_record(sets, d, d.val_fraction, d.val_split_seed) if sets.held_out else None
    return ClassificationData(train_loader, val_loader, num_classes,
                              class_names(full, num_classes), len(train), len(full), len(val),
                              held)


def _check_val_split(d: Any, train: Any, val: Any) -> None:
    names_train, names_val = getattr(train, "classes", None), getattr(val, "classes", None)
    if names_train and names_val and list(names_train) != list(names_val):
        raise ConfigError(f"config key 'data.val_split': its classes {list(names_val)[:5]}... "
                          f"differ from the training split's {list(names_train)[:5]}...")


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    mx = cfg.mixup
    if mx.mixup_alpha <= 0 and mx.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=mx.mixup_alpha, cutmix_alpha=mx.cutmix_alpha, prob=mx.prob,
                 switch_prob=mx.switch_prob, mode=mx.mode,
                 label_smoothing=cfg.loss.label_smoothing, num_classes=num_classes)


def build_train_loss(cfg: FinetuneConfig, num_classes: int, mixup: bool) -> Callable:
    """Focal, soft-target CE (mixup's targets carry the smoothing), smoothed CE, or plain CE."""
    loss = cfg.loss
    if loss.alpha and len(loss.alpha) != num_classes:
        raise ConfigError(f"config key 'loss.alpha' needs one weight per class ({num_classes}), "
                          f"got {len(loss.alpha)}")
    if loss.name == "focal":
        alpha = torch.tensor(loss.alpha) if loss.alpha else None
        return partial(softmax_focal_loss, gamma=loss.gamma, alpha=alpha,
                       label_smoothing=0.0 if mixup else loss.label_smoothing)
    if mixup:
        return SoftTargetCrossEntropy()
    if loss.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=loss.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def finetune(cfg: FinetuneConfig) -> Path:
    """Run (or resume) the fine-tuning described by ``cfg``; returns the run directory."""
    return run_job(cfg, lambda acc, cfg, run_dir: train(FinetuneJob(acc, cfg, run_dir)))


class FinetuneJob(TrainingJob[FinetuneConfig]):
    """A ViT classifier from an init: evaluated when due (the EMA's weights when
    ``train.ema_decay`` is set), the best kept in ``best/``, a checkpoint after every epoch."""

    remedy = "lower 'data.batch_size' or raise 'data.label_fraction'"
    checkpoint_each_epoch = True

    def __init__(self, acc, cfg: FinetuneConfig, run_dir: Path) -> None:
        super().__init__(acc, cfg, run_dir)
        set_seed(cfg.run.seed)
        self.data = data = build_classification_data(cfg, acc.process_index, acc.num_processes)
        if data.held_out is not None and acc.is_main_process:
            write_json(run_dir / "val_split.json", data.held_out)
        self.model, self.init_report = build_classifier(cfg, data.num_classes)
        self.loader, self.num_images = data.train, data.train_images
        self.mixup = build_mixup(cfg, data.num_classes)
        self.criterion = build_train_loss(cfg, data.num_classes, self.mixup is not None)
        self.dropout = DropoutSchedule(self.model, cfg.dropout.schedule, cfg.dropout.epochs)
        self.ema: ModelEmaV3 | None = None
        self.best: BestKeeper | None = None
        self.summary: dict[str, Any] = {}

    def flops(self) -> int:
        size = self.cfg.model.img_size
        flops = count_flops(self.model, torch.zeros(2, self.cfg.model.in_chans, size, size))
        for m in self.model.modules():  # the FLOP count's forward must not leave BatchNorm stats
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        self.summary["flops_per_image"] = flops
        return flops

    def optimizer_options(self) -> dict[str, Any]:
        decay = self.cfg.optim.layer_decay
        return {"layer_decay": decay} if decay < 1 else {}

    def accounting(self, budget: Budget, flops: int) -> list[tuple[str, Any]]:
        cfg, acc, data, d, o = self.cfg, self.acc, self.data, self.cfg.data, self.cfg.optim
        self.summary.update({
            "total_updates": budget.total_updates, "updates_per_epoch": budget.updates_per_epoch,
            "global_batch": budget.global_batch, "flops_per_image": flops, "lr": budget.lr,
            "num_classes": data.num_classes, "class_names": data.class_names,
            "train_images": data.train_images, "val_images": data.val_images,
            "init": self.init_report.to_dict()})
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return [
            ("run directory", self.run_dir), ("init", f"{cfg.init} ({self.init_report.kind})"),
            ("model", f"{cfg.model.arch}, {cfg.model.img_size} px, patch {cfg.model.patch_size}, "
                      f"pool {cfg.model.global_pool}"),
            ("tune", cfg.tune.mode + (f" (last {cfg.tune.blocks} blocks)"
                                      if cfg.tune.mode == "partial" else "")),
            ("train images", f"{data.train_images} of {data.all_train_images} "
                             f"(label_fraction {d.label_fraction:g}, stratified)"),
            ("val images", f"{data.val_images} ('{d.val_split}' split)" if data.held_out is None
             else f"{data.val_images} held out of '{d.split}' (no '{d.val_split}' split; "
                  f"val_fraction {d.val_fraction:g}, listed in val_split.json)"),
            ("classes", data.num_classes), ("per-device batch", d.batch_size),
            ("devices", f"{acc.num_processes} ({acc.device.type})"),
            ("accumulation", cfg.train.grad_accum_steps),
            ("global batch", budget.global_batch),
            ("iterations / epoch", data.train.batches_per_epoch),
            ("updates / epoch", budget.updates_per_epoch), ("total updates", budget.total_updates),
            ("lr", f"{budget.lr:.3g} (base_lr {o.base_lr:g} x {budget.global_batch} / 256)"
             if not o.lr else f"{budget.lr:.3g}"),
            ("optimizer", f"{o.optimizer}, layer decay {o.layer_decay:g}, wd {o.weight_decay:g}"),
            ("loss", f"{cfg.loss.name}, label smoothing {cfg.loss.label_smoothing:g}"
                     + (", mixup/cutmix" if self.mixup else "")),
            ("dropout", f"{cfg.dropout.rate:g}, drop path {cfg.model.drop_path_rate:g}, "
                        f"{cfg.dropout.schedule}" + (f" (E={cfg.dropout.epochs})"
                                                     if cfg.dropout.schedule != "constant"
                                                     else "")),
            ("parameters", f"{fmt_count(total)} ({fmt_count(trainable)} trainable)"),
            ("FLOPs / image", f"{fmt_count(flops)} forward"),
        ]

    def notes(self) -> list[str]:
        return self.init_report.lines()

    def started(self, loop: Loop[FinetuneConfig], resumed: bool) -> None:
        self.ema = start_model_ema(loop.acc, self.cfg.train.ema_decay, loop.model, loop.state)
        self.best = BestKeeper(self.run_dir, self.cfg.train.best_metric,
                               loop.state.extra.get("best"))

    def forward(self, loop: Loop[FinetuneConfig], batch: dict) -> tuple[torch.Tensor, dict, int]:
        """One micro-batch: mixup/cutmix (if on), then the classification loss."""
        acc = loop.acc
        images = batch["image"].to(acc.device, non_blocking=True)
        targets = batch["label"].to(acc.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with acc.autocast():
            loss = self.criterion(loop.model(images), targets)
        return loss, {}, images.shape[0]

    def epoch_begins(self, loop: Loop[FinetuneConfig]) -> dict[str, Any]:
        return {"dropout_scale": self.dropout.set_epoch(loop.state.epoch)}

    def after_update(self, loop: Loop[FinetuneConfig]) -> Callable[[int], None] | None:
        if self.ema is None:
            return None
        ema, net = self.ema, loop.acc.unwrap_model(loop.model)
        return lambda step: ema.update(net)

    def epoch_ends(self, loop: Loop[FinetuneConfig], epoch: int) -> None:
        acc, state, data, best = loop.acc, loop.state, self.data, self.best
        assert best is not None
        if epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs:
            scored = loop.model if self.ema is None else self.ema.module
            result, confusion = evaluate(acc, scored, data.val, data.num_classes)
            state.extra["last_eval"] = {k: v for k, v in result.items()
                                        if isinstance(v, (int, float))}
            improved = best.update(acc, result, confusion, epoch, state.step, scored,
                                   data.num_classes, data.class_names)
            log_eval(acc, loop.metrics, result, confusion, state.step, epoch, best, improved,
                     data.class_names, self.run_dir)
        state.extra["best"] = best.record

    def finish(self, loop: Loop[FinetuneConfig]) -> None:
        assert self.best is not None
        if loop.acc.is_main_process:
            self.summary["nonfinite_updates"] = loop.guards.nonfinite.total
            write_finetune_summary(loop.acc, self.cfg, self.run_dir, loop.state, self.best,
                                   loop.state.extra.get("last_eval", {}), self.summary)
