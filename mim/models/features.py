"""Embeddings of an image source with a frozen encoder, each image embedded once across processes.

Process ``r`` of ``W`` embeds images ``r, r + W, ...`` (no padding, no repeats); the features are
then gathered so that every process holds all of them in the source's order. The encoder runs in
eval mode without gradients; its mode is restored afterwards.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist

from mim.data import build_epoch_loader
from mim.models.encoder import MaskedEncoder


def pooled_features(encoder: MaskedEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the mean of the normalised patch tokens (the fine-tuning
    classifier's ``global_pool=avg`` input)."""
    tokens = encoder(images)
    return tokens[:, encoder.num_prefix_tokens:].mean(dim=1)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_loader(source: Any, transform: Callable, batch_size: int, num_workers: int) -> Any:
    """This process's every-W-th image of ``source``, in order (an ``EpochLoader``)."""
    rank, world = rank_and_world()
    return build_epoch_loader(source, transform, batch_size=batch_size, num_workers=num_workers,
                              rank=rank, world_size=world, seed=0, shuffle=False,
                              drop_last=False)


@torch.no_grad()
def embed(encoder: MaskedEncoder, loader: Any, num_images: int, device: torch.device,
          autocast: Callable[[], Any] = nullcontext) -> torch.Tensor:
    """Features (num_images, D), float32 on the CPU, of the images a :func:`shard_loader` of
    ``num_images`` images yields on each process, gathered in the source's order."""
    was_training = encoder.training
    encoder.eval()
    try:
        parts = []
        for batch in loader.epoch(0):
            with autocast():
                parts.append(pooled_features(encoder, batch["image"].to(device)).float())
    finally:
        encoder.train(was_training)
    local = torch.cat(parts) if parts else torch.zeros(0, encoder.embed_dim, device=device)
    return gather_interleaved(local, num_images).cpu()


def gather_interleaved(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows ``r, r + W, ...`` held by process ``r`` -> all ``total`` rows on every process."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    most = -(-total // world)
    padded = local.new_zeros(most, *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = local.new_empty(total, *local.shape[1:])
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, total, world))]
    return out
