"""``mim compare``: fine-tune every init x label fraction x seed with one recipe, then report.

The recipe is a classification or a detection (``task: detect``) fine-tune config. Each cell is
an ordinary fine-tuning run (:func:`mim.engine.finetune.finetune` or
:func:`mim.engine.detect.detect`) in
``<run>/cells/<init>_f<fraction>_s<seed>``, with the same config file and overrides (plus the
overrides of its label fraction, e.g. more epochs for fewer labels); only ``init``,
``data.label_fraction`` and ``run.seed`` change. That makes the comparison fair by
construction where it can be:
- at a given seed, every init sees the same labeled subset (for detection, the same annotated
  images), the same data order and the same augmentations (the loader draws them from the seed
  alone) and the same head initialisation (the head is built right after ``set_seed``);
- every init gets the same number of updates (same recipe, same subset);
- the encoder architecture of every init is checked against the recipe's before any training.
What it cannot remove (the pretraining budget and data behind each init, resampled embeddings)
is written into the report.

Cells run one after another, each across all processes of the launch. A cell whose
``summary.json`` exists is skipped; a cell killed midway continues from its last checkpoint
(``run.resume=auto``), so rerunning the command resumes the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mim.config import CompareConfig, ConfigError, finetune_task, load_config, save_config
from mim.engine.compare_report import CellResult, write_report
from mim.engine.run import RunLock, process_state, write_json
from mim.engine.state import config_diff
from mim.models.encoder import create_vit
from mim.models.init import read_init_state, to_timm_keys

# the metrics `metric:` may name, per task of the recipe; the first is the default ("auto")
TASK_METRICS = {"classify": ("top1", "top5", "macro_f1", "loss"),
                "detect": ("map", "map_50", "map_75", "mar_100", "mean_iou")}
# keys the fine-tuning classifier adds or drops around the encoder (pooling norm, head)
_CLASSIFIER_KEYS = ("head.", "fc_norm.")
_RESAMPLABLE = ("pos_embed", "patch_embed.proj.weight")
# keys that change how a cell runs, not what it computes
_RUN_ONLY_KEYS = ("run.resume", "tracking.", "data.num_workers", "data.eval_batch_size",
                  "train.log_every", "train.save_every", "train.keep_last", "train.dist_timeout_s")


@dataclass
class Cell:
    init_name: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init_name}_f{self.fraction:g}_s{self.seed}"


def compare(cmp: CompareConfig) -> Path:
    """Run (or resume) every cell of ``cmp`` and write the report; returns the run directory."""
    state = process_state()
    task = finetune_task(cmp.finetune, cmp.overrides)
    cmp = dataclasses.replace(cmp, metric=resolve_metric(cmp.metric, task))
    run_dir = cmp.run_dir
    base = cell_config(cmp, Cell(next(iter(cmp.inits)), cmp.label_fractions[0], cmp.seeds[0]))
    notes = check_architectures(cmp, base)  # before any training
    cells = [Cell(name, f, s) for f in cmp.label_fractions for s in cmp.seeds for name in cmp.inits]
    for cell in cells:  # every check that can refuse the comparison before it writes anything
        if (cell_config(cmp, cell).run_dir / "summary.json").is_file():
            _check_same_recipe(cell_config(cmp, cell), cell)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cmp, run_dir / "config.yaml")
    if task == "detect":
        from mim.engine.detect import detect as finetune
    else:
        from mim.engine.finetune import finetune

    timings_path = run_dir / "timings.json"
    for i, cell in enumerate(cells, 1):
        cfg = cell_config(cmp, cell)
        if (cfg.run_dir / "summary.json").is_file():
            state.print(f"[{i}/{len(cells)}] skip {cell.name}: finished ({cfg.run_dir}/summary.json)")
            continue
        state.print(f"[{i}/{len(cells)}] run {cell.name}: init={cmp.inits[cell.init_name]}, "
                    f"label_fraction={cell.fraction:g}, seed={cell.seed}")
        start = time.perf_counter()
        try:
            finetune(cfg)
        finally:
            RunLock.release(cfg.run_dir)
        if state.is_main_process:
            times = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
            times[cell.name] = round(time.perf_counter() - start, 2)
            write_json(timings_path, times)
        if not (cfg.run_dir / "summary.json").is_file():  # stopped early (train.max_steps)
            state.print(f"{cell.name} stopped before its end; rerun the comparison to continue")
            return run_dir
    if state.is_main_process:
        results = [CellResult.read(cell_config(cmp, c).run_dir, c.init_name, c.fraction, c.seed)
                   for c in cells]
        table = write_report(cmp, results, notes, _init_provenance(cmp), task)
        _log_summary(cmp, run_dir)
        print(table)
    state.wait_for_everyone()
    return run_dir


def resolve_metric(metric: str, task: str) -> str:
    """``metric`` checked against the recipe's task; "auto" is the task's first metric."""
    if metric == "auto":
        return TASK_METRICS[task][0]
    if metric not in TASK_METRICS[task]:
        kind = "a detection" if task == "detect" else "a classification"
        raise ConfigError(f"config key 'metric': {metric!r} does not apply to {kind} recipe "
                          f"(choose from auto, {', '.join(TASK_METRICS[task])})")
    return metric


def cell_config(cmp: CompareConfig, cell: Cell) -> Any:
    """The fine-tune config of one cell: the recipe file, its overrides, then the cell's keys."""
    init = cmp.inits[cell.init_name]
    t = cmp.tracking
    keys = [f"init={init}", f"init_file={cmp.init_files.get(cell.init_name, '')}",
            f"data.label_fraction={cell.fraction!r}", f"run.seed={cell.seed}",
            f"run.output_dir={cmp.run_dir / 'cells'}", f"run.name={cell.name}", "run.resume=auto",
            f"tracking.backend={t.backend}", f"tracking.project={t.project}",
            f"tracking.group={t.group or cmp.run.name}"]
    per_fraction = cmp.fraction_overrides.get(cell.fraction, [])
    overrides = [*cmp.overrides, *per_fraction, *keys]
    job = "detect" if finetune_task(cmp.finetune, overrides) == "detect" else "finetune"
    return load_config(cmp.finetune, overrides, job=job)


def _check_same_recipe(cfg: Any, cell: Cell) -> None:
    """A finished cell counts only if it ran the current recipe (else its number is stale)."""
    done = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    changed = [c for c in config_diff(done, cfg.to_dict()) if not c.startswith(_RUN_ONLY_KEYS)
               and ": None -> " not in c]  # a key added since (init_strict): not a recipe change
    if changed:
        raise ConfigError(f"cell {cell.name} finished with another recipe ({'; '.join(changed[:4])})"
                          f"; give the comparison a new 'run.name' or delete {cfg.run_dir}")


def check_architectures(cmp: CompareConfig, base: Any) -> dict[str, list[str]]:
    """Every init's encoder must match the recipe's ViT tensor for tensor (classifier head and
    pooling norm aside). Returns notes per init (what was resampled, with allow_resample=true);
    raises ConfigError naming the first init that differs."""
    ref_vit = create_vit(base.model)
    ref = {k: tuple(v.shape) for k, v in ref_vit.state_dict().items()
           if not k.startswith(_CLASSIFIER_KEYS)}
    m = base.model
    arch = (f"{m.arch}, {m.img_size} px, patch {m.patch_size}, dim {ref_vit.embed_dim}, "
            f"depth {len(ref_vit.blocks)}")
    notes: dict[str, list[str]] = {}
    for name, init in cmp.inits.items():
        notes[name] = []
        if init == "scratch":
            continue
        state, _ = read_init_state(init, cmp.init_files.get(name, ""))[:2]
        state, _ = to_timm_keys(state, ref_vit)
        got = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(_CLASSIFIER_KEYS)}
        missing = sorted(set(ref) - set(got))
        extra = sorted(set(got) - set(ref))
        shapes = [k for k in sorted(set(ref) & set(got)) if ref[k] != got[k]]
        resampled = [k for k in shapes if k in _RESAMPLABLE]
        problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) \
            + ([f"extra {', '.join(extra[:3])}"] if extra else []) \
            + [f"{k} {got[k]} vs {ref[k]}" for k in shapes
               if k not in _RESAMPLABLE or not cmp.allow_resample]
        if problems:
            raise ConfigError(
                f"config key 'inits.{name}': the encoder of {init} differs from the fine-tune "
                f"model ({arch}): {'; '.join(problems[:4])}. Every init must have the same "
                "architecture" + ("" if missing or extra else
                                  " (or set allow_resample=true to resample embeddings)"))
        notes[name] = [f"{k} resampled {got[k]} -> {ref[k]}" for k in resampled]
    return notes


def _init_provenance(cmp: CompareConfig) -> dict[str, str]:
    """One line per init: where its weights come from and what pretraining made them."""
    out = {}
    for name, init in cmp.inits.items():
        if init == "scratch":
            out[name] = "random initialisation (the recipe's own)"
            continue
        if init.startswith("timm:"):
            out[name] = f"timm pretrained weights {init[5:]}" + (
                f" from {cmp.init_files[name]}" if name in cmp.init_files else "")
            continue
        path = Path(init)
        cfg_file, summary = path / "config.yaml", path / "summary.json"
        if not (path.is_dir() and cfg_file.is_file()):
            out[name] = f"weights file {init}"
            continue
        try:
            pre = load_config(cfg_file, ["run.resume=none"], job="pretrain")
        except ConfigError:
            out[name] = f"run {init}"
            continue
        d = pre.data
        data = (f"synthetic shapes ({d.synthetic_size} images, seed {pre.run.seed})" if d.synthetic
                else d.path or d.name)
        done = json.loads(summary.read_text()) if summary.is_file() else {}
        budget = (f"{done['updates']} updates, {done['images_seen']} images seen"
                  if done else "unfinished run (newest checkpoint)")
        labels = ", with labels" if pre.method.name == "supervised" else ", labels unused"
        start = f", continued from {pre.init}" if pre.init != "scratch" else ""
        out[name] = f"`{pre.method.name}` pretraining{start}, {budget}, on {data}{labels} ({init})"
    return out


def _log_summary(cmp: CompareConfig, run_dir: Path) -> None:
    """The report table and figures into the cells' wandb group, as one more run of it."""
    if cmp.tracking.backend != "wandb":
        return
    import csv

    import wandb

    from mim.engine.tracking import tracker_init_kwargs

    kw = tracker_init_kwargs(cmp, run_dir)["wandb"]
    kw.update(name=f"{cmp.run.name}-summary", group=cmp.tracking.group or cmp.run.name,
              job_type="compare-summary")
    with wandb.init(project=cmp.tracking.project, config=cmp.to_dict(), **kw) as run:
        with open(run_dir / "report.csv") as f:
            rows = list(csv.reader(f))
        run.log({"compare/report": wandb.Table(columns=rows[0], data=rows[1:]),
                 "compare/label_efficiency": wandb.Image(str(run_dir / "label_efficiency.png")),
                 "compare/curves": wandb.Image(str(run_dir / "curves.png"))})
