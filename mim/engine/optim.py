"""The optimizer, the learning-rate schedule and the speed options applied to a built model."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mim.config import JobConfig


def build_optimizer(model: torch.nn.Module, cfg: JobConfig, lr: float, **kw: Any) -> torch.optim.Optimizer:
    """AdamW (or ``optim.optimizer`` where the config has one); no weight decay on norms, biases,
    position and class/mask tokens (timm's groups); ``layer_decay=`` goes through to timm.

    Adam-family optimizers use torch's fused kernel (one pass over all parameters; on CPU 5-10x
    faster than the per-tensor or foreach ones, see docs/benchmarks.md) on CUDA and CPU, unless
    ``kw`` chooses; a fused optimizer can also skip a step on the device (:func:`step_if_finite`).
    """
    name = getattr(cfg.optim, "optimizer", "adamw")
    if "adam" in name:
        kw.setdefault("betas", tuple(cfg.optim.betas))
        device = next(model.parameters()).device.type
        if name in ("adam", "adamw") and device in ("cuda", "cpu") and "foreach" not in kw:
            kw.setdefault("fused", True)
    return create_optimizer_v2(model, name, lr=lr, weight_decay=cfg.optim.weight_decay, **kw)


def apply_speed_options(model: torch.nn.Module, cfg: JobConfig) -> torch.nn.Module:
    """``train.grad_checkpointing`` and ``train.compile``, applied in place once after the model is
    built, so parameter names, state dicts and checkpoints do not change.

    Compilation is regional: every transformer block is compiled on its own and the blocks of one
    stack share the compiled code (one graph for the encoder's token count, one for the
    decoder's), which compiles in a fraction of the whole-model time, composes with activation
    checkpointing, and keeps the mask draws in eager mode, so the losses match
    ``train.compile=false`` up to float rounding."""
    if cfg.train.grad_checkpointing:
        for part in model.modules():
            if part is not model and hasattr(part, "set_grad_checkpointing"):
                part.set_grad_checkpointing(True)
    if cfg.train.compile:
        for block in transformer_blocks(model):
            block.compile(dynamic=False)  # encoder and decoder token counts: two static graphs
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module held in a ``blocks`` container (timm ViT blocks, MAE decoder blocks)."""
    return [b for name, m in model.named_modules() if name.split(".")[-1] == "blocks"
            for b in m.children()]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig, total_updates: int,
                    updates_per_epoch: int) -> CosineLRScheduler:
    """Per-update linear warmup from 0, then cosine to ``optim.min_lr`` at the last update."""
    warmup = min(int(round(cfg.optim.warmup_epochs * updates_per_epoch)), max(total_updates - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_updates - warmup, 1),
                             lr_min=cfg.optim.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)
