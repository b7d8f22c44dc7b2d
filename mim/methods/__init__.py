"""Pretraining methods, one file each; :data:`METHODS` is the one list of their names.

Adding a method: a file here with its ``<Name>Config(MethodConfig)`` (the ``method:`` keys, their
defaults and checks) and its :class:`Pretrainer`, and one line below.
"""

from __future__ import annotations

from typing import Any

from mim.methods.base import Method, MethodConfig, PretrainOutput, Pretrainer
from mim.methods.beit import BEiT, BEiTConfig
from mim.methods.data2vec import Data2Vec, Data2VecConfig
from mim.methods.mae import MAE, MAEConfig
from mim.methods.maskfeat import MaskFeat, MaskFeatConfig
from mim.methods.simmim import SimMIM, SimMIMConfig
from mim.methods.supervised import SupervisedConfig, SupervisedPretrainer
from mim.methods.vq_tokenizer import VQTokenizer, VQTokenizerConfig

METHODS: dict[str, Method] = {
    "mae": Method(MAEConfig, MAE.from_config),
    "simmim": Method(SimMIMConfig, SimMIM.from_config),
    "maskfeat": Method(MaskFeatConfig, MaskFeat.from_config),
    "beit": Method(BEiTConfig, BEiT.from_config),
    "vq_tokenizer": Method(VQTokenizerConfig, VQTokenizer.from_config),
    "supervised": Method(SupervisedConfig, SupervisedPretrainer.from_config),
    "data2vec": Method(Data2VecConfig, Data2Vec.from_config),
}

# Every key of the one flat ``method:`` section of earlier versions: a saved config holding all
# of them (a run directory's config.yaml, a checkpoint's config) loads with the foreign ones
# dropped.
LEGACY_FLAT_KEYS = frozenset({
    "name", "mask_ratio", "norm_pix_loss", "decoder_dim", "decoder_depth", "decoder_heads",
    "mask_type", "block_min_patches", "block_max_patches", "block_aspect", "hog_bins",
    "hog_cell", "tokenizer", "codebook_size", "code_dim", "code_entropy_weight", "num_classes"})


def method_configs() -> dict[str, type[MethodConfig]]:
    """``method.name`` -> the dataclass of its ``method:`` section."""
    return {name: m.config for name, m in METHODS.items()}


def list_methods() -> list[str]:
    return sorted(METHODS)


def build_pretrainer(cfg: Any) -> Pretrainer:
    """The pretraining model for ``cfg.method.name``: ``forward(images) -> PretrainOutput``."""
    return METHODS[cfg.method.name].build(cfg)


__all__ = ["BEiT", "MAE", "METHODS", "MaskFeat", "Method", "MethodConfig", "PretrainOutput",
           "Pretrainer", "SimMIM", "SupervisedPretrainer", "VQTokenizer", "build_pretrainer",
           "list_methods", "method_configs"]
