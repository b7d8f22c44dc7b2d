"""Scale-out: the launcher's mixed precision, launches that do not form their group, FSDP-safe
collective paths, multi-node on one machine, torchrun and the SLURM requeue logic."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

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
