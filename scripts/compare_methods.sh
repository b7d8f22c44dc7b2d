#!/usr/bin/env bash
# Pretrain MAE, SimMIM, MaskFeat and BEiT (plus BEiT's tokenizer) with one budget on the
# Fashion-MNIST training images, labels unused; writes runs/compare/summary.md with the wall
# time and final loss of each run. Same encoder, image size, batch, lr schedule and epochs for
# every method; each keeps its own targets, mask ratio, betas and gradient clipping (its
# *_demo.yaml). Knobs (environment): SUBSET (first N training images, default 6000), EPOCHS
# (default 2), SEED (default 0), OUT (default runs/compare), METHODS (default all; empty: only
# prepare the data), EXTRA
# (more key=value overrides for every run, e.g. "data.batch_size=256 train.mixed_precision=bf16").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUBSET="${SUBSET:-6000}" EPOCHS="${EPOCHS:-2}" SEED="${SEED:-0}" OUT="${OUT:-runs/compare}"
METHODS="${METHODS-mae simmim maskfeat beit}" PY="${PYTHON:-python}"
FMNIST="${FMNIST:-$ROOT/../shared/data/fashion-mnist}"
DATA="runs/data/fmnist-train-$SUBSET"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -d "$DATA" ]; then  # the first SUBSET training images as a save_to_disk dataset, no labels
    if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
        echo "compare_methods.sh: no Fashion-MNIST at $FMNIST (set FMNIST=...)" >&2
        exit 2
    fi
    "$PY" - "$FMNIST/train-images-idx3-ubyte.gz" "$SUBSET" "$DATA" <<'PY'
import gzip, io, sys
import datasets, numpy as np
from PIL import Image
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
raw = np.frombuffer(gzip.open(src).read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}
ds = datasets.Dataset.from_dict({"image": [png(a) for a in raw]},
                                features=datasets.Features({"image": datasets.Image()}))
ds.save_to_disk(dst)
print(f"wrote {len(ds)} images to {dst}")
PY
fi

COMMON=(model.arch=vit_tiny_patch16_224 model.img_size=32 model.patch_size=4 model.embed_dim=128
        model.depth=4 model.num_heads=4 model.init_values=0.0
        data.synthetic=false data.path="$DATA" "data.mean=[0.286,0.286,0.286]" "data.std=[0.353,0.353,0.353]"
        data.batch_size=64 data.num_workers=1 "data.crop_scale=[0.5,1.0]"
        train.epochs="$EPOCHS" train.log_every=10 train.vis_every=0 train.save_every=100000
        optim.base_lr=1.5e-3 optim.warmup_epochs=0.5 tracking.backend=none
        run.output_dir="$OUT" run.seed="$SEED" run.resume=none)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
COMMON+=("${EXTRA_ARGS[@]}")

timed() {  # timed NAME COMMAND...: run it, append "NAME seconds" to the timing file
    local name=$1 start end
    shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    echo "$name $("$PY" -c "print(round($end - $start, 1))")" >> "$OUT/timings.txt"
}

mkdir -p "$OUT"
: > "$OUT/timings.txt"
for method in $METHODS; do
    case $method in
        mae) timed mae "$PY" -m mim pretrain --config configs/pretrain/demo.yaml "${COMMON[@]}" \
                 run.name=mae ;;
        beit)
            timed tokenizer "$PY" -m mim tokenizer --config configs/pretrain/tokenizer_demo.yaml \
                "${COMMON[@]}" model.depth=2 run.name=tokenizer
            timed beit "$PY" -m mim pretrain --config configs/pretrain/beit_demo.yaml \
                "${COMMON[@]}" method.tokenizer="$OUT/tokenizer" run.name=beit ;;
        *) timed "$method" "$PY" -m mim pretrain --config "configs/pretrain/${method}_demo.yaml" \
               "${COMMON[@]}" run.name="$method" ;;
    esac
done

"$PY" - "$OUT" "$SUBSET" "$EPOCHS" <<'PY'
import json, sys
from pathlib import Path
out, subset, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
times = dict(line.split() for line in (out / "timings.txt").read_text().splitlines())
if not times:
    sys.exit(0)
rows = ["| run | target | wall time (s) | updates | images/s | final loss | other |",
        "|---|---|---|---|---|---|---|"]
targets = {"mae": "pixels (MSE, dropped patches)", "simmim": "pixels (L1, mask token)",
           "maskfeat": "HOG (MSE, mask token)", "tokenizer": "VQ-VAE reconstruction",
           "beit": "visual tokens (CE, mask token)"}
for name, secs in times.items():
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x]
    last = recs[-1]
    other = ", ".join(f"{k} {last[k]:.3g}" for k in ("token_acc", "codes_used", "recon_loss")
                      if k in last)
    ips = sum(r["images_per_s"] for r in recs) / len(recs)
    rows.append(f"| {name} | {targets.get(name, '')} | {secs} | {last['step']} | {ips:.0f} "
                f"| {last['loss']:.4f} | {other} |")
text = f"Fashion-MNIST train, first {subset} images, {epochs} epochs\n\n" + "\n".join(rows) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY
