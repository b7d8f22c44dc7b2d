"""A one-stage detector on a plain ViT: timm encoder -> simple feature pyramid -> RetinaNet head.

After ViTDet (Li et al. 2022, arXiv 2203.16527): the ViT keeps its single-scale, stride-p
feature map; the pyramid is built from that last map alone (deconvolution for finer levels,
max-pooling for coarser ones), with no FPN top-down path. The dense head, anchors and box
coder are torchvision's RetinaNet parts; the losses are in :mod:`mim.losses`.

Padded batches and position embeddings: the ViT is built at ``img_size`` (the largest input
side), so its position table covers the largest padded batch. A smaller batch uses the table's
top-left ``h x w`` corner, not a resampled table: images are padded at the bottom and right,
so a pixel gets the same position code however much padding its batch has, and no
interpolation blurs the pretrained table per batch. Padded patches are masked out of attention
as keys, padded cells are zeroed before every spatial layer of the pyramid and head (so padding
looks like the image border), and anchors centred on padding are ignored in the loss and in the
predictions: an image's detections do not depend on how much its batch was padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from mim.models.encoder import create_vit, vit_blocks
from mim.models.init import InitReport, load_encoder_init


class ViTFeatureMap(nn.Module):
    """A timm ViT as a single-scale backbone: (B, C, H, W) + mask -> (B, D, H/p, W/p)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        if vit.pos_embed is None:
            raise ValueError("the detector needs a ViT with an absolute position embedding")
        vit.patch_embed.strict_img_size = False  # any size up to img_size, a multiple of p
        self.vit = vit

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        vit, p = self.vit, self.patch_size
        B, _, H, W = images.shape
        h, w = H // p, W // p
        Gh, Gw = vit.patch_embed.grid_size
        if h > Gh or w > Gw or H % p or W % p:
            raise ValueError(f"input {H}x{W} must be a multiple of the patch size {p} and fit "
                             f"in the model's {Gh * p}x{Gw * p}")
        P = vit.num_prefix_tokens
        pos = vit.pos_embed
        grid_pos = pos[:, 0 if vit.no_embed_class else P:].reshape(1, Gh, Gw, -1)
        x = vit.patch_embed(images) + grid_pos[:, :h, :w].reshape(1, h * w, -1)
        attn_mask = None
        if mask is not None:
            # a patch with any real pixel is a real token; padded tokens are never attended to
            real = F.max_pool2d(mask[:, None].float(), p).flatten(1) > 0  # (B, h*w)
            if not real.all():
                keys = torch.cat([real.new_ones(B, P), real], dim=1)
                attn_mask = keys[:, None, None, :]  # (B, 1, 1, N), True = attend
        x = vit_blocks(vit, x, attn_mask)
        return x[:, P:].transpose(1, 2).reshape(B, -1, h, w)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one map: per level, resample by ``scale`` (2 and 4: stride-2
    deconvolutions; 1/2, 1/4...: max-pooling), then 1x1 and 3x3 convolutions with LayerNorm.
    LayerNorm (per position) rather than GroupNorm keeps padding out of the statistics."""

    def __init__(self, in_dim: int, out_dim: int, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.resample, self.project = nn.ModuleList(), nn.ModuleList()
        for s in self.scales:
            layers: list[nn.Module] = []
            dim = in_dim
            if s >= 2:
                for i in range(int(s).bit_length() - 1):
                    if i:
                        layers += [LayerNorm2d(dim), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
                    dim //= 2
            elif s < 1:
                k = round(1 / s)
                layers.append(nn.MaxPool2d(k, stride=k))
            self.resample.append(nn.Sequential(*layers))
            self.project.append(nn.Sequential(
                nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim)))

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
        """x (B, D, h, w) -> one map per scale; ``masks[i]`` (B, 1, H_i, W_i), 1 on real cells,
        zeroes the padding before the spatial layers (the deconvolutions do not overlap)."""
        out = []
        for i, (resample, project) in enumerate(zip(self.resample, self.project)):
            y = resample(x)
            if masks is not None:
                y = y * masks[i]
            y = project[1](project[0](y))
            if masks is not None:
                y = y * masks[i]
            y = project[3](project[2](y))
            out.append(y if masks is None else y * masks[i])
        return out


@dataclass
class DetectorOutput:
    """cls_logits (B, A, K); box_deltas (B, A, 4) against ``anchors`` (A, 4) xyxy pixels of
    the padded batch; anchor_valid (B, A) bool, True where the anchor centre is a real pixel."""

    cls_logits: torch.Tensor
    box_deltas: torch.Tensor
    anchors: torch.Tensor
    anchor_valid: torch.Tensor


class DenseDetector(nn.Module):
    IGNORE, BACKGROUND = -2, -1

    def __init__(self, vit: VisionTransformer, num_classes: int, pyramid_dim: int = 256,
                 pyramid_scales: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25),
                 anchor_scale: float = 4.0, anchor_octaves: int = 3,
                 anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 fg_iou: float = 0.5, bg_iou: float = 0.4) -> None:
        super().__init__()
        self.backbone = ViTFeatureMap(vit)
        self.num_classes = num_classes
        self.pyramid = SimpleFeaturePyramid(self.backbone.embed_dim, pyramid_dim, pyramid_scales)
        p = self.backbone.patch_size
        self.strides = [int(p / s) for s in pyramid_scales]
        sizes = tuple(tuple(anchor_scale * st * 2 ** (i / anchor_octaves)
                            for i in range(anchor_octaves)) for st in self.strides)
        self.anchor_generator = AnchorGenerator(sizes, (tuple(anchor_ratios),) * len(sizes))
        num_anchors = anchor_octaves * len(anchor_ratios)
        self.head = RetinaNetHead(pyramid_dim, num_anchors, num_classes, norm_layer=LayerNorm2d)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.size_divisibility = max(self.strides)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> DetectorOutput:
        B, _, H, W = images.shape
        if mask is None:
            mask = images.new_ones(B, H, W, dtype=torch.bool)
        p = self.backbone.patch_size
        # a cell is real when any of its pixels is; padding is zeroed before spatial layers
        cells = {s: F.max_pool2d(mask[:, None].to(images.dtype), s) for s in {p, *self.strides}}
        features = self.backbone(images, mask) * cells[p]
        levels = self.pyramid(features, [cells[s] for s in self.strides])
        cls_logits, box_deltas = self._head(levels, [cells[s] for s in self.strides])
        # anchors in float32 whatever the autocast dtype (only the maps' sizes are read)
        sizes_only = [x.new_empty((0, 0, *x.shape[-2:]), dtype=torch.float32) for x in levels]
        anchors = self.anchor_generator(ImageList(images, [(H, W)] * B), sizes_only)[0]
        centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).long()
        cx, cy = centres[:, 0].clamp(0, W - 1), centres[:, 1].clamp(0, H - 1)
        return DetectorOutput(cls_logits, box_deltas, anchors, mask[:, cy, cx])

    def _head(self, levels: list[torch.Tensor], masks: list[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's RetinaNet head layers, with the padding zeroed before every 3x3
        convolution (so padding acts like the image border), flattened as torchvision does:
        (B, A*K, H, W) -> (B, H*W*A, K) with anchors ordered (y, x, anchor)."""
        cls_head, reg_head = self.head.classification_head, self.head.regression_head
        cls_out, reg_out = [], []
        for x, m in zip(levels, masks):
            c, r = x, x
            for cls_block, reg_block in zip(cls_head.conv, reg_head.conv):
                c, r = cls_block(c) * m, reg_block(r) * m
            for head_out, width, conv, y in ((cls_out, self.num_classes, cls_head.cls_logits, c),
                                             (reg_out, 4, reg_head.bbox_reg, r)):
                t = conv(y)
                B, _, h, w = t.shape
                head_out.append(t.view(B, -1, width, h, w).permute(0, 3, 4, 1, 2)
                                .reshape(B, -1, width))
        return torch.cat(cls_out, dim=1), torch.cat(reg_out, dim=1)

    @torch.no_grad()
    def assign(self, out: DetectorOutput, targets: list[dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per anchor: a class index (positive), BACKGROUND or IGNORE, and its matched box.

        Positives have IoU >= fg_iou with a box (or are a box's best anchor), negatives < bg_iou.
        Anchors between the thresholds, centred on padding, or overlapping a crowd region by
        bg_iou or more (unless positive) are ignored. Returns labels (B, A), boxes (B, A, 4).
        """
        anchors = out.anchors
        labels, boxes = [], []
        for b, t in enumerate(targets):
            crowd = t["iscrowd"].to(anchors.device)
            all_boxes = t["boxes"].to(anchors.device)
            gt, gt_labels = all_boxes[~crowd], t["labels"].to(anchors.device)[~crowd]
            lab = torch.full((len(anchors),), self.BACKGROUND, dtype=torch.long,
                             device=anchors.device)
            matched = torch.zeros_like(anchors)
            if len(gt):
                idx = self.matcher(box_iou(gt, anchors))
                fg = idx >= 0
                lab[fg] = gt_labels[idx[fg]]
                lab[idx == det_utils.Matcher.BETWEEN_THRESHOLDS] = self.IGNORE
                matched[fg] = gt[idx[fg]]
            if crowd.any():
                near_crowd = box_iou(all_boxes[crowd], anchors).amax(0)
                lab[(near_crowd >= self.matcher.low_threshold) & (lab < 0)] = self.IGNORE
            lab[~out.anchor_valid[b]] = self.IGNORE
            labels.append(lab)
            boxes.append(matched)
        return torch.stack(labels), torch.stack(boxes)

    @torch.no_grad()
    def postprocess(self, out: DetectorOutput, sizes: torch.Tensor, score_thresh: float = 0.05,
                    nms_iou: float = 0.5, topk_candidates: int = 1000, max_detections: int = 100
                    ) -> list[dict[str, torch.Tensor]]:
        """Per image: scores above ``score_thresh`` on real anchors, the ``topk_candidates`` best,
        decoded and clipped to the (resized) image ``sizes`` (B, 2) as (h, w), class-wise NMS,
        at most ``max_detections``. Boxes are in the resized image's pixels."""
        K = self.num_classes
        results = []
        for b in range(out.cls_logits.shape[0]):
            scores = out.cls_logits[b].float().sigmoid() * out.anchor_valid[b, :, None]
            flat = scores.flatten()
            idx = torch.nonzero(flat > score_thresh).squeeze(1)
            top, order = flat[idx].topk(min(topk_candidates, len(idx)))
            idx = idx[order]
            anchor_idx, labels = idx // K, idx % K
            boxes = self.box_coder.decode_single(out.box_deltas[b, anchor_idx].float(),
                                                 out.anchors[anchor_idx])
            boxes = clip_boxes_to_image(boxes, tuple(int(v) for v in sizes[b]))
            keep = batched_nms(boxes, top, labels, nms_iou)[:max_detections]
            results.append({"boxes": boxes[keep], "scores": top[keep], "labels": labels[keep]})
        return results

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.vit.{n}" for n in self.backbone.vit.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for timm's layer-wise lr decay, as timm's own ViT: embeddings 0, block i ->
        i + 1 (the final norm with the last block); the pyramid and head get the full lr."""
        return dict(stem=r"^backbone\.vit\.(?:cls_token|reg_token|pos_embed|patch_embed)",
                    blocks=[(r"^backbone\.vit\.blocks\.(\d+)", None),
                            (r"^backbone\.vit\.norm", (99999,))])


def build_detector(cfg: Any, num_classes: int, load_init: bool = True
                   ) -> tuple[DenseDetector, InitReport]:
    """The detector ``cfg`` (a DetectConfig) describes, its encoder initialised from
    ``cfg.init`` as in classification fine-tuning (position table resampled to the grid)."""
    m = cfg.model
    vit = create_vit(m)
    report = (load_encoder_init(vit, cfg.init, cfg.init_file, cfg.init_strict) if load_init
              else InitReport(kind="scratch", source=""))
    model = DenseDetector(vit, num_classes, m.pyramid_dim, tuple(m.pyramid_scales),
                          m.anchor_scale, m.anchor_octaves, tuple(m.anchor_ratios),
                          cfg.loss.fg_iou, cfg.loss.bg_iou)
    return model, report
