"""What every pretraining method is: its config section, its output, and the written protocol
the engine and the pictures rely on (instead of probing models with ``hasattr``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from mim.errors import ConfigError
from mim.models.encoder import MaskedEncoder, ModelConfig


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


@dataclass
class MethodConfig:
    """The ``method:`` section; each method subclasses it with its own keys and checks."""

    name: str = ""

    def check(self, model: ModelConfig) -> None:
        """Raise :class:`ConfigError` naming the key of an impossible value."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_mask_ratio(ratio: float) -> None:
    require(0.0 < ratio < 1.0, f"config key 'method.mask_ratio' must be in (0, 1), got {ratio}")


class Pretrainer(nn.Module):
    """A pretraining model: ``forward(images[, masking=][, labels=]) -> PretrainOutput``.

    The engine passes ``labels=`` when ``needs_labels``; the pictures draw a fixed mask with
    :meth:`sample_mask` and ask :meth:`picture` for what to show. A method with a teacher (EMA)
    gets its per-update hook here, called by the loop after each optimizer update.
    """

    encoder: MaskedEncoder
    needs_labels: ClassVar[bool] = False

    def sample_mask(self, batch_size: int, device: torch.device | str,
                    generator: torch.Generator | None = None) -> Any:
        """A mask for ``forward(masking=...)``; a CPU ``generator`` makes it repeat exactly."""
        raise NotImplementedError(f"{type(self).__name__} draws no mask")

    def picture(self, images: torch.Tensor, mean: Any, std: Any,
                seed: int = 0) -> torch.Tensor | None:
        """A (3, H, W) grid of what the model learned, or None when it has nothing to show."""
        return None

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def after_update(self, step: int) -> None:
        """Called by the loop after optimizer update ``step`` (1-based), e.g. to move an EMA
        teacher; state it changes must live in the module (buffers, parameters) so checkpoints
        hold it and a resume repeats the run."""


@dataclass(frozen=True)
class Method:
    """A registry entry: the ``method:`` section's dataclass and the model built from a job
    config (``cfg.model``, ``cfg.method``, ``cfg.data``)."""

    config: type[MethodConfig]
    build: Callable[[Any], Pretrainer]
