"""BEiT (Bao et al. 2021, arXiv 2106.08254): predict the visual tokens of the masked patches.

A frozen tokenizer (:mod:`mim.methods.vq_tokenizer`) turns each patch of the uncorrupted image into
a code id; the encoder sees the image with the masked patches replaced by the mask token, and
a linear head over its patch tokens is trained with cross-entropy to give the code of every
masked patch. The logits are computed for the masked positions only (a codebook of 8192 codes
makes full-sequence logits costly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mim.errors import ConfigError
from mim.masking import gather_tokens, masked_indices
from mim.methods.base import Method, PretrainOutput, require
from mim.methods.masked_prediction import (MaskConfig, MaskedPredictionModel, init_head,
                                           masking_kwargs)
from mim.methods.vq_tokenizer import VQTokenizer, load_tokenizer, read_tokenizer_meta
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder
from mim.viz import token_grid


@dataclass
class BEiTConfig(MaskConfig):
    name: str = "beit"
    tokenizer: str = ""  # a `mim tokenizer` run directory or its tokenizer.safetensors

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        require(bool(self.tokenizer), "config key 'method.tokenizer' must name a tokenizer "
                                      "(train one with `mim tokenizer --config ...`)")
        try:
            meta = read_tokenizer_meta(self.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'method.tokenizer': {e}") from None
        tm = meta["model"]
        require((tm["img_size"], tm["patch_size"]) == (model.img_size, model.patch_size),
                f"config key 'method.tokenizer': the tokenizer works on {tm['img_size']} px "
                f"images with {tm['patch_size']} px patches, the model on {model.img_size} / "
                f"{model.patch_size}")
        require(tm["in_chans"] == model.in_chans,
                f"config key 'method.tokenizer': the tokenizer takes {tm['in_chans']} channels, "
                f"the model {model.in_chans}")


class BEiT(MaskedPredictionModel):
    def __init__(self, encoder: MaskedEncoder, tokenizer: VQTokenizer,
                 data_norm: tuple[Any, Any] | None = None,
                 tokenizer_norm: tuple[Any, Any] | None = None, **masking: Any) -> None:
        """``data_norm`` / ``tokenizer_norm``: the (mean, std) the inputs are normalised with
        here and when the tokenizer was trained; inputs are re-normalised for the tokenizer."""
        super().__init__(encoder, **masking)
        if tokenizer.encoder.grid_size != encoder.grid_size:
            raise ValueError(f"tokenizer grid {tokenizer.encoder.grid_size} != encoder grid "
                             f"{encoder.grid_size}")
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.head = init_head(nn.Linear(encoder.embed_dim, tokenizer.codebook_size))
        scale, shift = torch.ones(encoder.in_chans), torch.zeros(encoder.in_chans)
        if data_norm is not None and tokenizer_norm is not None:
            dm, ds = (torch.tensor(v, dtype=torch.float32) for v in data_norm)
            tm, ts = (torch.tensor(v, dtype=torch.float32) for v in tokenizer_norm)
            scale, shift = ds / ts, (dm - tm) / ts
        self.register_buffer("tok_scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("tok_shift", shift.view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: Any) -> BEiT:
        tokenizer, meta = load_tokenizer(cfg.method.tokenizer)
        return cls(create_encoder(cfg.model, use_mask_token=True), tokenizer,
                   data_norm=(cfg.data.mean, cfg.data.std),
                   tokenizer_norm=(meta["mean"], meta["std"]), **masking_kwargs(cfg.method))

    def train(self, mode: bool = True) -> BEiT:
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

    def picture(self, images: torch.Tensor, mean: Any, std: Any,
                seed: int = 0) -> torch.Tensor | None:
        return token_grid(self, images, mean, std, seed)

    @torch.no_grad()
    def tokens_of(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer's code ids (B, L) of images normalised as this model's inputs."""
        return self.tokenizer.encode(images.float() * self.tok_scale + self.tok_shift)

    def forward(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> PretrainOutput:
        """images (B, C, H, W); masking: an optional bool (B, L) mask with exactly
        ``num_masked`` True (= masked) per row.

        Returns pred = logits (B, num_masked, codebook) of the masked patches in patch order,
        target = the code ids (B, L) of all patches, and the masked-token accuracy.
        """
        mask = self.sample_mask(images.shape[0], images.device) if masking is None else masking
        codes = self.tokens_of(images)
        ids = masked_indices(mask, self.num_masked)
        logits = self.head(gather_tokens(self.encode_patches(images, mask), ids))
        wanted = torch.gather(codes, 1, ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), wanted.flatten())
        accuracy = (logits.detach().argmax(dim=-1) == wanted).float().mean()
        return PretrainOutput(loss=loss, pred=logits, mask=mask, target=codes,
                              metrics={"token_acc": accuracy})

    @torch.no_grad()
    def predicted_codes(self, out: PretrainOutput) -> torch.Tensor:
        """(B, L) code ids: the prediction at the masked patches, the tokenizer's elsewhere."""
        ids = masked_indices(out.mask, self.num_masked)
        return out.target.scatter(1, ids, out.pred.argmax(dim=-1))


METHOD = Method(BEiTConfig, BEiT.from_config)
