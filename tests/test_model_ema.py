"""Fine-tuning's model EMA (``train.ema_decay``): timm's EMA moves after every update, is what
gets evaluated and exported, and rides in the checkpoints so a resumed run repeats exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mim import load_config
from mim.checkpoint import latest_checkpoint, load_checkpoint
from mim.engine.evaluate import evaluate_run
from mim.engine.finetune import finetune
from mim.engine.tracking import read_metrics
from tests.test_finetune import TINY_FT


def ft(tmp_path, *extra, name="ft"):
    return load_config(None, TINY_FT + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                        "optim.lr=3e-3", "train.log_every=1", *extra],
                       job="finetune")


def test_ema_is_evaluated_and_exported(tmp_path):
    run = finetune(ft(tmp_path, "train.epochs=1", "train.ema_decay=0.5"))
    model_state, train_state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    ema = train_state["loop"]["model_ema"]
    best = load_file(run / "best" / "model.safetensors")
    assert set(best) == set(model_state) == set(ema)
    assert all(torch.equal(best[k], ema[k]) for k in best)  # best/ holds the EMA ...
    assert any(not torch.equal(best[k], model_state[k]) for k in best)  # ... not the model
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r][-1]
    assert evaluate_run(run)["loss"] == pytest.approx(logged["val/loss"], rel=1e-5)  # EMA scored
    exported = load_file(run / "export" / "model.safetensors")
    assert torch.equal(exported["head.weight"], ema["head.weight"])


def test_ema_resume_repeats_the_uninterrupted_run(tmp_path):
    common = ("train.epochs=2", "train.ema_decay=0.8")
    full = finetune(ft(tmp_path, *common, name="full"))
    part = finetune(ft(tmp_path, *common, "train.max_steps=5", name="part"))
    finetune(ft(tmp_path, *common, name="part"))
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r.get("loss") for r in a] == pytest.approx([r.get("loss") for r in b], abs=1e-5)
    assert [r.get("val/loss") for r in a] == pytest.approx([r.get("val/loss") for r in b],
                                                          abs=1e-5)
    ea = load_checkpoint(latest_checkpoint(full / "checkpoints"))[1]["loop"]["model_ema"]
    eb = load_checkpoint(latest_checkpoint(part / "checkpoints"))[1]["loop"]["model_ema"]
    assert all(torch.allclose(ea[k], eb[k], atol=1e-6) for k in ea)


def test_ema_decay_is_checked():
    from mim.config import ConfigError

    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, TINY_FT + ["train.ema_decay=1.0"], job="finetune")


def test_detector_ema_is_evaluated_saved_and_resumed(tmp_path):
    """Detection's ``train.ema_decay``: the EMA is scored, saved as model.safetensors, and a
    run stopped mid-way and resumed ends with the same EMA as the uninterrupted one."""
    from mim.engine.detect import detect, evaluate_run as evaluate_detections
    from tests.test_detect_engine import TINY

    def det(name, *extra):
        return load_config(None, TINY + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                         "data.synthetic_size=24", "data.batch_size=8",
                                         "train.epochs=2", "train.ema_decay=0.7",
                                         "optim.lr=2e-3", "eval.vis_images=0", *extra],
                           job="detect")

    full = detect(det("full"))
    model_state, train_state = load_checkpoint(latest_checkpoint(full / "checkpoints"))
    ema = train_state["loop"]["model_ema"]
    saved = load_file(full / "model.safetensors")
    assert set(saved) == set(ema) and all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], model_state[k]) for k in saved)  # the EMA, not the model
    logged = [r for r in read_metrics(full / "metrics.jsonl") if "val/map" in r][-1]
    assert evaluate_detections(full)["map"] == pytest.approx(logged["val/map"], abs=1e-6)

    part = detect(det("part", "train.max_steps=3", "run.resume=auto"))
    assert not (part / "summary.json").exists()
    detect(det("part", "run.resume=auto"))
    eb = load_checkpoint(latest_checkpoint(part / "checkpoints"))[1]["loop"]["model_ema"]
    assert all(torch.allclose(ema[k], eb[k], atol=1e-6) for k in ema)


def test_detector_ema_decay_is_checked():
    from mim.config import ConfigError
    from tests.test_detect_engine import TINY

    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, TINY + ["train.ema_decay=-0.1"], job="detect")
