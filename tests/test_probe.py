"""k-NN / linear probes: the classifier, the held-out split, `mim knn` and the pretraining monitor."""

import json
import re
import subprocess

import pytest
import torch
from PIL import Image

from mim import load_config
from mim.config import ConfigError
from mim.data.splits import stratified_holdout
from mim.data.synthetic import SyntheticShapes
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from mim.engine.knn import knn_command
from mim.probe.classifiers import knn_top1, linear_probe_top1
from tests.conftest import REPO, TINY, two_process_launch

MONITOR = ("monitor.every=1", "monitor.data.synthetic=true", "monitor.data.synthetic_size=256",
           "monitor.data.num_workers=0")


def test_knn_votes_are_weighted_by_similarity():
    # 3 neighbours: two of class 0 far away, one of class 1 very close -> class 1 wins (k=3)
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [-0.05, 1.0]])
    labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.45]])
    assert knn_top1(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    # a high temperature makes the votes nearly equal: the majority (class 0) wins
    assert knn_top1(train, labels, query, torch.tensor([1]), k=3, temperature=100.0) == 0.0


def test_linear_probe_separates_separable_features_and_repeats():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    feats = centers[labels] + torch.randn(400, 16, generator=g)
    args = (feats[:300], labels[:300], feats[300:], labels[300:], 5, 0)
    assert linear_probe_top1(*args) > 0.9
    assert linear_probe_top1(*args) == linear_probe_top1(*args)


def test_holdout_is_stratified_seeded_and_stable():
    labels = [i % 4 for i in range(400)] + [4] * 7
    keep, held = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(keep + held) == list(range(len(labels))) and not set(keep) & set(held)
    counts = [sum(labels[i] == c for i in held) for c in range(5)]
    assert counts == [10, 10, 10, 10, 1]
    assert stratified_holdout(labels, 0.1, seed=0)[1] == held  # same seed, same images
    assert stratified_holdout(labels, 0.1, seed=1)[1] != held
    # a class's hold-out depends on that class's images alone (appending a class changes nothing)
    more = stratified_holdout(labels + [5] * 20, 0.1, seed=0)[1]
    assert [i for i in more if i < len(labels)] == held


def test_monitor_logs_knn_above_chance_without_changing_training(tiny, capsys):
    common = ("train.epochs=2", "optim.lr=1e-3", "train.save_every=3")
    on = pretrain(load_config(None, tiny(*common, *MONITOR, "monitor.keep_best=true",
                                         "monitor.linear_epochs=3", name="mon")))
    out = capsys.readouterr().out
    probes = [r for r in read_metrics(on / "metrics.jsonl") if "knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in probes] == [(0, 0), (1, 8), (2, 16)]
    assert all(r["knn_top1"] > 0.1 for r in probes)  # 10 balanced classes: chance is 0.1
    assert all(0 <= r["linear_top1"] <= 1 for r in probes)
    printed = [float(s) for s in re.findall(r"monitor: epoch \d: .*?images, ([\d.]+) s\)", out)]
    assert printed == [round(r["knn_seconds"], 1) for r in probes]
    assert (on / "encoder_best.safetensors").is_file()
    off = pretrain(load_config(None, tiny(*common, name="moff")))
    part = pretrain(load_config(None, tiny(*common, *MONITOR, "train.max_steps=11", name="p")))
    pretrain(load_config(None, tiny(*common, *MONITOR, name="p")))
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
              for d in (on, off, part)]
    assert len(losses[0]) == 16 and losses[0] == losses[1]
    assert max(abs(a - b) for a, b in zip(losses[0], losses[2])) < 1e-5
    assert [r["epoch"] for r in read_metrics(part / "metrics.jsonl") if "knn_top1" in r] == [0, 1, 2]


def test_two_process_monitor_equals_one_process(tiny):
    over = tiny(*MONITOR, "monitor.linear_epochs=2", "train.max_steps=1", name="one")
    one = pretrain(load_config(None, over))
    over2 = tiny(*MONITOR, "monitor.linear_epochs=2", "train.max_steps=1", name="two")
    launch, env = two_process_launch(29531)
    r = subprocess.run(launch + ["pretrain", *over2], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    first = [[x for x in read_metrics(d / "metrics.jsonl") if "knn_top1" in x][0]
             for d in (one, load_config(None, over2).run_dir)]  # the init: the same weights
    assert first[0]["knn_top1"] == first[1]["knn_top1"]
    assert first[0]["linear_top1"] == first[1]["linear_top1"]


def test_knn_command_on_a_run_and_on_a_folder_without_val(tiny, tmp_path, capsys):
    run = pretrain(load_config(None, tiny("train.epochs=1", name="src")))
    capsys.readouterr()
    result = knn_command(str(run), "synthetic", "", ["data.synthetic_size=256",
                                                     "data.num_workers=0"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["top1"] == pytest.approx(result.top1) and line["top1"] > 0.1
    assert (line["k"], line["images"], line["held_out"]) == (20, 256 + 64, False)
    shapes = SyntheticShapes(60, 32, seed=3)  # a folder of class sub-folders, no val/ split
    for i in range(len(shapes)):
        img, label, _ = shapes.load(i)
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "imgs" / f"c{label}" / f"{i}.png")
    knn_command(str(run / "encoder.safetensors"), str(tmp_path / "imgs"), "",
                ["data.num_workers=0", "k=5"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["held_out"] and line["k"] == 5 and line["images"] == 60
    with pytest.raises(ConfigError, match="no such folder"):
        knn_command(str(run), "./nowhere", "", [])


def test_monitor_needs_its_data():
    with pytest.raises(ConfigError, match="monitor.data.name"):
        load_config(None, TINY + ["data.synthetic=true", "monitor.every=1"])
    with pytest.raises(ConfigError, match="monitor.keep_best"):
        load_config(None, TINY + ["data.synthetic=true", "monitor.keep_best=true"])
