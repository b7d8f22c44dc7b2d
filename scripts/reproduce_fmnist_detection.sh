#!/usr/bin/env bash
# The detection story on real data (docs/results.md, "Detection: does pretraining help, with
# intervals"), sized for a 2-core CPU:
#   1. the Fashion-MNIST detection set: 4,000 training / 500 validation canvases of 56 px (all
#      unlabeled for pretraining), and its first 2,000 training canvases annotated for the detectors;
#   2. MAE pretraining on the 4,000 training canvases at the detector's 56 px, annotations unused;
#   3. SimMIM pretraining (the BEiT family, raw-pixel targets) on the same canvases at 56 px;
#   4. supervised pretraining of the same encoder on 20,000 labeled Fashion-MNIST images (28 px);
#   5. `mim compare` of scratch / supervised / MAE / SimMIM as detectors at 10% and 100% of the
#      annotated training canvases, 3 seeds each (24 runs); the report goes to
#      runs/fmnist-det/fmnist-detect-compare/report.md.
# Needs the Fashion-MNIST IDX files in ../shared/data/fashion-mnist (or FMNIST_SRC=...).
# Rerunning skips what is finished, so a killed run continues where it stopped.
# Usage: bash scripts/reproduce_fmnist_detection.sh [extra key=value for both pretrainings]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_fmnist.sh"
OUT=runs/fmnist-det
mkdir -p "$OUT"
SRC=(); [ -z "${FMNIST_SRC:-}" ] || SRC=(--src "$FMNIST_SRC")
TIMES="$OUT/reproduce_times.txt"

step "data: detection canvases" runs/data/fmnist-det/annotations/instances_val.json \
    python scripts/make_fmnist_detection.py "${SRC[@]}"
step "data: the 2,000 annotated canvases" runs/data/fmnist-det-2k/annotations/instances_val.json \
    python scripts/make_fmnist_detection.py "${SRC[@]}" --train 2000 --out runs/data/fmnist-det-2k
step "data: 20,000 labeled images" runs/data/fmnist-20k/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --max-train 20000 --out runs/data/fmnist-20k
step "MAE pretraining (training canvases, 56 px, annotations unused)" \
    "$OUT/mae-fmnist-det/summary.json" \
    mim pretrain --config configs/pretrain/mae_fmnist_det.yaml run.output_dir="$OUT" \
        tracking.backend=none "$@"
step "SimMIM pretraining (training canvases, 56 px, annotations unused)" \
    "$OUT/simmim-fmnist-det/summary.json" \
    mim pretrain --config configs/pretrain/simmim_fmnist_det.yaml run.output_dir="$OUT" \
        tracking.backend=none "$@"
step "supervised pretraining (20,000 labeled images, 28 px)" \
    "$OUT/supervised-fmnist-20k/summary.json" \
    mim pretrain --config configs/pretrain/supervised_fmnist.yaml run.output_dir="$OUT" \
        data.path=runs/data/fmnist-20k run.name=supervised-fmnist-20k train.epochs=1 \
        optim.warmup_epochs=0.2 tracking.backend=none "$@"
step "compare: 4 inits x 2 fractions x 3 seeds" "$OUT/fmnist-detect-compare/report.md" \
    mim compare --config configs/compare/detect_fmnist.yaml tracking.backend=none

echo
sed -n '/^| init/,/^$/p' "$OUT/fmnist-detect-compare/report.md"
sed -n '/^## Budget/,/^## Inits/p' "$OUT/fmnist-detect-compare/report.md" | sed '$d'
echo "Wall times: $TIMES; report: $OUT/fmnist-detect-compare/report.md, label_efficiency.png," \
     "curves.png"
