#!/usr/bin/env bash
# Which masked-image-modeling method wins on Fashion-MNIST (docs/results.md, "Pretraining methods
# compared by fine-tuning"), sized for a 2-core CPU:
#   1. MAE, SimMIM, MaskFeat, BEiT (with its VQ-VAE tokenizer first) and data2vec, each
#      pretrained with the same encoder and budget (configs/pretrain/*_fmnist.yaml: 3 epochs over
#      the 60,000 training images, labels unused); the wall time of each goes to
#      runs/fmnist/methods_times.txt;
#   2. `mim compare` of the five (and scratch) fine-tuned with one recipe on 10% of the labels,
#      2 seeds: runs/fmnist/fmnist-methods/report.md.
# The MAE run is shared with scripts/reproduce_fmnist.sh. Rerunning skips what is finished.
# Usage: bash scripts/compare_methods_fmnist.sh [extra key=value for every pretraining]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_fmnist.sh"
TIMES="$OUT/methods_times.txt"
[ -f runs/data/fmnist/dataset_dict.json ] || python scripts/prepare_fmnist.py
for run in tokenizer:tokenizer simmim:pretrain maskfeat:pretrain beit:pretrain mae:pretrain \
        data2vec:pretrain; do
    name=${run%%:*} cmd=${run##*:}
    [ -f "$OUT/$name-fmnist/summary.json" ] && { echo "== $name: done"; continue; }
    echo "== $name"
    t0=$SECONDS
    mim "$cmd" --config "configs/pretrain/${name}_fmnist.yaml" run.output_dir="$OUT" "$@"
    echo "$name: $((SECONDS - t0)) s" | tee -a "$TIMES"
done
mim compare --config configs/compare/fmnist_methods.yaml
echo
sed -n '/^| init/,/^$/p' "$OUT/fmnist-methods/report.md"
echo "Pretraining wall times: $TIMES; report: $OUT/fmnist-methods/report.md"
