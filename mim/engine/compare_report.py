"""The report of ``mim compare``: report.md, report.csv, label_efficiency.png and curves.png.

Per init and label fraction: the mean and the sample standard deviation over seeds of the chosen
metric, and the difference to scratch with a 95% t-interval over the seeds' paired differences
(the same seed means the same labeled subset, data order and augmentations for both inits, so
pairing removes that shared noise). A detection comparison adds, per init and fraction, the
other COCO numbers beside the chosen one (mean IoU of the true positives among them), AP by
object size and the three best and worst classes.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30
# compare metric -> the key a run's summary.json and metrics.jsonl hold it under
SUMMARY_KEY = {"mean_iou": "mean_iou_tp"}
# detection numbers the report shows (means over seeds) beside the chosen metric
DETECTION_COLUMNS = ("map", "map_50", "map_75", "mar_100", "mean_iou_tp", "map_small",
                     "map_medium", "map_large")

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table up to 30, then a Cornish-Fisher expansion around z = 1.95996."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of the 95% t-interval of paired differences; None when n < 2."""
    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    half = t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass
class CellResult:
    """One finished fine-tuning cell, read from its run directory."""

    init_name: str
    fraction: float
    seed: int
    summary: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)  # the val records of metrics.jsonl

    @classmethod
    def read(cls, run_dir: Path, init_name: str, fraction: float, seed: int) -> CellResult:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        curve = [r for r in map(json.loads, filter(None, lines))
                 if "step" in r and any(k.startswith("val/") for k in r)]
        return cls(init_name, fraction, seed, summary, curve)

    def score(self, metric: str, which: str) -> float:
        if "final_metrics" in self.summary:  # classification
            return float(self.summary["final_metrics" if which == "final"
                                      else "best_metrics"][metric])
        key = SUMMARY_KEY.get(metric, metric)  # detection: the last evaluation's numbers
        if which == "best":
            return max(float(r[f"val/{key}"]) for r in self.curve)
        return float(self.summary[key])


def write_report(cmp: Any, results: list[CellResult], notes: dict[str, list[str]],
                 provenance: dict[str, str], task: str = "classify") -> str:
    """Write the four files into ``cmp.run_dir``; returns the markdown table (for the console)."""
    out = cmp.run_dir
    metric, inits, fractions = cmp.metric, list(cmp.inits), list(cmp.label_fractions)
    higher = metric != "loss"
    by = {(r.init_name, r.fraction): {} for r in results}
    for r in results:
        by[(r.init_name, r.fraction)][r.seed] = r.score(metric, cmp.score)
    scratch = next((n for n, i in cmp.inits.items() if i == "scratch"), None)
    rows = []
    for name in inits:
        for f in fractions:
            vals = by.get((name, f), {})
            row = {"init": name, "label_fraction": f, "n_seeds": len(vals),
                   "mean": statistics.fmean(vals.values()) if vals else float("nan"),
                   "std": statistics.stdev(vals.values()) if len(vals) > 1 else float("nan"),
                   "values": ";".join(f"{vals[s]:.6g}" for s in sorted(vals))}
            diff = None
            if scratch is not None and name != scratch:
                base = by.get((scratch, f), {})
                diff = paired_interval([vals[s] - base[s] for s in sorted(vals) if s in base])
                paired = [vals[s] - base[s] for s in sorted(vals) if s in base]
                row["diff_vs_scratch"] = statistics.fmean(paired) if paired else float("nan")
            row["ci95_low"], row["ci95_high"] = (diff[1], diff[2]) if diff else (math.nan, math.nan)
            if task == "detect":
                cells = [r.summary for r in results if r.init_name == name and r.fraction == f]
                row.update({k: _mean([s[k] for s in cells]) for k in DETECTION_COLUMNS})
            rows.append(row)
    _write_csv(out / "report.csv", rows, DETECTION_COLUMNS if task == "detect" else ())
    table = _markdown_table(rows, inits, fractions, metric, higher, scratch)
    budget = _budget_lines(results, fractions, cmp.fraction_overrides)
    text = _markdown(cmp, table, budget, notes, provenance, results, scratch, task)
    if task == "detect":
        text += detection_sections(results, inits, fractions)
    (out / "report.md").write_text(text)
    _plot_label_efficiency(out / "label_efficiency.png", rows, inits, metric, cmp.score)
    _plot_curves(out / "curves.png", results, inits, fractions, SUMMARY_KEY.get(metric, metric))
    return table


def _mean(values: list[Any]) -> float:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else math.nan


def detection_sections(results: list[CellResult], inits: list[str],
                       fractions: list[float]) -> str:
    """Markdown: every COCO number per init and fraction (mean ± std over seeds), then the
    three best and worst classes by AP (mean over seeds)."""
    def stat(cells: list[dict], key: str) -> str:
        vals = [float(c[key]) for c in cells if c.get(key) is not None]
        if not vals or all(v < 0 for v in vals):  # pycocotools' -1: nothing to measure
            return "n/a"
        sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
        return f"{statistics.fmean(vals):.4f}{sd}"

    names = ("mAP", "mAP@0.5", "mAP@0.75", "AR@100", "mean IoU of TP@0.5", "AP small",
             "AP medium", "AP large")
    text = ["", "## Every COCO number (mean ± std over seeds)", "",
            "`mean IoU of TP@0.5`: the mean IoU of the detections matched as true positives at "
            "IoU 0.5, how well the found objects are localised (apart from how many are found "
            "and named right). AP by object size: COCO's small / medium / large (< 32², < 96², "
            "larger; n/a where the set has no such object).", "",
            "| init | labels | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for f in fractions:
        for name in inits:
            cells = [r.summary for r in results if r.init_name == name and r.fraction == f]
            text.append(f"| {name} | {100 * f:g}% | "
                        + " | ".join(stat(cells, k) for k in DETECTION_COLUMNS) + " |")
    text += ["", "## Best and worst classes (AP, mean over seeds)", ""]
    for f in fractions:
        for name in inits:
            cells = [r.summary for r in results if r.init_name == name and r.fraction == f]
            classes = sorted({c for s in cells for c in s.get("per_class_ap", {})})
            ap = {c: _mean([s["per_class_ap"].get(c) for s in cells]) for c in classes}
            ranked = sorted((v, c) for c, v in ap.items() if not math.isnan(v))
            best = ", ".join(f"{c} {v:.3f}" for v, c in reversed(ranked[-3:]))
            worst = ", ".join(f"{c} {v:.3f}" for v, c in ranked[:3])
            text.append(f"- **{name}**, {100 * f:g}% labels: best {best}; worst {worst}")
    return "\n".join(text) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> None:
    cols = ["init", "label_fraction", "n_seeds", "mean", "std", "diff_vs_scratch", "ci95_low",
            "ci95_high", "values", *extra]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _markdown_table(rows: list[dict], inits: list[str], fractions: list[float], metric: str,
                    higher: bool, scratch: str | None) -> str:
    """Rows: inits; columns: label fractions; cells 'mean ± std (n)', the best mean in bold,
    then the difference to scratch with its 95% interval."""
    cell = {(r["init"], r["label_fraction"]): r for r in rows}
    best = {}
    for f in fractions:
        means = [(cell[(n, f)]["mean"], n) for n in inits if not math.isnan(cell[(n, f)]["mean"])]
        if means:
            best[f] = (max if higher else min)(means)[1]
    head = "| init | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |"
    lines = [head, "|---" * (len(fractions) + 1) + "|"]
    for name in inits:
        parts = []
        for f in fractions:
            r = cell[(name, f)]
            text = f"{_fmt(r['mean'])} ± {_fmt(r['std'])} (n={r['n_seeds']})"
            if best.get(f) == name:
                text = f"**{text}**"
            if scratch is not None and name != scratch and not math.isnan(r["diff_vs_scratch"]):
                d = r["diff_vs_scratch"]
                ci = (f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}]"
                      if not math.isnan(r["ci95_low"]) else "no interval: n < 2")
                text += f"<br>Δ vs {scratch} {d:+.4f} {ci}"
            parts.append(text)
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def _budget_lines(results: list[CellResult], fractions: list[float],
                  fraction_overrides: dict[float, list[str]]) -> list[str]:
    """The fine-tuning budget per label fraction, and whether every init got the same."""
    lines = []
    for f in fractions:
        cells = [r.summary for r in results if r.fraction == f]
        ups = sorted({s["updates"] for s in cells})
        imgs = sorted({s["train_images"] for s in cells})
        boxes = sorted({s["train_boxes"] for s in cells if "train_boxes" in s})
        gb = sorted({s["global_batch"] for s in cells})
        ep = sorted({s["epochs"] for s in cells})
        same = len(ups) == 1
        lines.append(f"- label fraction {f:g}: {'/'.join(map(str, imgs))} training images"
                     + (f" with {'/'.join(map(str, boxes))} boxes (per seed)" if boxes else "")
                     + ", "
                     f"{'/'.join(map(str, ep))} epochs, {'/'.join(map(str, ups))} updates of "
                     f"{'/'.join(map(str, gb))} images per cell"
                     + (f" (`{' '.join(fraction_overrides[f])}`)" if f in fraction_overrides else "")
                     + ("" if same else " (**the cells differ in updates**)"))
    return lines


def _markdown(cmp: Any, table: str, budget: list[str], notes: dict[str, list[str]],
              provenance: dict[str, str], results: list[CellResult], scratch: str | None,
              task: str) -> str:
    seeds = sorted({r.seed for r in results})
    which = ("the last epoch's validation score" if cmp.score == "final" else
             "the best epoch's validation score (selected on the same split: optimistic)")
    text = [f"# Comparison `{cmp.run.name}`", "",
            f"Metric: validation `{cmp.metric}` of the fine-tuned "
            f"{'detector' if task == 'detect' else 'classifier'}, {which}; mean ± sample std "
            "over seeds "
            f"{seeds} (n per cell in brackets); the best mean per column in bold. "
            + (f"Δ: the mean paired difference to `{scratch}` (same seed = same labeled subset, "
               "data order, augmentations and head initialisation) with its 95% t-interval over "
               "seeds; an interval needs n >= 2, and with n < 5 it is wide."
               if scratch else "No `scratch` init, so no differences are reported."), "",
            table, "", "## Budget (the same recipe for every init)",
            f"Recipe: `{cmp.finetune}`" + (f" with `{' '.join(cmp.overrides)}`"
                                            if cmp.overrides else ""), "", *budget, "",
            "## Inits", ""]
    for name in cmp.inits:
        text.append(f"- **{name}**: {provenance.get(name, cmp.inits[name])}")
    text += ["", "## Differences the comparison could not remove", ""]
    diffs = ["The inits come from different pretraining runs: their methods, budgets and data "
             "are listed above and are not equalised."]
    for name, items in notes.items():
        diffs += [f"`{name}`: {item}" for item in items]
    kinds = {r.init_name: r.summary.get("init", {}) for r in results}
    for name, rep in kinds.items():
        fresh = [k for k in rep.get("missing", []) if not k.startswith("head.")]
        if fresh and rep.get("kind") != "scratch":
            diffs.append(f"`{name}`: {len(fresh)} encoder tensors start from the recipe's "
                         f"initialisation, not the init ({', '.join(fresh[:4])})")
        if rep.get("unexpected"):
            diffs.append(f"`{name}`: its tensors {', '.join(rep['unexpected'][:4])} have no place "
                         "in the fine-tuned model and are not used")
    text += [f"- {d}" for d in diffs]
    return "\n".join(text) + "\n"


def _plot_label_efficiency(path: Path, rows: list[dict], inits: list[str], metric: str,
                           which: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in inits:
        pts = sorted((r["label_fraction"], r["mean"], r["std"]) for r in rows if r["init"] == name)
        xs, ys, es = zip(*pts)
        ax.errorbar([100 * x for x in xs], ys, yerr=[0 if math.isnan(e) else e for e in es],
                    marker="o", capsize=3, label=name)
    fracs = sorted({r["label_fraction"] for r in rows})
    if fracs[-1] / fracs[0] >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("labels used (% of the training set)")
    ax.set_ylabel(f"validation {metric} ({which})")
    ax.set_title("label efficiency: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(path: Path, results: list[CellResult], inits: list[str], fractions: list[float],
                 key: str) -> None:
    """Validation metric per optimizer update: one panel per label fraction, one colour per
    init, one thin line per seed."""
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.5 * len(fractions), 3.6),
                             squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(inits)}
    for ax, f in zip(axes[0], fractions):
        for r in (r for r in results if r.fraction == f):
            pts = [(c["step"], c[f"val/{key}"]) for c in r.curve if f"val/{key}" in c]
            if pts:
                xs, ys = zip(*pts)
                first = r.seed == min(x.seed for x in results if x.init_name == r.init_name)
                ax.plot(xs, ys, color=colors[r.init_name], alpha=0.8, marker=".",
                        label=r.init_name if first else None)
        ax.set_title(f"label fraction {f:g}")
        ax.set_xlabel("update")
        ax.set_ylabel(f"validation {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
