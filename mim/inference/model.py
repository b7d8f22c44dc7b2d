"""``load_model(run_dir)``: a fine-tuned classifier or detector back from its run directory alone.

The run directory holds everything: ``config.yaml`` (the architecture and preprocessing),
the weights as safetensors (a classifier's ``best/model.safetensors``, the weights its
evaluation scores; a detector's final ``model.safetensors``) and the class names
(``best/metrics.json``, ``summary.json``). Nothing is unpickled. ``predict`` runs the
evaluation's own preprocessing and post-processing, so it gives the run's evaluation outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torchvision import tv_tensors

from mim.config import ConfigError, load_config
from mim.data.detection import detection_transform, pad_collate
from mim.data.sources import to_rgb
from mim.data.transforms import eval_transform

# what load_config needs to rebuild a model without re-reading the initial weights or the data
_MODEL_ONLY = ["tracking.backend=none", "run.resume=none"]
_NO_INIT = ["init=scratch", "init_file="]


@dataclass
class Classification:
    """One image's top-k classes, best first."""

    labels: list[str]
    scores: list[float]  # softmax probabilities
    class_ids: list[int]


@dataclass
class Detections:
    """One image's detections after NMS, in the input image's pixels."""

    boxes: torch.Tensor  # (N, 4) xyxy
    scores: torch.Tensor  # (N,)
    class_ids: torch.Tensor  # (N,) contiguous class indices
    labels: list[str]  # class names


def run_kind(run_dir: Path) -> str:
    """"classify", "detect" or "pretrain", from the run's config.yaml."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a mim run directory (no config.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("task") == "detect":
        return "detect"
    return "pretrain" if "method" in raw else "classify"


def run_config(run_dir: Path, job: str, overrides: Sequence[str] = ()) -> Any:
    """The run's validated config; a data folder that is gone (another machine) is not needed to
    rebuild the model, so it is replaced by the synthetic set rather than refused."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    path = (raw.get("data") or {}).get("path")
    extra = ["data.path=", "data.synthetic=true"] if path and not Path(path).exists() else []
    no_init = [] if job == "pretrain" else _NO_INIT
    return load_config(run_dir / "config.yaml", [*_MODEL_ONLY, *no_init, *extra, *overrides],
                       job=job)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path.parent} is not a finished mim run: no {path.name}")
    return load_file(str(path))


class LoadedClassifier:
    """The timm ViT classifier of a fine-tuning run and its evaluation preprocessing."""

    task = "classify"

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu") -> None:
        from mim.models.classifier import build_classifier

        self.run_dir, self.device = run_dir, torch.device(device)
        self.config = run_config(run_dir, "finetune")
        info_path = run_dir / "best" / "metrics.json"
        if not info_path.is_file():
            raise ConfigError(f"{run_dir} is not a finished mim fine-tuning run "
                              "(needs best/model.safetensors and best/metrics.json)")
        info = json.loads(info_path.read_text())
        self.class_names: list[str] = list(info["class_names"])
        self.net, _ = build_classifier(self.config, int(info["num_classes"]), load_init=False)
        self.net.load_state_dict(_weights(run_dir / "best" / "model.safetensors"))
        self.net.to(self.device).eval()
        d = self.config.data
        self.transform = eval_transform(self.config.model.img_size, d.mean, d.std,
                                        crop_pct=d.eval_crop_pct)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) preprocessed images -> (B, num_classes) logits, on the CPU."""
        return self.net(images.to(self.device)).float().cpu()

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[Classification]:
        probs = logits.softmax(dim=-1)
        scores, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [Classification([self.class_names[i] for i in row_ids], row_scores, row_ids)
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def predict(self, images: Sequence[Image.Image], topk: int = 5,
                batch_size: int = 32) -> list[Classification]:
        out: list[Classification] = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            out += self.top_k(self.logits(batch), topk)
        return out


class LoadedDetector:
    """The ViT + pyramid + RetinaNet detector of a detection run and its evaluation steps."""

    task = "detect"

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu") -> None:
        from mim.models.detector import build_detector

        self.run_dir, self.device = run_dir, torch.device(device)
        self.config = run_config(run_dir, "detect")
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise ConfigError(f"{run_dir} is not a finished mim detection run "
                              "(needs model.safetensors and summary.json)")
        summary = json.loads(summary_path.read_text())
        self.class_names: list[str] = list(summary["classes"])
        # COCO files keep their category ids; every other source numbers classes from 1
        self.category_ids: list[int] = list(summary.get(
            "category_ids", range(1, len(self.class_names) + 1)))
        num_classes = self.config.model.num_classes or len(self.class_names)
        self.net, _ = build_detector(self.config, num_classes, load_init=False)
        self.net.load_state_dict(_weights(run_dir / "model.safetensors"))
        self.net.to(self.device).eval()
        d = self.config.data
        self.transform = detection_transform(self.config.model.img_size, False, d.mean, d.std,
                                             min_box_size=d.min_box_size)

    def preprocess(self, image: Image.Image) -> dict[str, Any]:
        """A sample as the evaluation loader makes it (fitted into img_size, normalised)."""
        img = to_rgb(image)
        out = self.transform({
            "image": img,
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                              canvas_size=(img.height, img.width)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "iscrowd": torch.zeros(0, dtype=torch.bool)})
        return {"image": out["image"].as_subclass(torch.Tensor), "boxes": torch.zeros(0, 4),
                "labels": out["labels"], "iscrowd": out["iscrowd"], "image_id": 0,
                "orig_size": (img.height, img.width), "index": 0, "bad": [], "issues": []}

    @torch.no_grad()
    def detect(self, samples: list[dict[str, Any]]) -> list[Detections]:
        """Preprocessed samples -> detections in each sample's original pixels."""
        from mim.engine.detect import to_original_pixels

        batch = pad_collate(samples, self.net.size_divisibility)
        out = self.net(batch["images"].to(self.device), batch["mask"].to(self.device))
        ev = self.config.eval
        dets = self.net.postprocess(out, batch["sizes"], ev.score_thresh, ev.nms_iou,
                                    ev.topk_candidates, ev.max_detections)
        result = []
        for det, size, orig in zip(dets, batch["sizes"], batch["orig_sizes"]):
            ids = det["labels"].cpu()
            result.append(Detections(to_original_pixels(det, size, orig), det["scores"].cpu(),
                                     ids, [self.class_names[int(i)] for i in ids]))
        return result

    def predict(self, images: Sequence[Image.Image], batch_size: int = 8) -> list[Detections]:
        out: list[Detections] = []
        for i in range(0, len(images), batch_size):
            out += self.detect([self.preprocess(im) for im in images[i:i + batch_size]])
        return out


LoadedModel = LoadedClassifier | LoadedDetector


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The classifier or detector a finished ``mim finetune``/``mim detect`` run trained,
    in eval mode: ``load_model("runs/cls-demo").predict([PIL images])``."""
    run = Path(run_dir)
    if run.is_file():
        raise ConfigError(f"load_model takes a run directory, not a file ({run}); mim reads "
                          "weights from safetensors only and never unpickles a checkpoint")
    kind = run_kind(run)
    if kind == "pretrain":
        raise ConfigError(f"{run} is a pretraining run: it has an encoder and no head to "
                          "predict with (get its features with `mim embed --init`)")
    return LoadedDetector(run, device) if kind == "detect" else LoadedClassifier(run, device)
