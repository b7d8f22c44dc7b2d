"""Evaluators: ``reset`` / ``update`` / ``compute`` over sufficient statistics that add up across
processes, so distributed evaluation needs one all-reduce and never counts a sample twice."""

from mim.metrics.classification import ClassificationEvaluator, save_confusion_matrix

__all__ = ["ClassificationEvaluator", "save_confusion_matrix"]
