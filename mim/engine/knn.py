"""``mim knn --init I --data D [key=value ...]``: k-NN top-1 of any init's encoder, one JSON line.

Run it under ``accelerate launch`` to split the embedding between processes. The encoder's
architecture and the input normalisation come from the init's run when it is a mim run
(``model.*`` and ``data.mean``/``data.std`` overrides win); any other init takes ``model.*``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from mim.config import KnnConfig, load_config
from mim.engine.run import process_state
from mim.errors import ConfigError
from mim.models.encoder import ModelConfig, create_encoder
from mim.models.init import load_encoder_init
from mim.probe.probe import Probe, ProbeResult


def knn_command(init: str, data: str, init_file: str, overrides: list[str]) -> ProbeResult:
    cfg: KnnConfig = load_config(None, [f"init={init}", f"init_file={init_file}",
                                        *data_overrides(data), *run_defaults(init), *overrides],
                                 job="knn")
    state = process_state()
    encoder = create_encoder(cfg.model)
    report = load_encoder_init(encoder.vit, cfg.init, cfg.init_file)
    if state.is_main_process:
        print("\n".join(report.lines()), file=sys.stderr)
    probe = Probe(cfg.data, cfg.model.img_size, cfg.data.mean, cfg.data.std, cfg.seed)
    result = probe.run(encoder.to(state.device), state.device, cfg.k, cfg.temperature,
                       cfg.linear_epochs, cfg.seed)
    if state.is_main_process:
        print(json.dumps({**result.to_dict(), "init": init,
                          "held_out": probe.holdout() is not None}), flush=True)
    return result


def data_overrides(data: str) -> list[str]:
    """``--data``: 'synthetic', a local folder or file, or a dataset name."""
    if data == "synthetic":
        return ["data.synthetic=true"]
    if Path(data).exists():
        return [f"data.path={data}"]
    if data.startswith(("/", ".", "~")):
        raise ConfigError(f"--data: no such folder or file: {data}")
    return [f"data.name={data}"]


def run_defaults(init: str) -> list[str]:
    """``model.*``, ``data.mean`` and ``data.std`` of the mim run ``init`` lives in, as overrides."""
    run = _run_config(Path(init)) if not init.startswith("timm:") and init != "scratch" else None
    if run is None:
        return []
    keys = {f.name for f in ModelConfig.__dataclass_fields__.values()}
    out = [f"model.{k}={_text(v)}" for k, v in (run.get("model") or {}).items() if k in keys]
    data = run.get("data") or {}
    return out + [f"data.{k}={_text(data[k])}" for k in ("mean", "std") if k in data]


def _run_config(path: Path) -> dict[str, Any] | None:
    # a run dir, a file in it, a checkpoint folder (run/checkpoints/step_*) or a file in one
    for d in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            raw = yaml.safe_load(f.read_text())
            if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
                return raw
    return None


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
