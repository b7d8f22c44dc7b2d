"""Checks of the annotation files a user hands mim: COCO instances (ground truth, training
annotations), COCO results (predictions) and YOLO label files. pycocotools trusts its input: a
repeated id, a NaN box or a score that is a string is scored wrongly without an error. Each
check names the file and the first bad record; a training record that can be skipped is."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from mim.errors import ConfigError
from mim.files import read_json
from mim.typed_config import read_text


def _number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _int_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _member(v: Any, ids: set) -> bool:
    return _int_id(v) and v in ids


def box_problem(box: Any) -> str:
    """'' for an [x, y, w, h] of finite numbers with w, h >= 0; else what is wrong."""
    if not isinstance(box, list) or len(box) != 4:
        return f"bbox must be [x, y, w, h], got {str(box)[:60]}"
    if not all(_number(v) for v in box):
        return f"bbox holds a non-finite or non-numeric value: {str(box)[:60]}"
    if box[2] < 0 or box[3] < 0:
        return f"bbox has a negative width or height: {box}"
    return ""


def annotation_problem(a: Any, image_ids: set, category_ids: set) -> str:
    """'' for a usable instances annotation; else what is wrong with it."""
    if not isinstance(a, dict):
        return f"not an object: {str(a)[:60]}"
    if not _member(a.get("image_id"), image_ids):
        return f"image_id {str(a.get('image_id'))[:30]} is not in 'images'"
    if not _member(a.get("category_id"), category_ids):
        return f"category_id {str(a.get('category_id'))[:30]} is not in 'categories'"
    why = box_problem(a.get("bbox"))
    if why:
        return why
    if "area" in a and not (_number(a["area"]) and a["area"] >= 0):
        return f"area must be a finite number >= 0, got {str(a['area'])[:30]}"
    if a.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd must be 0 or 1, got {str(a.get('iscrowd'))[:30]}"
    return ""


def check_instances(gt: Any, path: Any, need_images: bool = False) -> list[tuple[int, str]]:
    """Refuse an instances file that is not COCO-shaped (``images``/``categories`` lists of
    objects with distinct integer ids; with ``need_images`` also ``file_name``, ``width`` and
    ``height``); returns the annotations that cannot be used, as (index, problem)."""
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    if not isinstance(gt, dict):
        raise fail(f"not a COCO instances file (an object with 'images', 'annotations' and "
                   f"'categories'), got a {type(gt).__name__}")
    for key in ("images", "categories"):
        if not isinstance(gt.get(key), list):
            raise fail(f"'{key}' must be a list, got {type(gt.get(key)).__name__}")
    if not isinstance(gt.get("annotations", []), list):
        raise fail("'annotations' must be a list")
    image_ids = _distinct_ids(gt["images"], "images", fail)
    category_ids = _distinct_ids(gt["categories"], "categories", fail)
    for i, c in enumerate(gt["categories"]):
        if not isinstance(c.get("name"), str):
            raise fail(f"categories[{i}] has no 'name' string")
    if need_images:
        for i, im in enumerate(gt["images"]):
            if not isinstance(im.get("file_name"), str) or not all(
                    _int_id(im.get(k)) and im[k] > 0 for k in ("width", "height")):
                raise fail(f"images[{i}] needs 'file_name' and positive integer 'width'/'height', "
                           f"got {str(im)[:100]}")
    return [(i, why) for i, a in enumerate(gt.get("annotations", []))
            if (why := annotation_problem(a, image_ids, category_ids))]


def _distinct_ids(items: list, key: str, fail: Any) -> set:
    seen: set = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not _int_id(item.get("id")):
            raise fail(f"{key}[{i}] must be an object with an integer 'id', got {str(item)[:80]}")
        if item["id"] in seen:
            raise fail(f"{key}[{i}] repeats id {item['id']}")
        seen.add(item["id"])
    return seen


def check_ground_truth(gt: Any, path: Any) -> None:
    """Ground truth to score against: every annotation usable, annotation ids distinct (COCO
    indexes them by id: a repeated id loses one box and counts the other twice)."""
    bad = check_instances(gt, path)
    if bad:
        i, why = bad[0]
        raise ConfigError(f"{path}: annotations[{i}]: {why}"
                          + (f" ({len(bad) - 1} more bad annotations)" if len(bad) > 1 else ""))
    seen: set = set()
    for i, a in enumerate(gt.get("annotations", [])):
        if "id" in a and (not _int_id(a["id"]) or a["id"] in seen):
            raise ConfigError(f"{path}: annotations[{i}]: id {str(a['id'])[:30]} is repeated or "
                              "not an integer")
        seen.add(a.get("id"))


def check_results(pred: Any, path: Any, gt: dict) -> list[dict]:
    """A COCO results list whose every entry is scorable: an image and category of the ground
    truth, a finite [x, y, w, h] box, a finite score. Returns the entries with those four keys
    only (a 'segmentation' would make pycocotools decode masks of any claimed size)."""
    if not isinstance(pred, list):
        raise ConfigError(f"{path}: not a COCO results list (a list of detections), got a "
                          f"{type(pred).__name__}")
    image_ids = {im["id"] for im in gt["images"]}
    category_ids = {c["id"] for c in gt["categories"]}
    out = []
    for i, d in enumerate(pred):
        why = ("not an object" if not isinstance(d, dict) else
               f"image_id {str(d.get('image_id'))[:30]} is not in the ground truth"
               if not _member(d.get("image_id"), image_ids) else
               f"category_id {str(d.get('category_id'))[:30]} is not in the ground truth"
               if not _member(d.get("category_id"), category_ids) else
               box_problem(d.get("bbox")) or
               ("" if _number(d.get("score")) else
                f"score must be a finite number, got {str(d.get('score'))[:30]}"))
        if why:
            raise ConfigError(f"{path}: detection [{i}]: {why}")
        out.append({k: d[k] for k in ("image_id", "category_id", "bbox", "score")})
    return out


def read_coco_instances(path: Path) -> tuple[dict, dict[int, list[str]]]:
    """A training instances file without its unusable annotations, and those as issue lines by
    image id (one whose image is unknown goes with the first image, so it is listed once)."""
    gt = read_json(path, "COCO annotation file")
    bad = check_instances(gt, path, need_images=True)
    ids = {im["id"] for im in gt["images"]}
    first = gt["images"][0]["id"] if gt["images"] else None
    by_image: dict[int, list[str]] = defaultdict(list)
    for i, why in bad:
        a = gt["annotations"][i]
        image = a.get("image_id") if isinstance(a, dict) and _member(a.get("image_id"), ids) \
            else first
        by_image[image].append(f"{path}: annotations[{i}]: {why}; skipped")
    drop = {i for i, _ in bad}
    kept = [a for i, a in enumerate(gt.get("annotations", [])) if i not in drop]
    return {**gt, "annotations": kept}, dict(by_image)


def read_yolo_rows(path: Path, num_classes: int, issues: list[str]) -> list[tuple]:
    """``(class, cx, cy, w, h)`` of each well-formed line of a YOLO label file; a malformed line
    (or a file that is not UTF-8 text) goes to ``issues`` and is skipped."""
    try:
        lines = read_text(path, "YOLO label file").splitlines()
    except ConfigError as e:
        issues.append(f"{e}; its boxes skipped")
        return []
    rows = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            c, *box = int(parts[0]), *map(float, parts[1:5])
            if len(parts) != 5 or not 0 <= c < num_classes or not all(map(math.isfinite, box)):
                raise ValueError
        except ValueError:
            issues.append(f"{path}:{n}: not 'class cx cy w h' (finite numbers, a known class); "
                          "skipped")
            continue
        rows.append((c, *box))
    return rows
