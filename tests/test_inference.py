"""load_model, mim predict and mim embed on tiny finished runs (tests/conftest.py)."""

import csv
import json
import subprocess

import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import mim
from mim import load_config
from mim.cli import main
from mim.config import ConfigError
from mim.data import build_source
from mim.data.detection_sources import build_detection_source
from mim.engine.detect import evaluate_run as evaluate_detections_run
from mim.engine.evaluate import evaluate_run
from mim.inference.embed import Encoder
from mim.models.encoder import MaskedEncoder, create_vit
from tests.conftest import REPO, two_process_launch


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(runs, n=5):
    return [Image.open(p).convert("RGB") for p in sorted((runs / "images").rglob("*.png"))[:n]]


def test_load_model_round_trips_and_refuses_what_it_cannot_load(inference_runs):
    runs = inference_runs
    model = mim.load_model(runs / "cls")
    preds = model.predict(_images(runs), topk=3)
    assert len(preds) == 5 and all(len(p.labels) == 3 for p in preds)
    assert all(p.labels[0] == model.class_names[p.class_ids[0]] for p in preds)
    assert all(p.scores[0] >= p.scores[1] >= p.scores[2] for p in preds)
    # the weights the run exported for timm give the same logits as the loaded model
    x = torch.randn(3, 3, 32, 32)
    in_timm = timm.create_model(f"local-dir:{runs / 'cls' / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model.logits(x), in_timm(x), atol=1e-5)
    det = mim.load_model(runs / "det")
    boxes = det.predict(_images(runs, 2))
    assert det.task == "detect" and len(boxes) == 2 and boxes[0].boxes.shape[1] == 4
    assert len(boxes[0].labels) == len(boxes[0].scores) > 0
    with pytest.raises(ConfigError, match="pretraining run"):
        mim.load_model(runs / "pre")
    with pytest.raises(ConfigError, match="never unpickles"):
        mim.load_model(runs / "cls" / "best" / "model.safetensors")
    with pytest.raises(ConfigError, match="no config.yaml"):
        mim.load_model(runs / "images")


def test_predict_classifier_lists_and_skips_a_corrupt_file(inference_runs, tmp_path, capsys):
    runs = inference_runs
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--run", str(runs / "cls"), "--images", str(runs / "images"),
               "--out", str(out), "--topk", "3", "--num-workers", "0", "--batch-size", "5"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.jpg: UnidentifiedImageError" in err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and not any("broken" in r["path"] for r in rows)
    assert sum("/sub/" in r["path"] for r in rows) == 4  # sub-folders are read
    assert list(rows[0]) == ["path", "top1", "prob1", "top2", "prob2", "top3", "prob3"]
    names = mim.load_model(runs / "cls").class_names
    assert all(r["top1"] in names and 0 < float(r["prob1"]) <= 1 for r in rows)
    # a list of files (a .txt, relative to it) gives the same rows; all readable: exit 0
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted((runs / "images").rglob("*.png"))))
    again = tmp_path / "again.csv"
    assert main(["predict", "--run", str(runs / "cls"), "--images", str(listing),
                 "--out", str(again), "--topk", "3", "--num-workers", "0"]) == 0
    rows_again = sorted(map(tuple, csv.reader(again.open())))
    assert rows_again == sorted(map(tuple, csv.reader(out.open())))


def test_predict_detector_writes_coco_results_and_pictures(inference_runs, tmp_path, capsys):
    runs = inference_runs
    out = tmp_path / "det"
    rc = main(["predict", "--run", str(runs / "det"), "--images", str(runs / "images"),
               "--out", str(out), "--draw", "--score-thresh", "0", "--num-workers", "0"])
    assert rc == 1 and "broken.jpg" in capsys.readouterr().err
    results = json.loads((out / "predictions.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert len(index["images"]) == 12 and len(index["categories"]) == 10
    sizes = {im["id"]: (im["width"], im["height"]) for im in index["images"]}
    assert {r["image_id"] for r in results} == set(sizes)
    for r in results:  # original pixels: the 40 px images, not the model's 64 px input
        x, y, w, h = r["bbox"]
        W, H = sizes[r["image_id"]]
        assert -0.01 <= x and x + w <= W + 0.01 and y + h <= H + 0.01 and w > 0
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) > 20
    pictures = sorted((out / "drawn").glob("*.png"))
    assert len(pictures) == 12 and Image.open(pictures[0]).size == (240, 240)  # 6x zoom


def test_classifier_predictions_score_as_evaluate(inference_runs, tmp_path):
    """The validation split saved as class sub-folders: predict's metrics are evaluate's."""
    run = inference_runs / "cls"
    cfg = load_config(run / "config.yaml", job="finetune")
    model = mim.load_model(run)
    val = build_source(cfg.data, cfg.model.img_size, cfg.run.seed, split=cfg.data.val_split)
    for i in range(len(val)):
        img, label, _ = val.load(i)
        folder = tmp_path / "val" / model.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.png")
    out = tmp_path / "val.csv"
    assert main(["predict", "--run", str(run), "--images", str(tmp_path / "val"),
                 "--out", str(out), "--num-workers", "0"]) == 0
    got = json.loads(out.with_suffix(".metrics.json").read_text())
    want = evaluate_run(run)
    assert got["num_samples"] == want["num_samples"] == len(val)
    for key in ("top1", "top5", "macro_f1"):
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["label"] in model.class_names


def test_detector_predictions_are_evaluate_predictions(inference_runs):
    run = inference_runs / "det"
    evaluate_detections_run(run)
    cfg = load_config(run / "config.yaml", job="detect")
    source = build_detection_source(cfg.data, cfg.model.img_size, cfg.run.seed,
                                    cfg.data.val_split)
    model = mim.load_model(run)
    ids = [source.annotations(i).image_id for i in range(len(source))]
    dets = model.predict([source.load(i)[0] for i in range(len(source))],
                         batch_size=cfg.data.eval_batch_size or cfg.data.batch_size)
    want = json.loads((run / f"predictions_{cfg.data.val_split}.json").read_text())
    for image_id, det in zip(ids, dets):
        theirs = [r for r in want if r["image_id"] == image_id]
        assert len(theirs) == len(det.scores) > 0
        assert [r["score"] for r in theirs] == pytest.approx(det.scores.tolist(), abs=1e-5)
        xywh = torch.tensor([r["bbox"] for r in theirs])
        mine = det.boxes.clone()
        mine[:, 2:] -= mine[:, :2]
        assert torch.allclose(xywh, mine, atol=0.01)  # the results file rounds to 0.01 px
        assert [model.category_ids[int(c)] for c in det.class_ids] == \
               [r["category_id"] for r in theirs]


def test_two_process_predict_writes_each_image_once(inference_runs, tmp_path):
    runs = inference_runs
    launch, env = two_process_launch(29547)
    out = tmp_path / "two.csv"
    r = subprocess.run(launch + ["predict", "--run", str(runs / "cls"), "--images",
                                 str(runs / "images"), "--out", str(out), "--batch-size", "4",
                                 "--num-workers", "0"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("unreadable, skipped:") == 1  # listed once, by the main process
    assert r.stdout.count("wrote 12 predictions") == 1
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len({x["path"] for x in rows}) == 12
    one = tmp_path / "one.csv"
    main(["predict", "--run", str(runs / "cls"), "--images", str(runs / "images"),
          "--out", str(one), "--num-workers", "0"])
    mine = list(csv.DictReader(one.open()))
    assert [x["path"] for x in rows] == [x["path"] for x in mine]
    for a, b in zip(rows, mine):
        assert a["top1"] == b["top1"] and float(a["prob1"]) == pytest.approx(float(b["prob1"]),
                                                                             abs=1e-5)


def test_embed_is_the_encoders_pooled_output_whatever_the_batch(inference_runs, tmp_path):
    runs = inference_runs
    cfg = load_config(runs / "pre" / "config.yaml")
    enc = MaskedEncoder(create_vit(cfg.model))
    enc.vit.load_state_dict(load_file(str(runs / "pre" / "encoder.safetensors")))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.eval()(x)
        for pool, want in (("avg", tokens[:, 1:].mean(1)), ("token", tokens[:, 0])):
            got = Encoder(str(runs / "pre"), pool=pool).vectors(x)
            assert torch.allclose(got, want, atol=1e-5), pool
    outs = []
    for batch in ("1", "5"):
        out = tmp_path / f"b{batch}.parquet"
        rc = main(["embed", "--init", str(runs / "pre" / "encoder.safetensors"), "--images",
                   str(runs / "images"), "--out", str(out), "--batch-size", batch,
                   "--num-workers", "0"])
        assert rc == 1  # the corrupt file
        outs.append(pd.read_parquet(out))
    a, b = outs
    assert len(a) == 12 and list(a.columns) == ["path", "vector"] and len(a.vector[0]) == 32
    assert list(a.path) == list(b.path)
    diff = torch.tensor(list(a.vector)) - torch.tensor(list(b.vector))
    assert diff.abs().max() < 1e-5


def test_embed_a_fine_tuned_run_and_labels_from_class_folders(inference_runs, tmp_path):
    runs = inference_runs
    for name in ("circle", "square"):
        (tmp_path / "set" / name).mkdir(parents=True)
    for i, p in enumerate(sorted((runs / "images").rglob("*.png"))[:4]):
        Image.open(p).save(tmp_path / "set" / ("circle", "square")[i % 2] / p.name)
    out = tmp_path / "f.parquet"
    assert main(["embed", "--init", str(runs / "cls"), "--images", str(tmp_path / "set"),
                 "--out", str(out), "--num-workers", "0"]) == 0
    table = pd.read_parquet(out)
    assert list(table.label) == [0, 0, 1, 1] and len(table.vector[0]) == 32
    # a classifier's avg vector is its fc_norm output: the input of its head
    model = mim.load_model(runs / "cls")
    x = model.preprocess(Image.open(sorted((tmp_path / "set").rglob("*.png"))[0]))[None]
    with torch.no_grad():
        want = model.net.forward_head(model.net.forward_features(x), pre_logits=True)
    assert torch.allclose(torch.tensor(table.vector[0]), want[0], atol=1e-5)


def test_bad_inputs_are_one_line_exit_2(inference_runs, tmp_path, capsys):
    runs = inference_runs
    cases = [(["predict", "--run", str(runs / "cls"), "--images", "someone/no-such-set",
               "--out", str(tmp_path / "p.csv")], "not a file, folder or loadable dataset"),
             (["predict", "--run", str(runs / "cls"), "--images", str(runs / "images"),
               "--out", str(tmp_path / "p.json")], "a classifier writes a CSV"),
             (["predict", "--run", str(runs / "pre"), "--images", str(runs / "images"),
               "--out", str(tmp_path / "p.csv")], "pretraining run"),
             (["embed", "--init", str(runs / "pre"), "--images", str(runs / "images"),
               "--out", str(tmp_path / "f.csv")], "writes a .parquet")]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_predict_scores_a_labeled_detection_set_as_evaluate(inference_runs, tmp_path, capsys):
    """The run's validation split written as a COCO folder: predict --labels coco gives the
    metrics of mim evaluate."""
    from mim.data.detection_sources import coco_ground_truth

    run = inference_runs / "det"
    cfg = load_config(run / "config.yaml", job="detect")
    source = build_detection_source(cfg.data, cfg.model.img_size, cfg.run.seed,
                                    cfg.data.val_split)
    gt = coco_ground_truth(source)
    (tmp_path / "set" / "images" / "val").mkdir(parents=True)
    (tmp_path / "set" / "annotations").mkdir()
    for i, image in enumerate(gt["images"]):
        image["file_name"] = f"{image['id']}.png"
        source.load(i)[0].save(tmp_path / "set" / "images" / "val" / image["file_name"])
    (tmp_path / "set" / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    want = evaluate_detections_run(run)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--images", str(tmp_path / "set"), "--labels",
                 "coco", "--split", "val", "--out", str(out), "--num-workers", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got == pytest.approx({k: want[k] for k in got}, abs=1e-6)
    assert set(got) >= {"map", "map_50"} and (out / "metrics.json").is_file()
