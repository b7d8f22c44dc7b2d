"""The model card (``README.md``, Hugging Face layout) every export writes, and the Hub upload.

The card is ``huggingface_hub.ModelCard.from_template`` filled from the run directory: what the
model is, its resolved config, the data, the budget (updates, images seen, FLOPs per image) and
the metrics its run measured (``summary.json``); nothing in it is estimated.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import yaml

from mim.config import ConfigError

TASKS = {  # kind -> (what it is, Hub pipeline tag, model-index task type)
    "classify": ("image classifier", "image-classification", "image-classification"),
    "detect": ("object detector (ViT + simple feature pyramid + RetinaNet head)",
               "object-detection", "object-detection"),
    "pretrain": ("image encoder (no head; pooled features)", "image-feature-extraction",
                 "image-feature-extraction"),
}
METRICS = {"classify": (("top1", "accuracy"), ("top5", "top-5 accuracy"),
                        ("macro_f1", "f1"), ("loss", "loss")),
           "detect": (("map", "mAP"), ("map_50", "mAP@0.5"), ("map_75", "mAP@0.75"),
                      ("mar_100", "AR@100")),
           "pretrain": ()}


_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailable(ConfigError):
    """An upload that cannot happen here (offline mode, no network): said in one line."""


def _data_name(cfg: dict[str, Any]) -> str:
    d = cfg.get("data", {})
    if d.get("synthetic"):
        return "mim synthetic shapes"
    return d.get("name") or Path(d.get("path") or "images").name


def _lines(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in rows if v not in (None, "", []))


def _metrics(kind: str, summary: dict[str, Any]) -> dict[str, float]:
    measured = summary.get("best_metrics") or summary  # a classifier: its best evaluation
    return {key: float(measured[key]) for key, _ in METRICS[kind]
            if isinstance(measured.get(key), (int, float))}


def _usage(kind: str, fmt: str) -> str:
    if fmt == "timm":
        return ("```python\nimport timm\nmodel = timm.create_model(\"local-dir:PATH/TO/THIS/"
                "FOLDER\", pretrained=True).eval()\n```")
    outputs = ("logits = session.run(None, {\"images\": images})[0]  # (B, classes)"
               if kind == "classify" else
               "boxes, scores = session.run(None, {\"images\": images, \"mask\": mask})"
               "  # before NMS")
    return ("```python\nimport onnxruntime\nsession = onnxruntime.InferenceSession(\"model.onnx"
            f"\")\n{outputs}\n```\nPreprocessing, class names and (detector) the NMS settings "
            "are in the ONNX metadata (`session.get_modelmeta().custom_metadata_map`).")


def write_model_card(run_dir: Path, out: Path, kind: str, fmt: str) -> Path:
    """``out/README.md`` for the export of ``run_dir``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    what, pipeline, task_type = TASKS[kind]
    name = cfg.get("run", {}).get("name") or run_dir.name
    m, d, data = cfg.get("model", {}), cfg.get("data", {}), _data_name(cfg)
    split = d.get("val_split", "")
    metrics = _metrics(kind, summary)
    card_data = ModelCardData(
        model_name=name, library_name="timm" if fmt == "timm" else "onnx", pipeline_tag=pipeline,
        tags=["mim", "vision-transformer", "masked-image-modeling", pipeline],
        datasets=[d["name"]] if d.get("name") else None,
        metrics=[label for key, label in METRICS[kind] if key in metrics] or None,
        eval_results=[EvalResult(task_type=task_type, dataset_type=d.get("name") or data,
                                 dataset_name=data, dataset_split=split or None,
                                 metric_type=label, metric_value=round(metrics[key], 6))
                      for key, label in METRICS[kind] if key in metrics] or None)
    method = cfg.get("method", {}).get("name")
    classes = summary.get("class_names") or summary.get("classes") or []
    card = ModelCard.from_template(
        card_data,
        model_id=name,
        model_summary=f"A timm `{m.get('arch')}` {what} trained with `mim`"
                      + (f" ({method} pretraining)." if method else
                         f", initialised from `{cfg.get('init', 'scratch')}`."),
        model_description=_lines([
            ("architecture", f"`{m.get('arch')}`, {m.get('img_size')} px, patch "
                             f"{m.get('patch_size')}"),
            ("exported as", "ONNX (`model.onnx`)" if fmt == "onnx" else
             "timm folder (`model.safetensors` + `config.json`)"),
            ("classes", f"{len(classes)}: {', '.join(map(str, classes[:20]))}"
                        + (" ..." if len(classes) > 20 else "") if classes else None),
            ("init", (summary.get("init") or {}).get("source") or cfg.get("init"))]),
        model_type=what,
        training_data=_lines([("data", data), ("split", d.get("split")),
                              ("label fraction", d.get("label_fraction")),
                              ("training images", summary.get("train_images")),
                              ("validation images", summary.get("val_images"))]),
        preprocessing=_lines([("input size", m.get("img_size")), ("mean", d.get("mean")),
                              ("std", d.get("std")), ("eval crop", d.get("eval_crop_pct"))]),
        training_regime="The resolved `mim` config:\n\n```yaml\n"
                        + yaml.safe_dump(cfg, sort_keys=False) + "```",
        speeds_sizes_times=_lines([("updates", summary.get("updates")),
                                   ("epochs", summary.get("epochs")),
                                   ("global batch", summary.get("global_batch")),
                                   ("images seen", summary.get("images_seen")),
                                   ("forward FLOPs / image", summary.get("flops_per_image"))]),
        testing_data=f"The `{split}` split of {data}." if split else None,
        testing_metrics=", ".join(label for key, label in METRICS[kind] if key in metrics),
        results=_lines([(label, f"{metrics[key]:.4f}") for key, label in METRICS[kind]
                        if key in metrics]) or "No evaluation (a pretraining run).",
        get_started_code=_usage(kind, fmt),
        software="`mim` (timm, PyTorch, accelerate)",
    )
    out.mkdir(parents=True, exist_ok=True)
    card.save(out / "README.md")
    return out / "README.md"


def push_folder(folder: Path, repo: str, timeout_s: float = 5.0) -> str:
    """Upload ``folder`` to the Hub model repo ``repo`` (created if needed); refuses at once,
    in one line, when offline mode is set or the Hub cannot be reached."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        raise HubUnavailable(f"--push-to-hub: offline (HF_HUB_OFFLINE=1); not uploaded. The "
                             f"export is in {folder}")
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        raise HubUnavailable(f"--push-to-hub: cannot reach {host} ({e}); not uploaded. The "
                             f"export is in {folder}") from None
    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                             commit_message="mim export")
    return str(getattr(info, "commit_url", info))
