"""End-to-end fine-tuning runs of a tiny ViT on the synthetic set (CPU)."""

import json
import subprocess

import pytest
import timm
import torch
from safetensors.torch import load_file

from mim import load_config
from mim.cli import main
from mim.engine.evaluate import evaluate_run
from mim.engine.finetune import finetune
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from mim.models.classifier import build_classifier
from tests.conftest import REPO, TINY, two_process_launch

TINY_FT = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
           "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.synthetic=true",
           "data.synthetic_size=128", "data.batch_size=16", "data.num_workers=0",
           "data.crop_scale=[0.5,1.0]", "optim.warmup_epochs=0", "tracking.backend=none",
           "train.log_every=2"]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    cfg = load_config(None, TINY + ["data.synthetic=true", "data.synthetic_size=64",
                                    f"run.output_dir={out}", "run.name=mae", "train.epochs=1"])
    return pretrain(cfg)


def ft(tmp_path, *extra, name="ft"):
    return load_config(None, TINY_FT + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                        *extra], job="finetune")


def test_finetune_from_a_mim_run_end_to_end(tmp_path, encoder_run, capsys):
    cfg = ft(tmp_path, f"init={encoder_run}", "train.epochs=3", "optim.lr=3e-3",
             "model.drop_path_rate=0.1", "optim.layer_decay=0.75", "optim.clip_grad.mode=norm")
    run_dir = finetune(cfg)
    out = capsys.readouterr().out
    for row in ("init: mim weights", "train images        128 of 128", "iterations / epoch  8",
                "total updates       24", "FLOPs / image"):
        assert row in out, row
    rec = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rec if "loss" in r]
    val = [r for r in rec if "val/top1" in r]
    assert [r["epoch"] for r in val] == [1, 2, 3] and len(train) == 12
    assert all(0 < r["grad_norm"] for r in train)  # logged before clipping
    assert sum(r["loss"] for r in train[-4:]) < sum(r["loss"] for r in train[:4])
    for key in ("val/top5", "val/macro_f1", "val/loss", "val/f1", "val/precision"):
        assert key in val[0]
    assert val[0]["val/num_samples"] == 64 and len(val[0]["val/f1"]) == 10
    summary = json.loads((run_dir / "summary.json").read_text())
    best = max(val, key=lambda r: r["val/top1"])
    assert summary["best"]["epoch"] == best["epoch"]
    assert summary["best_metrics"]["top1"] == best["val/top1"]
    assert summary["init"]["kind"] == "mim" and summary["init"]["loaded"] > 0
    for f in ("best/model.safetensors", "best/metrics.json", "best/confusion_matrix.png",
              "confusion_matrix.png", "export/model.safetensors", "export/config.json"):
        assert (run_dir / f).is_file(), f
    # mim evaluate re-scores the best checkpoint to the same numbers
    again = evaluate_run(run_dir)
    assert again["top1"] == best["val/top1"] and again["loss"] == pytest.approx(best["val/loss"])
    assert (run_dir / "evaluate_validation.json").is_file()
    # the export is the best classifier, loadable by timm alone
    model, _ = build_classifier(cfg, 10, load_init=False)
    model.load_state_dict(load_file(str(run_dir / "best" / "model.safetensors")))
    in_timm = timm.create_model(f"local-dir:{run_dir / 'export'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(in_timm(x), model.eval()(x), atol=1e-5)


def test_linear_probe_keeps_the_encoder_frozen(tmp_path, encoder_run):
    cfg = ft(tmp_path, f"init={encoder_run}", "tune.mode=linear", "model.global_pool=token",
             "model.head_batchnorm=true", "model.head_init_std=0.01", "train.epochs=2",
             "optim.optimizer=lars", "optim.lr=0.1", "optim.weight_decay=0",
             "data.label_fraction=0.5", "train.best_metric=macro_f1")
    run_dir = finetune(cfg)
    encoder = load_file(str(encoder_run / "encoder.safetensors"))
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    for key, value in encoder.items():
        assert torch.equal(best[key], value), key
    assert {"head.0.running_mean", "head.1.weight"} <= set(best)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_images"] == 64 and summary["best"]["metric"] == "macro_f1"
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert "head.weight" in exported and not any(k.startswith("head.0") for k in exported)


def test_focal_loss_focal_alpha_and_resume(tmp_path):
    common = ("train.epochs=2", "optim.lr=1e-3", "loss.name=focal", "loss.gamma=2",
              "loss.alpha=[1,1,1,1,1,2,2,2,2,2]", "dropout.rate=0.1", "dropout.schedule=early",
              "dropout.epochs=1", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0")
    full = finetune(ft(tmp_path, *common, name="full"))
    part = finetune(ft(tmp_path, *common, "train.max_steps=10", name="part"))
    assert not (part / "summary.json").exists()
    finetune(ft(tmp_path, *common, name="part"))  # resumes mid-epoch 1 (run.resume=auto)
    a = read_metrics(full / "metrics.jsonl")
    b = read_metrics(part / "metrics.jsonl")
    assert [r["dropout_scale"] for r in a if "loss" in r][:4] == [1.0] * 4
    assert [r["dropout_scale"] for r in a if "loss" in r][-1] == 0.0
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val/top1", "val/loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def test_config_errors_are_one_line_exit_2(capsys, tmp_path):
    cases = [(["model.glob_pool=avg"], "unknown config key 'model.glob_pool'"),
             (["data.label_fraction=0"], "data.label_fraction"),
             (["init=no/such/run"], "config key 'init'"),
             (["tune.mode=linear", "model.drop_path_rate=0.1"], "tune.mode=linear"),
             (["mixup.mixup_alpha=0.8", "data.batch_size=15"], "must be even"),
             (["dropout.schedule=late", "dropout.epochs=0"], "dropout.epochs")]
    for extra, message in cases:
        rc = main(["finetune", *TINY_FT, f"run.output_dir={tmp_path}", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "not a finished mim fine-tuning run" in capsys.readouterr().err


def test_two_process_cpu_finetune_evaluates_every_sample_once(tmp_path):
    # 75 validation images, 37 per batch: rank 0 scores 38 (2 batches), rank 1 37 (1 batch)
    over = TINY_FT + [f"run.output_dir={tmp_path}", "run.name=ddp", "data.synthetic_size=300",
                      "data.eval_batch_size=37", "train.epochs=2", "model.head_batchnorm=true"]
    launch, env = two_process_launch(29523)
    r = subprocess.run(launch + ["finetune", *over], capture_output=True, text=True, timeout=300,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "devices             2 (cpu)" in r.stdout and "iterations / epoch  9" in r.stdout
    run_dir = tmp_path / "ddp"
    val = [x for x in read_metrics(run_dir / "metrics.jsonl") if "val/top1" in x]
    assert [x["val/num_samples"] for x in val] == [75, 75]
    best_epoch = json.loads((run_dir / "summary.json").read_text())["best"]["epoch"]
    logged = next(x for x in val if x["epoch"] == best_epoch)
    single = evaluate_run(run_dir)  # one process, the same checkpoint
    assert single["top1"] == logged["val/top1"]
    assert single["loss"] == pytest.approx(logged["val/loss"], rel=1e-5)
