"""k-NN curves of pretraining runs (their ``monitor`` records) beside the fine-tuned top-1 their
encoders led to in a ``mim compare`` run: does the probe rank the encoders as the fine-tunes do?

python scripts/knn_curves.py --out curves.png --compare runs/x/compare name=runs/x/run ...
(``name`` as in the comparison's ``inits``); prints one markdown table and writes the figure.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def knn_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    return [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r]


def finetuned(compare: Path) -> dict[str, tuple[float, float, str]]:
    """init -> (mean, std, values) of the comparison's report.csv (first label fraction)."""
    out = {}
    with open(compare / "report.csv") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["init"], (float(row["mean"]), float(row["std"] or "nan"),
                                         row["values"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the figure (png)")
    p.add_argument("--compare", required=True, help="the mim compare run directory")
    p.add_argument("runs", nargs="+", help="name=pretraining run directory")
    args = p.parse_args()
    scores = finetuned(Path(args.compare))
    fig, ax = plt.subplots(figsize=(6, 4))
    print("| init | k-NN top-1 by epoch (0 = its start) | fine-tuned top-1 (mean ± std) |")
    print("|---|---|---|")
    for item in args.runs:
        name, _, path = item.partition("=")
        curve = knn_curve(Path(path))
        ax.plot([e for e, _ in curve], [100 * v for _, v in curve], marker="o", label=name)
        mean, std, values = scores.get(name, (float("nan"), float("nan"), ""))
        knn = ", ".join(f"{e}: {100 * v:.1f}" for e, v in curve)
        print(f"| {name} | {knn} | {100 * mean:.2f} ± {100 * std:.2f} ({values}) |")
    for name, (mean, std, values) in scores.items():
        if not any(r.startswith(f"{name}=") for r in args.runs):
            print(f"| {name} | - | {100 * mean:.2f} ± {100 * std:.2f} ({values}) |")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
