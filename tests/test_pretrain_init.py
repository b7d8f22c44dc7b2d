"""Continued pretraining (``init=`` of `mim pretrain`): what is loaded where, and resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mim import load_config
from mim.engine.pretrain import pretrain
from mim.engine.tracking import read_metrics
from mim.methods import build_pretrainer
from mim.models.init import InitError
from mim.models.pretrain_init import load_pretrainer_init
from tests.conftest import TINY

MAE_NAMES = {"decoder.embed.": "decoder_embed.", "decoder.blocks.": "decoder_blocks.",
             "decoder.norm.": "decoder_norm.", "decoder.pred.": "decoder_pred.",
             "decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed",
             "encoder.vit.": ""}


def tiny_cfg(*extra: str):
    mae_only = () if "method.name=simmim" not in extra else ("method.decoder",)
    base = [k for k in TINY if not mae_only or not k.startswith(mae_only)]
    return load_config(None, base + ["data.synthetic=true", *extra])


def official_mae_state(seed: int = 1, *extra: str) -> dict[str, torch.Tensor]:
    """A state dict under the key names of facebookresearch/mae models_mae.py, random values."""
    torch.manual_seed(seed)
    model = build_pretrainer(tiny_cfg(*extra))
    out = {}
    for key, value in model.state_dict().items():
        for ours, theirs in MAE_NAMES.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = torch.randn_like(value)
    return out


def save_mae_pth(path, state) -> None:
    torch.save({"model": state, "epoch": 799}, path)  # the layout of MAE's released files


def test_official_mae_pth_loads_encoder_and_decoder(tmp_path):
    state = official_mae_state()
    assert {"decoder_pos_embed", "mask_token", "decoder_blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias", "decoder_pred.weight"} <= set(state)
    save_mae_pth(tmp_path / "mae.pth", state)
    model = build_pretrainer(tiny_cfg())
    report = load_pretrainer_init(model, str(tmp_path / "mae.pth"))
    assert report.kind == "mae" and not report.missing and not report.unexpected
    assert report.loaded == len(state)
    ours = model.state_dict()
    for key, value in state.items():
        name = next((o + key[len(t):] for o, t in MAE_NAMES.items() if t and key.startswith(t)),
                    "encoder.vit." + key)
        assert torch.equal(ours[name], value), key


def test_decoder_table_is_resampled_and_a_wider_decoder_refused(tmp_path):
    save_mae_pth(tmp_path / "mae.pth", official_mae_state())  # 32 px / 8 px patches: 4x4
    bigger = build_pretrainer(tiny_cfg("model.img_size=64"))
    report = load_pretrainer_init(bigger, str(tmp_path / "mae.pth"))
    assert "decoder.pos_embed (1, 17, 32) -> (1, 65, 32)" in report.adapted
    assert "pos_embed (1, 17, 32) -> (1, 65, 32)" in report.adapted
    wider = build_pretrainer(tiny_cfg("method.decoder_dim=64"))
    with pytest.raises(InitError, match=r"cannot load .decoder\..*file shape .*32\).*model shape .*64"):
        load_pretrainer_init(wider, str(tmp_path / "mae.pth"))


def test_encoder_safetensors_loads_the_encoder_and_leaves_the_decoder(tiny):
    run = pretrain(load_config(None, tiny("train.epochs=1", name="src")))
    file = load_file(str(run / "encoder.safetensors"))
    model = build_pretrainer(tiny_cfg())
    decoder_before = model.decoder.embed.weight.clone()
    report = load_pretrainer_init(model, str(run / "encoder.safetensors"))
    assert all(torch.equal(model.encoder.vit.state_dict()[k], v) for k, v in file.items())
    assert torch.equal(model.decoder.embed.weight, decoder_before)
    assert "decoder.embed.weight" in report.missing and not report.unexpected
    # the run directory itself gives its newest checkpoint: the decoder comes along
    full = build_pretrainer(tiny_cfg())
    report = load_pretrainer_init(full, str(run))
    ckpt = load_file(str(next((run / "checkpoints").iterdir()) / "model.safetensors"))
    assert report.kind == "mim" and not report.missing
    assert all(torch.equal(full.state_dict()[k], v) for k, v in ckpt.items())


def test_continued_run_reports_its_init_and_resume_does_not_reapply_it(tiny, tmp_path, capsys):
    pth = tmp_path / "mae.pth"
    save_mae_pth(pth, official_mae_state())
    common = ("train.epochs=2", "optim.lr=1e-3", "train.save_every=3", f"init={pth}")
    full = pretrain(load_config(None, tiny(*common, name="full")))
    report = json.loads((full / "init_report.json").read_text())
    assert report["kind"] == "mae" and report["missing"] == [] and report["loaded"] > 0
    assert "init: mae weights from" in capsys.readouterr().out
    part = pretrain(load_config(None, tiny(*common, "train.max_steps=5", name="part")))
    shutil.rmtree(part / "checkpoints" / "step_00000005")  # killed before this one was complete
    save_mae_pth(pth, official_mae_state(seed=2))  # re-applying the init would now change it all
    pretrain(load_config(None, tiny(*common, name="part")))
    assert "not applied again: the run resumes from" in capsys.readouterr().out
    a = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(part / "metrics.jsonl")]
    assert len(a) == len(b) == 16 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_pickled_init_is_refused(tiny, tmp_path):
    import datetime

    torch.save({"model": {"w": torch.zeros(1)}, "saved": datetime.date(2024, 1, 1)},
               tmp_path / "evil.pth")
    with pytest.raises(InitError, match="not a weights-only checkpoint"):
        pretrain(load_config(None, tiny(f"init={tmp_path / 'evil.pth'}", "train.epochs=1")))


def test_beit_pth_gives_the_encoder_mask_token_and_drops_lm_head(tmp_path):
    cfg = ("method.name=simmim", "model.init_values=0.1")
    torch.manual_seed(3)
    source = build_pretrainer(tiny_cfg(*cfg)).encoder
    state = {k: torch.randn_like(v) for k, v in source.vit.state_dict().items()}
    for k in [k for k in state if k.endswith(".attn.qkv.bias")]:  # BEiT: q and v biases only
        q, _, v = state.pop(k).chunk(3)
        state[k.replace("qkv.bias", "q_bias")], state[k.replace("qkv.bias", "v_bias")] = q, v
    for k in [k for k in state if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        state[k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = state.pop(k)
    state["mask_token"] = torch.randn(1, 1, 32)
    state["lm_head.weight"] = torch.randn(8192, 32)
    save_mae_pth(tmp_path / "beit.pth", state)
    model = build_pretrainer(tiny_cfg(*cfg))
    report = load_pretrainer_init(model, str(tmp_path / "beit.pth"))
    assert report.kind == "beit" and not report.unexpected
    assert torch.equal(model.encoder.mask_token, state["mask_token"])
    assert torch.equal(model.encoder.vit.blocks[1].ls2.gamma, state["blocks.1.gamma_2"])
    assert any(k.startswith("lm_head.weight") for k in report.dropped)
    assert all(k.startswith("head.") for k in report.missing)  # SimMIM's pixel head is new
