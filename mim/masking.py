"""Patch masks for masked image modeling, as pure seedable functions.

One convention everywhere: a boolean mask of shape (B, L) with True = masked (hidden from the
encoder, predicted by the method). The drop path (MAE) also needs the indices of the kept
patches and the permutation that puts a (kept + masked) sequence back in patch order. Two
generators: uniform random (:func:`random_masking`) and BEiT's blockwise
(:class:`BlockwiseMaskGenerator`); both mask exactly ``num_masked_patches(L, ratio)`` per sample.
"""

from __future__ import annotations

import math
import random
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


def masked_indices(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(B, num_masked) indices of the masked patches of ``mask`` (B, L), in patch order.

    Every row must mask exactly ``num_masked`` patches (both generators here guarantee it); the
    indices come from a stable sort, so no host synchronisation is needed.
    """
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    return order[:, :num_masked]


def block_shapes(grid_size: tuple[int, int], min_patches: int, max_patches: int,
                 aspect: tuple[float, float]) -> list[tuple[int, int]]:
    """Every (height, width) in patches that fits the grid with ``min <= h*w <= max`` and
    ``aspect[0] <= h/w <= aspect[1]`` (tiny ratio slack for floating point)."""
    gh, gw = grid_size
    lo, hi = aspect
    return [(h, w) for h in range(1, gh + 1) for w in range(1, gw + 1)
            if min_patches <= h * w <= max_patches and lo - 1e-9 <= h / w <= hi + 1e-9]


class BlockwiseMaskGenerator:
    """BEiT's blockwise masking (Bao et al. 2021, arXiv 2106.08254, Algorithm 1), made exact.

    Rectangles of random area (uniform from ``min_patches`` up to ``max_patches`` or what is
    left to mask) and aspect ratio (log-uniform in ``aspect``) are dropped at random places;
    one is kept when the patches it newly masks do not overshoot the target. The rounded
    rectangle is snapped to the nearest allowed integer shape, so every block respects the
    limits exactly. When no block fits after ``max_attempts`` tries in a row (what is left is
    smaller than the smallest block), the rest is taken from a further allowed rectangle: its
    unmasked patches nearest to its centre (BEiT would stop short instead). Every sample
    therefore has exactly ``num_masked`` masked patches, all inside rectangles of allowed
    shape; only the last rectangle may be partly filled.

    The random draws come from ``generator`` or, without one, the global torch RNG (which the
    engine reseeds every step): one seed per sample, then a Python RNG for the placement loop.
    Output: bool (B, L) on ``device``, True = masked, patches in row-major order.
    """

    def __init__(self, grid_size: tuple[int, int], num_masked: int, min_patches: int = 16,
                 max_patches: int = 0, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                 max_attempts: int = 10) -> None:
        gh, gw = grid_size
        if not 0 < num_masked < gh * gw:
            raise ValueError(f"num_masked must be in (0, {gh * gw}), got {num_masked}")
        if min_patches < 1 or not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"bad block limits: min_patches={min_patches}, aspect={aspect}")
        self.grid_size = (gh, gw)
        self.num_masked = num_masked
        self.min_patches = min_patches
        self.max_patches = max_patches or num_masked
        self.aspect = aspect
        self.max_attempts = max_attempts
        self.shapes = block_shapes(self.grid_size, min_patches, self.max_patches, aspect)
        if not self.shapes:
            raise ValueError(f"no rectangle of {min_patches}..{self.max_patches} patches with "
                             f"aspect ratio in {aspect} fits a {gh}x{gw} patch grid")
        self._allowed = set(self.shapes)
        self._log_shapes = [(math.log(h), math.log(w)) for h, w in self.shapes]
        self._places = [(t, lft, h, w) for h, w in self.shapes
                        for t in range(gh - h + 1) for lft in range(gw - w + 1)]

    def __call__(self, batch_size: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
        masks = [self.sample(random.Random(s))[0] for s in seeds]
        return torch.tensor(masks, dtype=torch.bool).view(batch_size, -1).to(device)

    def _shape(self, rng: random.Random, remaining: int) -> tuple[int, int]:
        """BEiT's draw (area up to what is left to mask, log-uniform aspect), snapped to the
        nearest allowed shape in log space."""
        hi = max(self.min_patches, min(self.max_patches, remaining))
        area = rng.uniform(self.min_patches, hi)
        log_aspect = rng.uniform(math.log(self.aspect[0]), math.log(self.aspect[1]))
        lh, lw = (math.log(area) + log_aspect) / 2, (math.log(area) - log_aspect) / 2
        rounded = (round(math.exp(lh)), round(math.exp(lw)))
        if rounded in self._allowed:
            return rounded
        best = min(range(len(self.shapes)), key=lambda k: abs(self._log_shapes[k][0] - lh)
                   + abs(self._log_shapes[k][1] - lw))
        return self.shapes[best]

    def sample(self, rng: random.Random) -> tuple[list[bool], list[tuple[int, int, int, int]]]:
        """One mask as a flat row-major list, and its blocks as (top, left, height, width)."""
        gh, gw = self.grid_size
        masked = [[False] * gw for _ in range(gh)]
        count, blocks, fails = 0, [], 0
        while count < self.num_masked and fails < self.max_attempts:
            h, w = self._shape(rng, self.num_masked - count)
            top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
            cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)
                     if not masked[i][j]]
            if 0 < len(cells) <= self.num_masked - count:
                for i, j in cells:
                    masked[i][j] = True
                count += len(cells)
                blocks.append((top, left, h, w))
                fails = 0
            else:
                fails += 1
        if count < self.num_masked:
            self._fill(masked, self.num_masked - count, rng, blocks)
        return [m for row in masked for m in row], blocks

    def _fill(self, masked: list[list[bool]], need: int, rng: random.Random,
              blocks: list[tuple[int, int, int, int]]) -> None:
        """Mask ``need`` more patches with allowed rectangles: a random one with room for all of
        them (its free patches nearest its centre), else the roomiest one, until done."""
        done = 0
        while done < need:
            tries = [rng.choice(self._places) for _ in range(64)] + self._places
            best, best_free = tries[0], []
            for top, left, h, w in tries:
                free = [(i, j) for i in range(top, top + h) for j in range(left, left + w)
                        if not masked[i][j]]
                if len(free) > len(best_free):
                    best, best_free = (top, left, h, w), free
                if len(free) >= need - done:
                    break
            top, left, h, w = best
            cy, cx = top + (h - 1) / 2, left + (w - 1) / 2
            best_free.sort(key=lambda ij: (ij[0] - cy) ** 2 + (ij[1] - cx) ** 2)
            for i, j in best_free[: need - done]:
                masked[i][j] = True
            done += min(len(best_free), need - done)
            blocks.append(best)
