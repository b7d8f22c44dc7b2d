"""Masked-image-modeling pretraining: wiring (``pretrain``) and the loop (``train_one_epoch``)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mim.config import ConfigError
from mim.data import build_epoch_loader, build_source, eval_transform, pretrain_transform
from mim.engine.common import (LoopState, NonFiniteGuard, StopRequest, Throughput,
                               apply_speed_options, build_optimizer, build_scheduler,
                               check_disk_space, count_flops, finish_update, fmt_count,
                               print_accounting, record_bad_samples, resolve_resume,
                               restore_training_state, run_job, save_training_state, seed_step,
                               start_tracking, write_json)
from mim.engine.checkpoint import state_dict_for_save
from mim.engine.tracking import MetricsLog
from mim.models import build_pretrainer
from mim.models.supervised import num_classes_of
from mim.viz import pretrain_grid, save_grid


def pretrain(cfg: Any) -> Path:
    """Run (or resume) a pretraining described by ``cfg``; returns the run directory."""
    return run_job(cfg, _pretrain)


def _pretrain(acc, cfg: Any, run_dir: Path) -> Path:
    source = build_source(cfg.data, image_size=cfg.model.img_size, seed=cfg.run.seed)
    if cfg.method.name == "supervised":  # resolved once; the checkpoints store the number
        cfg.method.num_classes = num_classes_of(source, cfg.method.num_classes)
    set_seed(cfg.run.seed)
    model = build_pretrainer(cfg)
    needs_labels = getattr(model, "needs_labels", False)  # forward(images, labels=...)
    d = cfg.data
    loader = build_epoch_loader(
        source, pretrain_transform(cfg.model.img_size, d.crop_scale, d.mean, d.std),
        batch_size=d.batch_size, num_workers=d.num_workers, rank=acc.process_index,
        world_size=acc.num_processes, seed=cfg.run.seed, pin_memory=acc.device.type == "cuda")
    accum = cfg.train.grad_accum_steps
    updates_per_epoch = loader.batches_per_epoch // accum
    if updates_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(source)} images, fewer than one global batch "
                          f"({d.batch_size} x {acc.num_processes} processes x {accum} accumulation)"
                          "; lower 'data.batch_size' or 'train.grad_accum_steps'")
    total_updates = cfg.train.epochs * updates_per_epoch
    global_batch = d.batch_size * acc.num_processes * accum
    lr = cfg.optim.lr or cfg.optim.base_lr * global_batch / 256
    flops = count_flops(model, torch.zeros(2, cfg.model.in_chans, cfg.model.img_size,
                                           cfg.model.img_size),
                        **({"labels": torch.zeros(2, dtype=torch.long)} if needs_labels else {}))
    if acc.is_main_process:
        check_disk_space(run_dir, model, cfg.train.keep_last)
    model = apply_speed_options(model.to(acc.device), cfg)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, total_updates, updates_per_epoch)
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    print_accounting(acc, [
        ("run directory", run_dir), ("method", cfg.method.name), ("encoder", cfg.model.arch),
        ("images", len(source)), ("per-device batch", d.batch_size),
        ("devices", f"{acc.num_processes} ({acc.device.type})"), ("accumulation", accum),
        ("global batch", global_batch), ("iterations / epoch", loader.batches_per_epoch),
        ("updates / epoch", updates_per_epoch), ("total updates", total_updates),
        ("lr", f"{lr:.3g} (base_lr {cfg.optim.base_lr:g} x {global_batch} / 256)"
         if not cfg.optim.lr else f"{lr:.3g}"),
        ("parameters", f"{fmt_count(all_params)} ({fmt_count(enc_params)} encoder)"),
        ("FLOPs / image", f"{fmt_count(flops)} forward, ~{fmt_count(3 * flops)} train step"),
    ])
    model, optimizer = acc.prepare(model, optimizer)
    state = LoopState()
    resume_from = resolve_resume(cfg, run_dir)
    if resume_from is not None:
        state = restore_training_state(acc, cfg, resume_from, model, optimizer)
        acc.print(f"resumed from {resume_from} at update {state.step}, epoch {state.epoch}")
    if state.step >= total_updates:
        acc.print(f"run already complete ({state.step} updates)")
    start_tracking(acc, cfg, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process,
                         state if resume_from is not None else None)
    vis_images = _vis_batch(cfg, source)
    meta = {"total_updates": total_updates, "updates_per_epoch": updates_per_epoch,
            "global_batch": global_batch, "flops_per_image": flops, "needs_labels": needs_labels}
    guards = Guards(seen_bad=set(), max_bad=int(d.max_bad_fraction * len(source)
                                                / acc.num_processes),
                    max_bad_fraction=d.max_bad_fraction,
                    nonfinite=NonFiniteGuard(cfg.train.max_nonfinite), stop=StopRequest())
    try:
        stopped = _train(acc, cfg, model, optimizer, scheduler, loader, state, metrics, run_dir,
                         meta, guards, vis_images)
    finally:
        guards.stop.restore()
    if stopped == "signal":
        save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
        acc.print(f"interrupted by signal {guards.stop.signum} at update {state.step}; checkpoint "
                  "saved, resume with run.resume=auto")
        raise SystemExit(143)
    save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
    if acc.is_main_process and state.epoch >= cfg.train.epochs:
        export_encoder(acc.unwrap_model(model), run_dir / "encoder.safetensors")
        write_json(run_dir / "summary.json", {"updates": state.step, "epochs": state.epoch,
                                              "images_seen": state.images_seen,
                                              "bad_samples": state.bad_samples,
                                              "nonfinite_updates": guards.nonfinite.total, **meta})
        acc.print(f"done: {state.step} updates. Results in {run_dir}/ "
                  "(config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors, recon_*.png)")
    elif acc.is_main_process:
        acc.print(f"stopped at update {state.step} (train.max_steps); resume with run.resume=auto")
    return run_dir


@dataclass
class Guards:
    seen_bad: set[str]
    max_bad: int
    max_bad_fraction: float
    nonfinite: NonFiniteGuard
    stop: StopRequest


def _train(acc, cfg, model, optimizer, scheduler, loader, state: LoopState, metrics: MetricsLog,
           run_dir: Path, meta: dict, guards: Guards, vis_images: torch.Tensor) -> str | None:
    """Epochs from ``state`` to the end; returns why it stopped early ('max_steps', 'signal')."""
    while state.epoch < cfg.train.epochs:
        stopped = train_one_epoch(acc, cfg, model, optimizer, scheduler, loader, state, metrics,
                                  run_dir, meta, guards)
        if stopped:
            return stopped
        last = state.epoch == cfg.train.epochs - 1
        every = cfg.train.vis_every
        if acc.is_main_process and ((every and (state.epoch + 1) % every == 0) or last):
            _save_vis(acc, cfg, model, vis_images, run_dir, state.epoch + 1)
        state.epoch += 1
        state.update_in_epoch = 0
    return None


def train_one_epoch(acc, cfg, model, optimizer, scheduler, loader, state: LoopState,
                    metrics: MetricsLog, run_dir: Path, meta: dict, guards: Guards) -> str | None:
    """One epoch of updates from ``state.update_in_epoch``; the reason if it stopped early."""
    t, accum = cfg.train, cfg.train.grad_accum_steps
    updates = meta["updates_per_epoch"]
    batches = iter(loader.epoch(state.epoch, start_batch=state.update_in_epoch * accum))
    params = [p for p in model.parameters() if p.requires_grad]
    speed, loss_sum, n_sum = Throughput(), torch.zeros((), device=acc.device), 0
    extra_sums: dict[str, torch.Tensor] = {}  # a model's optional PretrainOutput.metrics
    bar = tqdm(total=updates, initial=state.update_in_epoch, desc=f"epoch {state.epoch}",
               disable=not acc.is_local_main_process, leave=False, dynamic_ncols=True)
    while state.update_in_epoch < updates:
        if t.max_steps and state.step >= t.max_steps:
            bar.close()
            return "max_steps"
        if guards.stop.agreed(acc):
            bar.close()
            return "signal"
        scheduler.step_update(state.step)
        update_loss = torch.zeros((), device=acc.device)
        update_metrics: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = speed.wait_for(batches)
            record_bad_samples(acc, run_dir, state, batch["bad"], guards.seen_bad,
                               guards.max_bad, guards.max_bad_fraction)
            images = batch["image"].to(acc.device, non_blocking=True)
            seed_step(cfg.run.seed, acc.process_index, state.step * accum + micro)
            sync = acc.no_sync(model) if micro < accum - 1 else nullcontext()
            with sync:
                with acc.autocast():
                    if meta["needs_labels"]:
                        out = model(images, labels=batch["label"].to(acc.device))
                    else:
                        out = model(images)
                    loss = out.loss
                acc.backward(loss / accum)
            update_loss += loss.detach() / accum
            for k, v in out.metrics.items():  # every process makes the same keys, counted or not
                update_metrics[k] = update_metrics.get(k, 0.0) + v.detach().float() / accum
                extra_sums.setdefault(k, torch.zeros((), device=acc.device))
            speed.add(images.shape[0] * acc.num_processes)
        counted, grad_norm = finish_update(acc, cfg, optimizer, params, update_loss, state,
                                           guards.nonfinite, meta["global_batch"])
        if counted:
            loss_sum += update_loss
            n_sum += 1
            for k, v in update_metrics.items():
                extra_sums[k] += v
        bar.update(1)
        if state.step % t.log_every == 0 or state.update_in_epoch == updates:
            total = acc.reduce(torch.stack([loss_sum, torch.tensor(float(n_sum), device=acc.device)]),
                               reduction="sum")
            loss_avg = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
            rec = {"step": state.step, "epoch": state.epoch + state.update_in_epoch / updates,
                   "loss": loss_avg, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "images_per_s": speed.read(),
                   "data_wait": speed.data_wait, "bad_samples": state.bad_samples}
            for k, v in extra_sums.items():  # averaged like the loss: over every counted update
                rec[k] = (acc.reduce(v, reduction="sum") / total[1].clamp_min(1)).item()
            extra_sums.clear()
            metrics.write(rec)
            acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=state.step)
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{rec['lr']:.2e}")
            loss_sum.zero_()
            n_sum = 0
        if state.step % t.save_every == 0 and guards.nonfinite.in_row == 0:
            save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
    bar.close()
    return False


def _vis_batch(cfg: Any, source: Any) -> torch.Tensor:
    tf = eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std)
    imgs = []
    for i in range(min(cfg.train.vis_images, len(source))):
        try:
            imgs.append(tf(source.load(i)[0]))
        except Exception:  # noqa: BLE001 - a bad image is simply not shown
            continue
    return torch.stack(imgs) if imgs else torch.zeros(0)


def _save_vis(acc, cfg, model, images: torch.Tensor, run_dir: Path, epoch: int) -> None:
    net = acc.unwrap_model(model)
    if not len(images):
        return
    net.eval()
    with acc.autocast():
        grid = pretrain_grid(net, images.to(acc.device), cfg.data.mean, cfg.data.std)
    net.train()
    if grid is None:
        return
    path = run_dir / f"recon_epoch{epoch:04d}.png"
    save_grid(grid, path)
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"recon": wandb.Image(str(path), caption=f"epoch {epoch}")})
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("recon", grid, epoch)


def export_encoder(model: torch.nn.Module, path: Path) -> None:
    """The encoder alone under timm's key names (loads with ``timm.create_model``)."""
    save_file(state_dict_for_save(model.encoder.vit.state_dict()), str(path))
