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
from mim.checkpoint import UnsafeCheckpoint, latest_checkpoint
from mim.config import ConfigError, RunError
from mim import checkpoint as ckpt_mod
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from tests.conftest import REPO, two_process_launch

COMMON = ("train.epochs=3", "optim.lr=1e-3", "train.save_every=2", "train.keep_last=2",
          "model.drop_path_rate=0.1")


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def _launch(over, job="pretrain"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mim", job, *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_at_random_points(over, job, n_lines, rng, max_kills=3):
    """Launch, SIGKILL after a random number of metrics lines (plus up to 50 ms: mid-step,
    mid-evaluation, mid-checkpoint), relaunch, until a launch finishes; returns the kill count."""
    run_dir = load_config(None, over, job=job).run_dir
    kills = 0
    while True:
        proc = _launch(over, job)
        path = run_dir / "metrics.jsonl"
        done = len(path.read_text().splitlines()) if path.exists() else 0
        target = min(done + rng.randint(1, 6), n_lines)
        if kills < max_kills and target < n_lines and _wait_for_lines(path, target, proc):
            time.sleep(rng.random() * 0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        return kills


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
    over = tiny(*COMMON, name=f"kill{seed}")
    assert _kill_at_random_points(over, "pretrain", len(reference), random.Random(seed)) >= 1
    got = _losses(load_config(None, over).run_dir)
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
    from mim.methods.mae import MAE

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
        "import sys, time; from pathlib import Path; from mim.engine.run import RunLock; "
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
    launch, env = two_process_launch(29519)
    proc = subprocess.Popen(launch + ["pretrain", *over], cwd=REPO, env=env,
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


def _launch_two(over, port):
    """A 2-process CPU launch in its own session, so one killpg takes every rank at once."""
    launch, env = two_process_launch(port)
    return subprocess.Popen(launch + ["pretrain", *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_process_run_killed_whole_then_resumed(tiny):
    """Every rank SIGKILLed at once (a lost node) mid-run: the relaunch resumes from the last
    checkpoint and logs the uninterrupted two-process run's losses."""
    runs = {name: tiny(*COMMON, name=name) for name in ("ddp-ref", "ddp-kill")}
    ref = _launch_two(runs["ddp-ref"], 29531)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-2000:]
    reference = _losses(load_config(None, runs["ddp-ref"]).run_dir)
    assert len(reference) == 12  # 128 images / (16 x 2 processes) x 3 epochs
    run_dir = load_config(None, runs["ddp-kill"]).run_dir
    proc = _launch_two(runs["ddp-kill"], 29532)
    try:
        assert _wait_for_lines(run_dir / "metrics.jsonl", 7, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_losses(run_dir)) < len(reference)  # killed mid-run, not after it
    assert latest_checkpoint(run_dir / "checkpoints") is not None
    proc = _launch_two(runs["ddp-kill"], 29533)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "resumed from" in out
    got = _losses(run_dir)
    assert len(got) == len(reference)
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5


# ------------------------------------------------------------------ fine-tuning and detection

FT = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
      "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.1",
      "data.synthetic=true", "data.synthetic_size=96", "data.batch_size=16", "data.num_workers=0",
      "data.crop_scale=[0.5,1.0]", "optim.warmup_epochs=0", "optim.lr=1e-3", "tracking.backend=none",
      "train.log_every=1", "train.epochs=3", "train.save_every=2", "mixup.mixup_alpha=0.8",
      "mixup.cutmix_alpha=1.0"]
DET = ["task=detect", "model.arch=vit_tiny_patch16_224", "model.img_size=64", "model.patch_size=8",
       "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pyramid_dim=32",
       "model.drop_path_rate=0.1", "data.synthetic=true", "data.synthetic_size=24",
       "data.batch_size=8", "data.num_workers=0", "tracking.backend=none", "train.log_every=1",
       "train.epochs=3", "train.save_every=2", "optim.lr=2e-3", "eval.vis_images=0"]
JOBS = {"finetune": (FT, ("loss", "val/top1", "val/loss")),
        "detect": (DET, ("loss", "val/map", "val/map_50"))}


def _same_records(a, b, keys):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert abs(ra[k] - rb[k]) < 1e-5, (ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def downstream_reference(tmp_path_factory):
    from mim.engine.detect import detect
    from mim.engine.finetune import finetune

    out = tmp_path_factory.mktemp("downstream")
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a busy machine
    try:
        for job, (base, _) in JOBS.items():
            cfg = load_config(None, base + [f"run.output_dir={out}", f"run.name={job}-ref"],
                              job=job)
            run_dir = (finetune if job == "finetune" else detect)(cfg)
            runs[job] = read_metrics(run_dir / "metrics.jsonl")
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("job", ["finetune", "detect"])
def test_downstream_sigkill_at_random_points_then_resume(job, downstream_reference, tmp_path):
    base, keys = JOBS[job]
    over = base + [f"run.output_dir={tmp_path}", f"run.name={job}-kill", "run.resume=auto"]
    ref = downstream_reference[job]
    kills = _kill_at_random_points(over, job, len(ref), random.Random(3))
    assert kills >= 1
    run_dir = load_config(None, over, job=job).run_dir
    _same_records(read_metrics(run_dir / "metrics.jsonl"), ref, keys)
    assert (run_dir / "summary.json").is_file()


@pytest.mark.parametrize("job", ["finetune", "detect"])
def test_downstream_sigterm_saves_and_exits_then_resumes(job, downstream_reference, tmp_path):
    base, keys = JOBS[job]
    over = base + [f"run.output_dir={tmp_path}", f"run.name={job}-term", "run.resume=auto",
                   "train.save_every=1000"]
    run_dir = load_config(None, over, job=job).run_dir
    proc = _launch(over, job)
    assert _wait_for_lines(run_dir / "metrics.jsonl", 4, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert time.time() - t0 < 30 and "interrupted by signal 15" in out
    assert latest_checkpoint(run_dir / "checkpoints") is not None
    proc = _launch(over, job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    _same_records(read_metrics(run_dir / "metrics.jsonl"), downstream_reference[job], keys)


def test_not_enough_disk_is_a_config_error_before_any_work(tiny, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    over = tiny("train.epochs=1", name="full-disk")
    with pytest.raises(ConfigError, match=r"run.output_dir.*1 MiB free.*checkpoints need"):
        pretrain(load_config(None, over))
    run_dir = load_config(None, over).run_dir
    assert not (run_dir / "metrics.jsonl").exists()


def test_resume_cuts_the_log_back_to_what_the_checkpoint_saw(tmp_path):
    """An evaluation logged after the checkpoint (same step) is repeated after the resume, so it
    must be dropped with the lines after it, not kept by its step number."""
    import json

    from mim.engine.state import LoopState
    from mim.engine.tracking import MetricsLog

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "val/top1": 0.5},
        {"step": 3, "loss": 0.8}]))
    MetricsLog(log, True, LoopState(step=2, extra={"metrics_lines": 2}))
    assert [r.get("loss") for r in read_metrics(log)] == [1.0, 0.9]
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1}, {"step": 2}, {"step": 3}]))
    MetricsLog(log, True, LoopState(step=2))  # a checkpoint without the count: by step
    assert [r["step"] for r in read_metrics(log)] == [1, 2]
