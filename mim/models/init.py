"""Initialise a timm ViT from other weights: ``load_encoder_init(vit, init) -> InitReport``.

``init`` names where the weights come from:
- ``scratch``: keep the random initialisation;
- a mim pretraining run directory (its ``encoder.safetensors``, or the newest checkpoint of a run
  that has not finished), a mim checkpoint folder (``checkpoints/step_*``, keys ``encoder.vit.*``),
  a mim fine-tuning run (its ``export/model.safetensors``) or any ``.safetensors`` file;
- an official MAE or BEiT ``.pth`` (the ``model`` dict): decoder, mask-token and BEiT ``lm_head``
  keys are dropped; BEiT's split ``q_bias``/``v_bias`` become timm's ``qkv.bias`` and its
  ``gamma_1``/``gamma_2`` become LayerScale (or are folded into the projections when the ViT has
  none); BEiT's relative position bias has no place in a VisionTransformer and is refused;
- ``timm:<name>``: timm's pretrained weights of that model (a download, or ``init_file``).

Weights are read with safetensors or ``torch.load(weights_only=True)`` only; a pickle that needs
anything else is refused. The state dict is then fitted to the model: position embeddings and
patch-embedding kernels are resampled to the model's grid and patch size (timm's
``resample_abs_pos_embed`` / ``resample_patch_embed``), a classifier head of another size is
dropped, and any other shape mismatch stops with an error naming the key and both shapes.
Missing and unexpected keys are reported, not fatal: a classifier always misses its new head.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from mim.checkpoint import latest_checkpoint
from mim.errors import ConfigError

StateDict = dict[str, torch.Tensor]
MIN_INIT_SHARE = 0.5  # of the encoder's tensors an init must fill (unless init_strict=false)


class InitError(ConfigError):
    """Weights that cannot initialise the model (found before training starts)."""


@dataclass
class InitReport:
    """What ``load_encoder_init`` did, for the log and the run summary."""

    kind: str  # scratch | mim | mae | beit | timm | weights
    source: str  # the file actually read
    loaded: int = 0  # tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model keys the weights did not have
    unexpected: list[str] = field(default_factory=list)  # weights keys the model has no place for
    dropped: list[str] = field(default_factory=list)  # removed on purpose (decoder, mask token...)
    adapted: list[str] = field(default_factory=list)  # resampled or converted, with shapes

    def lines(self, limit: int = 12) -> list[str]:
        if self.kind == "scratch":
            return ["init: scratch (random initialisation)"]
        out = [f"init: {self.kind} weights from {self.source}: {self.loaded} tensors loaded"]
        for title, keys in (("adapted", self.adapted), ("dropped", self.dropped),
                            ("missing (left at their initialisation)", self.missing),
                            ("unexpected (ignored)", self.unexpected)):
            if keys:
                more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
                out.append(f"  {title}: {', '.join(keys[:limit])}{more}")
        return out

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_encoder_init(vit: VisionTransformer, init: str, init_file: str = "",
                      strict: bool = True) -> InitReport:
    """Load the weights ``init`` names into ``vit`` (in place) and say what happened; with
    ``strict``, weights that fill less than MIN_INIT_SHARE of it are an error."""
    if init == "scratch":
        return InitReport(kind="scratch", source="")
    return load_encoder_state(vit, *read_init_state(init, init_file), strict=strict)


def load_encoder_state(vit: VisionTransformer, state: StateDict, kind: str, source: str,
                       strict: bool = True) -> InitReport:
    """Fit a state dict as read by :func:`read_init_state` into ``vit`` and say what happened;
    with ``strict``, weights that fill less than MIN_INIT_SHARE of it are an error."""
    state, dropped = to_timm_keys(state, vit)
    state, adapted, dropped_head = fit_to_model(state, vit)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    report = InitReport(kind=kind, source=source, loaded=len(state) - len(unexpected),
                        missing=list(missing), unexpected=list(unexpected),
                        dropped=dropped + dropped_head, adapted=adapted)
    check_init_share(report, vit, strict)
    return report


# ----------------------------------------------------------------------------- reading


def read_init_state(init: str, init_file: str = "") -> tuple[StateDict, str, str]:
    """(state dict as stored, kind, file read) for any ``init`` value except ``scratch``."""
    if init.startswith("timm:"):
        return _timm_state(init[len("timm:"):], init_file)
    path = Path(init)
    from_run = path.is_dir()
    if from_run:
        path = _weights_in_dir(path)
    if not path.is_file():
        raise InitError(f"config key 'init': no such file or folder: {init}")
    state = load_safetensors(path) if path.suffix == ".safetensors" else load_weights_only(path)
    check_init_tensors(state, path)
    return state, "mim" if from_run else _kind_of(state), str(path)


def load_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise InitError(f"config key 'init': {path} is not a readable safetensors file "
                        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else e!r})"
                        ) from None


def check_init_tensors(state: StateDict, path: Path) -> None:
    """Weights with inf/NaN would train into NaN without another error: refused, named."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InitError(f"config key 'init': {path} holds inf/NaN values in '{key}'")


def check_init_share(report: InitReport, vit: VisionTransformer, strict: bool) -> None:
    """An init that fills less than MIN_INIT_SHARE of the encoder's tensors (keys of another
    model, a wrong prefix) would quietly train from scratch; an error unless ``init_strict`` is
    false."""
    total = sum(1 for k in vit.state_dict() if not k.startswith("head."))
    if not strict or report.kind == "scratch" or report.loaded >= MIN_INIT_SHARE * total:
        return
    sample = ", ".join(report.unexpected[:3]) or "none"
    raise InitError(f"config key 'init': {report.source} filled {report.loaded} of the encoder's "
                    f"{total} tensors (less than {MIN_INIT_SHARE:.0%}; its keys that fit nothing: "
                    f"{sample}); set init_strict=false to train from it anyway")


def _weights_in_dir(d: Path) -> Path:
    if (d / "model.safetensors").is_file() and (d / "state.pt").is_file():
        return d / "model.safetensors"  # a checkpoint folder
    for rel in ("encoder.safetensors", "export/model.safetensors"):  # pretraining / fine-tuning
        if (d / rel).is_file():
            return d / rel
    ckpt = latest_checkpoint(d / "checkpoints")  # a run that stopped before its end
    if ckpt is not None:
        return ckpt / "model.safetensors"
    raise InitError(f"config key 'init': {d} holds no encoder.safetensors, export/, "
                    "checkpoint or checkpoints/ folder")


def load_weights_only(path: Path) -> StateDict:
    """A ``.pth`` through ``torch.load(weights_only=True)``; the tensors of its model dict.

    ``argparse.Namespace`` is allowed as well: MAE and BEiT training checkpoints store their
    command-line arguments as one, and it holds plain values only.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # bytes that are no pickle at all
            raise InitError(f"config key 'init': {path} is not a readable torch file "
                            f"(not a zip or pickle archive)") from None
        detail = f"it pickles {found.group(1)}" if found else str(e).strip().splitlines()[0][:160]
        raise InitError(f"config key 'init': {path} is not a weights-only checkpoint ({detail}); "
                        "mim does not unpickle code. Re-save its state dict "
                        "(torch.save(ckpt['model'], ...)) or convert it to safetensors") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails many ways; all mean "unreadable"
        raise InitError(f"config key 'init': {path} is not a readable torch file "
                        f"({type(e).__name__}: {str(e).strip()[:160]})") from None
    for key in ("model", "state_dict", "module", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InitError(f"config key 'init': {path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _timm_state(name: str, init_file: str) -> tuple[StateDict, str, str]:
    if not timm.is_model(name):
        raise InitError(f"config key 'init': timm has no model '{name}'")
    # custom_load=False: a local file is a state dict even where timm's default weights are .npz
    overlay = {"file": init_file, "custom_load": False} if init_file else None
    try:
        src = timm.create_model(name, pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=overlay)
    except Exception as e:  # noqa: BLE001 - any failure here means "no weights", said plainly
        where = init_file or "the download"
        hint = "" if init_file else " (offline? pass a local file with init_file=...)"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InitError(f"config key 'init': timm:{name} weights from {where} failed to load: "
                        f"{type(e).__name__}: {first}{hint}") from None
    return src.state_dict(), "timm", init_file or f"timm:{name}"


def _kind_of(state: StateDict) -> str:
    keys = list(state)
    if any(k.startswith("encoder.vit.") for k in keys):
        return "mim"
    if any(".q_bias" in k or ".gamma_1" in k or "relative_position" in k or k.startswith("lm_head")
           for k in keys):
        return "beit"
    if any(k.startswith("decoder_") for k in keys):
        return "mae"
    return "weights"


# ----------------------------------------------------------------------------- key names


def to_timm_keys(state: StateDict, vit: VisionTransformer) -> tuple[StateDict, list[str]]:
    """Rename a mim/MAE/BEiT state dict to timm VisionTransformer keys; returns (state, dropped)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.vit.") for k in state):
        dropped = [k for k in state if not k.startswith("encoder.vit.")]
        state = {k.removeprefix("encoder.vit."): v for k, v in state.items()
                 if k.startswith("encoder.vit.")}
    else:
        dropped = []
    for k in list(state):
        if (k.startswith(("decoder", "lm_head")) or k == "mask_token"
                or k.endswith("relative_position_index")):
            dropped.append(k)
            del state[k]
    bias_tables = [k for k in state if k.endswith("relative_position_bias_table")]
    if bias_tables:
        raise InitError(f"config key 'init': '{bias_tables[0]}' is a BEiT relative position bias; "
                        "timm's VisionTransformer has absolute position embeddings only and cannot "
                        "hold it. Use a checkpoint pretrained with absolute positions "
                        "(BEiT use_abs_pos_emb, no rel_pos_bias)")
    return _beit_to_timm(state, vit), dropped


def _beit_to_timm(state: StateDict, vit: VisionTransformer) -> StateDict:
    """BEiT blocks: qkv bias = (q_bias, 0, v_bias); gamma_1/2 -> LayerScale, or folded."""
    target = vit.state_dict()
    out = dict(state)
    for k in [k for k in state if k.endswith(".attn.q_bias")]:
        prefix = k[: -len("q_bias")]
        q, v = out.pop(k), out.pop(prefix + "v_bias")
        out[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for k in [k for k in state if k.endswith((".gamma_1", ".gamma_2"))]:
        block, which = k.rsplit(".", 1)
        gamma = out.pop(k)
        ls_key = f"{block}.ls{which[-1]}.gamma"
        if ls_key in target:
            out[ls_key] = gamma
            continue
        # x + gamma * (W y + b) == x + (diag(gamma) W) y + gamma * b: exact without LayerScale
        proj = f"{block}.attn.proj" if which == "gamma_1" else f"{block}.mlp.fc2"
        out[f"{proj}.weight"] = out[f"{proj}.weight"] * gamma[:, None]
        if f"{proj}.bias" in out:
            out[f"{proj}.bias"] = out[f"{proj}.bias"] * gamma
    return out


# ----------------------------------------------------------------------------- shapes


def fit_to_model(state: StateDict, vit: VisionTransformer
                 ) -> tuple[StateDict, list[str], list[str]]:
    """Resample what can be resampled; returns (state, adapted, dropped head keys)."""
    target = vit.state_dict()
    out, adapted, dropped = {}, [], []
    for key, value in state.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
            continue
        if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want.shape[-1]:
            out[key] = resample_pos_embed(value, vit)
        elif (key == "patch_embed.proj.weight" and value.ndim == 4
              and value.shape[:2] == want.shape[:2]):
            out[key] = resample_patch_embed(value.float(), list(want.shape[-2:])).to(value.dtype)
        elif key.startswith("head."):
            dropped.append(f"{key} {tuple(value.shape)} (a classifier of another size)")
            continue
        else:
            raise InitError(f"config key 'init': cannot load '{key}': checkpoint shape "
                            f"{tuple(value.shape)}, model shape {tuple(want.shape)}")
        adapted.append(f"{key} {tuple(value.shape)} -> {tuple(want.shape)}")
    return out, adapted, dropped


def resample_pos_embed(pos: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """(1, prefix + s*s, D) from a square grid -> the ViT's (1, prefix' + H*W, D).

    The checkpoint's prefix rows (class/register tokens) are those beyond the largest square;
    rows the ViT lacks are dropped, rows it has more of start at zero.
    """
    return resample_pos_table(pos, tuple(vit.patch_embed.grid_size),
                              0 if vit.no_embed_class else vit.num_prefix_tokens)


def resample_pos_table(pos: torch.Tensor, grid_size: tuple[int, int],
                       dst_prefix: int) -> torch.Tensor:
    """(1, prefix + s*s, D) from a square grid -> (1, dst_prefix + H*W, D), prefix rows kept as
    far as they go (any position table: the encoder's, or an MAE decoder's)."""
    n = pos.shape[1]
    side = math.isqrt(n)
    src_prefix = n - side * side
    table = resample_abs_pos_embed(pos[:, src_prefix:], new_size=list(grid_size),
                                   old_size=[side, side], num_prefix_tokens=0)
    prefix = pos[:, :min(src_prefix, dst_prefix)]
    if prefix.shape[1] < dst_prefix:
        pad = pos.new_zeros(1, dst_prefix - prefix.shape[1], pos.shape[-1])
        prefix = torch.cat([prefix, pad], dim=1)
    return torch.cat([prefix, table], dim=1)
