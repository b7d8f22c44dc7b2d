"""``mim compare`` on a detection recipe (tiny ViT detector, synthetic shapes, CPU), and the
class-covering fraction of annotated images that detection label fractions train on."""

import csv
import json
import pytest
import torch
from safetensors.torch import save_file

from mim import load_config
from mim.config import ConfigError
from mim.data.labels import covering_subset
from mim.engine.compare import Cell, cell_config, compare
from mim.models.encoder import create_vit
from tests.conftest import REPO, read_compare_report, run_compare_two_processes

RECIPE = REPO / "configs/detect/demo.yaml"
RECIPE_TINY = ["model.img_size=32", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
               "model.pyramid_dim=16", "data.synthetic_size=32", "data.batch_size=8",
               "data.num_workers=0", "train.epochs=1", "train.eval_every=1", "train.log_every=1",
               "eval.vis_images=1", "eval.score_thresh=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory):
    """An encoder of the recipe's architecture with other (random) weights: a non-scratch init."""
    recipe = load_config(RECIPE, RECIPE_TINY, job="detect")
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in create_vit(recipe.model).state_dict().items()},
              str(path))
    return path


def _compare_cfg(tmp_path, encoder, *extra):
    return load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=cmp",
        f"inits={{scratch: scratch, other: {encoder}}}", f"finetune={RECIPE}",
        f"overrides={RECIPE_TINY}", "label_fractions=[0.5]", "seeds=[0,1]",
        "tracking.backend=none", *extra], job="compare")


def test_detection_compare_writes_the_report_in_map_and_skips_finished_cells(
        tmp_path, other_encoder, capsys):
    cfg = _compare_cfg(tmp_path, other_encoder)
    run_dir = compare(cfg)
    rows = read_compare_report(run_dir)
    assert [(r["init"], float(r["label_fraction"]), int(r["n_seeds"])) for r in rows] == [
        ("scratch", 0.5, 2), ("other", 0.5, 2)]
    for r in rows:
        assert float(r["mean"]) == pytest.approx(float(r["map"]))  # the default metric: map
        assert 0.5 <= float(r["mean_iou_tp"]) <= 1 or float(r["mean_iou_tp"]) == -1
    summary = json.loads((run_dir / "cells/other_f0.5_s1/summary.json").read_text())
    assert summary["train_images"] == 16 and summary["label_fraction"] == 0.5
    scratch = json.loads((run_dir / "cells/scratch_f0.5_s1/summary.json").read_text())
    assert scratch["train_boxes"] == summary["train_boxes"]  # same images for every init
    md = (run_dir / "report.md").read_text()
    assert "validation `map` of the fine-tuned detector" in md and "Δ vs scratch" in md
    assert "16 training images with " in md and "mean IoU of TP@0.5" in md
    assert "AP small" in md and "- **other**, 50% labels: best " in md
    summaries = sorted((run_dir / "cells").glob("*/summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    compare(cfg)
    out = capsys.readouterr().out
    assert out.count(" skip ") == 4 and " run " not in out
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes
    again = _compare_cfg(tmp_path, other_encoder, "metric=mean_iou", "run.name=cmp")
    compare(again)  # another metric re-reports the same cells
    with open(run_dir / "report.csv") as f:
        assert [float(r["mean"]) for r in csv.DictReader(f)] == pytest.approx(
            [float(r["mean_iou_tp"]) for r in rows])


def test_metric_must_fit_the_recipe_task(tmp_path, other_encoder):
    with pytest.raises(ConfigError, match="'top1' does not apply to a detection recipe"):
        compare(_compare_cfg(tmp_path, other_encoder, "metric=top1"))
    cls = load_config(None, [f"run.output_dir={tmp_path}", "inits={scratch: scratch}",
                             f"finetune={REPO / 'configs/finetune/cls_demo.yaml'}", "metric=map",
                             "tracking.backend=none"], job="compare")
    with pytest.raises(ConfigError, match="'map' does not apply to a classification recipe"):
        compare(cls)
    assert not (tmp_path / "cmp" / "cells").exists()
    cell = cell_config(_compare_cfg(tmp_path, other_encoder), Cell("other", 0.5, 0))
    assert cell.task == "detect" and cell.data.label_fraction == 0.5


def test_two_process_detection_compare_scores_each_validation_image_once(tmp_path,
                                                                         other_encoder):
    cfg = _compare_cfg(tmp_path, other_encoder, "label_fractions=[1.0]", "seeds=[0]")
    out = run_compare_two_processes(cfg, tmp_path, 29543)
    assert out.count("devices           2 (cpu)") == 2  # each cell on both processes
    for cell in ("scratch_f1_s0", "other_f1_s0"):
        run = tmp_path / "cmp" / "cells" / cell
        gt = json.loads((run / "ground_truth.json").read_text())
        preds = json.loads((run / "predictions.json").read_text())
        per_image = {}
        for p in preds:
            per_image.setdefault(p["image_id"], []).append(json.dumps(p, sort_keys=True))
        assert sorted(per_image) == sorted(im["id"] for im in gt["images"])
        assert all(len(v) == len(set(v)) for v in per_image.values())  # no image twice
    with open(tmp_path / "cmp" / "report.csv") as f:
        assert sorted(row["init"] for row in csv.DictReader(f)) == ["other", "scratch"]


def test_covering_subset_is_seeded_stable_and_keeps_every_class():
    g = torch.Generator().manual_seed(0)
    # 200 images: class 9 in one image only, 20 images without objects
    images = [torch.randint(0, 9, (int(torch.randint(1, 4, (1,), generator=g)),),
                            generator=g).tolist() for _ in range(180)]
    images[137] = [9, 3]
    images += [[] for _ in range(20)]
    a = covering_subset(images, 0.1, seed=5)
    assert a == covering_subset(images, 0.1, seed=5) == sorted(a)
    assert a != covering_subset(images, 0.1, seed=6)
    annotated = [i for i in a if images[i]]
    assert len(annotated) == 18 and len(a) == 20  # 10% of 180 annotated + 10% of 20 empty
    assert {c for i in a for c in images[i]} == set(range(10))  # the rare class 9 is kept
    assert covering_subset(images, 1.0, seed=5) == list(range(200))
    tiny = covering_subset(images, 0.001, seed=5)  # quota 1: classes cannot all be kept
    assert len(tiny) == 1 and len(images[tiny[0]]) >= 1


@pytest.mark.parametrize("name", ["detect_demo.yaml", "detect_fmnist.yaml"])
def test_shipped_detection_compare_configs_make_detection_cells(name):
    cmp = load_config(REPO / "configs/compare" / name, ["inits={scratch: scratch}"],
                      job="compare")
    for f in cmp.label_fractions:
        try:
            cell = cell_config(cmp, Cell("scratch", f, 0))
        except ConfigError as e:
            if "no such file or folder" not in str(e):
                raise
            pytest.skip(f"{name}: its data set is not made here ({e}); "
                        "scripts/reproduce_fmnist_detection.sh makes it")
        assert cell.task == "detect" and cell.data.label_fraction == f
