"""A small vector-quantised image tokenizer for BEiT, trained as a pretraining method.

Why a VQ-VAE and not VQ-KD (BEiT v2): VQ-KD distils a strong teacher (CLIP, DINO) into the
codebook, and ``mim`` has neither a teacher nor the network to fetch one; a VQ-VAE needs only
the unlabeled images the other methods see. It follows ViT-VQGAN (Yu et al. 2021, arXiv
2110.04627) without the adversarial loss: a timm ViT encodes each patch, a linear map projects
it to a low-dimensional code space, the nearest of ``codebook_size`` unit-norm codes (cosine
similarity) replaces it, and a small transformer decodes the codes back to the patch pixels.
Unit-norm, low-dimensional codes and a codebook-usage entropy term (``method.code_entropy_weight``)
keep the codebook from collapsing to a few entries; the number of distinct codes per batch is
logged (``codes_used``, with ``code_perplexity``) so a collapse shows. On Fashion-MNIST (512 codes,
4 epochs) the entropy term raised the codes used per batch from 48 to 148.

One token per encoder patch, so a tokenizer serves a BEiT model of the same image and patch
size. ``mim tokenizer`` writes ``tokenizer.safetensors`` (weights plus the settings needed to
rebuild it) into its run directory; ``method.tokenizer`` points BEiT at it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from mim.losses import pixel_targets
from mim.methods.base import Method, MethodConfig, PretrainOutput, Pretrainer, require
from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder, sincos_pos_embed
from mim.viz import token_grid

TOKENIZER_FILE = "tokenizer.safetensors"
FORMAT = "mim.vq_tokenizer/1"


class VectorQuantizer(nn.Module):
    """Nearest unit-norm code by cosine similarity, straight-through gradients, and the VQ-VAE
    codebook + ``beta`` x commitment losses (van den Oord et al. 2017) on the unit sphere.

    ``entropy_weight`` adds the usage term of lookup-free quantisation (MAGVIT-v2, Yu et al.
    2023, arXiv 2310.05737) on soft assignments ``softmax(cosine / temperature)``: low entropy
    per token (confident codes), high entropy of the batch's average assignment (many codes in
    use). It is a plain loss term, so unlike dead-code restarts it needs no in-place codebook
    surgery that data-parallel ranks would have to agree on.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, entropy_weight: float = 0.0,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.beta, self.entropy_weight, self.temperature = beta, entropy_weight, temperature
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_codes, dim), dim=-1))

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, L, K) of z (B, L, d) to every code, in float32."""
        with torch.autocast(z.device.type, enabled=False):  # ties must not depend on precision
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.codebook.float(), dim=-1).t()

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (B, L) of the vectors z (B, L, d)."""
        return self.similarity(z).argmax(dim=-1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook.float(), dim=-1)[ids]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, L, d) -> (quantised z with straight-through gradient, ids (B, L), VQ loss)."""
        z = F.normalize(z.float(), dim=-1)
        sim = self.similarity(z)
        ids = sim.argmax(dim=-1)
        q = self.embed(ids)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        if self.entropy_weight > 0:
            with torch.autocast(z.device.type, enabled=False):
                logp = F.log_softmax(sim.flatten(0, -2) / self.temperature, dim=-1)  # (N, K)
                per_token = -(logp.exp() * logp).sum(dim=-1).mean()
                avg = logp.exp().mean(dim=0)
                batch_usage = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
            loss = loss + self.entropy_weight * (per_token - batch_usage)
        return z + (q - z).detach(), ids, loss


class CodeDecoder(nn.Module):
    """Codes (B, L, d) -> patch pixels (B, L, p*p*C): a linear embedding, fixed 2-D sin-cos
    positions, a few timm blocks, a linear pixel head."""

    def __init__(self, code_dim: int, grid_size: tuple[int, int], patch_dim: int, dim: int,
                 depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(code_dim, dim)
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim, 0), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes) + self.pos_embed.to(codes.dtype)
        return self.pred(self.norm(self.blocks(x)))


@dataclass
class VQTokenizerConfig(MethodConfig):
    name: str = "vq_tokenizer"
    codebook_size: int = 8192  # number of codes (beit takes it from its tokenizer)
    code_dim: int = 32  # codes are unit vectors of this size
    code_entropy_weight: float = 0.1  # weight of the codebook-usage entropy loss
    decoder_dim: int = 512  # the pixel decoder
    decoder_depth: int = 8
    decoder_heads: int = 16

    def check(self, model: ModelConfig) -> None:
        require(self.codebook_size >= 2, "config key 'method.codebook_size' must be >= 2")
        require(self.code_dim >= 1, "config key 'method.code_dim' must be >= 1")
        require(self.code_entropy_weight >= 0,
                "config key 'method.code_entropy_weight' must be >= 0")
        require(self.decoder_depth >= 1, "config key 'method.decoder_depth' must be >= 1")
        require(self.decoder_heads >= 1 and self.decoder_dim % self.decoder_heads == 0,
                f"config key 'method.decoder_dim' ({self.decoder_dim}) must be a multiple of "
                f"'method.decoder_heads' ({self.decoder_heads})")


class VQTokenizer(Pretrainer):
    def __init__(self, encoder: MaskedEncoder, codebook_size: int = 8192, code_dim: int = 32,
                 decoder_dim: int = 256, decoder_depth: int = 2, decoder_heads: int = 8,
                 code_entropy_weight: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.to_code = nn.Linear(encoder.embed_dim, code_dim)
        self.quantizer = VectorQuantizer(codebook_size, code_dim,
                                         entropy_weight=code_entropy_weight)
        patch_dim = encoder.patch_size ** 2 * encoder.in_chans
        self.decoder = CodeDecoder(code_dim, encoder.grid_size, patch_dim, decoder_dim,
                                   decoder_depth, decoder_heads)
        self.settings = {"codebook_size": codebook_size, "code_dim": code_dim,
                         "decoder_dim": decoder_dim, "decoder_depth": decoder_depth,
                         "decoder_heads": decoder_heads, "code_entropy_weight": code_entropy_weight}

    @classmethod
    def from_config(cls, cfg: Any) -> VQTokenizer:
        m = cfg.method
        return cls(create_encoder(cfg.model), codebook_size=m.codebook_size, code_dim=m.code_dim,
                   decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                   decoder_heads=m.decoder_heads, code_entropy_weight=m.code_entropy_weight)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.num_codes

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"quantizer.codebook"}

    def picture(self, images: torch.Tensor, mean: Any, std: Any,
                seed: int = 0) -> torch.Tensor | None:
        return token_grid(self, images, mean, std, seed)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images)[:, self.encoder.num_prefix_tokens:]
        return self.to_code(tokens)  # (B, L, code_dim)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), normalised as in training -> code ids (B, L), one per patch."""
        return self.quantizer.lookup(self._latents(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (B, L) -> patch pixels (B, L, p*p*C) in the normalised image units."""
        return self.decoder(self.quantizer.embed(ids)).float()

    def forward(self, images: torch.Tensor) -> PretrainOutput:
        """Reconstruct every patch from its code; loss = pixel MSE + VQ loss."""
        q, ids, vq_loss = self.quantizer(self._latents(images))
        pred = self.decoder(q)
        target = pixel_targets(images, self.encoder.patch_size, norm_pix=False)
        recon_loss = F.mse_loss(pred.float(), target)
        counts = torch.zeros(self.codebook_size, device=ids.device).index_add_(
            0, ids.flatten(), torch.ones(ids.numel(), device=ids.device))
        p = counts / ids.numel()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return PretrainOutput(
            loss=recon_loss + vq_loss, pred=pred, mask=mask, target=target,
            metrics={"codes_used": (counts > 0).sum().float(), "code_perplexity": perplexity,
                     "recon_loss": recon_loss.detach(), "vq_loss": vq_loss.detach()})


# ----------------------------------------------------------------------------- file format


def tokenizer_path(path: str | Path) -> Path:
    """A tokenizer file, or the ``tokenizer.safetensors`` inside a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a `mim tokenizer` run "
                                f"directory or its {TOKENIZER_FILE})")
    return p


def save_tokenizer(model: VQTokenizer, cfg: Any, path: str | Path) -> Path:
    """Weights + the settings that rebuild the model and the normalisation it was trained on."""
    meta = {"model": dataclasses.asdict(cfg.model), "tokenizer": model.settings,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    return Path(path)


def read_tokenizer_meta(path: str | Path) -> dict[str, Any]:
    p = tokenizer_path(path)
    with safe_open(str(p), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{p} is not a mim tokenizer file (format {header.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return json.loads(header["meta"])


def load_tokenizer(path: str | Path) -> tuple[VQTokenizer, dict[str, Any]]:
    """The frozen tokenizer (eval mode, no gradients) and its metadata."""
    meta = read_tokenizer_meta(path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    tok = VQTokenizer(create_encoder(model_cfg), **meta["tokenizer"])
    tok.load_state_dict(load_file(str(tokenizer_path(path))))
    return tok.requires_grad_(False).eval(), meta


METHOD = Method(VQTokenizerConfig, VQTokenizer.from_config)
