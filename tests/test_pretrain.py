"""End-to-end pretraining runs of a tiny MAE on CPU."""

import json
import os
import shutil
import subprocess
import time

import pytest
import timm
import torch
from safetensors.torch import load_file

from mim import build_pretrainer, load_config
from mim.config import ConfigError, RunError
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from tests.conftest import REPO, two_process_launch


def test_loss_falls_and_run_dir_layout(tiny):
    cfg = load_config(None, tiny("train.epochs=4", "optim.lr=2e-3", "train.save_every=20",
                                 "train.keep_last=2", "train.vis_every=2",
                                 "method.norm_pix_loss=false"))
    run_dir = pretrain(cfg)
    rec = read_metrics(run_dir / "metrics.jsonl")
    assert len(rec) == 32 and [r["step"] for r in rec] == list(range(1, 33))
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s"):
        assert key in rec[0]
    first = sum(r["loss"] for r in rec[:4]) / 4
    last = sum(r["loss"] for r in rec[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000032"]  # keep_last=2 of 20 and the final 32
    assert {p.name for p in run_dir.glob("recon_*.png")} == {"recon_epoch0002.png",
                                                             "recon_epoch0004.png"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 32 and summary["flops_per_image"] > 0


def test_warmup_then_cosine_schedule(tiny):
    cfg = load_config(None, tiny("train.epochs=4", "optim.lr=1e-3", "optim.warmup_epochs=1",
                                 "optim.min_lr=1e-5"))
    rec = read_metrics(pretrain(cfg) / "metrics.jsonl")
    lrs = [r["lr"] for r in rec]  # lr used by update k (logged after it) is lrs[k-1]
    assert lrs[0] == 0.0 and abs(lrs[7] - 1e-3 * 7 / 8) < 1e-9  # linear warmup over 8 updates
    assert abs(lrs[8] - 1e-3) < 1e-9  # peak
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:]))  # then non-increasing cosine
    assert lrs[-1] < 2e-5


def test_resume_reproduces_uninterrupted_run(tiny):
    common = ("train.epochs=3", "optim.lr=1e-3", "train.save_every=5", "train.keep_last=3",
              "method.mask_ratio=0.6", "model.drop_path_rate=0.1")
    full = pretrain(load_config(None, tiny(*common, name="full")))
    # interrupted at update 13; the newest checkpoint is lost as if killed while writing it
    part_cfg = load_config(None, tiny(*common, "train.max_steps=13", name="part"))
    part = pretrain(part_cfg)
    assert not (part / "encoder.safetensors").exists()
    shutil.rmtree(part / "checkpoints" / "step_00000013")
    (part / "checkpoints" / ".tmp_step_00000013_1").mkdir()  # a half-written one is ignored
    pretrain(load_config(None, tiny(*common, name="part")))
    a = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(part / "metrics.jsonl")]
    assert len(a) == len(b) == 24
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    ea, eb = load_file(full / "encoder.safetensors"), load_file(part / "encoder.safetensors")
    assert all(torch.allclose(ea[k], eb[k], atol=1e-5) for k in ea)


def test_resuming_another_model_is_a_config_error(tiny):
    pretrain(load_config(None, tiny("train.epochs=1", name="arch")))
    with pytest.raises(ConfigError, match=r"holds another model.*model\.patch_size: 8 -> 16"):
        pretrain(load_config(None, tiny("train.epochs=2", "model.patch_size=16", name="arch")))


def test_encoder_export_loads_in_timm(tiny):
    cfg = load_config(None, tiny("train.epochs=1"))
    run_dir = pretrain(cfg)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(run_dir / "encoder.safetensors"),
                                                        custom_load=False),
                            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    ours = build_pretrainer(cfg)
    ours.encoder.vit.load_state_dict(load_file(run_dir / "encoder.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    vit.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), ours.encoder(x), atol=1e-5)


def _write_images(folder):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "a" / "deep").mkdir(parents=True)
    (folder / "b").mkdir()
    for i in range(20):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / ("a/deep" if i % 2 else "b") / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (36, 36, 4), dtype=np.uint8), "RGBA").save(
        folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")


def test_folder_with_corrupt_files_is_skipped_and_counted(tiny, tmp_path):
    data = tmp_path / "imgs"
    _write_images(data)
    over = [o for o in tiny("train.epochs=2", "data.batch_size=8")
            if not o.startswith("data.synthetic")] + [f"data.path={data}"]
    with pytest.raises(RunError, match=r"unreadable images, more than data.max_bad_fraction=0.01"):
        pretrain(load_config(None, over + ["run.name=strict"]))
    run_dir = pretrain(load_config(None, over + ["data.max_bad_fraction=0.1"]))
    issues = [json.loads(ln) for ln in (run_dir / "data_issues.jsonl").read_text().splitlines()]
    paths = {os.path.basename(i["path"]) for i in issues}
    assert paths == {"broken.jpg", "empty.png"}
    assert json.loads((run_dir / "summary.json").read_text())["bad_samples"] == len(issues)
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 2 * (24 // 8)


def test_save_to_disk_parquet_and_hub_style_sources(tiny, tmp_path):
    import datasets
    from PIL import Image

    imgs = [Image.new("RGB", (40, 40), (i * 10, 0, 0)) for i in range(20)]
    ds = datasets.Dataset.from_dict({"img": imgs, "label": list(range(20))},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    from mim.data import build_source

    for over in ([f"data.path={tmp_path / 'disk'}"], [f"data.path={tmp_path / 'pq'}"],
                 [f"data.name={tmp_path / 'pq'}"]):  # data.name goes through load_dataset()
        cfg = load_config(None, ["data.batch_size=4"] + over)
        src = build_source(cfg.data, image_size=32)
        assert len(src) == 20 and src.image_column == "img"
        img, label, _ = src.load(3)
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (30, 0, 0) and label == 3


def test_wandb_offline_run_is_written(tiny):
    cfg = load_config(None, tiny("train.epochs=1", "tracking.backend=wandb",
                                 "tracking.project=mim-test", "tracking.tags=[ci]"))
    env_key = os.environ.pop("WANDB_API_KEY", None)
    try:
        run_dir = pretrain(cfg)
    finally:
        if env_key:
            os.environ["WANDB_API_KEY"] = env_key
    import wandb

    wandb.teardown()  # the wandb service writes the run file asynchronously: let it finish
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    for _ in range(300):
        if run_file.stat().st_size > 7:
            break
        time.sleep(0.1)
    from wandb.proto import wandb_internal_pb2 as pb

    keys, config_keys = set(), set()
    raw = run_file.read_bytes()
    if len(raw) <= 7:  # seen under heavy load: wandb-core had not flushed a record yet
        pytest.skip("wandb wrote the offline run directory but no records yet (load); "
                    "content not checked this time")
    for data in _wandb_log_records(raw):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "config":
            config_keys |= {item.key for item in rec.config.update}
        elif kind == "run":
            assert rec.run.display_name == "t" and list(rec.run.tags) == ["ci"]
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        # history items are parsed from the log records; if wandb batched them in a framing this
        # reader does not know, the logged key must still be in the file
        assert key in keys or key.encode() in raw, key
    assert {"model", "method", "optim"} <= config_keys


def _wandb_log_records(raw: bytes):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framing in 32 KiB blocks."""
    assert raw[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length = int.from_bytes(raw[pos + 4:pos + 6], "little")
        kind = raw[pos + 6]
        if kind == 0:  # padding: the rest of this block is unused
            pos += block - pos % block
            continue
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            parts = (b"" if kind == 2 else parts) + chunk
        elif kind == 4:
            yield parts + chunk


def test_two_process_cpu_run(tiny):
    over = tiny("train.epochs=2", "train.save_every=3", "train.keep_last=5", name="ddp")
    launch, env = two_process_launch(29517)
    r = subprocess.run(launch + ["pretrain", *over], capture_output=True, text=True, timeout=300,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "devices             2 (cpu)" in r.stdout
    run_dir = load_config(None, over).run_dir
    rec = read_metrics(run_dir / "metrics.jsonl")
    # 128 images / (16 per device x 2 processes) = 4 updates per epoch (one process: 8)
    assert [r["step"] for r in rec] == list(range(1, 9))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006", "step_00000008"]
    assert (run_dir / "encoder.safetensors").is_file()


def test_streaming_source_pretrains_and_resumes_exactly(tiny, tmp_path):
    import datasets
    from PIL import Image

    imgs = [Image.new("RGB", (40, 40), (i * 5 % 255, i % 7 * 30, 90)) for i in range(96)]
    ds = datasets.Dataset.from_dict({"image": imgs},
                                    features=datasets.Features({"image": datasets.Image()}))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    base = [o for o in tiny("train.epochs=2", "optim.lr=1e-3", "train.save_every=2")
            if not o.startswith("data.synthetic")]
    base += [f"data.name={tmp_path / 'pq'}", "data.streaming=true"]
    with pytest.raises(Exception, match="data.num_examples"):
        pretrain(load_config(None, base + ["run.name=s0"]))
    base += ["data.num_examples=96"]
    full = pretrain(load_config(None, base + ["run.name=s1"]))
    part = pretrain(load_config(None, base + ["run.name=s2", "train.max_steps=5"]))
    pretrain(load_config(None, base + ["run.name=s2"]))
    a = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(part / "metrics.jsonl")]
    assert len(a) == len(b) == 12 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
