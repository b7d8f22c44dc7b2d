"""Masked autoencoder (He et al. 2021, arXiv 2111.06377) on the shared :class:`MaskedEncoder`.

The encoder sees only the visible patches; a light decoder of its own width and depth fills the
sequence with a shared mask token, adds fixed 2-D sin-cos positions and predicts the pixels of
every patch. The loss counts the masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mim.losses import denormalize_patch_pixels, masked_mse_loss, pixel_targets
from mim.masking import RandomMask, gather_tokens, random_masking
from mim.models.encoder import MaskedEncoder, sincos_pos_embed


@dataclass
class PretrainOutput:
    """loss: scalar; pred: (B, L, p*p*C); mask: (B, L) bool, True = masked; target like pred.

    metrics: optional extra scalar tensors (e.g. codebook usage); the engine averages them over
    each logging window and writes them beside the loss.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int,
                 patch_dim: int, dim: int = 512, depth: int = 8, num_heads: int = 16) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim, num_prefix_tokens),
                             persistent=False)
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


class MAE(nn.Module):
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

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def forward(self, images: torch.Tensor, masking: RandomMask | None = None) -> PretrainOutput:
        B = images.shape[0]
        if masking is None:
            masking = random_masking(B, self.encoder.num_patches, self.mask_ratio, images.device)
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
