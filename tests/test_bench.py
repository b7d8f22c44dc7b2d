"""The benchmark measures what it says: the reference matches the architecture (same counted
FLOPs), every contender runs, the pipeline and real-run probes produce sane numbers. Timings
themselves are never asserted (docs/benchmarks.md holds them)."""

import pytest
import torch

from mim.bench import main as bench_main
from mim.bench.measure import count_step_flops
from mim.bench.pipeline import (
    bench_pipeline,
    make_jpeg_folder,
    pipeline_contenders,
    real_run_data_wait,
    sample_tensor,
)
from mim.bench.suites import bench_config, run_step_case
from mim.config import load_config
from mim.methods import build_pretrainer
from tests.conftest import TINY

SMALL = [o for o in TINY if not o.startswith(("data.", "tracking."))] + ["data.batch_size=4"]


def test_reference_has_the_same_architecture_and_flops():
    pytest.importorskip("transformers")
    from mim.bench.reference import build_reference, reference_loss

    cfg = bench_config(SMALL)
    ours = build_pretrainer(cfg)
    ref = build_reference(ours)
    images = torch.randn(4, 3, 32, 32)
    f_ours = count_step_flops(lambda: ours(images).loss.backward(), 4)
    f_ref = count_step_flops(lambda: reference_loss(ref, images).backward(), 4)
    assert f_ours.attention > 0  # the fused CPU attention kernel is counted
    assert f_ref.total == pytest.approx(f_ours.total, rel=0.03)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ref == pytest.approx(n_ours, rel=0.03)


def test_step_case_times_every_contender():
    pytest.importorskip("transformers")
    res = run_step_case(bench_config(SMALL), "tiny", torch.device("cpu"), ("eager",),
                        warmup=1, rounds=2, matmul_size=256)
    assert [r.name for r in res.rows] == ["mim eager", "reference eager"]
    assert all(r.images_per_s > 0 and r.memory > 0 and 0 < r.mfu for r in res.rows)
    assert res.speedup() > 0


def test_cli_single_case_runs(tmp_path):
    out = tmp_path / "r.md"
    assert bench_main(["--quick", "--modes", "eager", "--no-reference", "--markdown", str(out),
                       *SMALL]) == 0
    assert "mim eager" in out.read_text()


def test_pipeline_loaders_give_imagefolders_tensors(tmp_path):
    root = make_jpeg_folder(tmp_path / "jpegs", 4, (96, 72))
    sets = pipeline_contenders(root, 32, (0.2, 1.0), (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    for i in range(4):
        want = sample_tensor(sets["torchvision ImageFolder"], (1, i))
        for name, ds in sets.items():
            if "full-size" in name or name == "mim folder":  # small files: no reduced decode
                assert torch.equal(sample_tensor(ds, (1, i)), want), name


def test_pipeline_and_real_run(tmp_path):
    root = make_jpeg_folder(tmp_path / "jpegs", 32, (96, 72))
    rows = bench_pipeline(root, 32, (0.2, 1.0), (0.5,) * 3, (0.5,) * 3, rounds=1)
    assert rows[0].name == "torchvision ImageFolder"
    assert rows[0].ratio_to_imagefolder == pytest.approx(1.0)
    assert all(r.images_per_s > 0 for r in rows)
    cfg = load_config(None, TINY + ["data.synthetic=true", "data.batch_size=8"])
    run = real_run_data_wait(cfg, root, steps=4, log_every=2, workdir=tmp_path / "runs")
    assert run.images_per_s > 0 and 0.0 <= run.data_wait <= 1.0
