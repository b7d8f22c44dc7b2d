"""mim export: ONNX (checked with onnxruntime), timm local-dir folders, the model card, the Hub
upload refused offline, and the wandb model artifact."""

import json

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import mim
from mim.cli import main
from mim.inference.embed import Encoder
from mim.inference.export import example_inputs, export, onnx_module

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnx_classifier_matches_pytorch_and_has_a_model_card(inference_runs, tmp_path):
    run = inference_runs / "cls"
    folder = export(run, "onnx", tmp_path / "cls")
    model = mim.load_model(run)
    session = _session(folder / "model.onnx")
    x = torch.randn(5, 3, 32, 32)  # another batch size than the traced one
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model.logits(x)
    assert torch.allclose(torch.from_numpy(logits), want, atol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == model.class_names
    assert json.loads(meta["img_size"]) == 32
    card = ModelCard.load(folder / "README.md")
    summary = json.loads((run / "summary.json").read_text())
    result = card.data.eval_results[0]
    assert result.metric_type == "accuracy"
    assert result.metric_value == pytest.approx(summary["best_metrics"]["top1"])
    assert card.data.pipeline_tag == "image-classification"
    for text in ("vit_tiny_patch16_224", "The resolved `mim` config", "images seen",
                 "onnxruntime.InferenceSession"):
        assert text in card.text, text


def test_onnx_detector_before_nms_matches_pytorch(inference_runs, tmp_path):
    run = inference_runs / "det"
    folder = export(run, "onnx", tmp_path / "det")
    model = mim.load_model(run)
    session = _session(folder / "model.onnx")
    images, mask = example_inputs(model, batch=3)
    images = torch.randn_like(images) * mask[:, None]
    boxes, scores = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        want_boxes, want_scores = onnx_module(model)(images, mask)
    assert torch.allclose(torch.from_numpy(boxes), want_boxes, atol=1e-3)
    assert torch.allclose(torch.from_numpy(scores), want_scores, atol=1e-3)
    assert scores.shape[-1] == 10 and (scores[-1] == 0).any()  # anchors on padding
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["outputs"]) == "before NMS"
    # the run's NMS on the ONNX outputs gives the PyTorch detections
    out = model.net(images, mask)
    sizes = torch.tensor([[64, 64]] * 3)
    ev = model.config.eval
    dets = model.net.postprocess(out, sizes, ev.score_thresh, ev.nms_iou, ev.topk_candidates,
                                 ev.max_detections)
    top = torch.from_numpy(scores[0]).flatten().argmax()
    assert dets[0]["scores"][0] == pytest.approx(float(scores[0].flatten()[top]), abs=1e-3)
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "object-detection"
    assert card.data.eval_results[0].metric_type == "mAP"


def test_timm_exports_load_with_local_dir(inference_runs, tmp_path):
    runs = inference_runs
    cls = export(runs / "cls", "timm", tmp_path / "cls")
    in_timm = timm.create_model(f"local-dir:{cls}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(in_timm(x), mim.load_model(runs / "cls").logits(x), atol=1e-5)
    pre = export(runs / "pre", "timm", tmp_path / "pre")
    encoder = timm.create_model(f"local-dir:{pre}", pretrained=True).eval()
    assert json.loads((pre / "config.json").read_text())["num_classes"] == 0
    with torch.no_grad():
        assert torch.allclose(encoder(x), Encoder(str(runs / "pre")).vectors(x), atol=1e-5)
    assert ModelCard.load(pre / "README.md").data.library_name == "timm"
    assert main(["export", "--run", str(runs / "det"), "--format", "timm"]) == 2
    assert main(["export", "--run", str(runs / "pre"), "--format", "onnx"]) == 2


def test_push_to_hub_offline_is_one_line_and_exit_2(inference_runs, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["export", "--run", str(inference_runs / "pre"), "--format", "timm",
               "--out", str(tmp_path / "x"), "--push-to-hub", "someone/tiny-mim"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "offline" in err and str(tmp_path / "x") in err
    assert (tmp_path / "x" / "README.md").is_file()  # the export itself is kept


def test_push_to_hub_without_network_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from mim.inference.card import HubUnavailable, push_folder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")  # nothing listens on 443
    with pytest.raises(HubUnavailable, match="cannot reach 127.0.0.1"):
        push_folder(tmp_path, "someone/tiny-mim", timeout_s=2)


def test_log_model_records_a_wandb_artifact(tmp_path, monkeypatch):
    from mim import load_config
    from mim.engine.finetune import finetune
    from tests.conftest import TINY

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, TINY[:6] + [
        "data.synthetic=true", "data.synthetic_size=32", "data.batch_size=16",
        "data.num_workers=0", "train.epochs=1", "tracking.backend=wandb",
        "tracking.log_model=true", f"run.output_dir={tmp_path}", "run.name=logged"],
        job="finetune")
    run_dir = finetune(cfg)
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and b"logged-model" in logs[0].read_bytes()
