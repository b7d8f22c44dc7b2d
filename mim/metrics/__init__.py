"""Evaluators: ``reset`` / ``update`` / ``compute``. Classification keeps sufficient statistics
that add up across processes, so distributed evaluation needs one all-reduce and never counts a
sample twice; COCO detection evaluation gathers every process's results to the main process,
since pycocotools needs them all."""

from mim.metrics.classification import ClassificationEvaluator, save_confusion_matrix
from mim.metrics.detection import CocoDetectionEvaluator

__all__ = ["ClassificationEvaluator", "CocoDetectionEvaluator", "save_confusion_matrix"]
