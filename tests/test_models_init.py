"""load_encoder_init: every kind of ``init``, resampling, and the errors it must raise."""

import argparse
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from mim import load_config
from mim.config import ModelConfig
from mim.engine.pretrain import pretrain
from mim.models import create_vit
from mim.models.init import InitError, load_encoder_init

SMALL = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
             num_heads=2, pos_embed="learned")


def vit(num_classes: int = 5, **kw) -> torch.nn.Module:
    return create_vit(ModelConfig(**{**SMALL, **kw}), num_classes=num_classes, global_pool="avg")


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A real (tiny) mim MAE pretraining run: encoder.safetensors + checkpoints/step_*."""
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("pre")
    cfg = load_config(None, TINY + ["data.synthetic=true", "data.synthetic_size=64",
                                    f"run.output_dir={out}", "run.name=mae", "train.epochs=1",
                                    "optim.lr=1e-3", "model.pos_embed=sincos"])
    return pretrain(cfg)


def test_scratch_leaves_weights_alone():
    model = vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_encoder_init(model, "scratch")
    assert report.kind == "scratch" and report.loaded == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mim_run_dir_and_checkpoint_folder(pretrained_run):
    encoder = load_file(str(pretrained_run / "encoder.safetensors"))
    for init in (pretrained_run, pretrained_run / "encoder.safetensors",
                 next((pretrained_run / "checkpoints").iterdir())):
        model = vit()
        report = load_encoder_init(model, str(init))
        state = model.state_dict()
        for key in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
            assert torch.equal(state[key], encoder[key]), (init, key)
        # a classifier with global pooling has a new head and fc_norm; the final norm is unused
        assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                          "head.weight"]
        assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]
    assert report.kind == "mim" and any(k.startswith("decoder.") for k in report.dropped)


def fake_mae_pth(path: Path, **kw) -> dict:
    """An official-MAE-layout checkpoint: the encoder keys plus decoder_*/mask_token, and the
    argparse args MAE stores next to the model."""
    state = vit(num_classes=0, **kw).state_dict()
    d = state["cls_token"].shape[-1]
    full = dict(state, mask_token=torch.randn(1, 1, 16), decoder_embed=torch.randn(16, d),
                **{"decoder_pos_embed": torch.randn(1, 17, 16),
                   "decoder_blocks.0.norm1.weight": torch.ones(16),
                   "decoder_pred.weight": torch.randn(192, 16)})
    torch.save({"model": full, "args": argparse.Namespace(blr=1.5e-4, epochs=800)}, path)
    return state


def test_official_mae_pth_drops_decoder_and_mask_token(tmp_path):
    state = fake_mae_pth(tmp_path / "mae_pretrain.pth")
    model = vit()
    report = load_encoder_init(model, str(tmp_path / "mae_pretrain.pth"))
    assert report.kind == "mae"
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight"} <= set(report.dropped)
    for key, value in state.items():
        if key in model.state_dict():
            assert torch.equal(model.state_dict()[key], value), key


def test_pos_embed_and_patch_kernel_are_resampled(tmp_path):
    state = fake_mae_pth(tmp_path / "mae.pth")  # 32 px, patch 8: a 4x4 grid
    bigger = vit(img_size=64)  # 8x8 grid
    report = load_encoder_init(bigger, str(tmp_path / "mae.pth"))
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[8, 8], num_prefix_tokens=1)
    assert torch.allclose(bigger.pos_embed.detach(), expected, atol=1e-6)
    assert torch.equal(bigger.pos_embed[:, 0], state["pos_embed"][:, 0])  # class row kept
    assert report.adapted == ["pos_embed (1, 17, 32) -> (1, 65, 32)"]
    finer = vit(patch_size=4)  # same image, patch 4: an 8x8 grid and 4x4 kernels
    report = load_encoder_init(finer, str(tmp_path / "mae.pth"))
    assert finer.patch_embed.proj.weight.shape == (32, 3, 4, 4)
    assert any(a.startswith("patch_embed.proj.weight (32, 3, 8, 8)") for a in report.adapted)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    fake_mae_pth(tmp_path / "mae.pth")
    with pytest.raises(InitError, match=r"'cls_token'.*\(1, 1, 32\).*\(1, 1, 48\)"):
        load_encoder_init(vit(embed_dim=48), str(tmp_path / "mae.pth"))


def test_head_of_another_size_is_dropped(tmp_path):
    ten = vit(num_classes=10)
    save_file(ten.state_dict(), str(tmp_path / "cls10.safetensors"))
    five = vit(num_classes=5)
    report = load_encoder_init(five, str(tmp_path / "cls10.safetensors"))
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert any(d.startswith("head.weight (10, 32)") for d in report.dropped)
    same = vit(num_classes=10)
    load_encoder_init(same, str(tmp_path / "cls10.safetensors"))
    assert torch.equal(same.head.weight, ten.head.weight)


class NotAWeight:
    pass


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    torch.save({"model": vit().state_dict(), "extra": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(InitError, match="not a weights-only checkpoint"):
        load_encoder_init(vit(), str(tmp_path / "evil.pth"))


def tiny_beit(rel_pos: bool) -> torch.nn.Module:
    return timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=0, global_pool="token",
                             init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=rel_pos)


@pytest.mark.parametrize("layer_scale", [True, False])
def test_beit_pth_maps_to_the_same_function(tmp_path, layer_scale):
    torch.manual_seed(0)
    beit = tiny_beit(rel_pos=False).eval()
    with torch.no_grad():  # non-trivial biases and layer scales, as after pretraining
        for name, p in beit.named_parameters():
            if name.endswith(("q_bias", "v_bias", "gamma_1", "gamma_2")):
                p.normal_()
    state = dict(beit.state_dict(), mask_token=torch.randn(1, 1, 32),
                 **{"lm_head.weight": torch.randn(8192, 32), "lm_head.bias": torch.zeros(8192)})
    torch.save({"model": state}, tmp_path / "beit.pth")
    model = create_vit(ModelConfig(**SMALL, init_values=0.5 if layer_scale else 0.0),
                       num_classes=0, global_pool="token").eval()
    report = load_encoder_init(model, str(tmp_path / "beit.pth"))
    assert report.kind == "beit" and not report.missing and not report.unexpected
    assert {"mask_token", "lm_head.weight"} <= set(report.dropped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), beit.forward_features(x), atol=1e-5)


def test_beit_relative_position_bias_is_refused(tmp_path):
    torch.save({"model": tiny_beit(rel_pos=True).state_dict()}, tmp_path / "beit_rel.pth")
    with pytest.raises(InitError, match="relative_position_bias_table"):
        load_encoder_init(vit(), str(tmp_path / "beit_rel.pth"))


def test_timm_name_with_a_local_file(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)  # 224 px, patch 16
    save_file(source.state_dict(), str(tmp_path / "vit_tiny.safetensors"))
    model = create_vit(ModelConfig(arch="vit_tiny_patch16_224", img_size=64, depth=12,
                                   pos_embed="learned"), num_classes=3)
    report = load_encoder_init(model, "timm:vit_tiny_patch16_224",
                               str(tmp_path / "vit_tiny.safetensors"))
    assert report.kind == "timm" and report.adapted == ["pos_embed (1, 197, 192) -> (1, 17, 192)"]
    assert torch.equal(model.blocks[11].mlp.fc1.weight, source.blocks[11].mlp.fc1.weight)
    with pytest.raises(InitError, match="timm has no model"):
        load_encoder_init(model, "timm:no_such_vit")
