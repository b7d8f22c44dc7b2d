"""The batched torch HOG against scikit-image's ``hog`` on the same cell layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim.hog import hog_cells, hog_dim, hog_patch_targets

skimage_feature = pytest.importorskip("skimage.feature", reason="scikit-image is a test extra")


def _reference(channel: np.ndarray, cell: int, bins: int) -> np.ndarray:
    """scikit-image HOG of one channel as (rows, cols, bins), one L2-normalised cell per block."""
    h = skimage_feature.hog(channel, orientations=bins, pixels_per_cell=(cell, cell),
                            cells_per_block=(1, 1), block_norm="L2", feature_vector=False)
    return h[:, :, 0, 0, :]


def _test_images() -> np.ndarray:
    """(2, 3, 32, 48) float64: a natural photo crop and smooth shapes plus noise."""
    from skimage import data

    photo = data.astronaut()[100:132, 180:228].transpose(2, 0, 1) / 255.0
    yy, xx = np.mgrid[0:32, 0:48]
    rng = np.random.default_rng(0)
    shapes = np.stack([np.sin(xx / 5.0) + (yy > 16), np.hypot(xx - 20, yy - 12) < 9,
                       xx * yy / 1500.0]).astype(np.float64) + 0.05 * rng.random((3, 32, 48))
    return np.stack([photo, shapes])


@pytest.mark.parametrize("cell, bins", [(8, 9), (4, 9), (8, 6)])
def test_hog_matches_skimage(cell, bins):
    images = _test_images()
    ours = hog_cells(torch.from_numpy(images), cell, bins).numpy()  # (B, C, bins, h, w)
    for b in range(images.shape[0]):
        for c in range(3):
            ref = _reference(images[b, c], cell, bins)
            np.testing.assert_allclose(ours[b, c].transpose(1, 2, 0), ref, atol=1e-6)


def test_hog_float32_on_device_agrees_with_float64():
    images = torch.from_numpy(_test_images())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = hog_cells(images.float().to(device), 8).cpu().double()
    # float32 may flip a pixel whose angle sits on a bin edge; the cell vectors stay close
    assert (ours - hog_cells(images, 8)).abs().max() < 1e-2


def test_patch_targets_gather_the_cells_of_each_patch():
    images = torch.from_numpy(_test_images())
    cells = hog_cells(images, 4, 9)  # (B, C, 9, 8, 12)
    targets = hog_patch_targets(images, 8, 4, 9)  # (B, L, 2*2*C*9)
    assert targets.shape == (2, 4 * 6, hog_dim(8, 4, 9, 3))
    row, col = 2, 5  # patch (2, 5): cells (4..5, 10..11), cell-major, then channel, then bin
    expected = torch.cat([cells[:, :, :, 2 * row + i, 2 * col + j].flatten(1)
                          for i in range(2) for j in range(2)], dim=1)
    assert torch.equal(targets[:, row * 6 + col], expected)


def test_hog_rejects_sizes_that_do_not_tile():
    with pytest.raises(ValueError, match="multiple"):
        hog_cells(torch.zeros(1, 3, 30, 32), 8)
    with pytest.raises(ValueError, match="divide"):
        hog_patch_targets(torch.zeros(1, 3, 32, 32), 8, 3)
