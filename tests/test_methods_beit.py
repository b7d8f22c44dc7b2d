"""SimMIM, MaskFeat, BEiT and the VQ tokenizer: losses fall, the engine trains them unchanged,
their encoders load into timm, and their configs are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from mim.cli import main
from mim.config import ConfigError, load_config
from mim.data import eval_transform
from mim.data.synthetic import SyntheticShapes
from mim.methods import build_pretrainer
from mim.methods.vq_tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from tests.conftest import full_and_resumed_losses

TINY = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
        "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "data.synthetic=true",
        "data.synthetic_size=64", "data.batch_size=16", "data.num_workers=0",
        "tracking.backend=none", "train.epochs=2", "train.log_every=2", "optim.warmup_epochs=0",
        "optim.base_lr=0.005"]
TOKENIZER = ["method.name=vq_tokenizer", "method.codebook_size=32", "method.code_dim=8",
             "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
METHODS = {
    "simmim": ["method.name=simmim", "method.mask_ratio=0.5", "method.norm_pix_loss=false"],
    "maskfeat": ["method.name=maskfeat", "method.mask_ratio=0.5", "method.hog_cell=4",
                 "method.mask_type=block", "method.block_min_patches=2"],
    "beit": ["method.name=beit", "method.mask_ratio=0.4", "method.mask_type=block",
             "method.block_min_patches=2"],
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    tf = eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    source = SyntheticShapes(64, 32, seed=0)
    return torch.stack([tf(source.load(i)[0]) for i in range(len(source))])


def _train(model: torch.nn.Module, images: torch.Tensor, steps: int, lr: float = 2e-3) -> list:
    """Plain AdamW steps on random batches of 16; returns the losses."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(len(images), (16,))]
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _falls(losses: list, factor: float) -> bool:
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return last < factor * first


@pytest.fixture(scope="module")
def tokenizer_file(images, tmp_path_factory) -> Path:
    """A tiny tokenizer trained for a few dozen steps (also checks that its loss falls)."""
    cfg = load_config(None, TINY + TOKENIZER)
    torch.manual_seed(0)
    model = build_pretrainer(cfg)
    losses = _train(model, images, 40, lr=3e-3)
    assert _falls(losses, 0.8), losses
    path = tmp_path_factory.mktemp("tok") / TOKENIZER_FILE
    return save_tokenizer(model.eval(), cfg, path)


def _cfg(name: str, tokenizer: Path, extra: list[str] = ()):
    tok = [f"method.tokenizer={tokenizer}"] if name == "beit" else []
    return load_config(None, TINY + METHODS[name] + tok + list(extra))


@pytest.mark.parametrize("name, factor", [("simmim", 0.9), ("maskfeat", 0.9), ("beit", 0.9)])
def test_loss_falls_on_synthetic_images(name, factor, images, tokenizer_file):
    torch.manual_seed(0)
    model = build_pretrainer(_cfg(name, tokenizer_file))
    losses = _train(model, images, 40)
    assert _falls(losses, factor), losses


def test_predictions_and_masks_have_the_documented_shapes(images, tokenizer_file):
    batch = images[:4]
    for name in METHODS:
        model = build_pretrainer(_cfg(name, tokenizer_file))
        out = model(batch)
        assert out.mask.shape == (4, 16) and (out.mask.sum(1) == model.num_masked).all()
    assert out.pred.shape == (4, model.num_masked, 32)  # beit: logits of masked patches
    assert out.target.shape == (4, 16) and out.target.dtype == torch.long
    assert torch.equal(model.predicted_codes(out)[~out.mask], out.target[~out.mask])


def test_beit_renormalises_inputs_for_its_tokenizer(images, tokenizer_file):
    """A BEiT run normalising its data differently still feeds the tokenizer what it saw."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = build_pretrainer(_cfg("beit", tokenizer_file, [f"data.mean={list(mean)}",
                                                           f"data.std={list(std)}"]))
    tok, meta = load_tokenizer(tokenizer_file)
    raw = images[:4] * torch.tensor(meta["std"]).view(1, 3, 1, 1) \
        + torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    ours = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(model.tokens_of(ours), tok.encode(images[:4]))


def test_beit_config_needs_a_matching_tokenizer(tokenizer_file, tmp_path):
    with pytest.raises(ConfigError, match="method.tokenizer"):
        load_config(None, TINY + METHODS["beit"])
    with pytest.raises(ConfigError, match="method.tokenizer"):
        load_config(None, TINY + METHODS["beit"] + [f"method.tokenizer={tmp_path}"])
    with pytest.raises(ConfigError, match="method.tokenizer.*patches"):
        load_config(None, TINY + METHODS["beit"] + [f"method.tokenizer={tokenizer_file}",
                                                    "model.patch_size=4"])
    with pytest.raises(ConfigError, match="method.hog_cell"):
        load_config(None, TINY + METHODS["maskfeat"] + ["method.hog_cell=3"])


def test_tokenizer_command_refuses_another_method(capsys):
    assert main(["tokenizer", *TINY, "method.name=simmim"]) == 2
    assert "method.name" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory) -> dict[str, Path]:
    """The real CLI and engine: `mim tokenizer`, then `mim pretrain` for each method."""
    out = tmp_path_factory.mktemp("runs")
    common = TINY + [f"run.output_dir={out}", "train.epochs=1"]
    assert main(["tokenizer", *common, *TOKENIZER, "run.name=tok"]) == 0
    runs = {"tok": out / "tok"}
    for name, extra in METHODS.items():
        tok = [f"method.tokenizer={out / 'tok'}"] if name == "beit" else []
        assert main(["pretrain", *common, *extra, *tok, f"run.name={name}"]) == 0
        runs[name] = out / name
    return runs


def test_engine_writes_tokenizer_with_codebook_usage(engine_runs):
    run = engine_runs["tok"]
    assert (run / TOKENIZER_FILE).is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(1 <= r["codes_used"] <= 32 and r["code_perplexity"] >= 1 for r in rows)
    assert (run / "recon_epoch0001.png").is_file()  # image | code map | decoded


def test_engine_logs_beit_token_accuracy_and_token_grid(engine_runs):
    rows = (engine_runs["beit"] / "metrics.jsonl").read_text().splitlines()
    assert all(0 <= json.loads(r)["token_acc"] <= 1 for r in rows)
    assert (engine_runs["beit"] / "recon_epoch0001.png").is_file()
    assert (engine_runs["simmim"] / "recon_epoch0001.png").is_file()


@pytest.mark.parametrize("name", list(METHODS))
def test_encoder_export_loads_into_timm(name, engine_runs):
    run = engine_runs[name]
    file = run / "encoder.safetensors"
    # custom_load=False: timm 1.0.29 (seen; 1.0.31 is fine) otherwise expects a JAX .npz here
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                            pretrained_cfg_overlay={"file": str(file), "custom_load": False},
                            num_classes=0, img_size=32, patch_size=8, embed_dim=64, depth=2,
                            num_heads=2)
    ckpt = max((run / "checkpoints").iterdir()) / "model.safetensors"
    from safetensors.torch import load_file

    trained = load_file(str(ckpt))
    for key, value in vit.state_dict().items():
        assert torch.equal(value, trained[f"encoder.vit.{key}"]), key


def test_beit_resume_repeats_the_uninterrupted_run(tokenizer_file, tmp_path):
    """Block masks come from the engine's per-step seed, so a resumed BEiT run is exact."""
    a, b = full_and_resumed_losses(
        TINY + METHODS["beit"] + [f"method.tokenizer={tokenizer_file}", "train.log_every=1",
                                  "train.save_every=2", "train.vis_every=0",
                                  f"run.output_dir={tmp_path}"])
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
