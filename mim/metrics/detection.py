"""COCO box evaluation: pycocotools' COCOeval for the AP/AR numbers, plus precision and recall at
IoU 0.5 at one score threshold (the operating point a user deploys), matched greedily by score
with IoUs from ``torchvision.ops.box_iou``.

Inputs are COCO dicts: the ground truth as an instances file (``images``, ``annotations`` with
``bbox`` [x, y, w, h], ``area``, ``iscrowd``, ``categories``) and predictions as a results list
(``image_id``, ``category_id``, ``bbox``, ``score``). pycocotools reports -1 for a number with
no ground truth to measure it on (e.g. ``map_large`` when every object is small); so do we, and
``mean_iou_tp`` is -1 when no detection matched.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100",
               "precision_50", "recall_50", "mean_iou_tp")
_STATS_INDEX = {"map": 0, "map_50": 1, "map_75": 2, "map_small": 3, "map_medium": 4,
                "map_large": 5, "mar_100": 8}


def _coco(dataset: dict[str, Any]):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def coco_metrics(gt: dict[str, Any], predictions: list[dict[str, Any]],
                 pr_score_thresh: float = 0.3) -> dict[str, Any]:
    """METRIC_KEYS plus ``per_class_ap`` (class name -> AP@[.5:.95], None without ground truth).

    Predictions on images that are not in ``gt`` are an error (pycocotools would drop them).
    """
    from pycocotools.cocoeval import COCOeval

    known = {im["id"] for im in gt["images"]}
    stray = {p["image_id"] for p in predictions} - known
    if stray:
        raise ValueError(f"predictions for {len(stray)} image id(s) not in the ground truth, "
                         f"e.g. {sorted(stray)[:3]}")
    coco_gt = _coco(gt)
    if predictions:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(predictions))
    else:  # loadRes cannot take an empty list; no detections scores 0 where there is ground truth
        coco_dt = _coco({"images": gt["images"], "annotations": [],
                         "categories": gt["categories"]})
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {k: float(ev.stats[i]) for k, i in _STATS_INDEX.items()}
    p, r = precision_recall_at(gt, predictions, pr_score_thresh, iou_thresh=0.5)
    out["precision_50"], out["recall_50"] = p, r
    out["mean_iou_tp"] = mean_iou_of_matches(ev, coco_gt, coco_dt)
    out["per_class_ap"] = per_class_ap(ev, gt)
    return {k: out[k] for k in (*METRIC_KEYS, "per_class_ap")}


def per_class_ap(ev: Any, gt: dict[str, Any]) -> dict[str, float | None]:
    """AP@[.5:.95] of each category from COCOeval's accumulated precision table
    (all areas, 100 detections), as detectron2 reports it; None when the class has no boxes."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = ev.eval["precision"]  # (iou thresholds, recall points, classes, areas, max dets)
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[names[cat_id]] = float(p.mean()) if p.size else None
    return out


def mean_iou_of_matches(ev: Any, coco_gt: Any, coco_dt: Any, iou_thresh: float = 0.5) -> float:
    """Mean IoU of the detections COCOeval matched as true positives at ``iou_thresh`` (all
    areas, the largest max-detections): how well the found objects are localised, apart from
    how many are found. Matching is COCOeval's own (per image and class, greedy by score, crowd
    matches ignored), read from ``ev.evalImgs``; -1 when nothing matched."""
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou_thresh)))
    pairs = []
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        for k, dt_id in enumerate(e["dtIds"]):
            gt_id = int(e["dtMatches"][t, k])
            if gt_id > 0 and not e["dtIgnore"][t, k]:
                pairs.append((coco_dt.anns[dt_id]["bbox"], coco_gt.anns[gt_id]["bbox"]))
    if not pairs:
        return -1.0
    d, g = _xyxy([d for d, _ in pairs]), _xyxy([g for _, g in pairs])
    inter = (torch.min(d[:, 2:], g[:, 2:]) - torch.max(d[:, :2], g[:, :2])).clamp_min(0).prod(1)
    union = (d[:, 2:] - d[:, :2]).prod(1) + (g[:, 2:] - g[:, :2]).prod(1) - inter
    return float((inter / union).mean())


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp_min(0).prod(dim=2)


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)


def precision_recall_at(gt: dict[str, Any], predictions: list[dict[str, Any]],
                        score_thresh: float, iou_thresh: float = 0.5) -> tuple[float, float]:
    """Precision and recall of the detections scoring >= ``score_thresh``.

    Per image and class, detections in score order take the unmatched ground-truth box of
    highest IoU >= ``iou_thresh`` (a true positive) or count as false positives; as in COCO, a
    detection left unmatched but covering a crowd region (intersection / its own area >=
    ``iou_thresh``) is ignored, and crowd boxes are not counted for recall. 0 when undefined.
    """
    gts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        gts[(a["image_id"], a["category_id"])].append(a)
    dets: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for d in predictions:
        if d["score"] >= score_thresh:
            dets[(d["image_id"], d["category_id"])].append(d)
    num_gt = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    tp = fp = 0
    for key, ds in dets.items():
        ds = sorted(ds, key=lambda d: -d["score"])
        g = [a for a in gts.get(key, []) if not a.get("iscrowd", 0)]
        crowd = [a for a in gts.get(key, []) if a.get("iscrowd", 0)]
        d_xyxy = _xyxy([d["bbox"] for d in ds])
        iou = box_iou(d_xyxy, _xyxy([a["bbox"] for a in g])) if g else None
        ioa = None
        if crowd:
            area = (d_xyxy[:, 2:] - d_xyxy[:, :2]).prod(dim=1).clamp_min(1e-12)
            ioa = _intersection(d_xyxy, _xyxy([a["bbox"] for a in crowd])) / area[:, None]
        taken = torch.zeros(len(g), dtype=torch.bool)
        for i in range(len(ds)):
            if iou is not None:
                cand = iou[i].masked_fill(taken, -1.0)
                j = int(cand.argmax())
                if cand[j] >= iou_thresh:
                    taken[j] = True
                    tp += 1
                    continue
            if ioa is not None and bool((ioa[i] >= iou_thresh).any()):
                continue
            fp += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / num_gt if num_gt else 0.0
    return precision, recall


class CocoDetectionEvaluator:
    """reset / update / compute over COCO results of one split (detectron2's evaluator shape).

    ``update`` takes COCO result dicts; in a distributed run the engine gathers every process's
    list first, and the main process computes."""

    def __init__(self, ground_truth: dict[str, Any], pr_score_thresh: float = 0.3) -> None:
        self.gt, self.pr_score_thresh = ground_truth, pr_score_thresh
        self.predictions: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.predictions = []

    def update(self, predictions: list[dict[str, Any]]) -> None:
        self.predictions.extend(predictions)

    def compute(self) -> dict[str, Any]:
        return coco_metrics(self.gt, self.predictions, self.pr_score_thresh)


def to_coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor,
                    labels: torch.Tensor, category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's detections (xyxy pixels, contiguous labels) as COCO result dicts."""
    out = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        x0, y0, x1, y1 = box
        out.append({"image_id": int(image_id), "category_id": category_ids[int(label)],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5)})
    return out


def evaluate_files(gt_path: str | Path, pred_path: str | Path,
                   pr_score_thresh: float = 0.3) -> dict[str, Any]:
    """``mim evaluate-detections``: a COCO instances file and a COCO results file; anything
    pycocotools would score wrongly is a ConfigError naming the file and the first bad record."""
    from mim.data.annotation_checks import check_ground_truth, check_results
    from mim.files import read_json

    gt = read_json(gt_path, "ground truth file")
    check_ground_truth(gt, gt_path)
    pred = read_json(pred_path, "predictions file")
    if isinstance(pred, dict) and "annotations" in pred:  # a results file saved as instances
        pred = pred["annotations"]
    return coco_metrics(gt, check_results(pred, pred_path, gt), pr_score_thresh)

