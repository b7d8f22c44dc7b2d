"""Masked-image-modeling pretraining as a :class:`~mim.engine.job.TrainingJob`: its model and data,
its forward pass, reconstruction grids and the encoder export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from mim.checkpoint import latest_checkpoint, state_dict_for_save
from mim.data import build_epoch_loader, build_source, eval_transform, pretrain_transform
from mim.data.labels import num_classes_of
from mim.engine.accounting import count_flops, fmt_count
from mim.engine.distributed import forward_module
from mim.config import PretrainConfig
from mim.engine.job import TrainingJob, train
from mim.engine.loop import Budget, Loop
from mim.engine.optim import apply_speed_options
from mim.engine.run import run_job, write_json
from mim.engine.tracking import log_model_artifact
from mim.methods import build_pretrainer
from mim.models.init import InitReport
from mim.models.pretrain_init import load_pretrainer_init
from mim.engine.monitor import Monitor
from mim.viz import pretrain_grid, save_grid


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) a pretraining described by ``cfg``; returns the run directory."""
    return run_job(cfg, lambda acc, cfg, run_dir: train(PretrainJob(acc, cfg, run_dir)))


class PretrainJob(TrainingJob[PretrainConfig]):
    """A pretraining method on unlabeled images (labels only where the method needs them)."""

    remedy = "lower 'data.batch_size' or 'train.grad_accum_steps'"

    def __init__(self, acc, cfg: PretrainConfig, run_dir: Path) -> None:
        super().__init__(acc, cfg, run_dir)
        self.source = build_source(cfg.data, image_size=cfg.model.img_size, seed=cfg.run.seed)
        if cfg.method.name == "supervised":  # resolved once; the checkpoints store the number
            cfg.method.num_classes = num_classes_of(self.source, cfg.method.num_classes)
        set_seed(cfg.run.seed)
        self.model = build_pretrainer(cfg)
        self.init_report = _continue_from_init(acc, cfg, run_dir, self.model)
        d = cfg.data
        self.loader = build_epoch_loader(
            self.source, pretrain_transform(cfg.model.img_size, d.crop_scale, d.mean, d.std),
            batch_size=d.batch_size, num_workers=d.num_workers, rank=acc.process_index,
            world_size=acc.num_processes, seed=cfg.run.seed,
            pin_memory=acc.device.type == "cuda")
        self.num_images = len(self.source)
        self.monitor = Monitor.for_run(acc, cfg, run_dir)
        self.vis_images = _vis_batch(cfg, self.source)
        self.flops_per_image = 0

    def flops(self) -> int:
        m = self.cfg.model
        labels = {"labels": torch.zeros(2, dtype=torch.long)} if self.model.needs_labels else {}
        self.flops_per_image = count_flops(
            self.model, torch.zeros(2, m.in_chans, m.img_size, m.img_size), **labels)
        return self.flops_per_image

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return apply_speed_options(model.to(self.acc.device), self.cfg)

    def accounting(self, budget: Budget, flops: int) -> list[tuple[str, Any]]:
        cfg, acc, d, report = self.cfg, self.acc, self.cfg.data, self.init_report
        enc_params = sum(p.numel() for p in self.model.encoder.parameters())
        all_params = sum(p.numel() for p in self.model.parameters())
        return [
            ("run directory", self.run_dir), ("method", cfg.method.name),
            ("encoder", cfg.model.arch),
            ("init", cfg.init if report is None else f"{cfg.init} ({report.kind})"),
            ("images", self.num_images), ("per-device batch", d.batch_size),
            ("devices", f"{acc.num_processes} ({acc.device.type})"),
            ("accumulation", cfg.train.grad_accum_steps),
            ("global batch", budget.global_batch),
            ("iterations / epoch", self.loader.batches_per_epoch),
            ("updates / epoch", budget.updates_per_epoch),
            ("total updates", budget.total_updates),
            ("lr", f"{budget.lr:.3g} (base_lr {cfg.optim.base_lr:g} x {budget.global_batch} / "
                   "256)" if not cfg.optim.lr else f"{budget.lr:.3g}"),
            ("parameters", f"{fmt_count(all_params)} ({fmt_count(enc_params)} encoder)"),
            ("FLOPs / image", f"{fmt_count(flops)} forward, ~{fmt_count(3 * flops)} train step"),
            *([self.monitor.accounting()] if self.monitor is not None else []),
        ]

    def notes(self) -> list[str]:
        return self.init_report.lines() if self.init_report is not None else []

    def started(self, loop: Loop[PretrainConfig], resumed: bool) -> None:
        if self.monitor is not None and loop.state.step == 0:
            self.monitor.after_epochs(loop.acc, loop.model, loop.state, loop.metrics, 0,
                                      export_encoder)

    def forward(self, loop: Loop[PretrainConfig], batch: dict) -> tuple[torch.Tensor, dict, int]:
        """One micro-batch: the pretrainer's loss and its optional metrics (``PretrainOutput``)."""
        acc = loop.acc
        images = batch["image"].to(acc.device, non_blocking=True)
        with acc.autocast():
            if self.model.needs_labels:
                out = loop.model(images, labels=batch["label"].to(acc.device))
            else:
                out = loop.model(images)
        return out.loss, out.metrics, images.shape[0]

    def after_update(self, loop: Loop[PretrainConfig]) -> Callable[[int], None]:
        return loop.acc.unwrap_model(loop.model).after_update

    def epoch_ends(self, loop: Loop[PretrainConfig], epoch: int) -> None:
        if self.monitor is not None:
            self.monitor.after_epochs(loop.acc, loop.model, loop.state, loop.metrics, epoch,
                                      export_encoder)
        every = self.cfg.train.vis_every
        if (every and epoch % every == 0) or epoch == self.cfg.train.epochs:
            _save_vis(loop.acc, self.cfg, loop.model, self.vis_images, self.run_dir, epoch)

    def finish(self, loop: Loop[PretrainConfig]) -> None:
        acc, state, run_dir = loop.acc, loop.state, self.run_dir
        export_encoder(acc, loop.model, run_dir / "encoder.safetensors")
        if not acc.is_main_process:
            return
        b = loop.budget
        write_json(run_dir / "summary.json", {
            "updates": state.step, "epochs": state.epoch, "images_seen": state.images_seen,
            "bad_samples": state.bad_samples, "nonfinite_updates": loop.guards.nonfinite.total,
            "total_updates": b.total_updates, "updates_per_epoch": b.updates_per_epoch,
            "global_batch": b.global_batch, "flops_per_image": self.flops_per_image,
            "needs_labels": self.model.needs_labels})
        log_model_artifact(acc, self.cfg, [run_dir / "encoder.safetensors",
                                           run_dir / "config.yaml"])
        acc.print(f"done: {state.step} updates. Results in {run_dir}/ "
                  "(config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors, recon_*.png)")


def _continue_from_init(acc, cfg: PretrainConfig, run_dir: Path, model: torch.nn.Module
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


def _vis_batch(cfg: PretrainConfig, source: Any) -> torch.Tensor:
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
