"""COCO evaluation of hand-made predictions: our numbers are pycocotools' numbers; precision and
recall at a score threshold counted by hand; empty images, crowd regions, no predictions."""

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mim.cli import main
from mim.metrics.detection import METRIC_KEYS, CocoDetectionEvaluator, coco_metrics

GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100},
               {"id": 3, "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600,
         "iscrowd": 0},
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400,
         "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [40, 40, 60, 60], "area": 3600,
         "iscrowd": 1},
    ],  # image 2 has no objects
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
}
PRED = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},  # hit
    {"image_id": 1, "category_id": 1, "bbox": [12, 12, 30, 30], "score": 0.8},  # duplicate
    {"image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "score": 0.2},  # hit, low score
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.7},  # empty image
    {"image_id": 3, "category_id": 1, "bbox": [45, 45, 20, 20], "score": 0.6},  # in the crowd
    {"image_id": 3, "category_id": 1, "bbox": [60, 0, 20, 20], "score": 0.5},  # nothing there
]


def _pycocotools(gt, pred, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(pred))), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_numbers_are_pycocotools_numbers():
    ours = coco_metrics(GT, PRED, pr_score_thresh=0.3)
    stats = _pycocotools(GT, PRED)
    for key, i in [("map", 0), ("map_50", 1), ("map_75", 2), ("map_small", 3),
                   ("map_medium", 4), ("map_large", 5), ("mar_100", 8)]:
        assert ours[key] == pytest.approx(stats[i], abs=1e-12), key
    assert 0 < ours["map"] < 1
    # per-class AP equals pycocotools run on that class alone
    for name, cat_id in (("cat", 1), ("dog", 2)):
        assert ours["per_class_ap"][name] == pytest.approx(_pycocotools(GT, PRED, [cat_id])[0])


def test_precision_recall_at_threshold_by_hand():
    ours = coco_metrics(GT, PRED, pr_score_thresh=0.3)
    # scores >= 0.3: one hit; duplicate, empty-image and background detections are false
    # positives; the detection inside the crowd region is ignored. 3 non-crowd boxes.
    assert ours["precision_50"] == pytest.approx(1 / 4)
    assert ours["recall_50"] == pytest.approx(1 / 3)
    low = coco_metrics(GT, PRED, pr_score_thresh=0.1)  # the low-scoring dog hit counts now
    assert low["precision_50"] == pytest.approx(2 / 5) and low["recall_50"] == pytest.approx(2 / 3)


def test_no_predictions_scores_zero_and_evaluator_accumulates():
    empty = coco_metrics(GT, [], pr_score_thresh=0.3)
    assert all(empty[k] == 0 for k in ("map", "map_50", "mar_100", "precision_50", "recall_50"))
    assert empty["map_large"] == -1  # no large ground truth: pycocotools' "not measured"
    ev = CocoDetectionEvaluator(GT, 0.3)
    ev.update(PRED[:3])
    ev.update(PRED[3:])
    assert ev.compute() == coco_metrics(GT, PRED, 0.3)
    ev.reset()
    assert ev.compute()["map"] == 0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_metrics(GT, [{**PRED[0], "image_id": 99}])


def test_evaluate_detections_cli_prints_the_keys(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "pred.json").write_text(json.dumps(PRED))
    assert main(["evaluate-detections", "--gt", str(tmp_path / "gt.json"),
                 "--pred", str(tmp_path / "pred.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(METRIC_KEYS)
    ours = coco_metrics(GT, PRED, 0.3)
    assert printed == {k: ours[k] for k in METRIC_KEYS}
    assert main(["evaluate-detections", "--gt", str(tmp_path / "nope.json"),
                 "--pred", str(tmp_path / "pred.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def _iou_xywh(a, b):
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _brute_force_mean_iou_tp(gt, pred):
    """Per image and class, detections by falling score take the free non-crowd box of highest
    IoU >= 0.5 (crowd boxes never make a true positive); the mean IoU of those matches."""
    ious = []
    for im in gt["images"]:
        for cat in gt["categories"]:
            g = [a for a in gt["annotations"] if a["image_id"] == im["id"]
                 and a["category_id"] == cat["id"] and not a["iscrowd"]]
            ds = sorted((d for d in pred if d["image_id"] == im["id"]
                         and d["category_id"] == cat["id"]), key=lambda d: -d["score"])
            free = [True] * len(g)
            for d in ds:
                cand = [(_iou_xywh(d["bbox"], a["bbox"]), j) for j, a in enumerate(g) if free[j]]
                best = max(cand, default=(0.0, -1))
                if best[0] >= 0.5:
                    free[best[1]] = False
                    ious.append(best[0])
    return sum(ious) / len(ious) if ious else -1.0


@pytest.mark.parametrize("seed", range(5))
def test_mean_iou_tp_matches_brute_force_on_random_sets(seed):
    import random

    rng = random.Random(seed)
    images = [{"id": i, "width": 64, "height": 64} for i in range(1, 7)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    anns, pred = [], []
    for im in images:
        for _ in range(rng.randint(0, 4)):
            w, h = rng.uniform(6, 30), rng.uniform(6, 30)
            box = [rng.uniform(0, 64 - w), rng.uniform(0, 64 - h), w, h]
            cat = rng.choice(cats)["id"]
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat,
                         "bbox": box, "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            for _ in range(rng.randint(0, 3)):  # jittered copies: hits, misses, duplicates
                jit = [v + rng.gauss(0, 3) for v in box[:2]] + [max(1.0, v + rng.gauss(0, 3))
                                                              for v in box[2:]]
                pred.append({"image_id": im["id"], "category_id": rng.choice([cat, cat, 1, 2]),
                             "bbox": jit, "score": rng.random()})
    gt = {"images": images, "annotations": anns, "categories": cats}
    ours = coco_metrics(gt, pred)["mean_iou_tp"]
    assert ours == pytest.approx(_brute_force_mean_iou_tp(gt, pred), abs=1e-9)
    assert 0.5 <= ours <= 1 or ours == -1


def test_mean_iou_tp_by_hand():
    # GT/PRED above: the cat hit at IoU 1 is the only true positive above 0.5 on cats (its
    # duplicate has IoU 28^2/(2*900-28^2) = 0.77 but the box is taken); the dog hit is exact.
    assert coco_metrics(GT, PRED)["mean_iou_tp"] == pytest.approx(1.0)
    shifted = [{**PRED[0], "bbox": [13, 10, 30, 30]}]  # IoU 27*30 / (1800 - 810)
    assert coco_metrics(GT, shifted)["mean_iou_tp"] == pytest.approx(810 / 990)
    assert coco_metrics(GT, [])["mean_iou_tp"] == -1
