"""The detector on a CUDA device (skipped without one): padding invariance in fp32, and a short
bf16 fine-tuning whose loss falls and whose evaluation runs end to end."""

import json

import pytest
import torch

from mim.config import load_config
from mim.engine.detect import detect
from mim.engine.tracking import read_metrics
from mim.models.detector import build_detector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["model.arch=vit_tiny_patch16_224", "model.img_size=64", "model.patch_size=8",
        "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.pyramid_dim=32",
        "data.synthetic=true", "data.num_workers=0", "tracking.backend=none", "run.resume=none"]


def test_padding_invariance_on_cuda():
    torch.manual_seed(0)
    model = build_detector(load_config(None, TINY, job="detect"), 3)[0].cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    small = torch.randn(1, 3, 32, 24, device="cuda")
    alone = torch.zeros(1, 3, 32, 32, device="cuda")
    alone[..., :24] = small
    mask_alone = torch.zeros(1, 32, 32, dtype=torch.bool, device="cuda")
    mask_alone[..., :24] = True
    batch = torch.randn(2, 3, 64, 64, device="cuda")
    batch[0] = 0
    batch[0, :, :32, :24] = small
    mask = torch.ones(2, 64, 64, dtype=torch.bool, device="cuda")
    mask[0] = False
    mask[0, :32, :24] = True
    with torch.no_grad():
        a, b = model(alone, mask_alone), model(batch, mask)
    ka, kb = a.anchor_valid[0], b.anchor_valid[0]
    assert torch.equal(a.anchors[ka], b.anchors[kb])
    assert torch.allclose(a.cls_logits[0, ka], b.cls_logits[0, kb], atol=1e-4)
    assert torch.allclose(a.box_deltas[0, ka], b.box_deltas[0, kb], atol=1e-4)


def test_bf16_training_on_cuda(tmp_path):
    cfg = load_config(None, TINY + [
        f"run.output_dir={tmp_path}", "run.name=gpu", "data.synthetic_size=256",
        "data.batch_size=32", "train.epochs=30", "train.eval_every=30", "train.log_every=8",
        "train.mixed_precision=bf16", "optim.lr=2e-3", "optim.warmup_epochs=0.5"], job="detect")
    run_dir = detect(cfg)
    rec = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert rec[-1]["loss"] < 0.7 * rec[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["map_50"] > 0.05, summary
    print("gpu run:", {k: summary[k] for k in ("map", "map_50", "mar_100")},
          "images/s", rec[-1]["images_per_s"])
