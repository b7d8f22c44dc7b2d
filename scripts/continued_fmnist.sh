#!/usr/bin/env bash
# Continued pretraining vs pretraining from scratch at the same budget (docs/results.md):
#   1. a "public" MAE encoder: MAE on Fashion-MNIST classes 5-9 (30,000 images, 2 epochs);
#   2. on the target images (classes 0-4, 30,000, labels unused), two MAE runs of the same budget
#      (2 epochs): from random weights, and continued from the public encoder (init=...); both
#      log the k-NN top-1 of their encoder before the first update and after every epoch
#      (monitor.*) on 3,000 labeled target training images (2,000 memory bank, 1,000 held out);
#   3. `mim compare` fine-tunes scratch / public / both MAE encoders on 10% of the target labels
#      (2 seeds) and scores them on the 5,000 target test images;
#   4. scripts/knn_curves.py draws the k-NN curves and prints them beside the fine-tuned top-1.
# Needs the Fashion-MNIST IDX files in ../shared/data/fashion-mnist. Rerunning skips what is done.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_fmnist.sh"
SRC=(); [ -z "${FMNIST_SRC:-}" ] || SRC=(--src "$FMNIST_SRC")
TIMES="$OUT/continued_times.txt"
step() {  # name, marker, command...: runs it once, logs its wall time
    local name=$1 marker=$2; shift 2
    if [ -e "$marker" ]; then echo "== $name: done ($marker)"; return; fi
    echo "== $name"
    local t0=$SECONDS
    "$@"
    echo "$name: $((SECONDS - t0)) s" | tee -a "$TIMES"
}
probe_set() {  # 3,000 labeled target training images, one split (the monitor holds out 1/3)
    python - <<'PY'
import datasets
train = datasets.load_from_disk("runs/data/fmnist-0to4")["train"].shuffle(seed=0)
datasets.DatasetDict(train=train.select(range(3000))).save_to_disk("runs/data/fmnist-0to4-probe")
PY
}
MAE=(--config configs/pretrain/mae_fmnist.yaml run.output_dir="$OUT" train.epochs=2)
MONITOR=(monitor.every=1 monitor.data.path=runs/data/fmnist-0to4-probe monitor.data.val_fraction=0.3334
         monitor.data.num_workers=1)

step "data: target classes 0-4" runs/data/fmnist-0to4/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 0,1,2,3,4 --out runs/data/fmnist-0to4
step "data: public classes 5-9" runs/data/fmnist-5to9/dataset_dict.json \
    python scripts/prepare_fmnist.py "${SRC[@]}" --classes 5,6,7,8,9 --out runs/data/fmnist-5to9
step "data: probe set" runs/data/fmnist-0to4-probe/dataset_dict.json probe_set
step "public MAE (classes 5-9)" "$OUT/mae-fmnist-5to9/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-fmnist-5to9 data.path=runs/data/fmnist-5to9 "${MONITOR[@]}"
step "MAE on the target from scratch" "$OUT/mae-0to4-scratch/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-0to4-scratch data.path=runs/data/fmnist-0to4 "${MONITOR[@]}"
step "MAE on the target continued from public" "$OUT/mae-0to4-continued/summary.json" \
    mim pretrain "${MAE[@]}" run.name=mae-0to4-continued data.path=runs/data/fmnist-0to4 \
    init="$OUT/mae-fmnist-5to9" "${MONITOR[@]}"
step "compare: 4 inits x 10% labels x 2 seeds" "$OUT/fmnist-continued-compare/report.md" \
    mim compare --config configs/compare/fmnist_continued.yaml
python scripts/knn_curves.py --out docs/img/fmnist_knn_curves.png \
    --compare "$OUT/fmnist-continued-compare" \
    public="$OUT/mae-fmnist-5to9" mae_scratch="$OUT/mae-0to4-scratch" \
    mae_continued="$OUT/mae-0to4-continued"
echo "Wall times: $TIMES"
