import pytest
import torch

from mim.masking import gather_tokens, num_masked_patches, random_masking
from mim.patching import patchify, unpatchify


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (196, 0.75), (49, 0.6), (64, 0.4), (10, 0.95)])
def test_random_masking_exact_count_per_sample(L, ratio):
    m = random_masking(8, L, ratio, generator=torch.Generator().manual_seed(0))
    n_mask = num_masked_patches(L, ratio)
    assert n_mask == min(max(round(L * ratio), 1), L - 1)
    assert m.mask.shape == (8, L) and m.mask.dtype == torch.bool
    assert (m.mask.sum(1) == n_mask).all()
    assert m.ids_keep.shape == (8, L - n_mask)
    # kept indices are exactly the unmasked positions
    assert not torch.gather(m.mask, 1, m.ids_keep).any()
    # different samples get different masks
    assert len({tuple(row.tolist()) for row in m.mask}) > 1


def test_restore_puts_tokens_back_in_patch_order():
    B, L, D = 4, 16, 3
    x = torch.arange(B * L * D, dtype=torch.float32).view(B, L, D)
    m = random_masking(B, L, 0.75, generator=torch.Generator().manual_seed(1))
    kept = gather_tokens(x, m.ids_keep)
    masked_ids = torch.argsort(m.mask.float(), dim=1, stable=True)[:, L - m.mask.sum(1)[0]:]
    filler = gather_tokens(x, torch.sort(masked_ids, dim=1).values)
    # the decoder's [kept, filler] sequence restored by ids_restore must equal the original when
    # the filler holds the masked tokens in shuffle order
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    seq = gather_tokens(x, ids_shuffle)
    assert torch.equal(seq[:, : kept.shape[1]], kept)
    assert torch.equal(gather_tokens(seq, m.ids_restore), x)
    assert filler.shape[1] == L - kept.shape[1]


def test_random_masking_seeded():
    a = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(5))
    b = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("p,c,h,w", [(4, 3, 32, 32), (8, 1, 16, 24), (16, 3, 64, 48)])
def test_patchify_round_trip(p, c, h, w):
    x = torch.randn(2, c, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), c), x)


def test_patchify_pixel_order_is_p_q_c():
    x = torch.randn(1, 3, 8, 8)
    patches = patchify(x, 4)
    # patch 1 is the top-right block; within it pixel (row i, col j) channel k sits at (i*4+j)*3+k
    block = x[0, :, 0:4, 4:8]
    expected = block.permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)


def test_patchify_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple of patch size"):
        patchify(torch.zeros(1, 3, 30, 32), 8)
