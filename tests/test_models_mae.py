import pytest
import timm
import torch

from mim import build_pretrainer, load_config
from mim.masking import random_masking
from mim.models.encoder import MaskedEncoder
from tests.conftest import TINY


def _cfg(*extra):
    return load_config(None, TINY + ["data.synthetic=true", *extra])


def test_build_pretrainer_api_shapes():
    model = build_pretrainer(_cfg())
    out = model(torch.randn(3, 3, 32, 32))
    L = (32 // 8) ** 2
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == (3, L, 8 * 8 * 3)
    assert out.mask.shape == (3, L) and out.mask.sum(1).tolist() == [12, 12, 12]


def test_encoder_sees_only_visible_patches():
    model = build_pretrainer(_cfg())
    m = random_masking(2, 16, 0.75)
    tokens = model.encoder(torch.randn(2, 3, 32, 32), idx_keep=m.ids_keep)
    assert tokens.shape == (2, 1 + 4, 32)  # class token + 4 visible of 16


def test_loss_touches_masked_patches_only():
    torch.manual_seed(0)
    model = build_pretrainer(_cfg("method.norm_pix_loss=false"))
    x = torch.randn(2, 3, 32, 32)
    m = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    out = model(x, masking=m)
    pred = out.pred.detach().requires_grad_(True)
    from mim.losses import masked_mse_loss
    masked_mse_loss(pred, out.target, out.mask).backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert (grad_per_patch[~out.mask] == 0).all()
    assert (grad_per_patch[out.mask] > 0).all()
    # changing the pixels of a visible patch of the *target* leaves the loss unchanged
    t2 = out.target.clone()
    t2[~out.mask] += 5.0
    assert torch.allclose(masked_mse_loss(out.pred, t2, out.mask), out.loss)


def test_norm_pix_targets_are_normalised_per_patch():
    model = build_pretrainer(_cfg("method.norm_pix_loss=true"))
    out = model(torch.rand(2, 3, 32, 32) * 3 + 1)
    assert torch.allclose(out.target.mean(-1), torch.zeros(2, 16), atol=1e-4)
    # reconstruct() maps the normalised prediction back to image units
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    out.pred = out.target.clone()  # a perfect norm-pix prediction ...
    from mim.patching import patchify
    assert torch.allclose(model.reconstruct(x, out), patchify(x, 8), atol=1e-3)  # ... is the image


def test_sincos_pos_embed_is_fixed_and_timm_loadable(tmp_path):
    cfg = _cfg()
    model = build_pretrainer(cfg)
    vit = model.encoder.vit
    assert not vit.pos_embed.requires_grad
    assert torch.all(vit.pos_embed[0, 0] == 0)  # class-token row
    assert vit.pos_embed[0, 1:].abs().max() <= 1.0


def test_any_timm_vit_size():
    for arch, size, patch in [("vit_small_patch16_224", 64, 16), ("vit_base_patch32_224", 64, 32)]:
        cfg = load_config(None, ["data.synthetic=true", f"model.arch={arch}",
                                 f"model.img_size={size}", f"model.patch_size={patch}",
                                 "model.depth=1", "method.decoder_depth=1",
                                 "method.decoder_dim=64", "method.decoder_heads=2"])
        out = build_pretrainer(cfg)(torch.randn(1, 3, size, size))
        assert out.pred.shape[-1] == patch * patch * 3
    assert timm.list_models("vit_tiny_patch16_224")


def test_flop_count_includes_attention():
    from mim.engine.accounting import count_flops

    cfg = _cfg("method.mask_ratio=0.75")
    model = build_pretrainer(cfg)
    flops = count_flops(model, torch.zeros(2, 3, 32, 32))
    D, N, depth, Dd, L, d_depth = 32, 1 + 4, 2, 32, 1 + 16, 1
    def block(dim, n):  # qkv + proj + mlp (4x) matmuls, plus q@k and attn@v
        return 2 * n * (3 * dim * dim + dim * dim + 8 * dim * dim) + 2 * 2 * n * n * dim
    patch_embed = 2 * 16 * (8 * 8 * 3) * D
    expected = (patch_embed + depth * block(D, N) + 2 * N * D * Dd + d_depth * block(Dd, L)
                + 2 * 16 * Dd * (8 * 8 * 3))
    assert flops == expected
    assert all(getattr(m, "fused_attn", True) for m in model.modules())  # restored


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 4}, {"no_embed_class": True},
                                {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 2, "no_embed_class": True}])
def test_encoder_is_timm_forward_for_every_prefix_token_layout(kw):
    """With nothing dropped or masked the encoder computes timm's forward_features exactly."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, **kw)
    encoder = MaskedEncoder(vit.eval())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.forward_features(x), encoder(x), atol=1e-5)
