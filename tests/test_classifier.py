"""The ViT classifier: recipes (freezing, layer decay, dropout schedule) and the timm export."""

import pytest
import timm
import torch
from torch import nn

from mim import load_config
from mim.engine.optim import build_optimizer
from mim.models.classifier import (DropoutSchedule, build_classifier, dropout_scale,
                                   export_classifier)
from tests.conftest import REPO

TINY_FT = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
           "model.embed_dim=32", "model.depth=4", "model.num_heads=2", "data.synthetic=true"]


def cfg(*extra):
    return load_config(None, TINY_FT + list(extra), job="finetune")


def timm_logits_match(tmp_path, c, model, num_classes):
    export_classifier(model, c, num_classes, tmp_path)
    m = c.model
    kw = dict(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
              num_heads=m.num_heads, global_pool=m.global_pool, num_classes=num_classes)
    file = str(tmp_path / "model.safetensors")
    from_file = timm.create_model(m.arch, pretrained=True, **kw, pretrained_cfg_overlay=dict(
        file=file, num_classes=num_classes, custom_load=False)).eval()
    from_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ours = model(x)
        for loaded in (from_file, from_dir):
            assert torch.allclose(loaded(x), ours, atol=1e-5), (ours, loaded(x))


def test_full_finetune_export_gives_the_same_logits_in_timm(tmp_path):
    c = cfg("model.global_pool=avg", "model.head_init_std=0.5")
    model, _ = build_classifier(c, num_classes=7)
    assert isinstance(model.fc_norm, nn.LayerNorm) and isinstance(model.norm, nn.Identity)
    timm_logits_match(tmp_path, c, model, 7)


def test_linear_probe_batchnorm_head_is_folded_for_timm(tmp_path):
    c = cfg("tune.mode=linear", "model.head_batchnorm=true", "model.global_pool=token",
            "model.head_init_std=0.5")
    model, _ = build_classifier(c, num_classes=4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight",
                                                                            "head.1.bias"]
    model.train()
    with torch.no_grad():  # give the BatchNorm real running statistics
        for _ in range(5):
            model(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert model.head[0].running_var.mean() != 1.0
    timm_logits_match(tmp_path, c, model, 4)


def test_partial_finetune_trains_the_last_blocks():
    model, _ = build_classifier(cfg("tune.mode=partial", "tune.blocks=2"), num_classes=3)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.2", "blocks.3", "fc_norm", "head"}
    with pytest.raises(Exception, match="tune.blocks"):
        build_classifier(cfg("tune.mode=partial", "tune.blocks=5"), num_classes=3)


def test_layer_decay_groups_scale_lr_by_depth():
    c = cfg("optim.weight_decay=0.05")
    model, _ = build_classifier(c, num_classes=3)
    opt = build_optimizer(model, c, lr=1.0, layer_decay=0.5)
    scale_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale_of[p] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    # 4 blocks: stem = layer 0, block i = layer i + 1, head and final norms = layer 5
    assert scale_of[named["patch_embed.proj.weight"]] == (0.5 ** 5, 0.05)
    assert scale_of[named["pos_embed"]] == (0.5 ** 5, 0.0)
    for i in range(4):
        assert scale_of[named[f"blocks.{i}.attn.qkv.weight"]] == (0.5 ** (4 - i), 0.05)
        assert scale_of[named[f"blocks.{i}.norm1.weight"]][1] == 0.0
    assert scale_of[named["head.weight"]] == (1.0, 0.05)
    assert scale_of[named["fc_norm.bias"]] == (1.0, 0.0)


def test_dropout_schedule_switches_at_epoch_e():
    assert [dropout_scale("early", e, 3) for e in range(5)] == [1, 1, 1, 0, 0]
    assert [dropout_scale("late", e, 3) for e in range(5)] == [0, 0, 0, 1, 1]
    assert [dropout_scale("constant", e, 3) for e in range(5)] == [1] * 5
    c = cfg("dropout.rate=0.2", "model.drop_path_rate=0.3", "dropout.schedule=late",
            "dropout.epochs=2", "train.epochs=4")
    model, _ = build_classifier(c, num_classes=3)
    schedule = DropoutSchedule(model, c.dropout.schedule, c.dropout.epochs)
    block = model.blocks[3]
    for epoch, on in [(0, False), (1, False), (2, True), (3, True)]:
        schedule.set_epoch(epoch)
        assert block.mlp.drop1.p == (0.2 if on else 0.0), epoch
        assert block.drop_path1.drop_prob == pytest.approx(0.3 if on else 0.0), epoch
        assert model.pos_drop.p == (0.2 if on else 0.0)
    model.train()  # with everything off, training-mode forwards are deterministic
    schedule.set_epoch(0)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_finetune_config_is_valid(path):
    # the data source is swapped for the synthetic set: the recipes' datasets are not here
    c = load_config(path, ["data.name=", "data.path=", "data.synthetic=true"], job="finetune")
    assert c.run.name and c.train.epochs > 0
