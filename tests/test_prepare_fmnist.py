"""scripts/prepare_fmnist.py on small IDX files written here (the real ones are not needed)."""

import gzip
import importlib.util

import numpy as np
import pytest

from mim.data.sources import HFImageSource, load_local
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("prepare_fmnist",
                                              REPO / "scripts" / "prepare_fmnist.py")
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def write_idx(folder, stem, images, labels):
    header = ((2051).to_bytes(4, "big") + len(images).to_bytes(4, "big")
              + (28).to_bytes(4, "big") * 2)
    (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    header = (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def write_source(tmp_path, n_train, seed=0):
    """IDX files of n_train training images (labels cycling 0-9) and 10 test images."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    src.mkdir()
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    write_idx(src, "train", train, (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(src, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              np.arange(10, dtype=np.uint8))
    return src, train


def test_idx_files_become_a_labelled_dataset_dict(tmp_path):
    src, train = write_source(tmp_path, 20)
    prepare.build(src, tmp_path / "out")
    source = HFImageSource(load_local(str(tmp_path / "out"), "train"))
    assert len(source) == 20 and source.classes[9] == "Ankle boot"
    img, label, _ = source.load(3)
    assert label == 3 and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 0], train[3])  # lossless, gray copied to RGB
    assert len(HFImageSource(load_local(str(tmp_path / "out"), "test"))) == 10


def test_class_subset_is_relabelled_in_the_given_order(tmp_path):
    src, train = write_source(tmp_path, 30, seed=1)
    prepare.build(src, tmp_path / "out", classes=[9, 5])
    source = HFImageSource(load_local(str(tmp_path / "out"), "train"))
    assert list(source.classes) == ["Ankle boot", "Sandal"] and len(source) == 6
    labels = [source.load(i)[1] for i in range(len(source))]
    assert labels == [1, 0, 1, 0, 1, 0]  # original order kept: 5, 9, 15, 19, 25, 29
    assert np.array_equal(np.asarray(source.load(1)[0])[..., 0], train[9])
    with pytest.raises(SystemExit, match="distinct values in 0..9"):
        prepare.build(src, tmp_path / "bad", classes=[3, 3])


def test_missing_source_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="lacks train-images-idx3-ubyte.gz"):
        prepare.build(tmp_path, tmp_path / "out")
