"""Continue pretraining from existing weights: ``load_pretrainer_init(model, init) -> InitReport``.

The encoder is loaded exactly as for fine-tuning (:func:`mim.models.init.load_encoder_state`: key
names, BEiT conversions, resampled position tables and patch kernels). What else the weights hold
is fitted to the method's own parts:
- an official MAE ``.pth``: ``decoder_embed``, ``decoder_blocks``, ``decoder_norm``,
  ``decoder_pred``, ``mask_token`` and the fixed ``decoder_pos_embed`` become mim's MAE decoder
  (the table resampled to the model's grid);
- a BEiT ``.pth``: its ``mask_token`` becomes the encoder's; ``lm_head`` predicts the codes of
  BEiT's own tokenizer, not of this run's, and is dropped;
- a mim run (its newest checkpoint, so the decoder or head comes along) or checkpoint: every
  tensor of the same name; the frozen BEiT tokenizer stays the one the config names.
A part of another shape (a decoder of another width) is an error naming both shapes; a part the
model lacks is reported as unexpected, one the file lacks as missing (left at its initialisation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mim.checkpoint import latest_checkpoint
from mim.models.init import (InitError, InitReport, StateDict, load_encoder_state,
                             read_init_state, resample_pos_table)

# official MAE (models_mae.py) name -> mim MAE name; prefixes first, then whole keys
MAE_DECODER_PREFIXES = {"decoder_embed.": "decoder.embed.", "decoder_blocks.": "decoder.blocks.",
                        "decoder_norm.": "decoder.norm.", "decoder_pred.": "decoder.pred."}
MAE_DECODER_KEYS = {"decoder_pos_embed": "decoder.pos_embed"}


def load_pretrainer_init(model: nn.Module, init: str, init_file: str = "") -> InitReport:
    """Load ``init`` into a pretraining model (``model.encoder`` a :class:`MaskedEncoder`) in
    place: the encoder as fine-tuning does, then the method's parts the weights have."""
    if init == "scratch":
        return InitReport(kind="scratch", source="")
    state, kind, source = _read(init, init_file)
    encoder_state = {k: v for k, v in state.items() if not _is_method_key(k, kind)}
    report = load_encoder_state(model.encoder.vit, encoder_state, kind, source)
    parts, dropped = _method_parts(state, kind, model)
    target = model.state_dict()
    fitted = {}
    for key, value in parts.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key]
        if key == "decoder.pos_embed" and value.shape[-1] == want.shape[-1] \
                and value.shape != want.shape:
            value = resample_pos_table(value, model.encoder.grid_size,
                                       model.encoder.num_prefix_tokens)
            report.adapted.append(f"{key} {tuple(parts[key].shape)} -> {tuple(value.shape)}")
        if value.shape != want.shape:
            raise InitError(f"config key 'init': cannot load '{key}' into the {type(model).__name__}"
                            f" model: file shape {tuple(value.shape)}, model shape "
                            f"{tuple(want.shape)} (set the method.decoder_* keys to the file's "
                            "sizes, or continue from its encoder alone)")
        fitted[key] = value.to(want.dtype)
    with torch.no_grad():
        for key, value in fitted.items():
            _tensor(model, key).copy_(value)
    report.loaded += len(fitted)
    report.dropped += dropped
    encoder_parts = {f"encoder.vit.{k}" for k in model.encoder.vit.state_dict()}
    report.missing = [f"encoder.vit.{k}" for k in report.missing] + [
        k for k in target if k not in encoder_parts and k not in fitted
        and not k.startswith("tokenizer.")]
    return report


def _read(init: str, init_file: str) -> tuple[StateDict, str, str]:
    """A mim pretraining run directory gives its newest checkpoint (encoder and method parts);
    anything else is read as fine-tuning reads it."""
    path = Path(init)
    if path.is_dir() and not (path / "state.pt").is_file():
        ckpt = latest_checkpoint(path / "checkpoints")
        weights = ckpt / "model.safetensors" if ckpt is not None else None
        if weights is not None and _has_mim_encoder(weights):
            return read_init_state(str(ckpt), init_file)[0], "mim", str(weights)
    return read_init_state(init, init_file)


def _has_mim_encoder(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("encoder.vit.") for k in f.keys())


def _is_method_key(key: str, kind: str) -> bool:
    """Keys outside the timm encoder, handled here rather than dropped by the encoder loader."""
    key = key.removeprefix("module.")
    if kind == "mim":
        return not key.startswith("encoder.vit.")
    return key == "mask_token" or key.startswith(("decoder", "lm_head"))


def _method_parts(state: StateDict, kind: str, model: nn.Module) -> tuple[StateDict, list[str]]:
    """(non-encoder tensors under the model's names, keys dropped on purpose)."""
    out, dropped = {}, []
    target = model.state_dict()
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not _is_method_key(key, kind):
            continue
        if key.startswith(("tokenizer.", "lm_head")):
            dropped.append(f"{key} (the tokenizer and its codes are the config's own)")
            continue
        if kind != "mim":
            key = _official_name(key, value, target)
        out[key] = value
    return out, dropped


def _official_name(key: str, value: torch.Tensor, target: StateDict) -> str:
    """MAE's decoder names -> mim's; a mask token goes where its width fits (MAE: the decoder's,
    BEiT/SimMIM: the encoder's)."""
    if key == "mask_token":
        for name in ("decoder.mask_token", "encoder.mask_token"):
            if name in target and target[name].shape == value.shape:
                return name
        return next((n for n in ("decoder.mask_token", "encoder.mask_token") if n in target),
                    key)
    if key in MAE_DECODER_KEYS:
        return MAE_DECODER_KEYS[key]
    for old, new in MAE_DECODER_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, name = key.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    return getattr(owner, name)
