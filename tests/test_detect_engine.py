"""End-to-end detection fine-tuning of a tiny ViT detector on the synthetic set, on CPU."""

import json
import subprocess

import pytest
import torch
import yaml

from mim.cli import main
from mim.config import ConfigError, load_config
from mim.engine.detect import detect
from mim.engine.tracking import read_metrics
from mim.metrics.detection import METRIC_KEYS
from tests.conftest import REPO, two_process_launch

TINY = ["task=detect", "model.arch=vit_tiny_patch16_224", "model.img_size=64", "model.patch_size=8",
        "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.pyramid_dim=32",
        "data.synthetic=true", "data.num_workers=0", "tracking.backend=none",
        "run.resume=none", "train.log_every=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """OpenMP threads spin while waiting; on a busy 2-core machine one thread is several times
    faster in wall time for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra],
                       job="detect")


def test_loss_falls_run_dir_and_evaluate_run(tmp_path, capsys):
    cfg = _cfg(tmp_path, "det", "data.synthetic_size=48", "data.batch_size=8", "train.epochs=3",
               "train.eval_every=3", "optim.lr=2e-3", "optim.warmup_epochs=0.5",
               "eval.vis_images=3")
    run_dir = detect(cfg)
    rec = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rec if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 19))
    assert sum(r["loss"] for r in train[-3:]) < 0.8 * sum(r["loss"] for r in train[1:4])
    evals = [r for r in rec if "val/map" in r]
    assert len(evals) == 1 and evals[0]["epoch"] == 3
    assert all(f"val/{k}" in evals[0] for k in METRIC_KEYS)
    for f in ("config.yaml", "ground_truth.json", "predictions.json", "summary.json",
              "model.safetensors", "detections_epoch0003.png"):
        assert (run_dir / f).is_file(), f
    gt = json.loads((run_dir / "ground_truth.json").read_text())
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert len(gt["images"]) == 32 and len(gt["categories"]) == 10
    image_ids = {im["id"] for im in gt["images"]}
    assert preds and {p["image_id"] for p in preds} <= image_ids
    assert {p["category_id"] for p in preds} <= {c["id"] for c in gt["categories"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 18 and set(METRIC_KEYS) <= set(summary)
    assert set(summary["per_class_ap"]) == {c["name"] for c in gt["categories"]}
    capsys.readouterr()
    # re-evaluating the saved model reproduces the run's last evaluation
    assert main(["evaluate", "--run", str(run_dir)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == pytest.approx({k: summary[k] for k in METRIC_KEYS}, abs=1e-6)


def test_overfits_a_handful_of_synthetic_images(tmp_path):
    cfg = _cfg(tmp_path, "overfit", "data.synthetic_size=4", "data.batch_size=4",
               "data.val_split=train", "data.hflip=0", "data.scale_range=[1,1]",
               "optim.lr=4e-3", "optim.warmup_epochs=3", "optim.layer_decay=1",
               "train.epochs=80", "train.eval_every=80", "eval.vis_images=0")
    summary = json.loads((detect(cfg) / "summary.json").read_text())
    assert summary["map_50"] > 0.9, summary


@pytest.mark.parametrize("override,match", [
    ("model.pyramid_scales=[1,3]", r"'model.pyramid_scales' must hold powers of two"),
    ("model.pyramid_scales=[0.5,1]", r"strictly decreasing"),
    ("model.img_size=80", r"multiple of the largest pyramid stride \(32"),
    ("loss.bg_iou=0.6", r"bg_iou <= fg_iou"),
    ("data.scale_range=[0.5,2]", r"'data.scale_range'"),
    ("loss.focal_gama=2", r"unknown config key 'loss.focal_gama' \(did you mean"),
    ("data.format=voc", r"'data.format' must be one of"),
    ("init=/no/such/run", r"'init' must be 'scratch', 'timm:<name>' or an existing path"),
    ("task=segment", r"'task' must be one of \['detect'\]"),
])
def test_config_errors_name_the_key(override, match, capsys):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + [override], job="detect")
    assert main(["finetune", *TINY, override]) == 2
    assert capsys.readouterr().err.startswith("mim: error: ")


def test_interrupted_run_resumes_to_the_same_losses_and_metrics(tmp_path):
    common = ("data.synthetic_size=16", "data.batch_size=8", "train.epochs=3",
              "train.eval_every=1", "optim.lr=2e-3", "train.save_every=1", "eval.vis_images=0",
              "model.drop_path_rate=0.1")
    full = detect(_cfg(tmp_path, "full", *common))
    detect(_cfg(tmp_path, "part", *common, "train.max_steps=3"))
    assert not (tmp_path / "part" / "summary.json").exists()
    part = detect(_cfg(tmp_path, "part", *common, "run.resume=auto"))
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "val/map", "val/map_50"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)


def test_two_processes_train_and_evaluate_exactly(tmp_path, capsys):
    over = TINY + [f"run.output_dir={tmp_path}", "run.name=ddp", "data.synthetic_size=32",
                   "data.batch_size=8", "train.epochs=1", "eval.vis_images=2",
                   "eval.score_thresh=0"]  # an untrained model scores ~0.01 (the prior)
    launch, env = two_process_launch(29521)
    r = subprocess.run(launch + ["finetune", *over], capture_output=True, text=True, timeout=300,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "devices           2 (cpu)" in r.stdout
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["updates"] == 2  # 32 images / (8 per device x 2 processes)
    preds = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert len({p["image_id"] for p in preds}) == 32  # both processes' shards, gathered
    r = subprocess.run(launch + ["evaluate", "--run", str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert main(["evaluate", "--run", str(tmp_path / "ddp")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert two == one == {k: summary[k] for k in METRIC_KEYS}


@pytest.mark.parametrize("path", sorted((REPO / "configs/detect").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_detection_configs_validate(path):
    from mim.cli import finetune_task

    raw = yaml.safe_load(path.read_text())
    assert finetune_task(str(path), []) == "detect"
    over = [] if (raw.get("data") or {}).get("synthetic") else \
        ["data.synthetic=true", "data.path=", "data.name="]
    load_config(path, over, job="detect")


def test_bad_labels_of_both_splits_are_listed_in_data_issues(tmp_path):
    from PIL import Image

    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (root / "classes.txt").write_text("thing\nother\n")
    (root / "labels" / "val" / "1.txt").write_text(
        "0 0.5 0.5 0.4 0.4\n"   # fine
        "1 1.5 0.5 0.2 0.2\n"   # entirely outside the image: zero area after clipping, dropped
        "0 0.95 0.5 0.3 0.3\n"  # partly outside: clipped, kept
        "5 0.5 0.5 0.1 0.1\n"   # unknown class
        "0 0.5 0.5 0\n")        # malformed
    (root / "labels" / "train" / "2.txt").write_text("0 0.5 0.5 0.4 0.4\n0 0.5 0.5 0.4 0.4 7\n"
                                                     "0 -2 0.5 0.2 0.2\n")  # malformed, outside
    run = detect(load_config(None, [
        "task=detect", "model.arch=vit_tiny_patch16_224", "model.img_size=64",
        "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "model.pyramid_dim=16", "data.format=yolo", f"data.path={root}", "data.val_split=val",
        "data.batch_size=2", "data.num_workers=1", "tracking.backend=none", "train.epochs=2",
        "eval.vis_images=0", f"run.output_dir={tmp_path}", "run.name=bad-labels"], job="detect"))
    issues = read_metrics(run / "data_issues.jsonl")
    val = [r for r in issues if r["split"] == "val"]
    assert len(val) == 3
    text = " ".join(r["issue"] for r in val)
    assert "1 degenerate box(es) dropped" in text and text.count("not 'class cx cy w h'") == 2
    train = [r["issue"] for r in issues if r["split"] == "train"]  # read in a loader worker,
    assert len(train) == 2 and "2.txt:2: not 'class cx cy w h'" in train[0] + train[1]  # once
    assert any("1 degenerate box(es) dropped" in t for t in train)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_box_issues"] == 3 and summary["train_label_issues"] == 2
    gt = json.loads((run / "ground_truth.json").read_text())
    assert sum(a["image_id"] == 2 for a in gt["annotations"]) == 2  # the fine one, the clipped one
