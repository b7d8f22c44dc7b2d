"""Patch masks for masked image modeling, as pure seedable functions.

One convention everywhere: a boolean mask of shape (B, L) with True = masked (hidden from the
encoder, predicted by the method). The drop path (MAE) also needs the indices of the kept
patches and the permutation that puts a (kept + masked) sequence back in patch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RandomMask:
    """Output of :func:`random_masking` for a batch of B images of L patches each.

    ids_keep:    (B, L_keep) indices of visible patches, in the order the encoder sees them.
    ids_restore: (B, L) where sequence position j of ``cat(kept, masked)`` goes back to patch order.
    mask:        (B, L) bool, True = masked, in patch order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Exactly round(L * ratio), kept within [1, L - 1] so both sides are non-empty."""
    n = int(round(num_patches * mask_ratio))
    return min(max(n, 1), num_patches - 1)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> RandomMask:
    """Per-sample uniform random masking by argsort of noise (MAE, He et al. 2021).

    Every sample gets exactly ``num_masked_patches(L, ratio)`` masked patches. Runs on ``device``
    with no host synchronisation.
    """
    num_keep = num_patches - num_masked_patches(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first num_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    mask[:, :num_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens ``ids`` (B, K) from ``x`` (B, L, D) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
