"""Evaluators: ``reset`` / ``update`` / ``compute``. Classification keeps sufficient statistics
that add up across processes (one all-reduce, no sample counted twice); COCO detection evaluation
(``mim.metrics.detection``) gathers every process's results, since pycocotools needs them all."""

from mim.metrics.classification import ClassificationEvaluator, save_confusion_matrix

__all__ = ["ClassificationEvaluator", "save_confusion_matrix"]
