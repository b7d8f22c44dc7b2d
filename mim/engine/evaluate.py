"""Classifier evaluation: every process scores its exact shard of the split, one all-reduce sums
the statistics (no sample padded in or counted twice); the best checkpoint by a chosen metric is
kept in ``<run>/best/``; ``evaluate_run`` re-scores it (``mim evaluate --run``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mim.checkpoint import load_weights_into, state_dict_for_save
from mim.config import ConfigError, FinetuneConfig, load_config
from mim.data import build_epoch_loader, build_source, eval_transform
from mim.data.splits import has_split, train_val_sources
from mim.engine.distributed import forward_module
from mim.engine.run import make_accelerator, write_json
from mim.engine.state import LoopState
from mim.engine.tracking import MetricsLog, log_model_artifact
from mim.files import read_json
from mim.metrics import ClassificationEvaluator, save_confusion_matrix
from mim.models.classifier import build_classifier, export_classifier

PER_CLASS_KEYS = ("precision", "recall", "f1", "support")


def sync_buffers(acc, net: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics drift apart after the last
    DDP forward), so all processes evaluate the same model."""
    if acc.num_processes > 1:
        for buf in net.buffers():
            torch.distributed.broadcast(buf.data, src=0)


@torch.no_grad()
def evaluate(acc, model: torch.nn.Module, loader, num_classes: int
             ) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics over the whole split (all processes together) and its confusion matrix."""
    net = acc.unwrap_model(model)
    sync_buffers(acc, net)
    was_training = net.training
    net.eval()
    evaluator = ClassificationEvaluator(num_classes)
    for batch in loader.epoch(0):
        with acc.autocast():  # under FSDP through the wrapped model, on every process
            logits = forward_module(acc, model)(batch["image"].to(acc.device, non_blocking=True))
        evaluator.update(logits, batch["label"])
    evaluator.merge(lambda t: acc.reduce(t.to(acc.device), reduction="sum"))
    net.train(was_training)
    return evaluator.compute(), evaluator.confusion


def scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


class BestKeeper:
    """``<run>/best/``: weights (training form), metrics.json and confusion matrix of the best
    evaluation so far by ``metric`` (lower is better for ``loss``, higher for the others)."""

    def __init__(self, run_dir: Path, metric: str, record: dict | None = None) -> None:
        self.dir, self.metric, self.record = run_dir / "best", metric, dict(record or {})

    def is_better(self, value: float) -> bool:
        if not self.record:
            return True
        old = self.record["value"]
        return value < old if self.metric == "loss" else value > old

    def update(self, acc, result: dict, confusion: torch.Tensor, epoch: int, step: int,
               model: torch.nn.Module, num_classes: int, class_names: list[str]) -> bool:
        value = result[self.metric]
        if not self.is_better(value):
            return False
        self.record = {"metric": self.metric, "value": value, "epoch": epoch, "step": step}
        state = acc.get_state_dict(model)
        if acc.is_main_process:
            tmp = self.dir.with_name(".best.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(state_dict_for_save(state), str(tmp / "model.safetensors"))
            write_json(tmp / "metrics.json", {"best": self.record, "metrics": result,
                                              "num_classes": num_classes,
                                              "class_names": class_names})
            save_confusion_matrix(confusion, class_names, tmp / "confusion_matrix.png",
                                  title=f"epoch {epoch}: top-1 {result['top1']:.4f}")
            shutil.rmtree(self.dir, ignore_errors=True)
            tmp.rename(self.dir)
        acc.wait_for_everyone()
        return True


def log_eval(acc, metrics: MetricsLog, result: dict, confusion: torch.Tensor, step: int,
             epoch: int, best: BestKeeper, improved: bool, names: list[str], run_dir: Path) -> None:
    record = {"step": step, "epoch": epoch, **{f"val/{k}": v for k, v in result.items()},
              f"best/{best.metric}": best.record["value"], "best/epoch": best.record["epoch"]}
    metrics.write(record)
    logged = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if len(names) <= 32:
        logged.update({f"val/f1/{n}": f for n, f in zip(names, result["f1"])})
    acc.log(logged, step=step)
    if acc.is_main_process:
        png = run_dir / "confusion_matrix.png"
        save_confusion_matrix(confusion, names, png, title=f"epoch {epoch}: top-1 "
                                                           f"{result['top1']:.4f}")
        for tracker in acc.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({"val/confusion_matrix": wandb.Image(str(png))}, step=step)
    acc.print(f"epoch {epoch}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
              f"macro-F1 {result['macro_f1']:.4f}  loss {result['loss']:.4f}"
              + ("  (best)" if improved else ""))


def write_finetune_summary(acc, cfg: FinetuneConfig, run_dir: Path, state: LoopState, best: BestKeeper,
                           last_eval: dict, meta: dict) -> None:
    """Export the best classifier for timm and write ``summary.json`` (main process). The
    export is a fresh model holding the best weights: under FSDP the trained one is sharded."""
    net, _ = build_classifier(cfg, meta["num_classes"], load_init=False)
    net.load_state_dict(load_file(str(best.dir / "model.safetensors")))
    export = export_classifier(net, cfg, meta["num_classes"], run_dir / "export",
                               meta["class_names"])
    best_metrics = json.loads((best.dir / "metrics.json").read_text())["metrics"]
    summary = {
        "best": best.record, "best_metrics": scalars(best_metrics), "final_metrics": last_eval,
        "updates": state.step, "epochs": state.epoch, "images_seen": state.images_seen,
        "bad_samples": state.bad_samples, "label_fraction": cfg.data.label_fraction,
        "export": str(export),
        "timm": f"timm.create_model('local-dir:{export.parent}', pretrained=True)",
        **{k: v for k, v in meta.items() if k != "dropout_scale"},
    }
    write_json(run_dir / "summary.json", summary)
    log_model_artifact(acc, cfg, [export, export.parent / "config.json", run_dir / "config.yaml",
                                  run_dir / "summary.json"])
    acc.print(f"done: {state.step} updates; best {best.metric} {best.record['value']:.4f} at "
              f"epoch {best.record['epoch']}. Results in {run_dir}/ (config.yaml, metrics.jsonl, "
              "summary.json, best/, export/model.safetensors, confusion_matrix.png)")


def evaluate_run(run: str | Path, split: str = "") -> dict[str, Any]:
    """Re-evaluate the best checkpoint of a fine-tuning run on ``split`` (default: its val split);
    writes ``<run>/evaluate_<split>.json`` and the confusion matrix next to it."""
    run_dir = Path(run)
    best_dir = run_dir / "best"
    if not (run_dir / "config.yaml").is_file() or not (best_dir / "model.safetensors").is_file():
        raise ConfigError(f"--run: {run_dir} is not a finished mim fine-tuning run "
                          "(needs config.yaml and best/model.safetensors)")
    cfg = load_config(run_dir / "config.yaml", ["init=scratch", "init_file=",
                                                "tracking.backend=none", "run.resume=none"],
                      job="finetune")
    info = read_json(best_dir / "metrics.json", "best-checkpoint record")
    if not isinstance(info, dict) or not {"num_classes", "class_names", "best"} <= set(info):
        raise ConfigError(f"--run: {best_dir / 'metrics.json'} is not a mim best-checkpoint "
                          "record")
    num_classes, names = info["num_classes"], info["class_names"]
    split = split or cfg.data.val_split
    acc = make_accelerator(cfg)
    model, _ = build_classifier(cfg, num_classes, load_init=False)
    load_weights_into(model, best_dir / "model.safetensors")
    model.to(acc.device)
    d = cfg.data
    if split == d.val_split and not has_split(d, split):  # the run's held-out images
        source = train_val_sources(d, cfg.model.img_size, cfg.run.seed, d.val_fraction,
                                   d.val_split_seed).val
    else:
        source = build_source(d, image_size=cfg.model.img_size, seed=cfg.run.seed, split=split)
    loader = build_epoch_loader(
        source, eval_transform(cfg.model.img_size, d.mean, d.std, crop_pct=d.eval_crop_pct),
        batch_size=d.eval_batch_size or d.batch_size, num_workers=d.num_workers,
        rank=acc.process_index, world_size=acc.num_processes, seed=cfg.run.seed, shuffle=False,
        drop_last=False)
    result, confusion = evaluate(acc, model, loader, num_classes)
    if acc.is_main_process:
        out = {"split": split, "epoch": info["best"]["epoch"], "processes": acc.num_processes,
               **result}
        write_json(run_dir / f"evaluate_{split}.json", out)
        save_confusion_matrix(confusion, names, run_dir / f"evaluate_{split}_confusion.png",
                              title=f"{split}: top-1 {result['top1']:.4f}")
    acc.print(f"{run_dir} (best epoch {info['best']['epoch']}) on '{split}', "
              f"{result['num_samples']} images: top-1 {result['top1']:.4f}  "
              f"top-5 {result['top5']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
              f"loss {result['loss']:.4f}")
    acc.wait_for_everyone()
    return result
