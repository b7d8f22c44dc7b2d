"""Pictures: what a pretraining learned (original | masked | reconstruction, one row per image)
and what a detector finds (predicted and ground-truth boxes)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from mim.masking import random_masking
from mim.patching import patchify, unpatchify


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor:
    """A (3, H', W') image grid for a pretrainer with ``reconstruct``; the same fixed masks at
    every call (``seed``), so grids from different epochs compare like with like."""
    enc = model.encoder
    B = images.shape[0]
    g = torch.Generator().manual_seed(seed)
    masking = random_masking(B, enc.num_patches, model.mask_ratio, "cpu", generator=g)
    masking.ids_keep, masking.ids_restore, masking.mask = (
        t.to(images.device) for t in (masking.ids_keep, masking.ids_restore, masking.mask))
    out = model(images, masking=masking)
    pred = model.reconstruct(images, out)  # (B, L, p*p*C), normalised-image units
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    patches = patchify(images.float(), enc.patch_size)
    gray = patchify(((0.5 - mean_t) / std_t).expand_as(images).float(), enc.patch_size)
    m = out.mask.unsqueeze(-1)
    shape = (enc.patch_size, enc.grid_size, enc.in_chans)
    masked = unpatchify(torch.where(m, gray, patches), *shape)
    recon = unpatchify(torch.where(m, pred, patches), *shape)
    rows = torch.stack([images.float(), masked, recon], dim=1).flatten(0, 1)
    rows = (rows * std_t + mean_t).clamp(0, 1)
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))


@torch.no_grad()
def detection_grid(images: torch.Tensor, mean, std, predictions: list[dict], targets: list[dict],
                   class_names: list[str], score_thresh: float, min_side: int = 256) -> torch.Tensor:
    """A (3, H', W') grid of a padded batch (B, 3, H, W, normalised) with ground-truth boxes
    (green, class name) and predictions scoring >= ``score_thresh`` (red, "name score").
    Small images are enlarged (nearest) so the labels stay readable."""
    from torchvision.utils import draw_bounding_boxes

    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    zoom = max(1, min_side // max(images.shape[-2:]))
    tiles = []
    for img, pred, tgt in zip(images.cpu().float(), predictions, targets):
        x = ((img * std_t + mean_t).clamp(0, 1) * 255).to(torch.uint8)
        if zoom > 1:
            x = x.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
        if len(tgt["boxes"]):
            x = draw_bounding_boxes(x, tgt["boxes"].cpu().float() * zoom,
                                    [class_names[int(c)] for c in tgt["labels"]],
                                    colors="lime", width=2)
        keep = pred["scores"].cpu() >= score_thresh
        if keep.any():
            names = [f"{class_names[int(c)]} {float(s):.2f}"
                     for c, s in zip(pred["labels"].cpu()[keep], pred["scores"].cpu()[keep])]
            x = draw_bounding_boxes(x, pred["boxes"].cpu().float()[keep] * zoom, names,
                                    colors="red", width=1)
        tiles.append(x.float() / 255)
    return make_grid(torch.stack(tiles), nrow=min(4, len(tiles)), padding=4, pad_value=1.0)
