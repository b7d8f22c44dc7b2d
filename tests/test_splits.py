"""Automatic validation split: a dataset without one gets a stratified, seeded hold-out."""

import json

from PIL import Image

from mim import load_config
from mim.data.detection_sources import coco_ground_truth
from mim.data.splits import detection_train_val
from mim.engine.evaluate import evaluate_run
from mim.engine.finetune import finetune
from tests.conftest import TINY


def test_detection_without_val_split_holds_out_by_main_class(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for i in range(30):  # 20 of class a, 10 of class b
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / "train" / f"{i:02d}.png")
        (tmp_path / "labels" / "train" / f"{i:02d}.txt").write_text(
            f"{int(i >= 20)} 0.5 0.5 0.4 0.4\n0 0.2 0.2 0.1 0.1\n" if i < 20 else
            "1 0.5 0.5 0.4 0.4\n1 0.2 0.2 0.1 0.1\n0 0.7 0.7 0.1 0.1\n")
    cfg = load_config(None, ["task=detect", "model.img_size=32", "model.patch_size=8",
                             "data.format=yolo", f"data.path={tmp_path}", "data.val_fraction=0.2"],
                      job="detect")
    sets = detection_train_val(cfg.data, 32, seed=0)
    assert (len(sets.train), len(sets.val)) == (24, 6)
    assert sum(i >= 20 for i in sets.held_out) == 2  # 20% of each main class
    gt = coco_ground_truth(sets.val)
    assert len(gt["images"]) == 6 and sets.val.classes == ["a", "b"]
    again = detection_train_val(load_config(None, ["task=detect", "model.img_size=32",
                                                   "model.patch_size=8", "data.format=yolo",
                                                   f"data.path={tmp_path}", "run.seed=5",
                                                   "data.val_fraction=0.2"], job="detect").data,
                                32, seed=5)
    assert again.held_out == sets.held_out  # the run's seed does not move the hold-out


def test_finetune_writes_and_evaluate_reuses_the_held_out_split(tmp_path):
    from mim.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(80, 32, seed=1)
    for i in range(len(shapes)):
        img, label, _ = shapes.load(i)
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "imgs" / f"c{label}" / f"{i}.png")
    model = [k for k in TINY if k.startswith("model.")]
    run = finetune(load_config(None, model + [
        f"data.path={tmp_path / 'imgs'}", "data.batch_size=8", "data.num_workers=0",
        "train.epochs=1", "tracking.backend=none", f"run.output_dir={tmp_path}", "run.name=ft"],
        job="finetune"))
    held = json.loads((run / "val_split.json").read_text())
    assert held["missing_split"] == "validation" and held["val_fraction"] == 0.1
    assert len(held["files"]) == held["images"] and all("/imgs/c" in f for f in held["files"])
    result = evaluate_run(str(run))
    assert result["num_samples"] == held["images"]
