#!/usr/bin/env bash
# Reproduces the "Detection" section of docs/results.md on a CPU (about 40 minutes of CPU time,
# one thread per run, on the project's shared 2-core machine):
#   1. data: the Fashion-MNIST detection set (scripts/make_fmnist_detection.py); coco128 is read
#      from ../shared/data/coco128;
#   2. the two encoder checkpoints of the Fashion-MNIST classification study
#      (scripts/finetune_fmnist.sh), made here if missing: MAE on the 60,000 training images
#      (labels unused), and a supervised classifier trained from scratch on all their labels;
#   3. detection on each set from scratch, from the MAE encoder and from the supervised encoder,
#      with the same schedule (configs/detect/{fmnist,coco128}.yaml);
#   4. a table of the results and of each run's CPU time.
# Usage: bash scripts/detect_results.sh [OUT_DIR]        (default runs/detect)
#        RUNS="fmnist-scratch coco128-scratch" bash scripts/detect_results.sh   (a subset)
#        RUNS="fmnist-scratch-s1" ...   (seed 1; the default set is seed 0)
#        FMNIST_RUNS=DIR: where the classification study's runs are (default runs/fmnist)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-runs/detect}"
FM="${FMNIST_RUNS:-runs/fmnist}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MIM=(python -m mim)
MAE="$FM/mae-fmnist"
SUP="$FM/scratch-100pct/export/model.safetensors"
RUNS="${RUNS:-fmnist-scratch fmnist-mae fmnist-supervised coco128-scratch coco128-mae coco128-supervised}"
mkdir -p "$OUT"

[ -f runs/data/fmnist-det/annotations/instances_val.json ] || python scripts/make_fmnist_detection.py
if [[ "$RUNS" == *-mae* && ! -f "$MAE/encoder.safetensors" ]]; then
    [ -f runs/data/fmnist/dataset_dict.json ] || python scripts/prepare_fmnist.py
    "${MIM[@]}" pretrain --config configs/pretrain/mae_fmnist.yaml run.output_dir="$FM"
fi
if [[ "$RUNS" == *-supervised* && ! -f "$SUP" ]]; then
    [ -f runs/data/fmnist/dataset_dict.json ] || python scripts/prepare_fmnist.py
    "${MIM[@]}" finetune --config configs/finetune/cls_fmnist.yaml run.output_dir="$FM" \
        run.name=scratch-100pct init=scratch optim.layer_decay=1.0 data.label_fraction=1.0 \
        train.epochs=1 train.eval_every=1 optim.warmup_epochs=0.1
fi

for run in $RUNS; do  # DATA-INIT, or DATA-INIT-sN for seed N (default 0)
    IFS=- read -r data which seed <<<"$run"
    seed="${seed:-s0}"
    case "$which" in
        scratch) init=scratch ;;
        mae) init="$MAE" ;;
        supervised) init="$SUP" ;;
        *) echo "unknown run $run" >&2; exit 2 ;;
    esac
    [ -f "$OUT/$run/summary.json" ] && continue
    /usr/bin/time -f '{"wall_s": %e, "cpu_s": %U, "sys_s": %S}' -o "$OUT/$run.time.json" \
        "${MIM[@]}" finetune --config "configs/detect/$data.yaml" run.output_dir="$OUT" \
        run.name="$run" init="$init" run.seed="${seed#s}" run.resume=none
done

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("map", "map_50", "map_75", "mar_100", "precision_50", "recall_50")
print("| set | init | " + " | ".join(keys) + " | updates | CPU min |")
print("|---|---|" + "---|" * (len(keys) + 2))
for data in ("fmnist", "coco128"):
    runs = [f"{data}-{init}" for init in ("scratch", "mae", "supervised")]
    runs += sorted(p.name for p in out.glob(f"{data}-*-s*") if p.is_dir())
    for run in runs:
        init = run.split("-", 1)[1]
        f = out / run / "summary.json"
        if not f.is_file():
            print(f"| {data} | {init} | " + " | ".join("not run" for _ in keys) + " | | |")
            continue
        s = json.loads(f.read_text())
        t = out / f"{run}.time.json"
        cpu = json.loads(t.read_text()) if t.is_file() else {}
        minutes = (cpu.get("cpu_s", 0) + cpu.get("sys_s", 0)) / 60
        print(f"| {data} | {init} | " + " | ".join(f"{100 * s[k]:.1f}" for k in keys)
              + f" | {s['updates']} | {minutes:.1f} |")
print("\nCOCO metrics in %, on the validation split, after the last epoch")
PY
