#!/usr/bin/env bash
# The whole story on real data (docs/results.md, "Self-supervised vs supervised vs scratch"),
# sized for a 2-core CPU (about an hour there when the machine is otherwise idle):
#   1. MAE pretraining on the 60,000 Fashion-MNIST training images, labels unused;
#   2. supervised pretraining of the same encoder on a labeled *source* task: classes 5-9
#      (30,000 other images, other classes);
#   3. `mim compare` on the *target* task, classes 0-4: scratch / supervised / MAE, fine-tuned with
#      one recipe at 1%, 10% and 100% of the target labels, 3 seeds each (27 runs), scored on the
#      5,000 target test images; the report goes to runs/fmnist/fmnist-compare/report.md.
# Needs the Fashion-MNIST IDX files in ../shared/data/fashion-mnist (or FMNIST_SRC=...).
# Rerunning skips what is finished, so a killed run continues where it stopped.
# Usage: bash scripts/reproduce_fmnist.sh [extra key=value for both pretrainings]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_fmnist.sh"
SRC=(); [ -z "${FMNIST_SRC:-}" ] || SRC=(--src "$FMNIST_SRC")
TIMES="$OUT/reproduce_times.txt"

step "data: all classes" runs/data/fmnist/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}"
step "data: target classes 0-4" runs/data/fmnist-0to4/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 0,1,2,3,4 --out runs/data/fmnist-0to4
step "data: source classes 5-9" runs/data/fmnist-5to9/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 5,6,7,8,9 --out runs/data/fmnist-5to9
step "MAE pretraining (60,000 images, labels unused)" "$OUT/mae-fmnist/summary.json" \
    mim pretrain --config configs/pretrain/mae_fmnist.yaml run.output_dir="$OUT" "$@"
step "supervised pretraining (classes 5-9, with labels)" "$OUT/supervised-fmnist-5to9/summary.json" \
    mim pretrain --config configs/pretrain/supervised_fmnist.yaml run.output_dir="$OUT" "$@"
step "compare: 3 inits x 3 label fractions x 3 seeds" "$OUT/fmnist-compare/report.md" \
    mim compare --config configs/compare/fmnist.yaml

echo
sed -n '/^| init/,/^$/p' "$OUT/fmnist-compare/report.md"
sed -n '/^## Budget/,/^## Inits/p' "$OUT/fmnist-compare/report.md" | sed '$d'
echo "Wall times: $TIMES; report: $OUT/fmnist-compare/report.md, label_efficiency.png, curves.png"
