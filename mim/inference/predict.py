"""``mim predict``: a fine-tuned run's predictions on new images, as one output file.

Classification writes a CSV (path, then the top-k class names and probabilities); when the
inputs carry the run's classes it also scores them with the metrics ``mim evaluate`` reports
(``<out>.metrics.json``). Detection writes ``predictions.json`` (COCO results, original
pixels; image ids are the inputs' positions + 1) beside ``images.json`` (the COCO ``images``
and ``categories`` those ids refer to) and, with ``--draw``, one picture per image; a labeled
detection set (``--labels coco|yolo|hf``) keeps its image ids and is scored with COCOeval as
``mim evaluate`` scores (``metrics.json``).
Under ``accelerate launch`` every process predicts its share and the main process writes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from mim.config import ConfigError
from mim.data.detection_sources import build_detection_source, coco_ground_truth
from mim.engine.run import process_state
from mim.inference.images import (PreparedImage, open_images, process_shard, report_unreadable,
                                  run_label_map)
from mim.inference.model import LoadedClassifier, LoadedDetector, load_model, run_config
from mim.metrics import ClassificationEvaluator
from mim.metrics.detection import METRIC_KEYS, CocoDetectionEvaluator, to_coco_results
from mim.viz import draw_predictions


def predict(run: str | Path, images: list[str], out: str | Path, *, split: str = "",
            batch_size: int = 32, num_workers: int = 2, topk: int = 5, draw: bool = False,
            score_thresh: float = 0.5, labels_format: str = "") -> int:
    """Predict ``images`` with the run's model into ``out``; the exit status (1 when some
    images could not be read, 0 otherwise). ``labels_format`` (detector): ``images`` is one
    detection dataset folder in that ``data.format``, scored as ``mim evaluate`` scores."""
    state = process_state()
    model = load_model(run, state.device)
    if labels_format and isinstance(model, LoadedDetector):
        source: Any = detection_dataset(model, images, labels_format, split)
    elif labels_format:
        raise ConfigError("--labels: a classifier reads labels from class sub-folders or a "
                          "labeled set, without --labels")
    else:
        source = open_images(images, split)
    out = Path(out)
    if isinstance(model, LoadedClassifier):
        if out.suffix.lower() != ".csv":
            raise ConfigError(f"--out: a classifier writes a CSV file, got {out}")
        labels = run_label_map(source, model.class_names)
        if source.label_column and labels is None:
            state.print(f"the inputs' labels ({(source.classes or [])[:5]}...) are not the "
                        "run's classes: predictions only, no metrics")
        rows, unreadable = process_shard(
            source, model.preprocess, lambda batch: _classify(model, batch, labels),
            batch_size=batch_size, num_workers=num_workers, desc="predict")
        if state.is_main_process:
            _write_classes(model, rows, out, topk, labels is not None)
    else:
        if out.suffix:
            raise ConfigError(f"--out: a detector writes a folder, got {out}")
        if draw and state.is_main_process:
            (out / "drawn").mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        rows, unreadable = process_shard(
            source, model.preprocess,
            lambda batch: _detect(model, batch, source, out if draw else None, score_thresh,
                                  bool(labels_format)),
            batch_size=batch_size, num_workers=num_workers, desc="predict")
        if state.is_main_process:
            _write_detections(model, rows, out,
                              coco_ground_truth(source) if labels_format else None)
    state.wait_for_everyone()
    return report_unreadable(unreadable, len(source))


def _classify(model: LoadedClassifier, batch: list[PreparedImage],
              labels: dict[int, int] | None) -> list[dict[str, Any]]:
    logits = model.logits(torch.stack([p.item for p in batch]))
    return [{"index": p.index, "path": p.path, "logits": row,
             "target": labels[p.label] if labels is not None and p.label is not None else None}
            for p, row in zip(batch, logits.tolist())]


def _write_classes(model: LoadedClassifier, rows: list[dict[str, Any]], out: Path, topk: int,
                   labeled: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    k = min(topk, len(model.class_names))
    logits = torch.tensor([r["logits"] for r in rows]).view(len(rows), -1)
    header = ["path"] + (["label"] if labeled else [])
    header += [c for i in range(1, k + 1) for c in (f"top{i}", f"prob{i}")]
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r, top in zip(rows, model.top_k(logits, k)):
            truth = [model.class_names[r["target"]]] if labeled else []
            pairs = [v for name, p in zip(top.labels, top.scores) for v in (name, f"{p:.6f}")]
            writer.writerow([r["path"], *truth, *pairs])
    print(f"wrote {len(rows)} predictions to {out}")
    if labeled and rows:
        evaluator = ClassificationEvaluator(len(model.class_names))
        evaluator.update(logits, torch.tensor([r["target"] for r in rows]))
        result = evaluator.compute()
        metrics = out.with_suffix(".metrics.json")
        metrics.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['num_samples']} labeled images: top-1 {result['top1']:.4f}  top-5 "
              f"{result['top5']:.4f}  macro-F1 {result['macro_f1']:.4f}  loss "
              f"{result['loss']:.4f} ({metrics})")


def _detect(model: LoadedDetector, batch: list[PreparedImage], source: Any,
            draw_dir: Path | None, score_thresh: float, labeled: bool) -> list[dict[str, Any]]:
    rows = []
    for p, det in zip(batch, model.detect([p.item for p in batch])):
        image_id = p.label.image_id if labeled else p.index + 1  # labeled: Annotations
        rows.append({"index": p.index, "image_id": image_id, "path": p.path, "size": p.size,
                     "boxes": det.boxes.tolist(), "scores": det.scores.tolist(),
                     "class_ids": det.class_ids.tolist()})
        if draw_dir is not None:  # small images enlarged so that the names stay readable
            image = source.load(p.index)[0]
            zoom = max(1, 256 // max(image.size))
            image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
            picture = draw_predictions(pil_to_tensor(image), det.boxes * zoom, det.scores,
                                       det.labels, score_thresh, max(1, max(image.size) // 256))
            name = f"{p.index:06d}_{Path(p.path).stem}.png"
            to_pil_image(picture).save(draw_dir / "drawn" / name)
    return rows


def detection_dataset(model: LoadedDetector, images: list[str], fmt: str, split: str) -> Any:
    """The labeled detection set at ``images[0]`` (a ``data.path`` in ``data.format`` ``fmt``),
    read as the run reads its own data."""
    if len(images) != 1:
        raise ConfigError("--labels: --images must name one dataset folder")
    cfg = run_config(model.run_dir, "detect", [f"data.path={images[0]}", f"data.format={fmt}",
                                               "data.name=", "data.synthetic=false"])
    source = build_detection_source(cfg.data, cfg.model.img_size, cfg.run.seed,
                                    split or cfg.data.val_split)
    if list(source.classes) != model.class_names:
        raise ConfigError(f"--images: its classes {list(source.classes)[:5]}... are not the "
                          f"run's {model.class_names[:5]}...")
    return source


def _write_detections(model: LoadedDetector, rows: list[dict[str, Any]], out: Path,
                      ground_truth: dict[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for r in rows:
        results += to_coco_results(r["image_id"], torch.tensor(r["boxes"]).view(-1, 4),
                                   torch.tensor(r["scores"]), torch.tensor(r["class_ids"]),
                                   model.category_ids)
    images = [{"id": r["image_id"], "file_name": r["path"], "width": r["size"][0],
               "height": r["size"][1]} for r in rows]
    categories = [{"id": cid, "name": name}
                  for cid, name in zip(model.category_ids, model.class_names)]
    (out / "predictions.json").write_text(json.dumps(results) + "\n")
    (out / "images.json").write_text(json.dumps({"images": images,
                                                 "categories": categories}) + "\n")
    print(f"wrote {len(results)} detections on {len(rows)} images to {out}/predictions.json "
          f"(image ids in {out}/images.json)")
    if ground_truth is not None:
        evaluator = CocoDetectionEvaluator(ground_truth, model.config.eval.pr_score_thresh)
        evaluator.update(results)
        metrics = evaluator.compute()
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps({k: metrics[k] for k in METRIC_KEYS}))
