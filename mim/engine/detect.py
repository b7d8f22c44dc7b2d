"""Detection fine-tuning as a :class:`~mim.engine.job.TrainingJob` (data, forward pass, per-epoch
evaluation, the saved model), and COCO evaluation (``evaluate``, ``evaluate_run`` for
``mim evaluate --run``).

Every evaluation writes ``predictions.json`` (COCO results, in the ground truth's image and
category ids and the original image pixels) beside ``ground_truth.json``, appends the metrics to
``metrics.jsonl`` and the trackers, and draws ``detections_epochXXXX.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import gather_object, set_seed
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

from mim.checkpoint import load_weights_into, state_dict_for_save
from mim.config import ConfigError, DetectConfig, load_config
from mim.data.detection import build_detection_loader, detection_transform, pad_collate
from mim.data.detection_sources import build_detection_source, coco_ground_truth
from mim.data.labels import DetectionSubset, covering_subset
from mim.data.loader import EpochLoader
from mim.data.splits import detection_train_val, has_split, holdout_record
from mim.engine.accounting import count_flops, fmt_count
from mim.engine.distributed import forward_module
from mim.engine.job import TrainingJob, train
from mim.engine.loop import Budget, Loop
from mim.engine.run import make_accelerator, run_job, write_json
from mim.engine.state import start_model_ema
from mim.engine.tracking import MetricsLog, log_model_artifact
from mim.losses import dense_detection_loss
from mim.metrics.detection import METRIC_KEYS, CocoDetectionEvaluator, to_coco_results
from mim.models.detector import DenseDetector, build_detector
from mim.viz import detection_grid, save_grid


@dataclass
class DetectionData:
    train: EpochLoader
    val: EpochLoader
    classes: list[str]
    category_ids: list[int]
    ground_truth: dict[str, Any]  # the validation split as COCO instances
    val_issues: list[str]  # validation boxes/label lines dropped (degenerate, malformed)
    train_boxes: int  # boxes of the training images used (after data.label_fraction)
    held_out: dict | None = None  # the validation images held out of the training split


def _val_loader(cfg: DetectConfig, source: Any, rank: int, world: int, size_div: int) -> EpochLoader:
    d = cfg.data
    return build_detection_loader(
        source, detection_transform(cfg.model.img_size, False, d.mean, d.std,
                                    min_box_size=d.min_box_size),
        batch_size=d.eval_batch_size or d.batch_size, num_workers=d.num_workers, rank=rank,
        world_size=world, seed=cfg.run.seed, size_divisibility=size_div, shuffle=False,
        drop_last=False)


def build_detection_data(cfg: DetectConfig, rank: int, world: int, size_div: int) -> DetectionData:
    d, m = cfg.data, cfg.model
    sets = detection_train_val(d, m.img_size, cfg.run.seed)
    train, val = sets.train, sets.val
    image_classes = [train.annotations(i).labels.tolist() for i in range(len(train))]
    train.issues.clear()  # read here for the class cover; the training loop lists its own
    if d.label_fraction < 1:
        keep = covering_subset(image_classes, d.label_fraction, cfg.run.seed)
        train, image_classes = DetectionSubset(train, keep), [image_classes[i] for i in keep]
    if val.classes != train.classes:
        raise ConfigError(f"'{d.split}' and '{d.val_split}' have different classes "
                          f"({len(train.classes)} vs {len(val.classes)})")
    train_loader = build_detection_loader(
        train, detection_transform(m.img_size, True, d.mean, d.std, d.hflip, d.scale_range,
                                   d.min_box_size),
        batch_size=d.batch_size, num_workers=d.num_workers, rank=rank, world_size=world,
        seed=cfg.run.seed, size_divisibility=size_div, pin_memory=torch.cuda.is_available())
    gt = coco_ground_truth(val)
    held = holdout_record(sets, d, d.val_fraction, d.val_split_seed) if sets.held_out else None
    return DetectionData(train_loader, _val_loader(cfg, val, rank, world, size_div),
                         train.classes, train.category_ids, gt, list(val.issues),
                         sum(map(len, image_classes)), held)


def _num_classes(cfg: DetectConfig, classes: list[str]) -> int:
    k = cfg.model.num_classes or len(classes)
    if k < len(classes):
        raise ConfigError(f"config key 'model.num_classes' ({k}) is below the dataset's "
                          f"{len(classes)} classes")
    return k


def detect(cfg: DetectConfig) -> Path:
    """Run (or resume) the detection fine-tuning ``cfg`` describes; returns the run directory."""
    return run_job(cfg, lambda acc, cfg, run_dir: train(DetectJob(acc, cfg, run_dir)))


class DetectJob(TrainingJob[DetectConfig]):
    """A ViT detector from an init: COCO evaluation when due (the EMA's weights when
    ``train.ema_decay`` is set), ``model.safetensors`` and ``summary.json`` at the end."""

    def __init__(self, acc, cfg: DetectConfig, run_dir: Path) -> None:
        super().__init__(acc, cfg, run_dir)
        set_seed(cfg.run.seed)
        m = cfg.model
        size_div = int(m.patch_size / min(m.pyramid_scales))
        self.data = data = build_detection_data(cfg, acc.process_index, acc.num_processes,
                                                size_div)
        if data.held_out is not None and acc.is_main_process:
            write_json(run_dir / "val_split.json", data.held_out)
        self.model, self.init_report = build_detector(cfg, _num_classes(cfg, data.classes))
        self.loader, self.num_images = data.train, len(data.train.dataset)
        self.ema: ModelEmaV3 | None = None
        self.last_eval: dict[str, Any] = {}
        self.flops_per_image = 0

    def flops(self) -> int:
        m = self.cfg.model
        self.flops_per_image = count_flops(self.model,
                                           torch.zeros(1, m.in_chans, m.img_size, m.img_size))
        return self.flops_per_image

    def optimizer_options(self) -> dict[str, Any]:
        decay = self.cfg.optim.layer_decay
        return {"layer_decay": decay} if decay < 1 else {}

    def accounting(self, budget: Budget, flops: int) -> list[tuple[str, Any]]:
        cfg, acc, data, model = self.cfg, self.acc, self.data, self.model
        m, d, o = cfg.model, cfg.data, cfg.optim
        enc = sum(p.numel() for p in model.backbone.parameters())
        return [
            ("run directory", self.run_dir), ("init", f"{cfg.init} ({self.init_report.kind})"),
            ("model", f"{m.arch}, max side {m.img_size} px, patch {m.patch_size}, pyramid "
                      f"strides {model.strides}, "
                      f"{model.head.classification_head.num_anchors} anchors/pos"),
            ("train images", f"{self.num_images} ({data.train_boxes} boxes"
                             + (f", label fraction {d.label_fraction:g})"
                                if d.label_fraction < 1 else ")")),
            ("val images", len(data.val.dataset)), ("classes", f"{model.num_classes}"),
            ("val box issues", len(data.val_issues)), ("per-device batch", d.batch_size),
            ("devices", f"{acc.num_processes} ({acc.device.type})"),
            ("global batch", budget.global_batch), ("updates / epoch", budget.updates_per_epoch),
            ("total updates", budget.total_updates),
            ("lr", f"{budget.lr:.3g}"
             + ("" if o.lr else f" (base_lr {o.base_lr:g} x {budget.global_batch} / 256)")
             + f", layer decay {o.layer_decay:g}, clip {o.clip_grad.mode}"),
            ("loss", f"focal (alpha {cfg.loss.focal_alpha:g}, gamma {cfg.loss.focal_gamma:g}) + "
                     f"{cfg.loss.box} x {cfg.loss.box_weight:g}, / positives"),
            *([("model EMA", f"decay {cfg.train.ema_decay:g} (evaluated and saved)")]
              if cfg.train.ema_decay else []),
            ("parameters", f"{fmt_count(sum(p.numel() for p in model.parameters()))} "
                           f"({fmt_count(enc)} encoder)"),
            ("FLOPs / image", f"{fmt_count(flops)} forward at {m.img_size}x{m.img_size}"),
        ]

    def notes(self) -> list[str]:
        return self.init_report.lines() + [f"  data issue: {issue}"
                                           for issue in self.data.val_issues[:5]]

    def started(self, loop: Loop[DetectConfig], resumed: bool) -> None:
        acc, data = loop.acc, self.data
        self.ema = start_model_ema(acc, self.cfg.train.ema_decay, loop.model, loop.state)
        self.last_eval = loop.state.extra.get("last_eval", {})
        if acc.is_main_process:
            write_json(self.run_dir / "ground_truth.json", data.ground_truth)
            if not resumed and data.val_issues:  # out-of-image boxes are clipped, not listed
                with open(self.run_dir / "data_issues.jsonl", "a") as f:
                    f.writelines(json.dumps({"split": self.cfg.data.val_split, "issue": issue})
                                 + "\n" for issue in data.val_issues)

    def forward(self, loop: Loop[DetectConfig], batch: dict) -> tuple[torch.Tensor, dict, int]:
        """One micro-batch: the detector under autocast, then anchor assignment and the focal +
        box loss in fp32, divided on every process by the same (mean) number of positives."""
        acc, lc = loop.acc, self.cfg.loss
        images = batch["images"].to(acc.device, non_blocking=True)
        pad_mask = batch["mask"].to(acc.device, non_blocking=True)
        net: DenseDetector = acc.unwrap_model(loop.model)
        with acc.autocast():
            out = loop.model(images, pad_mask)
        labels, boxes = net.assign(out, batch["targets"])
        num_pos = acc.reduce((labels >= 0).sum().float(), reduction="mean")
        losses = dense_detection_loss(
            out.cls_logits, out.box_deltas, out.anchors, labels, boxes, net.box_coder,
            alpha=lc.focal_alpha, gamma=lc.focal_gamma, box=lc.box, box_weight=lc.box_weight,
            num_pos=num_pos)
        scalars = {"loss_cls": losses["loss_cls"], "loss_box": losses["loss_box"],
                   "positives": num_pos}
        return losses["loss"], scalars, images.shape[0]

    def after_update(self, loop: Loop[DetectConfig]) -> Callable[[int], None] | None:
        if self.ema is None:
            return None
        ema, net = self.ema, loop.acc.unwrap_model(loop.model)
        return lambda step: ema.update(net)

    def scored_model(self, loop: Loop[DetectConfig]) -> torch.nn.Module:
        """What is evaluated and saved: the EMA's weights when there is one."""
        return loop.model if self.ema is None else self.ema.module

    def epoch_ends(self, loop: Loop[DetectConfig], epoch: int) -> None:
        if epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs:
            self.last_eval = evaluate_and_log(loop.acc, self.cfg, self.scored_model(loop),
                                              self.data, loop.metrics, self.run_dir,
                                              loop.state.step, epoch)
        loop.state.extra["last_eval"] = {k: self.last_eval[k] for k in METRIC_KEYS
                                         if k in self.last_eval}

    def finish(self, loop: Loop[DetectConfig]) -> None:
        acc, cfg, state, run_dir, data = loop.acc, self.cfg, loop.state, self.run_dir, self.data
        last_eval, b = self.last_eval, loop.budget
        final_state = acc.get_state_dict(self.scored_model(loop))  # every process (FSDP)
        if not acc.is_main_process:
            return
        save_file(state_dict_for_save(final_state), str(run_dir / "model.safetensors"))
        write_json(run_dir / "summary.json", {
            **{k: last_eval.get(k) for k in METRIC_KEYS},
            "per_class_ap": last_eval.get("per_class_ap", {}), "updates": state.step,
            "train_images": self.num_images, "train_boxes": data.train_boxes,
            "label_fraction": cfg.data.label_fraction,
            "epochs": state.epoch, "images_seen": state.images_seen,
            "bad_samples": state.bad_samples, "nonfinite_updates": loop.guards.nonfinite.total,
            "val_box_issues": len(data.val_issues),
            "train_label_issues": _count_issues(run_dir / "data_issues.jsonl", cfg.data.split),
            "pr_score_thresh": cfg.eval.pr_score_thresh,
            "total_updates": b.total_updates, "updates_per_epoch": b.updates_per_epoch,
            "global_batch": b.global_batch, "flops_per_image": self.flops_per_image,
            "lr": b.lr, "classes": data.classes, "category_ids": data.category_ids,
            "init": self.init_report.to_dict(), "model_ema": cfg.train.ema_decay})
        log_model_artifact(acc, cfg, [run_dir / "model.safetensors", run_dir / "config.yaml",
                                      run_dir / "summary.json"])
        acc.print(f"done: {state.step} updates, mAP {last_eval.get('map', 0):.4f}, mAP@0.5 "
                  f"{last_eval.get('map_50', 0):.4f}. Results in {run_dir}/ (summary.json, "
                  "metrics.jsonl, predictions.json, ground_truth.json, detections_*.png, "
                  "model.safetensors)")


def _count_issues(path: Path, split: str) -> int:
    """Distinct label issues of ``split`` in data_issues.jsonl (a resume may list one twice)."""
    if not path.is_file():
        return 0
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return len({r["issue"] for r in rows if r.get("split") == split and "issue" in r})


def to_original_pixels(det: dict[str, torch.Tensor], size: torch.Tensor, orig: torch.Tensor
                       ) -> torch.Tensor:
    """Boxes from the resized image back to the original image's pixels."""
    boxes = det["boxes"].float().cpu().clone()
    boxes[:, 0::2] *= float(orig[1]) / float(size[1])
    boxes[:, 1::2] *= float(orig[0]) / float(size[0])
    return boxes


@torch.no_grad()
def predict(acc, model: torch.nn.Module, loader: EpochLoader, cfg: DetectConfig,
            category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO results of the whole split: every process its shard, gathered on every process."""
    net: DenseDetector = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    ev, results = cfg.eval, []
    for batch in loader.epoch(0):
        with acc.autocast():
            out = forward_module(acc, model)(batch["images"].to(acc.device),
                                             batch["mask"].to(acc.device))
        dets = net.postprocess(out, batch["sizes"], ev.score_thresh, ev.nms_iou,
                               ev.topk_candidates, ev.max_detections)
        for det, image_id, size, orig in zip(dets, batch["image_ids"], batch["sizes"],
                                             batch["orig_sizes"]):
            results += to_coco_results(int(image_id), to_original_pixels(det, size, orig),
                                       det["scores"].cpu(), det["labels"].cpu(), category_ids)
    net.train(was_training)
    return gather_object(results) if acc.num_processes > 1 else results


def evaluate_and_log(acc, cfg: DetectConfig, model: torch.nn.Module, data: DetectionData,
                     metrics: MetricsLog, run_dir: Path, step: int, epoch: int) -> dict[str, Any]:
    results = predict(acc, model, data.val, cfg, data.category_ids)
    png = save_detection_picture(acc, cfg, model, data,
                                 run_dir / f"detections_epoch{epoch:04d}.png")
    out: dict[str, Any] = {}
    if acc.is_main_process:
        write_json(run_dir / "predictions.json", results)
        out = _compute(data.ground_truth, results, cfg.eval.pr_score_thresh)
        record = {"step": step, "epoch": epoch, **{f"val/{k}": out[k] for k in METRIC_KEYS}}
        metrics.write({**record, "val/per_class_ap": out["per_class_ap"]})
        logged = {k: v for k, v in record.items() if k != "step"}
        logged.update({f"val/ap/{n}": v for n, v in out["per_class_ap"].items() if v is not None})
        acc.log(logged, step=step)
        for tracker in acc.trackers:
            if tracker.name == "wandb" and png is not None:
                import wandb

                tracker.log({"val/detections": wandb.Image(str(png), caption=f"epoch {epoch}")},
                            step=step)
        acc.print(f"epoch {epoch}: mAP {out['map']:.4f}  mAP@0.5 {out['map_50']:.4f}  "
                  f"AR@100 {out['mar_100']:.4f}  P@0.5 {out['precision_50']:.3f}  "
                  f"R@0.5 {out['recall_50']:.3f} (score >= {cfg.eval.pr_score_thresh:g})  "
                  f"IoU of TP@0.5 {out['mean_iou_tp']:.3f}")
    acc.wait_for_everyone()
    return out


@torch.no_grad()
def save_detection_picture(acc, cfg: DetectConfig, model: torch.nn.Module, data: DetectionData,
                           path: Path) -> Path | None:
    """The first ``eval.vis_images`` validation images with predictions and ground truth.
    Every process runs the forward (FSDP gathers the shards in it); the main process saves."""
    n = min(cfg.eval.vis_images, len(data.val.dataset))
    if n == 0:
        return None
    net: DenseDetector = acc.unwrap_model(model)
    batch = pad_collate([data.val.dataset[i] for i in range(n)], net.size_divisibility)
    was_training = net.training
    net.eval()
    with acc.autocast():
        out = forward_module(acc, model)(batch["images"].to(acc.device),
                                         batch["mask"].to(acc.device))
    ev = cfg.eval
    dets = net.postprocess(out, batch["sizes"], ev.score_thresh, ev.nms_iou, ev.topk_candidates,
                           ev.max_detections)
    net.train(was_training)
    if not acc.is_main_process:
        return None
    grid = detection_grid(batch["images"], cfg.data.mean, cfg.data.std, dets, batch["targets"],
                          data.classes, ev.pr_score_thresh)
    save_grid(grid, path)
    return path


def evaluate_run(run: str | Path, split: str = "") -> dict[str, Any]:
    """``mim evaluate --run``: re-evaluate a finished detection run's final model on ``split``
    (default: its validation split); writes ``evaluate_<split>.json`` and the predictions."""
    run_dir = Path(run)
    weights = run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not weights.is_file():
        raise ConfigError(f"--run: {run_dir} is not a finished mim detection run "
                          "(needs config.yaml and model.safetensors)")
    cfg = load_config(run_dir / "config.yaml", ["init=scratch", "init_file=",
                                                "tracking.backend=none", "run.resume=none"],
                      job="detect")
    split = split or cfg.data.val_split
    acc = make_accelerator(cfg)
    if split == cfg.data.val_split and not has_split(cfg.data, split):  # the held-out images
        source = detection_train_val(cfg.data, cfg.model.img_size, cfg.run.seed).val
    else:
        source = build_detection_source(cfg.data, cfg.model.img_size, cfg.run.seed, split)
    model, _ = build_detector(cfg, _num_classes(cfg, source.classes), load_init=False)
    load_weights_into(model, weights)
    model.to(acc.device)
    loader = _val_loader(cfg, source, acc.process_index, acc.num_processes,
                         model.size_divisibility)
    results = predict(acc, model, loader, cfg, source.category_ids)
    out: dict[str, Any] = {}
    if acc.is_main_process:
        gt = coco_ground_truth(source)
        write_json(run_dir / f"predictions_{split}.json", results)
        write_json(run_dir / f"ground_truth_{split}.json", gt)
        out = _compute(gt, results, cfg.eval.pr_score_thresh)
        write_json(run_dir / f"evaluate_{split}.json", {"split": split, **out})
        print(json.dumps({k: out[k] for k in METRIC_KEYS}))
    acc.wait_for_everyone()
    return out


def _compute(gt: dict[str, Any], results: list[dict[str, Any]], thresh: float) -> dict[str, Any]:
    evaluator = CocoDetectionEvaluator(gt, thresh)
    evaluator.update(results)
    return evaluator.compute()
