"""Masked autoencoder (He et al. 2021, arXiv 2111.06377) on the shared :class:`MaskedEncoder`.

The encoder sees only the visible patches; a light decoder of its own width and depth fills the
sequence with a shared mask token, adds fixed 2-D sin-cos positions and predicts the pixels of
every patch. The loss counts the masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mim.losses import denormalize_patch_pixels, masked_mse_loss, pixel_targets
from mim.masking import RandomMask, gather_tokens, random_masking
from mim.methods.base import Method, MethodConfig, PretrainOutput, Pretrainer, check_mask_ratio
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder, sincos_pos_embed
from mim.viz import reconstruction_grid


@dataclass
class MAEConfig(MethodConfig):
    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def check(self, model: ModelConfig) -> None:
        check_mask_ratio(self.mask_ratio)


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int,
                 patch_dim: int, dim: int = 512, depth: int = 8, num_heads: int = 16) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, but saved: a table loaded from an official MAE checkpoint (its own sin-cos
        # layout) must survive a resume
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim, num_prefix_tokens))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=nn.LayerNorm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens (B, prefix + K, D_enc), ids_restore (B, L) -> per-patch predictions (B, L, patch_dim)."""
        x = self.embed(tokens)
        P = self.num_prefix_tokens
        prefix, visible = x[:, :P], x[:, P:]
        B, L = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, P:])


class MAE(Pretrainer):
    def __init__(self, encoder: MaskedEncoder, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        patch_dim = encoder.patch_size ** 2 * encoder.in_chans
        self.decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, encoder.num_prefix_tokens,
                                  patch_dim, decoder_dim, decoder_depth, decoder_heads)
        self.apply(_init_mae_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        w = encoder.vit.patch_embed.proj.weight  # MAE: init the patch projection like a Linear
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        if encoder.vit.cls_token is not None:
            nn.init.normal_(encoder.vit.cls_token, std=0.02)

    @classmethod
    def from_config(cls, cfg: Any) -> MAE:
        m = cfg.method
        return cls(create_encoder(cfg.model), mask_ratio=m.mask_ratio,
                   norm_pix_loss=m.norm_pix_loss, decoder_dim=m.decoder_dim,
                   decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}

    def sample_mask(self, batch_size: int, device: torch.device | str,
                    generator: torch.Generator | None = None) -> RandomMask:
        where = "cpu" if generator is not None else device
        masking = random_masking(batch_size, self.encoder.num_patches, self.mask_ratio, where,
                                 generator=generator)
        masking.ids_keep, masking.ids_restore, masking.mask = (
            t.to(device) for t in (masking.ids_keep, masking.ids_restore, masking.mask))
        return masking

    def picture(self, images: torch.Tensor, mean: Any, std: Any,
                seed: int = 0) -> torch.Tensor | None:
        return reconstruction_grid(self, images, mean, std, seed)

    def forward(self, images: torch.Tensor, masking: RandomMask | None = None) -> PretrainOutput:
        B = images.shape[0]
        if masking is None:
            masking = self.sample_mask(B, images.device)
        tokens = self.encoder(images, idx_keep=masking.ids_keep)
        pred = self.decoder(tokens, masking.ids_restore)
        target = pixel_targets(images, self.encoder.patch_size, self.norm_pix_loss)
        loss = masked_mse_loss(pred, target, masking.mask)
        return PretrainOutput(loss=loss, pred=pred, mask=masking.mask, target=target)

    def reconstruct(self, images: torch.Tensor, out: PretrainOutput) -> torch.Tensor:
        """Predicted pixels (B, L, p*p*C) in the input's units: a norm-pix prediction is mapped
        back with each patch's own mean and variance (taken from the input)."""
        if self.norm_pix_loss:
            return denormalize_patch_pixels(out.pred, images, self.encoder.patch_size)
        return out.pred.float()


def _init_mae_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


METHOD = Method(MAEConfig, MAE.from_config)
