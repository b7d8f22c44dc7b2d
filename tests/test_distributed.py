"""Scale-out: the launcher's mixed precision, launches that do not form their group, FSDP-safe
collective paths, multi-node on one machine, torchrun and the SLURM requeue logic."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mim.config import ConfigError, load_config
from mim.engine import distributed
from mim.engine.checkpoint import latest_checkpoint
from mim.engine.distributed import check_launch
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from tests.conftest import REPO, two_process_launch

# Runs a tiny pretraining of one update in this process and prints, from inside the encoder's
# forward, whether autocast is on and its dtype.
AUTOCAST_PROBE = """
import sys, torch
import mim.engine.pretrain as pretrain
from mim.config import ConfigError, load_config
from mim.engine.distributed import check_launch
seen = []
build = pretrain.build_pretrainer
def probed(cfg):
    model = build(cfg)
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(
        (torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'))))
    return model
pretrain.build_pretrainer = probed
pretrain.pretrain(load_config(None, sys.argv[1:]))
print('AUTOCAST', seen[-1][0], seen[-1][1])
"""


def _probe(over, precision):
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION=precision, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", AUTOCAST_PROBE, *over], capture_output=True,
                       text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("explicit, autocast, note", [
    ("auto", "True torch.bfloat16", "bf16 (the launcher's)"),
    ("no", "False", "no (train.mixed_precision; overrides the launcher's bf16)")])
def test_launcher_precision_reaches_the_forward(tiny, explicit, autocast, note):
    out = _probe(tiny("train.max_steps=1", f"train.mixed_precision={explicit}",
                      name=f"amp-{explicit}"), "bf16")
    line = next(ln for ln in out.splitlines() if ln.startswith("AUTOCAST"))
    assert line.startswith(f"AUTOCAST {autocast}")
    assert f"mixed precision     {note}" in out


def _launch(args, port, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *args, "-m", "mim"], env


def test_fsdp_launch_without_gpus_is_one_line_error(tiny):
    """``accelerate launch --use_fsdp`` of two processes on a machine without GPUs: each would
    train the whole job alone (accelerate falls back to one process each)."""
    over = tiny("train.max_steps=1", name="nogroup")
    launch, env = _launch(["--use_fsdp"], 29541)
    r = subprocess.run(launch + ["pretrain", *over], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO)
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("mim: error:")]
    assert len(errors) == 1 and "accelerate runs FSDP on GPUs only" in errors[0], r.stderr[-3000:]
    assert not re.search(r'File "[^"]*/mim/', r.stderr), r.stderr[-3000:]  # no traceback of ours
    assert not (load_config(None, over).run_dir / "checkpoints").exists()


class _State:
    def __init__(self, n):
        self.num_processes, self.device = n, torch.device("cpu")


@pytest.mark.parametrize("env, state, says", [
    ({"WORLD_SIZE": "2"}, None, "WORLD_SIZE=2 processes on a machine without GPUs"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, None, "DeepSpeed"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"}, None, None),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"}, _State(1), "did not form a group"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"}, _State(2), None),
    ({"WORLD_SIZE": "1"}, _State(1), None)])
def test_launch_problems_from_the_environment(monkeypatch, env, state, says):
    for key in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP",
                "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if says is None:
        check_launch(state)
    else:
        with pytest.raises(ConfigError, match=says):
            check_launch(state)
        monkeypatch.setenv("RANK", "1")  # the other ranks exit quietly with the same status
        with pytest.raises(SystemExit):
            check_launch(state)


# ------------------------------------------------------------- collective paths and their state

def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("saved_as", ["by_name", "legacy"])
def test_optimizer_state_by_name_and_legacy_resume_exactly(tiny, monkeypatch, saved_as):
    """The optimizer state FSDP saves (torch's full state dict, keyed by parameter name) and the
    format of checkpoints written before it (no 'optimizer_format' key) both resume exactly."""
    common = ("train.epochs=2", "optim.lr=1e-3", "train.save_every=3", "data.synthetic_size=96")
    full = pretrain(load_config(None, tiny(*common, name="full")))
    if saved_as == "by_name":
        monkeypatch.setattr(distributed, "by_name", lambda acc: True)
    part = pretrain(load_config(None, tiny(*common, "train.max_steps=7", name="part")))
    ckpt = latest_checkpoint(part / "checkpoints")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    if saved_as == "by_name":
        assert state["optimizer_format"] == "by_name"
        assert "encoder.vit.cls_token" in state["optimizer"]["state"]
    else:
        assert state.pop("optimizer_format") == "by_index"
        torch.save(state, ckpt / "state.pt")
    pretrain(load_config(None, tiny(*common, name="part")))
    a, b = _losses(full), _losses(part)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_two_processes_take_part_in_every_picture_export_and_checkpoint(tiny):
    """Pictures every epoch, checkpoints and the encoder export run on every process (FSDP
    needs each of them for its gathers); each ends with a collective, so one entered by the
    main process alone fails within the short train.dist_timeout_s instead of hanging."""
    over = tiny("train.epochs=2", "train.vis_every=1", "train.save_every=3",
                "train.dist_timeout_s=30", name="collective")
    launch, env = two_process_launch(29543)
    r = subprocess.run(launch + ["pretrain", *over], capture_output=True, text=True, timeout=300,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run_dir = load_config(None, over).run_dir
    assert {p.name for p in run_dir.glob("recon_*.png")} == {"recon_epoch0001.png",
                                                             "recon_epoch0002.png"}
    final = load_file(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")
    encoder = load_file(run_dir / "encoder.safetensors")
    assert encoder and all(torch.equal(v, final[f"encoder.vit.{k}"]) for k, v in encoder.items())
    assert len(encoder) == sum(k.startswith("encoder.vit.") for k in final)
