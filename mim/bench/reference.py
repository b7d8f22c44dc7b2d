"""The reference a user would otherwise pick: Hugging Face ``ViTMAEForPreTraining``, built at the
identical architecture of a mim MAE (same widths, depths, heads, MLP sizes, decoder, patch and
image size, mask ratio and loss), with PyTorch's fused attention (``attn_implementation="sdpa"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NotComparable(ValueError):
    """The mim model has a part ``ViTMAEForPreTraining`` cannot express."""


def reference_config(model: nn.Module) -> Any:
    """A ``transformers.ViTMAEConfig`` matching ``model`` (a mim MAE), read off the built model."""
    from transformers import ViTMAEConfig

    from mim.methods.mae import MAE

    if not isinstance(model, MAE):
        raise NotComparable(f"the reference is an MAE; this model is a {type(model).__name__}")
    vit = model.encoder.vit
    block = vit.blocks[0]
    dec = model.decoder
    problems = []
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class:
        problems.append("the encoder must have one class token and no register tokens")
    if block.attn.qkv.bias is None or not isinstance(block.norm1, nn.LayerNorm):
        problems.append("blocks must use qkv bias and LayerNorm")
    if not isinstance(block.ls1, nn.Identity) or not isinstance(block.attn.q_norm, nn.Identity):
        problems.append("no layer scale or qk-norm")
    if not isinstance(vit.norm_pre, nn.Identity) or not isinstance(vit.patch_embed.norm,
                                                                    nn.Identity):
        problems.append("no pre-norm or patch-embedding norm")
    if problems:
        raise NotComparable("; ".join(problems))
    eps = block.norm1.eps
    return ViTMAEConfig(
        image_size=vit.patch_embed.img_size[0], patch_size=model.encoder.patch_size,
        num_channels=model.encoder.in_chans, hidden_size=vit.embed_dim,
        num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, hidden_act="gelu", qkv_bias=True,
        layer_norm_eps=eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        decoder_hidden_size=dec.embed.out_features, decoder_num_hidden_layers=len(dec.blocks),
        decoder_num_attention_heads=dec.blocks[0].attn.num_heads,
        decoder_intermediate_size=dec.blocks[0].mlp.fc1.out_features,
        mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss,
        attn_implementation="sdpa")


def build_reference(model: nn.Module) -> nn.Module:
    """A randomly initialised ``ViTMAEForPreTraining`` at ``model``'s architecture."""
    try:
        from transformers import ViTMAEForPreTraining
    except ImportError as e:
        raise NotComparable("transformers is not installed (pip install 'mim[bench]')") from e
    return ViTMAEForPreTraining(reference_config(model))


def reference_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).loss
