"""The one encoder of mim: a timm VisionTransformer that can drop or replace masked patches.

``MaskedEncoder.forward(images, idx_keep=..., mask=...)`` is the only interface the methods
use (after lightly's masked ViT): ``idx_keep`` drops every other patch before the blocks (MAE),
``mask`` swaps the masked patch embeddings for a learned mask token (BEiT, SimMIM, MaskFeat).
The wrapped ``vit`` keeps timm's parameter names, so ``encoder.vit.state_dict()`` loads with
``timm.create_model`` and every timm/MAE/BEiT ViT checkpoint loads into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mim.errors import ConfigError
from mim.masking import gather_tokens


@dataclass
class ModelConfig:
    """The ``model:`` section: which timm ViT the encoder is."""

    arch: str = "vit_base_patch16_224"  # any timm VisionTransformer name
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # 0 keeps the arch's own value; set them to build tiny models for tests and demos.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    drop_path_rate: float = 0.0
    pos_embed: Literal["sincos", "learned"] = "sincos"  # MAE fixes a 2-D sin-cos table
    init_values: float = 0.0  # layer scale (BEiT uses 0.1); 0 = off


class MaskedEncoder(nn.Module):
    def __init__(self, vit: VisionTransformer, use_mask_token: bool = False) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
        if vit.pos_embed is None or getattr(vit, "dynamic_img_size", False):
            raise ValueError("MaskedEncoder needs a ViT with a fixed absolute position embedding")
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim)) if use_mask_token else None
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def in_chans(self) -> int:
        return self.vit.patch_embed.proj.in_channels

    def no_weight_decay(self) -> set[str]:
        names = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def forward(
        self,
        images: torch.Tensor,
        idx_keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + kept patches, D).

        idx_keep: (B, K) patch indices to keep (drop the rest before the blocks).
        mask:     (B, L) bool, True = replace that patch embedding by the mask token.
        """
        vit = self.vit
        x = vit.patch_embed(images)  # (B, L, D)
        if mask is not None:
            if self.mask_token is None:
                raise RuntimeError("this encoder was built without a mask token")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        P = self.num_prefix_tokens
        pos = vit.pos_embed
        x = x + (pos if vit.no_embed_class else pos[:, P:])
        if idx_keep is not None:
            x = gather_tokens(x, idx_keep)
        return vit_blocks(vit, x)


def vit_blocks(vit: VisionTransformer, x: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ViT after its patch embedding: patch tokens ``x`` (B, N, D), position already added,
    get the prefix tokens, the blocks (activation-checkpointed when the ViT is set so) and the
    final norm. ``attn_mask`` (B, 1, 1, prefix + N), True = attend, hides padding. The one
    forward of the encoder and the detector's backbone."""
    x = vit.norm_pre(vit.pos_drop(with_prefix_tokens(vit, x)))
    for blk in vit.blocks:
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, attn_mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask=attn_mask)
    return vit.norm(x)


def with_prefix_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens ``x`` (B, N, D) behind the class/register tokens, those with their position
    embedding unless the ViT keeps it off them (``no_embed_class``)."""
    prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token)
              if t is not None]
    if not prefix:
        return x
    tokens = torch.cat(prefix, dim=1)
    if not vit.no_embed_class:
        tokens = tokens + vit.pos_embed[:, :vit.num_prefix_tokens]
    return torch.cat([tokens, x], dim=1)


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table (1, prefix + H*W, dim); prefix (class) rows are zero, as in MAE."""
    table = build_sincos2d_pos_embed(list(grid_size), dim=dim)
    return torch.cat([torch.zeros(num_prefix, dim), table], dim=0).unsqueeze(0)


def create_vit(cfg: ModelConfig, num_classes: int = 0, **overrides) -> VisionTransformer:
    """Build the timm ViT named by ``cfg.arch`` at the configured size (random init)."""
    kwargs = dict(pretrained=False, num_classes=num_classes, img_size=cfg.img_size,
                  patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                  drop_path_rate=cfg.drop_path_rate)
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, key):
            kwargs[key] = getattr(cfg, key)
    if cfg.init_values:
        kwargs["init_values"] = cfg.init_values
    kwargs.update(overrides)
    try:
        vit = timm.create_model(cfg.arch, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"config key 'model.arch': {e}") from None
    except (TypeError, ValueError, AssertionError) as e:  # another family: no img_size, patches
        raise ConfigError(f"config key 'model.arch' must name a timm VisionTransformer; "
                          f"'{cfg.arch}' does not build as one ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
                          ) from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"config key 'model.arch' must name a timm VisionTransformer, "
                          f"'{cfg.arch}' builds {type(vit).__name__}")
    if cfg.pos_embed == "sincos":
        table = sincos_pos_embed(vit.patch_embed.grid_size, vit.embed_dim,
                                 0 if vit.no_embed_class else vit.num_prefix_tokens)
        with torch.no_grad():
            vit.pos_embed.copy_(table)
        vit.pos_embed.requires_grad_(False)
    return vit


def create_encoder(cfg: ModelConfig, use_mask_token: bool = False) -> MaskedEncoder:
    return MaskedEncoder(create_vit(cfg), use_mask_token=use_mask_token)
