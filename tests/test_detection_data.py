"""Detection data: box-aware transforms, padding masks, and the COCO / YOLO / HF / synthetic
sources with empty images, crowd regions and degenerate boxes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from mim.config import ConfigError, load_config
from mim.data.detection import detection_transform, pad_collate
from mim.data.detection_sources import (CocoSource, HFDetectionSource, SyntheticDetection,
                                        YoloSource, build_detection_source, coco_ground_truth)
from mim.engine.detect import to_original_pixels
from tests.conftest import SHARED_DATA

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _picture(w=120, h=80, boxes=((10, 20, 40, 50), (70, 5, 110, 30))):
    """Black image, each box filled white exactly (xyxy, end exclusive)."""
    arr = np.zeros((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr), torch.tensor(boxes, dtype=torch.float32)


def _sample(img, boxes, crowd=None):
    n = len(boxes)
    return {"image": img,
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                              canvas_size=(img.height, img.width)),
            "labels": torch.arange(n), "iscrowd": torch.zeros(n, dtype=torch.bool)
            if crowd is None else crowd}


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_flip_and_resize_keep_boxes_on_the_objects(scale):
    img, boxes = _picture()
    tf = detection_transform(64, True, MEAN, STD, hflip=1.0, scale_range=(scale, scale))
    out = tf(_sample(img, boxes))
    x = out["image"][0]  # white objects on black, resized with antialiasing
    assert max(x.shape) <= 64
    for box in out["boxes"]:
        x0, y0, x1, y1 = box.tolist()
        inner = x[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1]
        assert inner.min() > 0.9  # the box interior is object
    on = x > 0.5
    covered = torch.zeros_like(on)
    for x0, y0, x1, y1 in out["boxes"].round().long().tolist():
        covered[y0:y1, x0:x1] = True
    assert not (on & ~covered).any()  # no object pixel outside the boxes
    # flipped: the left object is now on the right
    assert out["boxes"][0, 0] > out["boxes"][1, 0]


def test_resize_round_trip_to_original_pixels():
    img, boxes = _picture(w=333, h=201)
    out = detection_transform(64, False, MEAN, STD)(_sample(img, boxes))
    h, w = out["image"].shape[1:]
    assert max(h, w) == 64
    back = to_original_pixels({"boxes": out["boxes"]}, torch.tensor([h, w]),
                              torch.tensor([201, 333]))
    assert torch.allclose(back, boxes, atol=1e-3)
    twice = v2.RandomHorizontalFlip(1.0)(v2.RandomHorizontalFlip(1.0)(_sample(img, boxes)))
    assert torch.equal(twice["boxes"].as_subclass(torch.Tensor), boxes)


def test_degenerate_boxes_are_dropped_with_their_labels_and_crowd_flags():
    img, _ = _picture()
    boxes = torch.tensor([[10, 20, 40, 50], [5, 5, 5.2, 30], [70, 5, 110, 30.]])
    out = detection_transform(64, False, MEAN, STD, min_box_size=1.0)(
        _sample(img, boxes, torch.tensor([False, True, True])))
    assert out["labels"].tolist() == [0, 2] and out["iscrowd"].tolist() == [False, True]


def test_padding_mask_marks_real_pixels():
    samples = [{"image": torch.ones(3, h, w), "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.long),
                "iscrowd": torch.zeros(0, dtype=torch.bool), "image_id": i,
                "orig_size": (h, w), "index": i, "bad": [], "issues": []}
               for i, (h, w) in enumerate([(40, 64), (64, 17), (33, 33)])]
    batch = pad_collate(samples, size_divisibility=32)
    assert batch["images"].shape == (3, 3, 64, 64) and batch["mask"].shape == (3, 64, 64)
    for b, (h, w) in enumerate([(40, 64), (64, 17), (33, 33)]):
        assert batch["mask"][b, :h, :w].all() and batch["mask"][b].sum() == h * w
        assert (batch["images"][b][:, ~batch["mask"][b]] == 0).all()
    assert batch["sizes"].tolist() == [[40, 64], [64, 17], [33, 33]]


def test_synthetic_boxes_are_exact_and_reproducible():
    src = SyntheticDetection(40, 64, seed=3)
    empty = 0
    for i in range(len(src)):
        img, ann, _ = src.load(i)
        assert img.size == (ann.width, ann.height)
        empty += len(ann.boxes) == 0
        for x0, y0, x1, y1 in ann.boxes.astype(int):
            assert x1 > x0 and y1 > y0 and x1 <= ann.width and y1 <= ann.height
        assert ann.width <= 64 and ann.height <= 64
    assert 0 < empty < len(src)
    a, b = src.annotations(7), SyntheticDetection(40, 64, seed=3).annotations(7)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)


def _write_coco(root, split="train"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, size in ((1, (60, 40)), (2, (50, 50)), (5, (30, 20))):
        Image.new("RGB", size).save(root / "images" / split / f"{i}.jpg")
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "width": 60, "height": 40},
                      {"id": 2, "file_name": "2.jpg", "width": 50, "height": 50},
                      {"id": 5, "file_name": "5.jpg", "width": 30, "height": 20}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "area": 70,
                "iscrowd": 0},
               {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 30, 30], "area": 800,
                "iscrowd": 1},
               {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10], "area": 0,
                "iscrowd": 0}],  # degenerate; image 5 has no objects
           "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))


def test_coco_source_keeps_ids_crowd_and_empty_images(tmp_path):
    _write_coco(tmp_path)
    src = CocoSource(str(tmp_path), "train")
    assert len(src) == 3 and src.classes == ["cat", "dog"] and src.category_ids == [3, 7]
    img, ann, _ = src.load(0)
    assert img.size == (60, 40) and ann.image_id == 1
    assert ann.labels.tolist() == [1, 0] and ann.iscrowd.tolist() == [False, True]
    assert ann.boxes.tolist() == [[1, 2, 11, 12], [20, 5, 50, 35]]
    assert ann.area.tolist() == [70, 800]
    assert len(src.annotations(1).boxes) == 0 and len(src.issues) == 1  # degenerate dropped
    assert len(src.annotations(2).boxes) == 0
    gt = coco_ground_truth(src)
    assert [im["id"] for im in gt["images"]] == [1, 2, 5]
    assert [(a["category_id"], a["iscrowd"], a["bbox"]) for a in gt["annotations"]] == [
        (7, 0, [1, 2, 10, 10]), (3, 1, [20, 5, 30, 30])]
    with pytest.raises(ConfigError, match="instances_val.json"):
        CocoSource(str(tmp_path), "val")


def test_yolo_source_with_background_images_and_bad_lines(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("person\nbicycle\n")
    for name in ("a", "b"):
        Image.new("RGB", (100, 50)).save(tmp_path / "images" / "val" / f"{name}.png")
    (tmp_path / "labels" / "val" / "a.txt").write_text(
        "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0 0.1\nnot a line\n7 0.5 0.5 0.1 0.1\n")
    src = YoloSource(str(tmp_path), "val")  # b has no label file: a background image
    a = src.annotations(0)
    assert a.labels.tolist() == [1] and np.allclose(a.boxes, [[40, 15, 60, 35]])
    assert len(src.annotations(1).boxes) == 0 and src.category_ids == [1, 2]
    assert len(src.issues) == 3  # the zero-width box, the bad line, the unknown class


def _hf_dataset(list_of_dicts: bool):
    import datasets

    cat = datasets.ClassLabel(names=["a", "b", "c"])
    imgs = [Image.new("RGB", (40, 30)), Image.new("RGB", (20, 20))]
    if list_of_dicts:
        objects = [[{"bbox": [1.0, 2.0, 10.0, 5.0], "category": 2}], []]
        feat = datasets.List({"bbox": datasets.List(datasets.Value("float32"), length=4),
                              "category": cat})
    else:
        objects = [{"bbox": [[1.0, 2.0, 10.0, 5.0]], "category": [2]}, {"bbox": [], "category": []}]
        feat = {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(cat)}
    return datasets.Dataset.from_dict({"image": imgs, "objects": objects},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "objects": feat}))


@pytest.mark.parametrize("list_of_dicts", [True, False])
def test_hf_source_reads_both_object_layouts(tmp_path, list_of_dicts):
    _hf_dataset(list_of_dicts).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(None, [f"data.path={tmp_path / 'ds'}", "data.format=hf"], job="detect")
    src = build_detection_source(cfg.data, 64, 0, "train")
    assert isinstance(src, HFDetectionSource) and src.classes == ["a", "b", "c"]
    img, ann, _ = src.load(0)
    assert img.size == (40, 30) and ann.labels.tolist() == [2]
    assert ann.boxes.tolist() == [[1, 2, 11, 7]] and len(src.annotations(1).boxes) == 0


@pytest.mark.skipif(not (SHARED_DATA / "coco128").is_dir(),
                    reason="coco128 not found under ../shared/data (see shared/data/README.md)")
def test_coco128_json_and_yolo_labels_agree():
    root = str(SHARED_DATA / "coco128")
    coco, yolo = CocoSource(root, "train2017"), YoloSource(root, "train2017")
    assert len(coco) == len(yolo) == 128
    crowd = total = 0
    for i in range(128):
        c, y = coco.annotations(i), yolo.annotations(i)
        assert c.width == y.width and c.height == y.height
        crowd += int(c.iscrowd.sum())
        total += len(y.boxes)
        own = c.boxes[~c.iscrowd]
        names_c = [coco.classes[k] for k in c.labels[~c.iscrowd]]
        names_y = [yolo.classes[k] for k in y.labels]
        assert sorted(names_c) == sorted(names_y)
        assert np.allclose(np.sort(own, axis=0), np.sort(y.boxes, axis=0), atol=0.02)
    assert crowd == 10 and total == 929
    val = YoloSource(root, "val2017")
    assert sum(len(val.annotations(i).boxes) for i in range(len(val))) == 898
