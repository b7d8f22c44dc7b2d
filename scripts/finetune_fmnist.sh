#!/usr/bin/env bash
# Reproduces docs/results.md on a CPU (about an hour on 2 shared cores):
#   1. MAE pretraining on the 60,000 Fashion-MNIST training images (labels unused);
#   2. at 1% / 10% / 100% of the training labels (class-stratified, seed 0): fine-tuning the
#      same ViT from scratch and from the MAE encoder, and a linear probe of the MAE encoder;
#   3. every run is scored once, after its last epoch, on the 10,000 test images.
# The epochs per label fraction keep each run within a few minutes; see docs/results.md.
# Usage: bash scripts/finetune_fmnist.sh [OUT_DIR]   (default runs/fmnist)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-runs/fmnist}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MIM=(python -m mim)

[ -f runs/data/fmnist/dataset_dict.json ] || python scripts/prepare_fmnist.py
[ -f "$OUT/mae-fmnist/encoder.safetensors" ] || \
    "${MIM[@]}" pretrain --config configs/pretrain/mae_fmnist.yaml run.output_dir="$OUT"

# label fraction, its name, epochs, warmup epochs (about 10-50 updates of warmup each)
for setting in "0.01 1pct 30 3" "0.1 10pct 5 0.5" "1.0 100pct 1 0.1"; do
    read -r frac name epochs warmup <<<"$setting"
    common=(run.output_dir="$OUT" data.label_fraction="$frac" train.epochs="$epochs"
            train.eval_every="$epochs" optim.warmup_epochs="$warmup")
    [ -f "$OUT/scratch-$name/summary.json" ] || "${MIM[@]}" finetune \
        --config configs/finetune/cls_fmnist.yaml "${common[@]}" run.name="scratch-$name" \
        init=scratch optim.layer_decay=1.0
    [ -f "$OUT/mae-ft-$name/summary.json" ] || "${MIM[@]}" finetune \
        --config configs/finetune/cls_fmnist.yaml "${common[@]}" run.name="mae-ft-$name" \
        init="$OUT/mae-fmnist"
    [ -f "$OUT/mae-linprobe-$name/summary.json" ] || "${MIM[@]}" finetune \
        --config configs/finetune/linprobe_fmnist.yaml "${common[@]}" \
        run.name="mae-linprobe-$name" init="$OUT/mae-fmnist"
done

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [("from scratch, fine-tune", "scratch"), ("MAE, fine-tune", "mae-ft"),
        ("MAE, linear probe", "mae-linprobe")]
print("| init, protocol | 1% labels | 10% labels | 100% labels |")
print("|---|---|---|---|")
for title, prefix in rows:
    cells = []
    for name in ("1pct", "10pct", "100pct"):
        f = out / f"{prefix}-{name}" / "summary.json"
        if f.is_file():
            m = json.loads(f.read_text())["final_metrics"]
            cells.append(f"{100 * m['top1']:.1f} ({100 * m['macro_f1']:.1f})")
        else:
            cells.append("not run")
    print(f"| {title} | " + " | ".join(cells) + " |")
print("\ntest top-1 % (macro-F1 %), 10,000 Fashion-MNIST test images, after the last epoch")
PY
