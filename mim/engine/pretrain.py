"""Masked-image-modeling pretraining: wiring (``pretrain``), the forward pass the shared loop
(:func:`mim.engine.loop.run_epoch`) runs, reconstruction grids and the encoder export."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from mim.checkpoint import latest_checkpoint, state_dict_for_save
from mim.data import build_epoch_loader, build_source, eval_transform, pretrain_transform
from mim.data.labels import num_classes_of
from mim.engine.accounting import count_flops, fmt_count, print_accounting
from mim.engine.distributed import forward_module
from mim.engine.loop import Guards, loop_budget, report_stop, run_epoch, start_loop
from mim.engine.optim import apply_speed_options, build_optimizer, build_scheduler
from mim.engine.run import check_disk_space, run_job, write_json
from mim.engine.state import LoopState, save_training_state
from mim.engine.tracking import MetricsLog, log_model_artifact
from mim.methods import build_pretrainer
from mim.models.init import InitReport
from mim.models.pretrain_init import load_pretrainer_init
from mim.engine.monitor import Monitor
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
    init_report = _continue_from_init(acc, cfg, run_dir, model)
    needs_labels = model.needs_labels  # forward(images, labels=...)
    d = cfg.data
    loader = build_epoch_loader(
        source, pretrain_transform(cfg.model.img_size, d.crop_scale, d.mean, d.std),
        batch_size=d.batch_size, num_workers=d.num_workers, rank=acc.process_index,
        world_size=acc.num_processes, seed=cfg.run.seed, pin_memory=acc.device.type == "cuda")
    accum = cfg.train.grad_accum_steps
    budget = loop_budget(acc, cfg, loader.batches_per_epoch, len(source),
                         "lower 'data.batch_size' or 'train.grad_accum_steps'")
    updates_per_epoch, total_updates = budget.updates_per_epoch, budget.total_updates
    global_batch, lr = budget.global_batch, budget.lr
    flops = count_flops(model, torch.zeros(2, cfg.model.in_chans, cfg.model.img_size,
                                           cfg.model.img_size),
                        **({"labels": torch.zeros(2, dtype=torch.long)} if needs_labels else {}))
    if acc.is_main_process:
        check_disk_space(run_dir, model, cfg.train.keep_last)
    model = apply_speed_options(model.to(acc.device), cfg)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, total_updates, updates_per_epoch)
    monitor = Monitor.for_run(acc, cfg, run_dir)
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    print_accounting(acc, [
        ("run directory", run_dir), ("method", cfg.method.name), ("encoder", cfg.model.arch),
        ("init", cfg.init if init_report is None else f"{cfg.init} ({init_report.kind})"),
        ("images", len(source)), ("per-device batch", d.batch_size),
        ("devices", f"{acc.num_processes} ({acc.device.type})"), ("accumulation", accum),
        ("global batch", global_batch), ("iterations / epoch", loader.batches_per_epoch),
        ("updates / epoch", updates_per_epoch), ("total updates", total_updates),
        ("lr", f"{lr:.3g} (base_lr {cfg.optim.base_lr:g} x {global_batch} / 256)"
         if not cfg.optim.lr else f"{lr:.3g}"),
        ("parameters", f"{fmt_count(all_params)} ({fmt_count(enc_params)} encoder)"),
        ("FLOPs / image", f"{fmt_count(flops)} forward, ~{fmt_count(3 * flops)} train step"),
        *([monitor.accounting()] if monitor is not None else []),
    ])
    for line in init_report.lines() if init_report is not None else []:
        acc.print(line)
    model, optimizer, state, metrics, _ = start_loop(acc, cfg, run_dir, model, optimizer)
    if state.step >= total_updates:
        acc.print(f"run already complete ({state.step} updates)")
    vis_images = _vis_batch(cfg, source)
    meta = {"total_updates": total_updates, "updates_per_epoch": updates_per_epoch,
            "global_batch": global_batch, "flops_per_image": flops, "needs_labels": needs_labels}
    guards = Guards.for_run(acc, cfg, len(source))
    try:
        stopped = _train(acc, cfg, model, optimizer, scheduler, loader, state, metrics, run_dir,
                         meta, guards, vis_images, monitor)
    finally:
        guards.stop.restore()
    save_training_state(acc, cfg, run_dir, model, optimizer, scheduler, state)
    report_stop(acc, stopped, state, guards)
    if state.epoch >= cfg.train.epochs:
        export_encoder(acc, model, run_dir / "encoder.safetensors")
    if acc.is_main_process and state.epoch >= cfg.train.epochs:
        write_json(run_dir / "summary.json", {"updates": state.step, "epochs": state.epoch,
                                              "images_seen": state.images_seen,
                                              "bad_samples": state.bad_samples,
                                              "nonfinite_updates": guards.nonfinite.total, **meta})
        log_model_artifact(acc, cfg, [run_dir / "encoder.safetensors", run_dir / "config.yaml"])
        acc.print(f"done: {state.step} updates. Results in {run_dir}/ "
                  "(config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors, recon_*.png)")
    return run_dir


def _continue_from_init(acc, cfg: Any, run_dir: Path, model: torch.nn.Module
                        ) -> InitReport | None:
    """Load ``init`` into a new run (what was loaded goes to init_report.json); a run that
    resumes keeps its checkpoint's weights, the init is not applied again over them."""
    if cfg.init == "scratch":
        return None
    mode = cfg.run.resume
    resume = None if mode == "none" else (
        latest_checkpoint(run_dir / "checkpoints") if mode == "auto" else Path(mode))
    if resume is not None:
        acc.print(f"init: {cfg.init} not applied again: the run resumes from {resume}")
        return None
    report = load_pretrainer_init(model, cfg.init, cfg.init_file)
    if acc.is_main_process:
        write_json(run_dir / "init_report.json", report.to_dict())
    return report


def _train(acc, cfg, model, optimizer, scheduler, loader, state: LoopState, metrics: MetricsLog,
           run_dir: Path, meta: dict, guards: Guards, vis_images: torch.Tensor,
           monitor: Monitor | None) -> str | None:
    """Epochs from ``state`` to the end; returns why it stopped early ('max_steps', 'signal')."""
    forward = partial(_forward, acc, model, meta["needs_labels"])
    if monitor is not None and state.step == 0:
        monitor.after_epochs(acc, model, state, metrics, 0, export_encoder)
    while state.epoch < cfg.train.epochs:
        stopped = run_epoch(acc, cfg, model, optimizer, scheduler, loader, state, metrics,
                            run_dir, meta, guards, forward,
                            after_update=acc.unwrap_model(model).after_update)
        if stopped:
            return stopped
        if monitor is not None:
            monitor.after_epochs(acc, model, state, metrics, state.epoch + 1, export_encoder)
        last = state.epoch == cfg.train.epochs - 1
        every = cfg.train.vis_every
        if (every and (state.epoch + 1) % every == 0) or last:
            _save_vis(acc, cfg, model, vis_images, run_dir, state.epoch + 1)
        state.epoch += 1
        state.update_in_epoch = 0
    return None


def _forward(acc, model, needs_labels: bool, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """One micro-batch: the pretrainer's loss and its optional metrics (``PretrainOutput``)."""
    images = batch["image"].to(acc.device, non_blocking=True)
    with acc.autocast():
        if needs_labels:
            out = model(images, labels=batch["label"].to(acc.device))
        else:
            out = model(images)
    return out.loss, out.metrics, images.shape[0]


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
    """Every process runs the grid's forward (FSDP gathers the shards in it); the main process
    saves it. Every process waits for the others at the end."""
    if len(images):
        net = forward_module(acc, model)
        net.eval()
        with acc.autocast():
            grid = pretrain_grid(net, images.to(acc.device), cfg.data.mean, cfg.data.std)
        net.train()
        if grid is not None and acc.is_main_process:
            _publish_grid(acc, grid, run_dir, epoch)
    acc.wait_for_everyone()


def _publish_grid(acc, grid: torch.Tensor, run_dir: Path, epoch: int) -> None:
    path = run_dir / f"recon_epoch{epoch:04d}.png"
    save_grid(grid, path)
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"recon": wandb.Image(str(path), caption=f"epoch {epoch}")})
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("recon", grid, epoch)


def export_encoder(acc, model: torch.nn.Module, path: Path) -> None:
    """The encoder alone under timm's key names (loads with ``timm.create_model``). Every process
    calls this: the full state is gathered (FSDP) with accelerate's ``get_state_dict``, and the
    main process writes it."""
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        prefix = "encoder.vit."
        save_file(state_dict_for_save({k[len(prefix):]: v for k, v in state.items()
                                       if k.startswith(prefix)}), str(path))
    acc.wait_for_everyone()
