"""Round two of reliability: what a run must never overwrite, delete or save (run names, refused
resumes, checkpoint re-saves killed midway, unreadable checkpoints, non-finite numbers)."""

import hashlib
import os

import pytest
import torch

from mim import load_config
from mim.config import ConfigError
from mim import checkpoint as ckpt_mod
from mim.checkpoint import (NonFiniteWeights, UnreadableCheckpoint, latest_checkpoint,
                                   list_checkpoints, load_checkpoint, recover_checkpoints,
                                   save_checkpoint)
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics


def tree_hashes(root):
    """path -> sha256 of every file under ``root`` (the run's lock file aside: it holds a pid)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "a\\b", "a\0b"])
@pytest.mark.parametrize("job", ["pretrain", "finetune", "detect", "compare"])
def test_run_name_must_be_one_folder(name, job, tmp_path):
    with pytest.raises(ConfigError, match="'run.name' must be one folder name"):
        load_config(None, [f"run.name={name}", f"run.output_dir={tmp_path}"], job=job)


def test_refused_resume_leaves_the_run_directory_as_it_was(tiny):
    over = tiny("train.epochs=1", name="other")
    run_dir = pretrain(load_config(None, over))
    before = tree_hashes(run_dir)
    with pytest.raises(ConfigError, match="holds another model"):
        pretrain(load_config(None, [*over, "model.depth=1"]))
    assert tree_hashes(run_dir) == before


def _state(step, value):
    train = {"config": {}, "loop": {"step": step}, "scheduler": {},
             "optimizer": {"state": {}, "param_groups": []}}
    return {"w": torch.full((4,), float(value))}, train


def _value(folder):
    return float(load_checkpoint(folder)[0]["w"][0])


def test_resave_killed_between_its_renames_keeps_a_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, *_state(2, 1.0), keep_last=1)
    real_rename = os.rename

    def killed_before_the_new_copy_is_named(src, dst):
        if ".tmp_step_" in str(src) and str(dst).endswith("step_00000002"):
            raise KeyboardInterrupt  # the kill, after the old copy went aside
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "rename", killed_before_the_new_copy_is_named)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 2, *_state(2, 2.0), keep_last=1)
    monkeypatch.setattr(ckpt_mod.os, "rename", real_rename)
    assert latest_checkpoint(root) is None  # neither copy is named step_2 at this moment ...
    assert recover_checkpoints(root)  # ... and the next start adopts the new complete copy
    assert _value(latest_checkpoint(root)) == 2.0
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_complete_temporary_copy_is_adopted_incomplete_one_deleted(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, *_state(1, 1.0), keep_last=1)
    done = save_checkpoint(root, 3, *_state(3, 3.0), keep_last=5)
    os.rename(done, root / ".tmp_step_00000003_999")  # killed just before its final rename
    torn = root / ".tmp_step_00000004_998"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    recover_checkpoints(root)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000003"]
    assert not torn.exists()
    # with keep_last=1 the next save keeps the newest; nothing complete was lost on the way
    save_checkpoint(root, 5, *_state(5, 5.0), keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005"]


def test_complete_copy_of_an_existing_step_is_kept_aside(tmp_path):
    root = tmp_path / "checkpoints"
    done = save_checkpoint(root, 2, *_state(2, 1.0), keep_last=2)
    (root / ".tmp_step_00000002_7").mkdir()
    for f in done.iterdir():
        (root / ".tmp_step_00000002_7" / f.name).write_bytes(f.read_bytes())
    recover_checkpoints(root)
    assert (root / "step_00000002.recovered").is_dir() and _value(done) == 1.0


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors"])
def test_unreadable_newest_checkpoint_is_set_aside_and_the_previous_used(tiny, victim, capfd):
    over = tiny("train.epochs=1", "train.save_every=2", "train.keep_last=2", name="torn")
    cfg = load_config(None, [*over, "train.max_steps=4"])
    run_dir = pretrain(cfg)
    newest = latest_checkpoint(run_dir / "checkpoints")
    data = (newest / victim).read_bytes()
    (newest / victim).write_bytes(data[: len(data) // 2])
    pretrain(load_config(None, over))
    err = capfd.readouterr().out
    assert "step_00000004" in err and "set aside as step_00000004.unreadable" in err
    assert "resumed from" in err and "step_00000002" in err
    assert (run_dir / "checkpoints" / "step_00000004.unreadable" / victim).read_bytes() \
        == data[: len(data) // 2]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 9))


def test_no_usable_checkpoint_is_one_error(tiny):
    over = tiny("train.epochs=1", "train.save_every=4", "train.keep_last=2", name="none")
    run_dir = pretrain(load_config(None, over))
    for ck in list_checkpoints(run_dir / "checkpoints"):
        (ck / "state.pt").write_bytes(b"")
    with pytest.raises(UnreadableCheckpoint, match="no usable checkpoint"):
        pretrain(load_config(None, over))
    with pytest.raises(UnreadableCheckpoint, match="no usable checkpoint"):  # stays refused
        pretrain(load_config(None, over))
    assert len(list((run_dir / "checkpoints").glob("step_*.unreadable"))) == 2


@pytest.mark.parametrize("key", ["optim.lr=.inf", "optim.weight_decay=nan", "optim.betas=[0.9,inf]",
                                 "method.mask_ratio=.nan", "data.mean=[0.5,-inf,0.5]",
                                 "optim.warmup_epochs=1e999", "train.max_steps=1"])
def test_non_finite_hyperparameters_are_config_errors(tiny, key):
    over = tiny(key)
    if key == "train.max_steps=1":  # the control: a finite config loads
        load_config(None, over)
        return
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, over)


def test_non_finite_weights_are_never_the_newest_checkpoint(tiny, monkeypatch):
    from mim.engine import loop

    real = loop.finish_update

    def weights_overflow_at_update_3(acc, cfg, optimizer, params, loss, state, *a):
        out = real(acc, cfg, optimizer, params, loss, state, *a)
        if state.step == 3:  # a finite gradient step that leaves an inf weight behind
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(loop, "finish_update", weights_overflow_at_update_3)
    over = tiny("train.epochs=1", "train.save_every=2", name="inf")
    with pytest.raises(NonFiniteWeights, match="inf/NaN values at update 8"):
        pretrain(load_config(None, over))
    ck = latest_checkpoint(load_config(None, over).run_dir / "checkpoints")
    assert ck.name == "step_00000002"
    assert all(torch.isfinite(t).all() for t in load_checkpoint(ck)[0].values())


def test_write_json_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk, a kill) leaves the previous file as it was."""
    import json
    from pathlib import Path

    from mim.engine.run import write_json

    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})
    real_write = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"a": 2, "b": "x" * 100})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
