"""Labelled sources for fine-tuning: folders of class sub-folders, save_to_disk, parquet, hub."""

import datasets
import pytest
from PIL import Image

from mim import load_config
from mim.config import ConfigError
from mim.engine.finetune import build_classification_data

CLASSES = ["ant", "bee", "cat"]


def image_folder(root, split, per_class):
    for c, name in enumerate(CLASSES):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (36, 36), (80 * c, 10 * i, 0)).save(root / split / name / f"{i}.png")


def data(*over):
    cfg = load_config(None, ["model.img_size=32", "model.patch_size=8", "data.batch_size=2",
                             "data.num_workers=0", "data.val_split=validation", *over],
                      job="finetune")
    return build_classification_data(cfg, rank=0, world_size=1)


def test_image_folder_with_class_subfolders(tmp_path):
    image_folder(tmp_path, "train", 4)
    held = data(f"data.path={tmp_path}")  # no validation/ folder: 1 of 4 per class held out
    assert held.held_out is not None and held.held_out["images"] == 3
    assert (held.all_train_images, held.val_images) == (9, 3)
    image_folder(tmp_path, "validation", 2)
    d = data(f"data.path={tmp_path}", "data.label_fraction=0.5")
    assert (d.num_classes, d.class_names) == (3, CLASSES)
    assert (d.all_train_images, d.train_images, d.val_images) == (12, 6, 6)
    batch = next(iter(d.val.epoch(0)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].tolist() == [0, 0]


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "hub"])
def test_saved_and_hub_style_splits(tmp_path, layout):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    splits = {s: datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(n)],
         "label": [i % 3 for i in range(n)]}, features=features)
        for s, n in (("train", 9), ("validation", 6))}
    if layout == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "d"))
    else:
        (tmp_path / "d").mkdir()
        for s, ds in splits.items():
            ds.to_parquet(str(tmp_path / "d" / f"{s}-00000-of-00001.parquet"))
    key = "data.name" if layout == "hub" else "data.path"  # data.name: datasets.load_dataset()
    d = data(f"{key}={tmp_path / 'd'}")
    assert (d.train_images, d.val_images, d.num_classes) == (9, 6, 3)
    assert d.class_names == CLASSES  # the ClassLabel survives in the parquet schema


def test_held_out_validation_is_the_same_for_every_seed_and_label_fraction(tmp_path):
    image_folder(tmp_path, "train", 20)
    runs = [data(f"data.path={tmp_path}", f"run.seed={seed}", f"data.label_fraction={f}")
            for seed, f in ((0, 1.0), (1, 0.5), (2, 0.1))]
    files = [r.held_out["files"] for r in runs]
    assert files[0] == files[1] == files[2] and len(files[0]) == 6  # 2 of 20 per class
    assert all(f"/train/{c}/" in f for c, f in zip([c for c in CLASSES for _ in (0, 1)], files[0]))
    assert {r.all_train_images for r in runs} == {54}
    other = data(f"data.path={tmp_path}", "data.val_split_seed=7").held_out["files"]
    assert other != files[0] and len(other) == 6
    with pytest.raises(ConfigError, match="val_fraction"):
        data(f"data.path={tmp_path}", "data.val_fraction=1.5")
