"""``mim embed``: one vector per image from the encoder of any init, written as parquet.

The init is what fine-tuning accepts (:mod:`mim.models.init`): a mim run or one of its weight
files (the architecture and preprocessing then come from the run's ``config.yaml``), an
``encoder.safetensors``, an MAE/BEiT ``.pth`` or ``timm:<name>`` (the architecture from
``model.*`` overrides; ``timm:<name>`` names its own). The vector is the timm ViT's pooled
output: ``avg`` (the mean of the patch tokens, the classifier's default) or ``token`` (the
class token); without ``--pool``, a fine-tuned run's own pooling, else ``avg``. It comes after
the encoder's final norm as it was trained (a pretraining encoder normalises every token before
pooling; a fine-tuned classifier's ``fc_norm`` normalises the pooled vector).
The model runs in eval mode and in float32, so an image gets the same vector (to float rounding)
whichever process or batch computed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mim.config import ConfigError, load_config
from mim.data.transforms import eval_transform
from mim.engine.run import process_state
from mim.inference.images import open_images, process_shard, report_unreadable
from mim.inference.model import run_config, run_kind
from mim.models.encoder import create_vit
from mim.models.init import load_encoder_init, read_init_state

_JOBS = {"pretrain": "pretrain", "classify": "finetune", "detect": "detect"}


def _run_dir_of(init: str) -> Path | None:
    """The mim run an init belongs to: the folder itself, or the run above one of its files
    (encoder.safetensors, export/model.safetensors, checkpoints/step_*/model.safetensors)."""
    if init.startswith("timm:") or not Path(init).exists():
        return None
    path = Path(init).resolve()
    for folder in [path, *path.parents[:3]] if path.is_dir() else path.parents[:3]:
        if (folder / "config.yaml").is_file():
            return folder
    return None


class Encoder:
    """A timm ViT without head: ``vectors(images)`` -> (B, D) pooled features."""

    def __init__(self, init: str, init_file: str = "", pool: str = "",
                 overrides: list[str] | None = None, device: str | torch.device = "cpu") -> None:
        run_dir = _run_dir_of(init)
        if run_dir is not None:
            cfg = run_config(run_dir, _JOBS[run_kind(run_dir)], overrides or [])
        else:
            arch = [f"model.arch={init[len('timm:'):]}"] if init.startswith("timm:") else []
            cfg = load_config(None, ["data.synthetic=true", *arch, *(overrides or [])],
                              job="pretrain")
        self.pool = pool or getattr(cfg.model, "global_pool", "avg")  # a classifier's own
        state, _, _ = read_init_state(init, init_file)
        has_fc_norm = any(k.split(".")[-2:-1] == ["fc_norm"] for k in state)
        del state
        self.vit = create_vit(cfg.model, num_classes=0, global_pool=self.pool,
                              fc_norm=has_fc_norm)
        self.report = load_encoder_init(self.vit, init, init_file)
        if self.report.loaded == 0:
            raise ConfigError(f"--init: {self.report.source} holds no weights of this encoder")
        self.device = torch.device(device)
        self.vit.to(self.device).eval()
        d = cfg.data
        self.transform = eval_transform(cfg.model.img_size, d.mean, d.std,
                                        crop_pct=getattr(d, "eval_crop_pct", 1.0))

    @property
    def dim(self) -> int:
        return self.vit.num_features

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.transform(image)

    @torch.no_grad()
    def vectors(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images.to(self.device)).float().cpu()


def embed(init: str, images: list[str], out: str | Path, *, init_file: str = "",
          pool: str = "", split: str = "", batch_size: int = 32, num_workers: int = 2,
          overrides: list[str] | None = None) -> int:
    """Write ``out`` (parquet: path, label when the inputs have one, vector); the exit status
    (1 when some images could not be read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out: embed writes a .parquet file, got {out}")
    state = process_state()
    encoder = Encoder(init, init_file, pool, overrides, state.device)
    for line in encoder.report.lines():
        state.print(line)
    source = open_images(images, split)

    def run(batch):
        vectors = encoder.vectors(torch.stack([p.item for p in batch]))
        return [{"index": p.index, "path": p.path, "label": p.label, "vector": v}
                for p, v in zip(batch, vectors.tolist())]

    rows, unreadable = process_shard(source, encoder.preprocess, run, batch_size=batch_size,
                                     num_workers=num_workers, desc="embed")
    if state.is_main_process:
        columns: dict[str, Any] = {"path": pa.array([r["path"] for r in rows], pa.string())}
        if source.label_column:
            columns["label"] = pa.array([r["label"] for r in rows], pa.int64())
        columns["vector"] = pa.array([r["vector"] for r in rows],
                                     pa.list_(pa.float32(), encoder.dim))
        table = pa.table(columns)
        if source.classes:
            table = table.replace_schema_metadata({"class_names": ",".join(source.classes)})
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        print(f"wrote {len(rows)} vectors of {encoder.dim} ({encoder.pool} pooling) to {out}")
    state.wait_for_everyone()
    return report_unreadable(unreadable, len(source))
