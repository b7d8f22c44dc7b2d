"""Fine-tuning a ViT classifier: wiring (``finetune``), its epoch (train, evaluate, checkpoint)
and the forward pass the shared loop (:func:`mim.engine.loop.run_epoch`) runs.

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
from mim.engine.accounting import count_flops, fmt_count, print_accounting
from mim.engine.evaluate import BestKeeper, evaluate, log_eval, write_finetune_summary
from mim.engine.loop import Guards, loop_budget, report_stop, run_epoch, start_loop
from mim.engine.optim import build_optimizer, build_scheduler
from mim.engine.run import check_disk_space, run_job, write_json
from mim.engine.state import LoopState, save_training_state
from mim.engine.tracking import MetricsLog
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


def build_classification_data(cfg: Any, rank: int, world_size: int) -> ClassificationData:
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


def build_mixup(cfg: Any, num_classes: int) -> Mixup | None:
    mx = cfg.mixup
    if mx.mixup_alpha <= 0 and mx.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=mx.mixup_alpha, cutmix_alpha=mx.cutmix_alpha, prob=mx.prob,
                 switch_prob=mx.switch_prob, mode=mx.mode,
                 label_smoothing=cfg.loss.label_smoothing, num_classes=num_classes)


def build_train_loss(cfg: Any, num_classes: int, mixup: bool) -> Callable:
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


def finetune(cfg: Any) -> Path:
    """Run (or resume) the fine-tuning described by ``cfg``; returns the run directory."""
    return run_job(cfg, _finetune)


def _finetune(acc, cfg: Any, run_dir: Path) -> Path:
    set_seed(cfg.run.seed)
    data = build_classification_data(cfg, acc.process_index, acc.num_processes)
    if data.held_out is not None and acc.is_main_process:
        write_json(run_dir / "val_split.json", data.held_out)
    model, init_report = build_classifier(cfg, data.num_classes)
    for line in init_report.lines():
        acc.print(line)
    d, o, accum = cfg.data, cfg.optim, cfg.train.grad_accum_steps
    budget = loop_budget(acc, cfg, data.train.batches_per_epoch, data.train_images,
                         "lower 'data.batch_size' or raise 'data.label_fraction'")
    updates_per_epoch, total_updates = budget.updates_per_epoch, budget.total_updates
    global_batch, lr = budget.global_batch, budget.lr
    mixup = build_mixup(cfg, data.num_classes)
    criterion = build_train_loss(cfg, data.num_classes, mixup is not None)
    size = cfg.model.img_size
    flops = count_flops(model, torch.zeros(2, cfg.model.in_chans, size, size))
    for m in model.modules():  # the FLOP count's forward must not leave BatchNorm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    if acc.is_main_process:
        check_disk_space(run_dir, model, cfg.train.keep_last)
    optimizer = build_optimizer(model, cfg, lr,
                                **({"layer_decay": o.layer_decay} if o.layer_decay < 1 else {}))
    scheduler = build_scheduler(optimizer, cfg, total_updates, updates_per_epoch)
    dropout = DropoutSchedule(model, cfg.dropout.schedule, cfg.dropout.epochs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print_accounting(acc, [
        ("run directory", run_dir), ("init", f"{cfg.init} ({init_report.kind})"),
        ("model", f"{cfg.model.arch}, {size} px, patch {cfg.model.patch_size}, "
                  f"pool {cfg.model.global_pool}"),
        ("tune", cfg.tune.mode + (f" (last {cfg.tune.blocks} blocks)"
                                  if cfg.tune.mode == "partial" else "")),
        ("train images", f"{data.train_images} of {data.all_train_images} "
                         f"(label_fraction {d.label_fraction:g}, stratified)"),
        ("val images", f"{data.val_images} ('{d.val_split}' split)" if data.held_out is None
         else f"{data.val_images} held out of '{d.split}' (no '{d.val_split}' split; "
              f"val_fraction {d.val_fraction:g}, listed in val_split.json)"),
        ("classes", data.num_classes), ("per-device batch", d.batch_size),
        ("devices", f"{acc.num_processes} ({acc.device.type})"), ("accumulation", accum),
        ("global batch", global_batch), ("iterations / epoch", data.train.batches_per_epoch),
        ("updates / epoch", updates_per_epoch), ("total updates", total_updates),
        ("lr", f"{lr:.3g} (base_lr {o.base_lr:g} x {global_batch} / 256)" if not o.lr
         else f"{lr:.3g}"),
        ("optimizer", f"{o.optimizer}, layer decay {o.layer_decay:g}, wd {o.weight_decay:g}"),
        ("loss", f"{cfg.loss.name}, label smoothing {cfg.loss.label_smoothing:g}"
                 + (", mixup/cutmix" if mixup else "")),
        ("dropout", f"{cfg.dropout.rate:g}, drop path {cfg.model.drop_path_rate:g}, "
                    f"{cfg.dropout.schedule}" + (f" (E={cfg.dropout.epochs})"
                                                 if cfg.dropout.schedule != "constant" else "")),
        ("parameters", f"{fmt_count(total)} ({fmt_count(trainable)} trainable)"),
        ("FLOPs / image", f"{fmt_count(flops)} forward"),
    ])
    model, optimizer, state, metrics, _ = start_loop(acc, cfg, run_dir, model, optimizer)
    ema = start_model_ema(acc, cfg, model, state)
    best = BestKeeper(run_dir, cfg.train.best_metric, state.extra.get("best"))
    meta = {"total_updates": total_updates, "updates_per_epoch": updates_per_epoch,
            "global_batch": global_batch, "flops_per_image": flops, "lr": lr,
            "num_classes": data.num_classes, "class_names": data.class_names,
            "train_images": data.train_images, "val_images": data.val_images,
            "init": init_report.to_dict()}
    guards = Guards.for_run(acc, cfg, data.train_images)
    stopped = None
    try:
        while state.epoch < cfg.train.epochs and not stopped:
            stopped = _epoch(acc, cfg, model, optimizer, scheduler, data, state, metrics,
                             run_dir, meta, mixup, criterion, guards, dropout, best, ema)
    finally:
        guards.stop.restore()
    if stopped:  # a finished epoch has saved its checkpoint already
        save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
        report_stop(acc, stopped, state, guards)
    elif acc.is_main_process:
        meta["nonfinite_updates"] = guards.nonfinite.total
        write_finetune_summary(acc, cfg, run_dir, state, best,
                               state.extra.get("last_eval", {}), meta)
    acc.wait_for_everyone()
    return run_dir


def _epoch(acc, cfg, model, optimizer, scheduler, data: ClassificationData, state: LoopState,
           metrics: MetricsLog, run_dir: Path, meta: dict, mixup: Mixup | None,
           criterion: Callable, guards: Guards, dropout: DropoutSchedule,
           best: BestKeeper, ema: ModelEmaV3 | None) -> str | None:
    """Train one epoch, evaluate when due (the EMA's weights when there is one), checkpoint;
    the reason if it stopped early."""
    meta["dropout_scale"] = dropout.set_epoch(state.epoch)
    net = acc.unwrap_model(model)
    stopped = run_epoch(acc, cfg, model, optimizer, scheduler, data.train, state, metrics,
                        run_dir, meta, guards, partial(_forward, acc, model, mixup, criterion),
                        log_extra={"dropout_scale": meta["dropout_scale"]},
                        after_update=None if ema is None else lambda step: ema.update(net))
    if stopped:
        return stopped
    epoch = state.epoch + 1
    if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
        scored = model if ema is None else ema.module
        result, confusion = evaluate(acc, scored, data.val, data.num_classes)
        state.extra["last_eval"] = {k: v for k, v in result.items()
                                    if isinstance(v, (int, float))}
        improved = best.update(acc, result, confusion, epoch, state.step, scored, meta)
        log_eval(acc, metrics, result, confusion, state.step, epoch, best, improved,
                 data.class_names, run_dir)
    state.epoch, state.update_in_epoch = epoch, 0
    state.extra["best"] = best.record
    if guards.nonfinite.in_row == 0:
        save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
    return None


def start_model_ema(acc, cfg: Any, model: torch.nn.Module, state: LoopState) -> ModelEmaV3 | None:
    """``train.ema_decay``: timm's EMA of the classifier, updated after every optimizer update.
    ``state.model_ema`` holds its very tensors (timm moves them in place), so every checkpoint
    saves them and a resume continues them."""
    if not cfg.train.ema_decay:
        return None
    ema = ModelEmaV3(acc.unwrap_model(model), decay=cfg.train.ema_decay)
    if state.model_ema:
        ema.module.load_state_dict(state.model_ema)
    elif state.step:
        acc.print("note: the checkpoint holds no model EMA; it starts from the resumed weights")
    state.model_ema = ema.module.state_dict()
    return ema


def _forward(acc, model, mixup: Mixup | None, criterion: Callable,
             batch: dict) -> tuple[torch.Tensor, dict, int]:
    """One micro-batch: mixup/cutmix (if on), then the classification loss."""
    images = batch["image"].to(acc.device, non_blocking=True)
    targets = batch["label"].to(acc.device, non_blocking=True)
    if mixup is not None:
        images, targets = mixup(images, targets)
    with acc.autocast():
        loss = criterion(model(images), targets)
    return loss, {}, images.shape[0]
