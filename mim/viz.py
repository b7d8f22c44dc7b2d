"""Pictures of what a pretraining learned (one row per image) and of what a detector finds
(predicted and ground-truth boxes).

Pixel methods (MAE, SimMIM): original | masked | reconstruction. Token methods: the tokenizer
shows original | its code map | the image decoded from the codes; BEiT shows original | masked |
the tokenizer's codes | the codes it predicts at the masked patches | those codes decoded.
Code maps paint each code id in a fixed colour.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from mim.patching import patchify, unpatchify


def _fixed_masking(model, batch_size: int, device: torch.device, seed: int):
    """The same masks at every call, so grids from different epochs compare like with like."""
    return model.sample_mask(batch_size, device, generator=torch.Generator().manual_seed(seed))


def _norm(mean, std, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return mean_t, std_t


def _masked_view(images: torch.Tensor, mask: torch.Tensor, enc, mean_t, std_t) -> torch.Tensor:
    patches = patchify(images.float(), enc.patch_size)
    gray = patchify(((0.5 - mean_t) / std_t).expand_as(images).float(), enc.patch_size)
    return unpatchify(torch.where(mask.unsqueeze(-1), gray, patches), enc.patch_size,
                      enc.grid_size, enc.in_chans)


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor:
    """A (3, H', W') image grid for a pretrainer with ``reconstruct``."""
    enc = model.encoder
    out = model(images, masking=_fixed_masking(model, images.shape[0], images.device, seed))
    pred = model.reconstruct(images, out)  # (B, L, p*p*C), normalised-image units
    mean_t, std_t = _norm(mean, std, images)
    patches = patchify(images.float(), enc.patch_size)
    m = out.mask.unsqueeze(-1)
    recon = unpatchify(torch.where(m, pred, patches), enc.patch_size, enc.grid_size, enc.in_chans)
    masked = _masked_view(images, out.mask, enc, mean_t, std_t)
    rows = torch.stack([images.float(), masked, recon], dim=1).flatten(0, 1)
    rows = (rows * std_t + mean_t).clamp(0, 1)
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)


def code_palette(num_codes: int) -> torch.Tensor:
    """(num_codes, 3) fixed random colours in [0.1, 0.9]: the same code, the same colour."""
    g = torch.Generator().manual_seed(1234)
    return 0.1 + 0.8 * torch.rand(num_codes, 3, generator=g)


def code_map(codes: torch.Tensor, grid_size: tuple[int, int], patch_size: int,
             num_codes: int) -> torch.Tensor:
    """Code ids (B, L) -> an RGB picture (B, 3, H, W) with one flat colour per patch."""
    colours = code_palette(num_codes).to(codes.device)[codes]  # (B, L, 3)
    gh, gw = grid_size
    pic = colours.view(-1, gh, gw, 3).permute(0, 3, 1, 2)
    return pic.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


@torch.no_grad()
def token_grid(model, images: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor:
    """A grid for the tokenizer (3 columns) or BEiT (5 columns); see the module docstring."""
    mean_t, std_t = _norm(mean, std, images)
    tok = getattr(model, "tokenizer", model)
    enc = tok.encoder
    shape = (enc.patch_size, enc.grid_size, enc.in_chans)

    def to_unit(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * std_t + mean_t).clamp(0, 1)

    def codes_pic(codes: torch.Tensor) -> torch.Tensor:
        return code_map(codes, enc.grid_size, enc.patch_size, tok.codebook_size)

    if tok is model:  # the tokenizer itself
        codes = tok.encode(images)
        cols = [to_unit(images), codes_pic(codes), to_unit(unpatchify(tok.decode(codes), *shape))]
    else:  # BEiT: the decoder of the tokenizer renders the predicted codes
        out = model(images, masking=_fixed_masking(model, images.shape[0], images.device, seed))
        pred = model.predicted_codes(out)
        decoded = (unpatchify(tok.decode(pred), *shape) - model.tok_shift) / model.tok_scale
        cols = [to_unit(images), to_unit(_masked_view(images, out.mask, enc, mean_t, std_t)),
                codes_pic(out.target), codes_pic(pred), to_unit(decoded)]
    rows = torch.stack(cols, dim=1).flatten(0, 1)
    return make_grid(rows.cpu(), nrow=len(cols), padding=2, pad_value=1.0)


def pretrain_grid(model, images: torch.Tensor, mean, std, seed: int = 0) -> torch.Tensor | None:
    """The picture that fits ``model`` (its ``picture``), or None when it has nothing to show."""
    return model.picture(images, mean, std, seed)


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
        x = draw_predictions(x, pred["boxes"].cpu().float() * zoom, pred["scores"].cpu(),
                             [class_names[int(c)] for c in pred["labels"].cpu()], score_thresh)
        tiles.append(x.float() / 255)
    return make_grid(torch.stack(tiles), nrow=min(4, len(tiles)), padding=4, pad_value=1.0)


def draw_predictions(image: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                     names: list[str], score_thresh: float, width: int = 1) -> torch.Tensor:
    """Boxes (N, 4 xyxy) scoring >= ``score_thresh`` on a uint8 (3, H, W) image, in red with
    "name score"."""
    from torchvision.utils import draw_bounding_boxes

    keep = scores >= score_thresh
    if not keep.any():
        return image
    labels = [f"{n} {float(s):.2f}" for n, s, k in zip(names, scores, keep) if k]
    return draw_bounding_boxes(image, boxes[keep], labels, colors="red", width=width)
