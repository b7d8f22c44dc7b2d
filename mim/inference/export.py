"""``mim export``: a run's model as ONNX or as a timm folder, with a model card beside it.

- ``onnx``, classifier: ``model.onnx`` maps normalised images (B, C, S, S) to logits (B, K).
- ``onnx``, detector: ``model.onnx`` maps normalised images (B, C, S, S), fitted into S x S and
  padded at the bottom and right, and their ``mask`` (B, S, S; True on real pixels) to every
  anchor's ``boxes`` (B, A, 4; xyxy in the input's pixels, decoded, not clipped) and ``scores``
  (B, A, K; sigmoid, 0 where the anchor centre is padding): BEFORE non-maximum suppression.
  Keep scores above a threshold, clip to the image, run class-wise NMS (the run's
  ``eval.score_thresh``, ``eval.nms_iou`` and ``eval.max_detections`` are in the metadata), then
  scale to the original image.
- ``timm``: ``model.safetensors`` + ``config.json`` that ``timm.create_model("local-dir:DIR",
  pretrained=True)`` loads with no other argument: a classifier, or the encoder of a pretraining
  run (``num_classes=0``, average pooling after the encoder's own final norm).

The ONNX file is written by ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``): it
needs no onnxscript, and the tracer records the detector's masked-attention path for any mask
(the dynamo exporter would stop at its data-dependent "no padding" shortcut). Its metadata
holds the class names and the preprocessing (size, mean, std, crop).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mim.config import ConfigError
from mim.inference.card import push_folder, write_model_card
from mim.inference.model import (LoadedClassifier, LoadedDetector, load_model, run_config,
                                 run_kind)

OPSET = 17


class DetectorBeforeNMS(nn.Module):
    """The detector's dense outputs, decoded: what ``postprocess`` starts from."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector(images, mask)
        B, A, _ = out.box_deltas.shape
        anchors = out.anchors[None].expand(B, A, 4).reshape(-1, 4)
        boxes = self.detector.box_coder.decode_single(
            out.box_deltas.float().reshape(-1, 4), anchors).reshape(B, A, 4)
        scores = out.cls_logits.float().sigmoid() * out.anchor_valid[..., None]
        return boxes, scores


def example_inputs(model: LoadedClassifier | LoadedDetector, batch: int = 2
                   ) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with (and to test against): a detector's second image is padded, so
    the traced graph keeps the attention mask."""
    m = model.config.model
    images = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
    if isinstance(model, LoadedClassifier):
        return (images,)
    mask = torch.ones(batch, m.img_size, m.img_size, dtype=torch.bool)
    mask[-1, m.img_size // 2:, :] = False
    mask[-1, :, m.img_size * 3 // 4:] = False
    return images * mask[:, None], mask


def onnx_module(model: LoadedClassifier | LoadedDetector) -> nn.Module:
    """The module the ONNX file computes (the classifier itself, or the detector before NMS)."""
    return model.net if isinstance(model, LoadedClassifier) else DetectorBeforeNMS(model.net)


def export_onnx(model: LoadedClassifier | LoadedDetector, path: Path) -> Path:
    import onnx

    net = onnx_module(model).cpu().eval()
    if isinstance(model, LoadedClassifier):
        names_in, names_out = ["images"], ["logits"]
    else:
        names_in, names_out = ["images", "mask"], ["boxes", "scores"]
    dynamic = {n: {0: "batch"} for n in names_in + names_out}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tracer's notes on shapes it records as constants
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example_inputs(model), str(path), dynamo=False,
                          input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
                          opset_version=OPSET)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in _metadata(model).items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _metadata(model: LoadedClassifier | LoadedDetector) -> dict[str, Any]:
    cfg = model.config
    meta: dict[str, Any] = {"task": model.task, "class_names": model.class_names,
                            "img_size": cfg.model.img_size, "mean": list(cfg.data.mean),
                            "std": list(cfg.data.std)}
    if isinstance(model, LoadedClassifier):
        meta["crop_pct"] = cfg.data.eval_crop_pct
    else:
        meta.update(outputs="before NMS", category_ids=model.category_ids,
                    score_thresh=cfg.eval.score_thresh, nms_iou=cfg.eval.nms_iou,
                    max_detections=cfg.eval.max_detections,
                    resize="fit the longer side into img_size, pad bottom/right with 0")
    return meta


def export_timm(run_dir: Path, kind: str, out: Path) -> Path:
    from mim.models.classifier import export_classifier

    if kind == "detect":
        raise ConfigError("--format timm: timm has no detector; export it with --format onnx")
    if kind == "classify":
        model = load_model(run_dir)
        return export_classifier(model.net, model.config, len(model.class_names), out,
                                 model.class_names)
    from mim.models.encoder import create_vit

    weights = run_dir / "encoder.safetensors"
    if not weights.is_file():
        raise ConfigError(f"--run: {run_dir} is not a finished pretraining run (no "
                          "encoder.safetensors)")
    cfg = run_config(run_dir, "pretrain")
    vit = create_vit(cfg.model, num_classes=0, global_pool="avg", fc_norm=False)
    vit.load_state_dict(load_file(str(weights)))
    return export_classifier(vit, cfg, 0, out)


def export(run: str | Path, fmt: str, out: str | Path | None = None,
           push_to_hub: str = "") -> Path:
    """Export the run into ``out`` (default ``<run>/export_<fmt>``) with a README.md model
    card; upload the folder to ``push_to_hub`` when given. Returns the folder."""
    run_dir = Path(run)
    kind = run_kind(run_dir)
    folder = Path(out) if out else run_dir / f"export_{fmt}"
    if fmt == "onnx":
        if kind == "pretrain":
            raise ConfigError("--format onnx exports a classifier or a detector; a pretraining "
                              "run's encoder exports with --format timm")
        weights = export_onnx(load_model(run_dir), folder / "model.onnx")
    elif fmt == "timm":
        weights = export_timm(run_dir, kind, folder)
    else:
        raise ConfigError(f"--format must be 'onnx' or 'timm', got {fmt!r}")
    card = write_model_card(run_dir, folder, kind, fmt)
    print(f"exported {run_dir} ({kind}) as {fmt}: {weights}, model card {card}")
    if push_to_hub:
        url = push_folder(folder, push_to_hub)
        print(f"uploaded {folder} to {url}")
    return folder
