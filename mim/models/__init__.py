"""Models: the shared masked encoder, its initialisation, the classifier and the detector.

The pretraining methods built on the encoder live in :mod:`mim.methods`.
"""

from __future__ import annotations

from mim.models.encoder import MaskedEncoder, ModelConfig, create_encoder, create_vit

__all__ = ["MaskedEncoder", "ModelConfig", "create_encoder", "create_vit"]
