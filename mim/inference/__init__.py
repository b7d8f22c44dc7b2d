"""Using what a run trained: ``load_model`` (Python), ``mim predict``, ``mim embed`` and
``mim export`` (ONNX, timm; with a model card and an optional Hub upload)."""

from mim.inference.model import Classification, Detections, load_model

__all__ = ["Classification", "Detections", "load_model"]
