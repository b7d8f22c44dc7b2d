import subprocess

import pytest
import yaml

from mim.config import ConfigError, load_config
from tests.conftest import REPO, mim_cmd


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  img_size: 64\ndata:\n  synthetic: true\n")
    cfg = load_config(f, ["model.patch_size=8", "optim.betas=[0.9,0.999]", "tracking.tags=a,b",
                          "optim.base_lr=1e-3", "train.epochs=3"])
    assert cfg.model.img_size == 64 and cfg.model.patch_size == 8
    assert cfg.optim.betas == (0.9, 0.999) and cfg.tracking.tags == ["a", "b"]
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.method.mask_ratio == 0.75  # untouched default
    assert cfg.to_dict()["optim"]["clip_grad"]["mode"] == "none"


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("modle.arch=x", r"unknown config key 'modle"),
    ("train.epochs=ten", r"'train.epochs' must be int"),
    ("train.epochs=1.5", r"'train.epochs' must be int"),
    ("method.norm_pix_loss=maybe", r"'method.norm_pix_loss' must be bool"),
    ("method.mask_ratio=1.0", r"'method.mask_ratio' must be in \(0, 1\)"),
    ("method.name=simclr", r"'method.name' must be one of"),
    ("model.img_size=30", r"'model.img_size' \(30\) must be a multiple of 'model.patch_size'"),
    ("optim.clip_grad.mode=l2", r"'optim.clip_grad.mode' must be one of"),
    ("train.mixed_precision=fp8", r"'train.mixed_precision' must be one of"),
    ("data.batch_size=0", r"'data.batch_size' must be positive"),
    ("noequals", r"not of the form key=value"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.synthetic=true", override])


@pytest.mark.parametrize("overrides,match", [
    (["method.hog_bins=9"], r"'method.hog_bins' is not a key of method.name=mae "
                            r"\(it belongs to maskfeat\)"),
    (["method.name=supervised", "method.decoder_dim=8"],
     r"'method.decoder_dim' is not a key of method.name=supervised \(it belongs to mae, "
     r"vq_tokenizer\)"),
    (["method.name=maskfeat", "method.hog_binz=9"],
     r"unknown config key 'method.hog_binz' \(did you mean 'method.hog_bins'\?\)"),
])
def test_a_key_of_another_method_is_an_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.synthetic=true", *overrides])


def test_each_method_has_its_own_section():
    cfg = load_config(None, ["data.synthetic=true", "method.name=maskfeat", "method.hog_cell=4"])
    assert type(cfg.method).__name__ == "MaskFeatConfig" and cfg.method.hog_cell == 4
    assert cfg.to_dict()["method"]["name"] == "maskfeat"
    assert "decoder_dim" not in cfg.to_dict()["method"]
    again = load_config(None, [f"{k}={v}" for k, v in _flat(cfg.to_dict())])
    assert again.method == cfg.method


def test_a_saved_flat_method_section_of_an_earlier_version_loads(tmp_path):
    """Run directories written before the per-method sections hold every method's keys."""
    old = {"name": "simmim", "mask_ratio": 0.6, "norm_pix_loss": False, "decoder_dim": 512,
           "decoder_depth": 8, "decoder_heads": 16, "mask_type": "random",
           "block_min_patches": 16, "block_max_patches": 0, "block_aspect": [0.3, 3.33],
           "hog_bins": 9, "hog_cell": 8, "tokenizer": "", "codebook_size": 8192, "code_dim": 32,
           "code_entropy_weight": 0.1, "num_classes": 0}
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump({"method": old, "data": {"synthetic": True}}))
    cfg = load_config(f)
    assert type(cfg.method).__name__ == "SimMIMConfig"
    assert (cfg.method.mask_ratio, cfg.method.norm_pix_loss) == (0.6, False)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            out.append((f"{prefix}{k}", "[" + ",".join(str(x) for x in v) + "]"))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def test_missing_data_path_is_an_error():
    with pytest.raises(ConfigError, match=r"'data.path': no such file or folder"):
        load_config(None, ["data.path=/nonexistent/images"])
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(None, [])


def test_cli_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run(mim_cmd() + ["pretrain", "-c", str(REPO / "configs/pretrain/demo.yaml"),
                                    "optim.warmup_epoch=3", f"run.output_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["mim: error: unknown config key 'optim.warmup_epoch' "
                     "(did you mean 'optim.warmup_epochs'?)"]
    assert not (tmp_path / "demo-pretrain").exists()  # no work started


def _tiny_tokenizer(tmp_path, img_size: int, patch_size: int):
    """A small untrained BEiT tokenizer file for the given image and patch size."""
    from mim.methods import build_pretrainer
    from mim.methods.vq_tokenizer import save_tokenizer

    cfg = load_config(None, ["data.synthetic=true", "method.name=vq_tokenizer",
                             f"model.img_size={img_size}", f"model.patch_size={patch_size}",
                             "model.arch=vit_tiny_patch16_224", "model.embed_dim=32",
                             "model.depth=1", "model.num_heads=2", "method.codebook_size=16",
                             "method.decoder_dim=32", "method.decoder_depth=1",
                             "method.decoder_heads=2"])
    return save_tokenizer(build_pretrainer(cfg), cfg, tmp_path / "tokenizer.safetensors")


@pytest.mark.parametrize("path", sorted((REPO / "configs/pretrain").glob("*.yaml")))
def test_shipped_configs_validate(path, tmp_path):
    # shipped configs point at user data; substitute the synthetic set to validate the rest
    raw = yaml.safe_load(path.read_text()) or {}
    over = [] if (raw.get("data") or {}).get("synthetic") else \
        ["data.synthetic=true", "data.path=", "data.name="]
    if (raw.get("method") or {}).get("name") == "beit":  # BEiT needs a tokenizer trained first
        model = raw.get("model") or {}
        tok = _tiny_tokenizer(tmp_path, model.get("img_size", 224), model.get("patch_size", 16))
        over.append(f"method.tokenizer={tok}")
    load_config(path, over)


def test_yaml_boolean_words_map_onto_string_choices():
    cfg = load_config(None, ["data.synthetic=true", "train.mixed_precision=no",
                             "optim.clip_grad.mode=none"])
    assert cfg.train.mixed_precision == "no" and cfg.optim.clip_grad.mode == "none"
