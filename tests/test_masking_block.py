"""Blockwise (BEiT) masks: exact counts, block limits, seeding; the mask token replaces exactly
the masked patches."""

from __future__ import annotations

import random

import pytest
import torch

from mim.config import ConfigError, ModelConfig, load_config
from mim.masking import (BlockwiseMaskGenerator, block_shapes, masked_indices, num_masked_patches,
                         random_masking)
from mim.models.encoder import create_encoder

CASES = [  # (grid, mask ratio, min patches, max patches, aspect)
    ((14, 14), 0.4, 16, 0, (0.3, 1 / 0.3)),  # BEiT ViT-B/16 at 224 px
    ((8, 8), 0.6, 4, 4, (1.0, 1.0)),  # SimMIM-like 2x2 squares
    ((8, 8), 0.75, 4, 12, (0.5, 2.0)),
    ((4, 6), 0.5, 1, 3, (0.3, 3.4)),  # non-square grid, tiny blocks
]


@pytest.mark.parametrize("grid, ratio, lo, hi, aspect", CASES)
def test_block_masks_reach_the_exact_count(grid, ratio, lo, hi, aspect):
    n = num_masked_patches(grid[0] * grid[1], ratio)
    gen = BlockwiseMaskGenerator(grid, n, lo, hi, aspect)
    mask = gen(64, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, grid[0] * grid[1])
    assert (mask.sum(dim=1) == n).all()


@pytest.mark.parametrize("grid, ratio, lo, hi, aspect", CASES)
def test_every_masked_patch_lies_in_a_block_of_allowed_shape(grid, ratio, lo, hi, aspect):
    n = num_masked_patches(grid[0] * grid[1], ratio)
    gen = BlockwiseMaskGenerator(grid, n, lo, hi, aspect)
    gh, gw = grid
    for seed in range(50):
        flat, blocks = gen.sample(random.Random(seed))
        covered = torch.zeros(gh, gw, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert lo <= h * w <= (hi or n)
            assert aspect[0] - 1e-9 <= h / w <= aspect[1] + 1e-9
            assert 0 <= top and top + h <= gh and 0 <= left and left + w <= gw
            covered[top:top + h, left:left + w] = True
        mask = torch.tensor(flat).view(gh, gw)
        assert int(mask.sum()) == n
        assert not (mask & ~covered).any()


def test_block_masks_are_blocky_not_scattered():
    """BEiT masks are contiguous rectangles: far fewer mask/visible borders than random masks."""
    grid, n = (14, 14), 78

    def edges(m):
        m = m.view(-1, *grid).int()
        return ((m[:, 1:] != m[:, :-1]).sum() + (m[:, :, 1:] != m[:, :, :-1]).sum()).item()

    g = torch.Generator().manual_seed(0)
    block = BlockwiseMaskGenerator(grid, n, 16)(32, generator=g)
    rand = random_masking(32, 196, 78 / 196, generator=g).mask
    assert edges(block) < 0.5 * edges(rand)


def test_block_masks_are_seedable():
    gen = BlockwiseMaskGenerator((8, 8), 26, 4)
    a = gen(8, generator=torch.Generator().manual_seed(1))
    b = gen(8, generator=torch.Generator().manual_seed(1))
    c = gen(8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)  # without a generator: the global RNG, which the engine reseeds
    d = gen(8)
    torch.manual_seed(5)
    assert torch.equal(d, gen(8))


def test_impossible_block_limits_raise():
    with pytest.raises(ValueError, match="no rectangle"):
        BlockwiseMaskGenerator((4, 4), 8, min_patches=5, max_patches=6, aspect=(1.0, 1.0))
    assert block_shapes((4, 4), 4, 4, (1.0, 1.0)) == [(2, 2)]


def test_block_config_is_validated():
    base = ["data.synthetic=true", "model.img_size=32", "model.patch_size=8"]
    with pytest.raises(ConfigError, match="method.mask_type"):
        load_config(None, base + ["method.mask_type=block"])  # MAE drops patches: no blocks
    with pytest.raises(ConfigError, match="method.block_min_patches"):
        load_config(None, base + ["method.name=simmim", "method.mask_type=block",
                                  "method.block_min_patches=20"])  # 4x4 grid
    with pytest.raises(ConfigError, match="method.block_aspect"):
        load_config(None, base + ["method.name=simmim", "method.mask_type=block",
                                  "method.block_aspect=[2.0, 1.0]"])


def test_masked_indices_lists_the_masked_patches_in_order():
    mask = BlockwiseMaskGenerator((8, 8), 26, 4)(4, generator=torch.Generator().manual_seed(0))
    ids = masked_indices(mask, 26)
    for row, m in zip(ids, mask):
        assert row.tolist() == torch.nonzero(m).flatten().tolist()


def test_mask_token_replaces_exactly_the_masked_patches():
    cfg = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                      depth=1, num_heads=2)
    torch.manual_seed(0)
    enc = create_encoder(cfg, use_mask_token=True).eval()
    seen = []
    enc.vit.norm_pre.register_forward_hook(lambda mod, inp, out: seen.append(out))
    images = torch.randn(2, 3, 32, 32)
    mask = BlockwiseMaskGenerator((4, 4), 6, 2)(2, generator=torch.Generator().manual_seed(0))
    enc(images)
    enc(images, mask=mask)
    enc(torch.randn(2, 3, 32, 32), mask=mask)  # other pixels, same mask
    plain, masked, other = (t[:, enc.num_prefix_tokens:] for t in seen)
    assert torch.equal(masked[~mask], plain[~mask])  # visible patches untouched
    assert not torch.isclose(masked[mask], plain[mask]).all(dim=-1).any()
    assert torch.equal(masked[mask], other[mask])  # masked patches carry no pixel information
    pos = enc.vit.pos_embed[:, enc.num_prefix_tokens:].expand(2, -1, -1)
    expected = (enc.mask_token + pos)[mask]
    assert torch.allclose(masked[mask], expected)
