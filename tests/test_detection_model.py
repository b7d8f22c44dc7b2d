"""The detector: pyramid shapes, padding invariance, target assignment, layer decay, init."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from mim.config import load_config
from mim.engine.optim import build_optimizer
from mim.models.detector import DenseDetector, SimpleFeaturePyramid, build_detector

TINY = ["model.arch=vit_tiny_patch16_224", "model.img_size=64", "model.patch_size=8",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pyramid_dim=16",
        "data.synthetic=true"]


def _detector(*extra, num_classes=3):
    torch.manual_seed(0)
    return build_detector(load_config(None, TINY + list(extra), job="detect"), num_classes)[0]


@pytest.mark.parametrize("h,w", [(64, 64), (64, 128), (128, 64), (192, 128)])
def test_pyramid_levels_have_strides_8_16_32_64_for_16px_patches(h, w):
    pyramid = SimpleFeaturePyramid(24, 16, (2.0, 1.0, 0.5, 0.25))
    levels = pyramid(torch.randn(2, 24, h // 16, w // 16))
    assert [tuple(x.shape) for x in levels] == [(2, 16, h // s, w // s) for s in (8, 16, 32, 64)]


@pytest.mark.parametrize("h,w", [(64, 64), (32, 64), (64, 32)])
def test_detector_output_shapes(h, w):
    model = _detector("model.pyramid_scales=[4,2,1,0.5,0.25]", "model.anchor_octaves=2",
                      "model.anchor_ratios=[1.0]")
    assert model.strides == [2, 4, 8, 16, 32] and model.size_divisibility == 32
    out = model(torch.randn(2, 3, h, w))
    A = sum((h // s) * (w // s) for s in model.strides) * 2
    assert out.cls_logits.shape == (2, A, 3) and out.box_deltas.shape == (2, A, 4)
    assert out.anchors.shape == (A, 4) and out.anchor_valid.all()
    with pytest.raises(ValueError, match="fit in the model"):
        model(torch.randn(1, 3, 96, 64))


def test_an_image_gets_the_same_detections_alone_or_padded_in_a_batch():
    model = _detector().eval()
    small = torch.randn(1, 3, 32, 24)
    alone = torch.zeros(1, 3, 32, 32)
    alone[..., :24] = small
    mask_alone = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask_alone[..., :24] = True
    batch = torch.zeros(2, 3, 64, 64)
    batch[0, :, :32, :24] = small
    batch[1] = torch.randn(3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, :32, :24] = True
    mask[1] = True
    with torch.no_grad():
        a, b = model(alone, mask_alone), model(batch, mask)
    for (la, lb) in ((a, b),):
        keep_a, keep_b = la.anchor_valid[0], lb.anchor_valid[0]
        assert keep_a.sum() == keep_b.sum() > 0
        # the same anchors, in the same order, lie on the image in both layouts
        assert torch.equal(la.anchors[keep_a], lb.anchors[keep_b])
        assert torch.allclose(la.cls_logits[0, keep_a], lb.cls_logits[0, keep_b], atol=1e-4)
        assert torch.allclose(la.box_deltas[0, keep_a], lb.box_deltas[0, keep_b], atol=1e-4)
    # without the mask, padding leaks into the image's features
    with torch.no_grad():
        leaky = model(batch)
    assert not torch.allclose(leaky.cls_logits[0, b.anchor_valid[0]],
                              b.cls_logits[0, b.anchor_valid[0]], atol=1e-4)


def test_assign_ignores_padding_crowd_and_in_between_anchors():
    model = _detector()
    images = torch.zeros(2, 3, 64, 64)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    mask[1, :, 32:] = False
    out = model(images, mask)
    targets = [{"boxes": torch.tensor([[8.0, 8, 24, 24], [30, 30, 62, 62]]),
                "labels": torch.tensor([2, 0]), "iscrowd": torch.tensor([False, True])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "iscrowd": torch.zeros(0, dtype=torch.bool)}]
    labels, boxes = model.assign(out, targets)
    pos = labels[0] >= 0
    assert pos.any() and (labels[0][pos] == 2).all()
    assert torch.equal(boxes[0][pos], torch.tensor([[8.0, 8, 24, 24]]).expand(int(pos.sum()), 4))
    from torchvision.ops import box_iou
    crowd_iou = box_iou(targets[0]["boxes"][1:], out.anchors)[0]
    assert (labels[0][crowd_iou >= 0.4] < 0).all()  # near the crowd: ignored, never background
    assert (labels[0][(crowd_iou >= 0.4) & ~pos] == DenseDetector.IGNORE).all()
    # the empty image: background on real pixels, ignored on padding
    assert (labels[1][out.anchor_valid[1]] == DenseDetector.BACKGROUND).all()
    assert (labels[1][~out.anchor_valid[1]] == DenseDetector.IGNORE).all()
    assert (~out.anchor_valid[1]).any()


def test_layer_decay_scales_encoder_blocks_only():
    model = _detector()
    cfg = load_config(None, TINY + ["optim.layer_decay=0.5"], job="detect")
    opt = build_optimizer(model, cfg, 1e-3, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
    # as timm's ViT: embeddings 0, blocks 1-2 (final norm with the last), the rest 3 (full lr)
    assert scale["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.5 ** 3)
    assert scale["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 2)
    assert scale["backbone.vit.blocks.1.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["backbone.vit.norm.weight"] == pytest.approx(0.5)
    assert scale["head.classification_head.cls_logits.weight"] == 1.0
    assert scale["pyramid.project.0.0.weight"] == 1.0


def test_init_from_an_encoder_file_resamples_position_embedding(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=5)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(tmp_path / "encoder.safetensors"))
    cfg = load_config(None, TINY + [f"init={tmp_path}"], job="detect")
    model, report = build_detector(cfg, 3)
    got = model.backbone.vit
    assert torch.equal(got.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert got.pos_embed.shape == (1, 1 + 64, 32) and "head.weight" in report.unexpected
    assert report.adapted and report.adapted[0].startswith("pos_embed")
    assert torch.allclose(got.pos_embed[:, 0], vit.pos_embed[:, 0])  # class token row kept


def test_anchors_stay_float32_under_bf16_autocast():
    model = _detector()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.anchors.dtype == torch.float32 and out.cls_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.cls_logits.float()).all()
    ref = model(torch.randn(2, 3, 64, 64)).anchors
    assert torch.equal(out.anchors, ref)
