"""``mim tokenizer``: train the BEiT tokenizer with the pretraining engine, then export it.

The tokenizer is an ordinary pretraining method (``vq_tokenizer``), so it gets the engine's
resume, logging and checkpoints for free; this module only adds the export of the finished
model to ``<run>/tokenizer.safetensors``, the file ``method.tokenizer`` reads.
"""

from __future__ import annotations

from pathlib import Path

from mim.checkpoint import latest_checkpoint, load_checkpoint
from mim.config import PretrainConfig
from mim.engine.pretrain import pretrain
from mim.engine.run import process_state
from mim.engine.tracking import read_metrics
from mim.errors import ConfigError
from mim.methods.vq_tokenizer import TOKENIZER_FILE, VQTokenizer, save_tokenizer


def train_tokenizer(cfg: PretrainConfig) -> Path:
    """Run (or resume) the tokenizer pretraining; export it once all epochs are done."""
    if cfg.method.name != "vq_tokenizer":
        raise ConfigError(f"config key 'method.name' must be 'vq_tokenizer' for `mim tokenizer`, "
                          f"got {cfg.method.name!r}")
    run_dir = pretrain(cfg)
    if not process_state().is_main_process:
        return run_dir
    if not (run_dir / "summary.json").is_file():
        print(f"tokenizer not exported: the run stopped early; resume it to finish ({run_dir})")
        return run_dir
    path = export_tokenizer(cfg, run_dir)
    logged = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    used = next((r["codes_used"] for r in reversed(logged) if "codes_used" in r), None)
    usage = f", {used:.0f} codes used per batch at the end" if used is not None else ""
    print(f"tokenizer: {path} (codebook {cfg.method.codebook_size}{usage}); "
          f"use it with method.tokenizer={run_dir}")
    return run_dir


def export_tokenizer(cfg: PretrainConfig, run_dir: Path) -> Path:
    """The newest checkpoint of ``run_dir`` as a self-contained ``tokenizer.safetensors``."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
    state, _ = load_checkpoint(ckpt)
    model = VQTokenizer.from_config(cfg)
    model.load_state_dict(state)
    return save_tokenizer(model, cfg, run_dir / TOKENIZER_FILE)
