"""One contender of a step benchmark: a model, its optimizer and the training step, the same for
mim and for the reference.

The step is the engine's (``mim.engine.loop.run_epoch``): forward under the configured
autocast, backward, gradient norm and the non-finite guard (read on the host, as the engine
does), optimizer step (fused AdamW, as the engine builds it, for both sides), ``zero_grad``. Only
the model and how it is compiled differ.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mim.engine.loop import is_finite, step_if_finite
from mim.engine.optim import apply_speed_options, build_optimizer
from mim.methods import build_pretrainer

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Contender:
    name: str  # e.g. "mim eager", "reference compile"
    impl: str  # "mim" | "reference"
    mode: str  # "eager" | "compile"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    images: torch.Tensor
    autocast_dtype: torch.dtype | None
    device_guard: bool = False  # skip a non-finite step on the device (no host sync)
    sdpa_backends: list | None = None  # restrict scaled_dot_product_attention to these kernels

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.images.device.type, dtype=self.autocast_dtype)

    def forward(self) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        kernels = (sdpa_kernel(self.sdpa_backends) if self.sdpa_backends
                   else contextlib.nullcontext())
        with self.autocast(), kernels:
            return self.loss_fn(self.model, self.images)

    def forward_backward(self) -> None:
        self.forward().backward()

    def step(self) -> None:
        self.forward_backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if self.device_guard:
            step_if_finite(self.optimizer, grad_norm)
        elif is_finite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _mim_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).loss


def build_contender(cfg: Any, impl: str, mode: str, device: torch.device,
                    images: torch.Tensor) -> Contender:
    """mim's MAE (``mode="compile"`` means ``train.compile=true``, mim's own way) or the reference
    at the same architecture (``compile`` = ``torch.compile`` of the whole model, the way
    ``transformers`` users compile). Variants of mim, to measure one option each:
    ``mim-deviceguard`` decides the non-finite guard on the device (``step_if_finite``, no host
    sync); ``mim-gc`` turns on ``train.grad_checkpointing``; ``mim-whole`` compiles the whole
    model in one graph instead of block by block (``compile`` mode only); ``mim-flash`` /
    ``mim-efficient`` / ``mim-cudnn`` restrict attention to one SDPA kernel."""
    from torch.nn.attention import SDPBackend

    from mim.bench.reference import build_reference, reference_loss

    torch.manual_seed(cfg.run.seed)
    ours = build_pretrainer(cfg)
    if impl.startswith("mim"):
        model, loss_fn = ours, _mim_loss
    else:
        model, loss_fn = build_reference(ours), reference_loss
        del ours
    model = model.to(device).train()
    if impl.startswith("mim"):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.compile = mode == "compile" and impl != "mim-whole"
        run_cfg.train.grad_checkpointing |= impl == "mim-gc"
        apply_speed_options(model, run_cfg)
        if impl == "mim-whole" and mode == "compile":
            model.compile(dynamic=False)
    else:
        if cfg.train.grad_checkpointing:
            model.gradient_checkpointing_enable()
        if mode == "compile":
            model.compile()
    optimizer = build_optimizer(model, cfg, lr=1e-4)
    backends = {"mim-flash": [SDPBackend.FLASH_ATTENTION],
                "mim-efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "mim-cudnn": [SDPBackend.CUDNN_ATTENTION]}.get(impl)
    return Contender(f"{impl} {mode}", impl, mode, model, optimizer, loss_fn, images,
                     AUTOCAST[cfg.train.mixed_precision], impl == "mim-deviceguard", backends)
