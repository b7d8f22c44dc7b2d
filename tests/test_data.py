"""Every kind of awkward image is either read correctly or skipped with its path."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mim import load_config
from mim.data import build_epoch_loader, build_source, pretrain_transform
from mim.data.loader import ShardedEpochSampler, TransformedDataset
from mim.data.synthetic import CLASSES, synthetic_image


def _png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) \
        + chunk(b"IEND", b"")


@pytest.fixture
def zoo(tmp_path):
    d = tmp_path / "zoo"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    rgb.save(d / "ok.jpg")
    rgb.convert("L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "deep16.png")
    Image.new("CMYK", (30, 30), (10, 200, 30, 0)).save(d / "cmyk.jpg")
    Image.new("RGB", (3, 3), (200, 10, 10)).save(d / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20), (0, 0, 255)).save(d / "exif.jpg", exif=exif)
    Image.new("P", (20, 20)).save(d / "palette.gif")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image")
    (d / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    return d


GOOD = {"ok.jpg", "gray.png", "rgba.png", "deep16.png", "cmyk.jpg", "tiny.png", "exif.jpg",
        "palette.gif"}
BAD = {"truncated.jpg", "zero.jpg", "notes.png", "bomb.png"}


def test_each_awkward_image_is_read_or_reported(zoo):
    cfg = load_config(None, [f"data.path={zoo}"])
    src = build_source(cfg.data, image_size=32)
    names = [cell["path"].split("/")[-1] for cell in src.ds["image"]]
    assert set(names) == GOOD | BAD
    ds = TransformedDataset(src, pretrain_transform(32, (0.2, 1.0), cfg.data.mean, cfg.data.std), 0)
    for i, name in enumerate(names):
        sample = ds[i]
        assert sample["image"].shape == (3, 32, 32) and torch.isfinite(sample["image"]).all()
        reported = {p.split("/")[-1] for p, _ in sample["bad"]}
        if name in BAD:
            assert name in reported and sample["index"] != i
        else:
            assert sample["index"] == i and not reported
            img, _, _ = src.load(i)
            assert img.mode == "RGB"
            if name == "exif.jpg":
                assert img.size == (20, 40)  # EXIF rotation applied
            if name == "deep16.png":
                assert np.asarray(img).max() > 200  # 16-bit range scaled, not clipped to white


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    n, bs, world = 103, 4, 3
    shards = []
    for rank in range(world):
        s = ShardedEpochSampler(n, bs, rank, world, seed=7)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == s.batches_per_epoch() * bs == (103 // 12) * 4
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat))
    s = ShardedEpochSampler(n, bs, 1, world, seed=7)
    s.set_epoch(2, start_batch=3)
    assert list(s) == shards[1][12:]  # resuming mid-epoch skips exactly the consumed batches
    s.set_epoch(3)
    assert list(s) != shards[1]  # a new epoch, a new order


def test_augmentation_is_a_function_of_seed_epoch_index_not_workers():
    cfg = load_config(None, ["data.synthetic=true", "data.synthetic_size=32"])
    src = build_source(cfg.data, image_size=32)
    tf = pretrain_transform(32, (0.2, 1.0), cfg.data.mean, cfg.data.std)
    batches = []
    for workers in (0, 2):
        loader = build_epoch_loader(src, tf, batch_size=8, num_workers=workers, rank=0,
                                    world_size=1, seed=3)
        batches.append(torch.cat([b["image"] for b in loader.epoch(1)]))
    assert torch.equal(batches[0], batches[1])
    other_epoch = torch.cat([b["image"] for b in loader.epoch(2)])
    assert not torch.equal(batches[0], other_epoch)


def test_synthetic_set_is_deterministic_and_labeled():
    a, la = synthetic_image(5, 32, seed=1)
    b, lb = synthetic_image(5, 32, seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb
    labels = {synthetic_image(i, 16)[1] for i in range(200)}
    assert labels == set(range(len(CLASSES)))
