"""Supervised pretraining and ``mim compare`` end to end on the synthetic set (tiny ViT, CPU)."""

import csv
import math

import pytest
from safetensors.torch import save_file

from mim import load_config
from mim.config import ConfigError
from mim.data.labels import num_classes_of
from mim.engine.compare import Cell, cell_config, compare
from mim.engine.compare_report import paired_interval, t_quantile_975
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from mim.models.encoder import create_vit
from mim.models.init import load_encoder_init
from tests.conftest import REPO, TINY, read_compare_report, run_compare_two_processes

RECIPE_TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
               "data.synthetic_size=32", "data.batch_size=16", "data.num_workers=0",
               "train.epochs=1", "mixup.mixup_alpha=0.0", "mixup.cutmix_alpha=0.0",
               "model.drop_path_rate=0.0", "train.log_every=1"]


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sup")
    cfg = load_config(REPO / "configs/pretrain/supervised_demo.yaml", [
        *(o for o in TINY if not o.startswith("method.")),
        "data.synthetic_size=64", "train.epochs=6", "optim.lr=3e-3", "optim.warmup_epochs=0",
        f"run.output_dir={out}", "run.name=sup", "data.crop_scale=[0.9,1.0]"])
    return pretrain(cfg)


def test_supervised_loss_falls_and_encoder_loads(supervised_run):
    rec = read_metrics(supervised_run / "metrics.jsonl")
    first = sum(r["loss"] for r in rec[:4]) / 4
    last = sum(r["loss"] for r in rec[-4:]) / 4
    assert last < first, (first, last)
    assert "train_top1" in rec[-1]
    cfg = load_config(REPO / "configs/finetune/cls_demo.yaml", RECIPE_TINY, job="finetune")
    vit = create_vit(cfg.model, num_classes=10)
    report = load_encoder_init(vit, str(supervised_run))
    assert report.kind == "mim" and report.loaded > 0
    assert not [k for k in report.missing if not k.startswith(("head.", "fc_norm."))]


def test_supervised_needs_labels():
    class Unlabeled:
        def __len__(self):
            return 4

    with pytest.raises(ConfigError, match="needs labels"):
        num_classes_of(Unlabeled())


def _compare_cfg(tmp_path, inits, *extra):
    return load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=cmp", f"inits={inits}",
        f"finetune={REPO / 'configs/finetune/cls_demo.yaml'}", f"overrides={RECIPE_TINY}",
        "label_fractions=[0.5,1.0]", "seeds=[0,1]", "tracking.backend=none", *extra],
        job="compare")


def test_compare_end_to_end_and_resume(tmp_path, supervised_run, capsys):
    cfg = _compare_cfg(tmp_path, {"scratch": "scratch", "sup": str(supervised_run)})
    run_dir = compare(cfg)
    rows = read_compare_report(run_dir)
    assert [(r["init"], float(r["label_fraction"]), int(r["n_seeds"])) for r in rows] == [
        ("scratch", 0.5, 2), ("scratch", 1.0, 2), ("sup", 0.5, 2), ("sup", 1.0, 2)]
    sup = rows[2]
    assert float(sup["ci95_low"]) <= float(sup["diff_vs_scratch"]) <= float(sup["ci95_high"])
    md = (run_dir / "report.md").read_text()
    assert "| scratch |" in md and "| sup |" in md and "Δ vs scratch" in md and "updates" in md
    summaries = sorted((run_dir / "cells").glob("*/summary.json"))
    assert len(summaries) == 8
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    compare(cfg)  # every cell is finished: nothing trains again
    out = capsys.readouterr().out
    assert out.count(" skip ") == 8 and " run " not in out
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes


def test_two_process_compare_runs_each_cell_across_both(tmp_path, supervised_run):
    cfg = _compare_cfg(tmp_path, {"scratch": "scratch", "sup": str(supervised_run)},
                       "label_fractions=[1.0]", "seeds=[0]")
    out = run_compare_two_processes(cfg, tmp_path, 29541)
    assert out.count("devices             2 (cpu)") == 2  # each cell on both processes
    for cell in ("scratch_f1_s0", "sup_f1_s0"):
        rec = read_metrics(tmp_path / "cmp" / "cells" / cell / "metrics.jsonl")
        assert [x["val/num_samples"] for x in rec if "val/num_samples" in x] == [64]
    with open(tmp_path / "cmp" / "report.csv") as f:
        assert [row["init"] for row in csv.DictReader(f)] == ["scratch", "sup"]


def test_compare_refuses_a_different_encoder_before_training(tmp_path):
    recipe = load_config(REPO / "configs/finetune/cls_demo.yaml",
                         RECIPE_TINY + ["model.depth=3"], job="finetune")
    deeper = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in create_vit(recipe.model).state_dict().items()},
              str(deeper))
    cfg = _compare_cfg(tmp_path, {"scratch": "scratch", "deep": str(deeper)})
    with pytest.raises(ConfigError, match=r"inits\.deep.*extra blocks\.2"):
        compare(cfg)
    assert not (tmp_path / "cmp" / "cells").exists()


def test_compare_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="inits.x"):
        _compare_cfg(tmp_path, {"x": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="set by the comparison"):
        _compare_cfg(tmp_path, {"scratch": "scratch"}, "overrides=[run.seed=3]")


def test_fraction_overrides_reach_only_their_cells(tmp_path):
    cfg = _compare_cfg(tmp_path, {"scratch": "scratch"},
                       "fraction_overrides={0.5: [train.epochs=4, data.batch_size=8]}")
    few = cell_config(cfg, Cell("scratch", 0.5, 1))
    full = cell_config(cfg, Cell("scratch", 1.0, 1))
    assert (few.train.epochs, few.data.batch_size) == (4, 8)
    assert (full.train.epochs, full.data.batch_size) == (1, 16)
    with pytest.raises(ConfigError, match=r"fraction_overrides.0.3.*not one of"):
        _compare_cfg(tmp_path, {"scratch": "scratch"}, "fraction_overrides={0.3: [train.epochs=4]}")
    with pytest.raises(ConfigError, match=r"fraction_overrides.0.5.*set by the comparison"):
        _compare_cfg(tmp_path, {"scratch": "scratch"}, "fraction_overrides={0.5: [run.seed=4]}")


def test_t_interval():
    assert paired_interval([0.1]) is None
    mean, _, hi = paired_interval([0.1, 0.3])
    assert math.isclose(mean, 0.2) and math.isclose(hi - mean, 12.706 * 0.1, rel_tol=1e-6)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 60, 200):
        assert math.isclose(t_quantile_975(df), stats.t.ppf(0.975, df), rel_tol=2e-4), df
