"""Scale-out: the launcher's mixed precision, launches that do not form their group, FSDP-safe
collective paths, multi-node on one machine, torchrun and the SLURM requeue logic."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mim.checkpoint import latest_checkpoint
from mim.config import ConfigError, load_config
from mim.engine import distributed
from mim.engine.distributed import check_launch
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from tests.conftest import REPO, TINY, two_process_launch
from tests.test_reliability import _wait_for_lines

# Runs a tiny pretraining of one update in this process and prints, from inside the encoder's
# forward, whether autocast is on and its dtype.
AUTOCAST_PROBE = """
import sys, torch
import mim.engine.pretrain as pretrain
from mim.config import load_config
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


# The run every launcher is compared with: two processes of one accelerate launch (gloo),
# pictures every epoch, checkpoints every 3 of its 12 updates, a short collective timeout.
LAUNCHED = TINY + ["data.synthetic=true", "data.synthetic_size=128", "train.epochs=3",
                   "train.vis_every=1", "train.save_every=3", "train.keep_last=5",
                   "train.dist_timeout_s=30", "optim.lr=1e-3"]


def _over(out, name):
    return LAUNCHED + [f"run.output_dir={out}", f"run.name={name}"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    launch, env = two_process_launch(29543)
    r = subprocess.run(launch + ["pretrain", *_over(out, "ref")], capture_output=True,
                       text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out / "ref"


def test_two_processes_take_part_in_every_picture_export_and_checkpoint(two_process_run):
    """Pictures every epoch, checkpoints and the encoder export run on every process (FSDP
    needs each of them for its gathers); each ends with a collective, so one entered by the
    main process alone fails within the short train.dist_timeout_s instead of hanging."""
    run_dir = two_process_run
    assert len(_losses(run_dir)) == 12  # 128 images / (16 x 2 processes) x 3 epochs
    assert {p.name for p in run_dir.glob("recon_*.png")} == {f"recon_epoch000{e}.png"
                                                             for e in (1, 2, 3)}
    final = load_file(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")
    encoder = load_file(run_dir / "encoder.safetensors")
    assert encoder and all(torch.equal(v, final[f"encoder.vit.{k}"]) for k, v in encoder.items())
    assert len(encoder) == sum(k.startswith("encoder.vit.") for k in final)


def _kill_tree(pid):
    """SIGKILL a launcher and every process under it (torch's agent starts its workers in
    sessions of their own): a node lost at once."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        proc.kill()


def _node(rank, port, over):
    """One 'node' of a 2-node launch on localhost: a launcher and its one process."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mim", "pretrain", *over]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_nodes_match_one_node_and_a_lost_node_resumes_exactly(two_process_run, tmp_path):
    """Two 'nodes' of one process each on localhost: one is killed mid-run, the other exits
    with a one-line error (within train.dist_timeout_s); the relaunch of both resumes from the
    last checkpoint, and the whole log equals the one-node two-process run's."""
    over = _over(tmp_path, "nodes")
    run_dir = tmp_path / "nodes"
    nodes = [_node(rank, 29551, over) for rank in (0, 1)]
    try:
        assert _wait_for_lines(run_dir / "metrics.jsonl", 5, nodes[0])
    finally:
        _kill_tree(nodes[1].pid)
        nodes[1].wait()
    out, _ = nodes[0].communicate(timeout=30 + 90)  # dist_timeout_s, and the launcher's exit
    assert nodes[0].returncode != 0
    assert "mim: error: process 0 of 2 lost the others of its launch" in out, out[-3000:]
    assert len(_losses(run_dir)) < 12 and latest_checkpoint(run_dir / "checkpoints")
    nodes = [_node(rank, 29552, over) for rank in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "resumed from" in outs[0]
    got, want = _losses(run_dir), _losses(two_process_run)
    assert len(got) == len(want) == 12
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_torchrun_matches_accelerate_launch(two_process_run, tmp_path):
    """``torchrun --nproc_per_node 2 -m mim pretrain`` (ACCELERATE_USE_CPU=true, gloo) trains
    like ``accelerate launch`` with two processes."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29553", "-m", "mim", "pretrain", *_over(tmp_path, "torchrun")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "devices             2 (cpu)" in r.stdout
    got, want = _losses(tmp_path / "torchrun"), _losses(two_process_run)
    assert len(got) == len(want) == 12
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


# ------------------------------------------------------------------------------------- SLURM

FAKE_SLURM = {
    # one node: the step runs here in its own process group, which the fake scancel signals
    "srun": """while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0
set -m
"$@" &
echo $! > "$FAKE_SLURM/step.pgid"
wait $!""",
    "scancel": """sig=${1#--signal=}
echo "scancel $*" >> "$FAKE_SLURM/calls.log"
kill -s "$sig" -- -"$(cat "$FAKE_SLURM/step.pgid")\"""",
    "scontrol": """echo "scontrol $*" >> "$FAKE_SLURM/calls.log"
if [[ $1 == show ]]; then echo localhost; fi""",
}


def _sbatch(over, fake, restart):
    """scripts/slurm/pretrain.sbatch as SLURM would start it on one CPU node, with srun,
    scancel and scontrol replaced by fakes that log their calls."""
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_SLURM=str(fake),
               SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_RESTART_COUNT=str(restart), SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1",
               ACCELERATE_CONFIG="configs/accelerate/cpu.yaml", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(REPO / "scripts/slurm/pretrain.sbatch"), *over],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_slurm_signal_checkpoints_requeues_and_resumes_exactly(tiny, tmp_path):
    """SLURM's USR1 to the batch shell: every process of the step saves at the next update
    boundary and stops, the job requeues itself; the requeued job resumes the run exactly."""
    common = ("train.epochs=3", "optim.lr=1e-3", "train.save_every=2", "model.drop_path_rate=0.1")
    reference = _losses(pretrain(load_config(None, tiny(*common, name="slurm-ref"))))
    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/bin/bash\n" + body + "\n")
        (fake / name).chmod(0o755)
    over = tiny(*common, name="slurm")
    run_dir = load_config(None, over).run_dir
    job = _sbatch(over, fake, restart=0)
    try:
        assert _wait_for_lines(run_dir / "metrics.jsonl", 5, job)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "interrupted by signal 10" in out, out[-3000:]
    calls = (fake / "calls.log").read_text().splitlines()
    assert "scancel --signal=USR1 4242" in calls and calls[-1] == "scontrol requeue 4242"
    assert 5 <= len(_losses(run_dir)) < len(reference) == 24
    job = _sbatch(over, fake, restart=1)  # the requeued job
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0 and "resumed from" in out, out[-3000:]
    assert (fake / "calls.log").read_text().count("requeue") == 1
    got = _losses(run_dir)
    assert len(got) == len(reference)
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5
