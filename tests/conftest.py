import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = [
    "model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
    "data.batch_size=16", "data.num_workers=0", "optim.warmup_epochs=0",
    "tracking.backend=none", "train.log_every=1", "train.vis_every=0", "train.vis_images=4",
]


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny MAE run in tmp_path on the synthetic set."""
    def make(*extra: str, name: str = "t") -> list[str]:
        return TINY + ["data.synthetic=true", "data.synthetic_size=128",
                       f"run.output_dir={tmp_path}", f"run.name={name}", *extra]
    return make


def mim_cmd() -> list[str]:
    return [sys.executable, "-m", "mim"]


def two_process_launch(port: int) -> tuple[list[str], dict[str, str]]:
    """Command prefix (ending in ``-m mim``) and environment of a real 2-process CPU launch over
    gloo; ``accelerate launch --cpu`` would start only one process."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "mim"], env


def read_compare_report(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a finished comparison's report.csv, after checking that all four report files
    are there."""
    import csv

    for name in ("report.md", "report.csv", "label_efficiency.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "report.csv") as f:
        return list(csv.DictReader(f))


def run_compare_two_processes(cfg, tmp_path: Path, port: int) -> str:
    """``mim compare`` of the validated config ``cfg`` as a real 2-process CPU launch; asserts
    it succeeded and returns its stdout."""
    import subprocess

    import yaml

    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    launch, env = two_process_launch(port)
    r = subprocess.run(launch + ["compare", "--config", str(path)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread: OpenMP threads spin while waiting, and on a busy 2-core machine one
    thread is several times faster in wall time for tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def inference_runs(tmp_path_factory):
    """Tiny finished runs for the inference tests: an MAE pretraining ('pre'), a classifier
    fine-tuned from it ('cls') and a detector ('det', every detection kept: score_thresh 0),
    plus a folder of 12 synthetic images (some in a sub-folder) and one corrupt file."""
    import torch

    from mim import load_config
    from mim.data.synthetic import SyntheticShapes
    from mim.engine.detect import detect
    from mim.engine.finetune import finetune
    from mim.engine.pretrain import pretrain

    out = tmp_path_factory.mktemp("inference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["data.synthetic=true", "data.num_workers=0", "optim.warmup_epochs=0",
              "tracking.backend=none", f"run.output_dir={out}", "train.epochs=1"]
    pretrain(load_config(None, TINY + common + ["data.synthetic_size=64", "run.name=pre"]))
    finetune(load_config(None, TINY[:6] + common + [
        "data.synthetic_size=64", "data.batch_size=16", "run.name=cls", f"init={out / 'pre'}"],
        job="finetune"))
    detect(load_config(None, [
        "task=detect", "model.arch=vit_tiny_patch16_224", "model.img_size=64",
        "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "model.pyramid_dim=16", "data.synthetic_size=16", "data.batch_size=8",
        "eval.vis_images=0", "eval.score_thresh=0", "run.name=det", *common], job="detect"))
    torch.set_num_threads(threads)
    images = out / "images"
    (images / "sub").mkdir(parents=True)
    shapes = SyntheticShapes(12, 40, seed=5)
    for i in range(12):
        shapes.load(i)[0].save(images / ("sub" if i % 3 == 0 else "") / f"im{i:02d}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    return out


def full_and_resumed_losses(overrides: list[str], stop_at: int = 3) -> tuple[list, list]:
    """Per-update losses of a pretraining run and of the same run stopped after ``stop_at``
    updates (``train.max_steps``) and resumed to its end: equal when resuming is exact."""
    from mim.config import load_config
    from mim.engine.pretrain import pretrain
    from mim.engine.tracking import read_metrics

    full = pretrain(load_config(None, overrides + ["run.name=full"]))
    part = pretrain(load_config(None, overrides + ["run.name=part", f"train.max_steps={stop_at}"]))
    pretrain(load_config(None, overrides + ["run.name=part"]))  # resumes from update stop_at
    return ([r["loss"] for r in read_metrics(full / "metrics.jsonl")],
            [r["loss"] for r in read_metrics(part / "metrics.jsonl")])
