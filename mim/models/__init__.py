"""Models: the shared masked encoder and one pretrainer per method, built from a config."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from mim.models.beit import BEiT
from mim.models.encoder import MaskedEncoder, create_encoder, create_vit
from mim.models.mae import MAE, PretrainOutput
from mim.models.maskfeat import MaskFeat
from mim.models.simmim import SimMIM
from mim.models.supervised import SupervisedPretrainer
from mim.models.tokenizer import VQTokenizer

_METHODS: dict[str, Callable[[Any], nn.Module]] = {}


def register_method(name: str) -> Callable:
    def wrap(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is already registered")
        _METHODS[name] = fn
        return fn
    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


@register_method("mae")
def _build_mae(cfg: Any) -> nn.Module:
    m = cfg.method
    return MAE(create_encoder(cfg.model), mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
               decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads)


register_method("simmim")(SimMIM.from_config)
register_method("maskfeat")(MaskFeat.from_config)
register_method("beit")(BEiT.from_config)
register_method("vq_tokenizer")(VQTokenizer.from_config)
register_method("supervised")(SupervisedPretrainer.from_config)


def build_pretrainer(cfg: Any) -> nn.Module:
    """The pretraining model for ``cfg.method.name``: ``forward(images) -> PretrainOutput``."""
    return _METHODS[cfg.method.name](cfg)


__all__ = ["BEiT", "MAE", "MaskFeat", "MaskedEncoder", "PretrainOutput", "SimMIM",
           "SupervisedPretrainer", "VQTokenizer", "build_pretrainer", "create_encoder", "create_vit", "list_methods", "register_method"]
