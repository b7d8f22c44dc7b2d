"""Pretraining methods, one file each; :data:`METHOD_NAMES` is the one list of their names.

Adding a method: a file ``mim/methods/<name>.py`` with its ``<Name>Config(MethodConfig)`` (the
``method:`` keys, their defaults and checks), its :class:`Pretrainer` and its registry entry
``METHOD = Method(<Name>Config, <Name>.from_config)``, and its name in :data:`METHOD_NAMES`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mim.methods.base import Method, MethodConfig, PretrainOutput, Pretrainer

METHOD_NAMES = ("mae", "simmim", "maskfeat", "beit", "vq_tokenizer", "supervised", "data2vec")

# each name is the module mim/methods/<name>.py, whose METHOD is the entry
METHODS: dict[str, Method] = {name: import_module(f"mim.methods.{name}").METHOD
                              for name in METHOD_NAMES}

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


__all__ = ["METHODS", "METHOD_NAMES", "Method", "MethodConfig", "PretrainOutput", "Pretrainer",
           "build_pretrainer", "list_methods", "method_configs"]
