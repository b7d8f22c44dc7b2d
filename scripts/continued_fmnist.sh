#!/usr/bin/env bash
# Continued pretraining vs pretraining from scratch at the same budget (docs/results.md), sized
# for a busy 2-core CPU (N images per set, default 3,000):
#   1. a "public" MAE encoder: MAE on N Fashion-MNIST images of classes 5-9 (4 epochs);
#   2. on N target images (classes 0-4, labels unused), two MAE runs of the same budget
#      (2 epochs, one recipe): from random weights, and continued from the public encoder
#      (init=...); all three log the k-NN top-1 of their encoder before the first update and
#      after every epoch (monitor.*) on 1,000 other labeled target training images (700 memory
#      bank, 300 held out);
#   3. `mim compare` fine-tunes public / both target MAE encoders on 10% of the N target labels
#      (2 seeds) and scores them on 1,000 target test images;
#   4. scripts/knn_curves.py draws the k-NN curves and prints them beside the fine-tuned top-1.
# Needs the Fashion-MNIST IDX files in ../shared/data/fashion-mnist (or FMNIST_SRC=...).
# Rerunning skips what is done.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_fmnist.sh"
SRC=(); [ -z "${FMNIST_SRC:-}" ] || SRC=(--src "$FMNIST_SRC")
N="${N:-3000}"
TIMES="$OUT/continued_times.txt"
subsets() {  # seeded subsets: N target + 1,000 probe (disjoint), N public, 1,000 target test
    N="$N" python - <<'PY'
import os
import datasets
n = int(os.environ["N"])
target = datasets.load_from_disk("runs/data/fmnist-0to4")
train, test = target["train"].shuffle(seed=0), target["test"].shuffle(seed=0)
datasets.DatasetDict(train=train.select(range(n)), test=test.select(range(1000))).save_to_disk(
    "runs/data/fmnist-0to4-small")
datasets.DatasetDict(train=train.select(range(n, n + 1000))).save_to_disk(
    "runs/data/fmnist-0to4-probe")
public = datasets.load_from_disk("runs/data/fmnist-5to9")["train"].shuffle(seed=0)
datasets.DatasetDict(train=public.select(range(n))).save_to_disk("runs/data/fmnist-5to9-small")
PY
}
MAE=(--config configs/pretrain/mae_fmnist.yaml run.output_dir="$OUT" train.epochs=2
     data.batch_size=64 train.log_every=10)
MONITOR=(monitor.every=1 monitor.data.path=runs/data/fmnist-0to4-probe monitor.data.val_fraction=0.3
         monitor.data.num_workers=0 monitor.data.batch_size=250)

step "data: target classes 0-4" runs/data/fmnist-0to4/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 0,1,2,3,4 --out runs/data/fmnist-0to4
step "data: public classes 5-9" runs/data/fmnist-5to9/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 5,6,7,8,9 --out runs/data/fmnist-5to9
step "data: subsets" runs/data/fmnist-5to9-small/dataset_dict.json subsets
step "public MAE (classes 5-9)" "$OUT/mae-5to9-public/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-5to9-public data.path=runs/data/fmnist-5to9-small train.epochs=4 \
    "${MONITOR[@]}"
step "MAE on the target from scratch" "$OUT/mae-0to4-scratch/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-0to4-scratch data.path=runs/data/fmnist-0to4-small \
    "${MONITOR[@]}"
step "MAE on the target continued from public" "$OUT/mae-0to4-continued/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-0to4-continued data.path=runs/data/fmnist-0to4-small \
    init="$OUT/mae-5to9-public" "${MONITOR[@]}"
step "compare: 3 inits x 10% labels x 2 seeds" "$OUT/fmnist-continued-compare/report.md" \
    mim compare --config configs/compare/fmnist_continued.yaml
python scripts/knn_curves.py --out docs/img/fmnist_knn_curves.png \
    --compare "$OUT/fmnist-continued-compare" \
    public="$OUT/mae-5to9-public" mae_scratch="$OUT/mae-0to4-scratch" \
    mae_continued="$OUT/mae-0to4-continued"
echo "Wall times: $TIMES"
