"""The classifier is the timm VisionTransformer itself, so what mim fine-tunes loads in timm.

Built with the run's ``ModelConfig`` through :func:`create_vit`, initialised by
:func:`mim.models.init.load_encoder_init`, then shaped by the recipe (MAE, He et al. 2021,
``main_finetune.py`` / ``main_linprobe.py``):
- full fine-tune: everything trains; global average pooling with ``fc_norm`` when
  ``global_pool=avg``; the new head starts at ``trunc_normal(std=2e-5)``;
- linear probe: a frozen encoder, ``BatchNorm1d(affine=False)`` in front of the linear head;
- partial fine-tune: the last k blocks, the final norms and the head train.

The BatchNorm head is the only part timm's VisionTransformer does not have:
:func:`export_state_dict` folds it into the linear layer, so the exported weights load into a plain
timm ViT and give the same logits as the evaluated model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mim.errors import ConfigError
from mim.models.encoder import create_vit
from mim.models.init import InitReport, load_encoder_init


def classifier_kwargs(cfg: Any, num_classes: int) -> dict[str, Any]:
    """The timm ``create_model`` arguments of the classifier (also written into the export)."""
    rate = cfg.dropout.rate
    return dict(num_classes=num_classes, global_pool=cfg.model.global_pool,
                proj_drop_rate=rate, pos_drop_rate=rate)


def build_classifier(cfg: Any, num_classes: int, load_init: bool = True
                     ) -> tuple[VisionTransformer, InitReport]:
    """The ViT classifier of a fine-tuning config, initialised and frozen as the recipe says."""
    vit = create_vit(cfg.model, **classifier_kwargs(cfg, num_classes))
    report = (load_encoder_init(vit, cfg.init, cfg.init_file, cfg.init_strict) if load_init
              else InitReport(kind="scratch", source=""))
    if report.kind == "scratch" or "head.weight" in report.missing:
        with torch.no_grad():  # a new head, small as in MAE; a loaded one of this size is kept
            trunc_normal_(vit.head.weight, std=cfg.model.head_init_std)
            nn.init.zeros_(vit.head.bias)
    if cfg.model.head_batchnorm:
        vit.head = nn.Sequential(nn.BatchNorm1d(vit.embed_dim, affine=False, eps=1e-6), vit.head)
    set_trainable(vit, cfg.tune.mode, cfg.tune.blocks)
    return vit, report


def set_trainable(vit: VisionTransformer, mode: str, blocks: int = 1) -> None:
    """full: all; linear: the head only; partial: the last ``blocks`` blocks, norms and head."""
    if mode == "full":
        return
    depth = len(vit.blocks)
    if mode == "partial" and not 1 <= blocks <= depth:
        raise ConfigError(f"config key 'tune.blocks' must be in [1, {depth}] (the model depth), "
                          f"got {blocks}")
    vit.requires_grad_(False)
    train = [vit.head]
    if mode == "partial":
        train += [vit.norm, vit.fc_norm, *list(vit.blocks)[depth - blocks:]]
    for module in train:
        module.requires_grad_(True)


# ----------------------------------------------------------------------------- dropout schedule


def dropout_scale(schedule: str, epoch: int, switch_epoch: int) -> float:
    """1 when dropout is on in ``epoch`` (0-based), else 0 (Liu et al. 2023, arXiv 2303.01500).

    constant: always on; early: on for epochs [0, E) then off (against underfitting);
    late: off until epoch E, then on (against overfitting).
    """
    if schedule == "constant":
        return 1.0
    if schedule == "early":
        return 1.0 if epoch < switch_epoch else 0.0
    if schedule == "late":
        return 1.0 if epoch >= switch_epoch else 0.0
    raise ValueError(f"unknown dropout schedule {schedule!r}")


class DropoutSchedule:
    """Remembers every dropout and drop-path rate the model was built with and scales them."""

    def __init__(self, model: nn.Module, schedule: str, switch_epoch: int) -> None:
        self.schedule, self.switch_epoch = schedule, switch_epoch
        self.base = {m: (m.p if isinstance(m, nn.Dropout) else m.drop_prob)
                     for m in model.modules() if isinstance(m, (nn.Dropout, DropPath))}

    def set_epoch(self, epoch: int) -> float:
        scale = dropout_scale(self.schedule, epoch, self.switch_epoch)
        for m, rate in self.base.items():
            if isinstance(m, nn.Dropout):
                m.p = rate * scale
            else:
                m.drop_prob = rate * scale
        return scale


# ----------------------------------------------------------------------------- export


def export_state_dict(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm-loadable weights; a BatchNorm1d(affine=False) + Linear head becomes one Linear.

    BN in eval mode is y = (x - mean) / sqrt(var + eps), so W (y) + b = (W / s) x + (b - W mean / s)
    with s = sqrt(var + eps) per input feature.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    if isinstance(vit.head, nn.Sequential):
        bn, linear = vit.head[0], vit.head[1]
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        weight = linear.weight.double() * scale[None, :]
        bias = linear.bias.double() - weight @ bn.running_mean.double()
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state["head.weight"] = weight.to(linear.weight.dtype).cpu().contiguous()
        state["head.bias"] = bias.to(linear.bias.dtype).cpu().contiguous()
    return state


def export_classifier(vit: VisionTransformer, cfg: Any, num_classes: int, out_dir: Path,
                      class_names: list[str] | None = None) -> Path:
    """``out_dir/model.safetensors`` + timm's ``config.json``: ``timm.create_model(
    "local-dir:<out_dir>", pretrained=True)`` rebuilds the classifier with these weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(vit), str(out_dir / "model.safetensors"))
    m = cfg.model
    pool = getattr(m, "global_pool", "avg")  # a pretraining encoder: avg, its norm before pooling
    model_args: dict[str, Any] = {"img_size": m.img_size, "patch_size": m.patch_size,
                                  "in_chans": m.in_chans, "num_classes": num_classes,
                                  "global_pool": pool}
    if pool == "avg" and isinstance(vit.fc_norm, nn.Identity):
        model_args["fc_norm"] = False
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(m, key):
            model_args[key] = getattr(m, key)
    if m.init_values:
        model_args["init_values"] = m.init_values
    pretrained_cfg = {"input_size": [m.in_chans, m.img_size, m.img_size],
                      "fixed_input_size": True, "interpolation": "bicubic",
                      "crop_pct": getattr(cfg.data, "eval_crop_pct", 1.0), "crop_mode": "center",
                      "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                      "num_classes": num_classes, "first_conv": "patch_embed.proj",
                      "classifier": "head", "custom_load": False}
    if class_names:
        pretrained_cfg["label_names"] = list(class_names)
    config = {"architecture": m.arch, "num_classes": num_classes, "num_features": vit.embed_dim,
              "global_pool": pool, "model_args": model_args,
              "pretrained_cfg": pretrained_cfg}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / "model.safetensors"
