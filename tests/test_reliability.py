"""Fault injection: kills, SIGTERM, torn checkpoint writes, NaNs, hostile pickles, live-run locks."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mim import load_config
from mim.config import ConfigError, RunError
from mim.engine import checkpoint as ckpt_mod
from mim.engine.checkpoint import UnsafeCheckpoint, latest_checkpoint
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from tests.conftest import REPO

COMMON = ("train.epochs=3", "optim.lr=1e-3", "train.save_every=2", "train.keep_last=2",
          "model.drop_path_rate=0.1")


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def _launch(over):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mim", "pretrain", *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_lines(path, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not reach {n} lines")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("ref")
    over = TINY + ["data.synthetic=true", "data.synthetic_size=128", f"run.output_dir={out}",
                   "run.name=ref", *COMMON]
    return _losses(pretrain(load_config(None, over)))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_points_then_resume(tiny, reference, seed):
    rng = random.Random(seed)
    over = tiny(*COMMON, name=f"kill{seed}")
    run_dir = load_config(None, over).run_dir
    kills = 0
    while True:
        proc = _launch(over)
        done = len(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0
        target = min(done + rng.randint(1, 9), len(reference))
        if kills < 3 and target < len(reference) and _wait_for_lines(run_dir / "metrics.jsonl",
                                                                     target, proc):
            time.sleep(rng.random() * 0.05)  # land anywhere: mid-step, mid-checkpoint
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        break
    assert kills >= 1
    got = _losses(run_dir)
    assert len(got) == len(reference)
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5


def test_sigterm_saves_and_exits_then_resumes(tiny, reference):
    over = tiny(*COMMON, "train.save_every=1000", name="term")
    run_dir = load_config(None, over).run_dir
    proc = _launch(over)
    assert _wait_for_lines(run_dir / "metrics.jsonl", 5, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert time.time() - t0 < 30
    assert "interrupted by signal 15" in out
    step = int(latest_checkpoint(run_dir / "checkpoints").name.split("_")[1])
    assert 5 <= step < len(reference)
    pretrain(load_config(None, over))
    got = _losses(run_dir)
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5 and len(got) == len(reference)


def test_crash_during_checkpoint_write_keeps_previous(tiny, monkeypatch):
    over = tiny(*COMMON, "train.max_steps=4", name="torn")
    pretrain(load_config(None, over))  # checkpoints at 2 and 4
    run_dir = load_config(None, over).run_dir

    def torn_rename(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(ckpt_mod.os, "rename", torn_rename)
    with pytest.raises(OSError, match="disk pulled out"):
        pretrain(load_config(None, tiny(*COMMON, "train.max_steps=6", name="torn")))
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"
    assert list((run_dir / "checkpoints").glob(".tmp_step_*"))  # the torn one is left hidden
    monkeypatch.undo()
    pretrain(load_config(None, tiny(*COMMON, name="torn")))
    assert len(_losses(run_dir)) == 24


def _nan_after(monkeypatch, bad_calls):
    from mim.models.mae import MAE

    real = MAE.forward
    calls = {"n": 0}

    def forward(self, images, masking=None):
        out = real(self, images, masking)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", forward)


def test_nonfinite_updates_are_skipped_and_counted(tiny, monkeypatch):
    _nan_after(monkeypatch, {3, 7})
    run_dir = pretrain(load_config(None, tiny("train.epochs=2", name="nan")))
    import json
    assert json.loads((run_dir / "summary.json").read_text())["nonfinite_updates"] == 2
    losses = torch.tensor(_losses(run_dir))
    # a logging window with only skipped updates logs NaN, never a made-up number
    assert (~torch.isfinite(losses)).nonzero().flatten().tolist() == [2, 6]


def test_divergence_stops_with_checkpoint_before_it(tiny, monkeypatch):
    _nan_after(monkeypatch, set(range(6, 100)))
    over = tiny("train.epochs=3", "train.save_every=2", "train.max_nonfinite=3", name="div")
    with pytest.raises(RunError, match="3 non-finite updates in a row"):
        pretrain(load_config(None, over))
    run_dir = load_config(None, over).run_dir
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"


def test_hostile_pickle_is_refused_not_run(tiny, tmp_path):
    over = tiny("train.epochs=1", name="evil")
    run_dir = pretrain(load_config(None, over))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = latest_checkpoint(run_dir / "checkpoints")
    torch.save({"format_version": 1, "x": Payload()}, ck / "state.pt")
    with pytest.raises(UnsafeCheckpoint, match="refused without running them"):
        pretrain(load_config(None, over))
    assert not marker.exists()
    r = subprocess.run([sys.executable, "-m", "mim", "pretrain", *over], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "refused without running them" in r.stderr
    assert not marker.exists()


def test_live_run_directory_is_locked(tiny, tmp_path):
    over = tiny("train.epochs=1", name="busy")
    run_dir = load_config(None, over).run_dir
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mim.engine.common import RunLock; "
        f"RunLock.acquire(Path({str(run_dir)!r})); print('locked', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another live run \\(pid {holder.pid}\\)"):
            pretrain(load_config(None, over))
    finally:
        holder.kill()
        holder.wait()
    pretrain(load_config(None, over))  # the lock dies with its process


def test_unwritable_output_dir_is_a_config_error(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to"):
        pretrain(load_config(None, tiny(f"run.output_dir={ro / 'file'}")))


def test_dead_process_ends_the_whole_launch(tiny):
    import psutil

    over = tiny("train.epochs=50", "data.synthetic_size=256", name="dead")
    run_dir = load_config(None, over).run_dir
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                             "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                             "no", "--dynamo_backend", "no", "--main_process_port", "29519",
                             "-m", "mim", "pretrain", *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for_lines(run_dir / "metrics.jsonl", 2, proc)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1" and "mim" in " ".join(p.cmdline())]
        assert rank1, "rank 1 not found"
        rank1[0].kill()
        t0 = time.time()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - t0 < 120
        assert not psutil.pid_exists(rank1[0].pid) or rank1[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
