#!/usr/bin/env bash
# The sweep behind the demo's settings (docs/results.md, "How the demo's settings were chosen"):
# variants of the demo story (MAE pretraining, optional supervised pretraining, `mim compare` of the
# demo config with extra overrides), PARALLEL at a time, each table into $OUT/<name>.txt.
# Made for a GPU machine (bare image: carry .whl from scripts/gpu_wheels.sh); runs on CPU as well.
# A variant line: name|MAE overrides|supervised overrides ("-": no such init)|compare extras, where
# an extra is a recipe override (key=value), F<fraction>:key=value for one fraction, or
# C:<key>=<yaml> for a key of the compare config itself (C:seeds=[0,1,2]).
# Usage: bash scripts/demo_sweep.sh [variants file]   (default: the second sweep's variants)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/runs/demo-sweep}" WORK="${WORK:-/tmp/demo_sweep}" PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import timm" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl | grep -v pyarrow) || echo "FAILED: wheels"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

variant() {  # name, MAE overrides, supervised overrides, compare extras
    local name=$1 mae=$2 sup=$3 extras=$4 d=$WORK/$1 t0=$SECONDS
    local inits="{scratch: scratch"
    mkdir -p "$d"
    if [ "$mae" != "-" ]; then
        "$PY" -m mim pretrain --config configs/pretrain/demo.yaml run.output_dir="$d" run.name=mae \
            tracking.backend=none train.vis_every=0 $mae > "$d/mae.log" 2>&1 \
            || { echo "FAILED: $name (MAE, $d/mae.log)"; return; }
        inits="$inits, mae: $d/mae"
    fi
    if [ "$sup" != "-" ]; then
        "$PY" -m mim pretrain --config configs/pretrain/supervised_demo.yaml run.output_dir="$d" \
            run.name=sup tracking.backend=none $sup > "$d/sup.log" 2>&1 \
            || { echo "FAILED: $name (supervised, $d/sup.log)"; return; }
        inits="$inits, supervised: $d/sup"
    fi
    local t1=$SECONDS
    "$PY" - "$d" "$inits}" "$extras" <<'PY'
import sys
import yaml
d, inits, extras = sys.argv[1], sys.argv[2], sys.argv[3].split()
c = yaml.safe_load(open("configs/compare/demo.yaml"))
c.update(run={"output_dir": d, "name": "cmp"}, inits=yaml.safe_load(inits),
         tracking={"backend": "none"})
for item in extras:
    if item.startswith("C:"):
        key, value = item[2:].split("=", 1)
        c[key] = yaml.safe_load(value)
    elif item.startswith("F"):
        fraction, kv = item[1:].split(":", 1)
        c.setdefault("fraction_overrides", {}).setdefault(float(fraction), []).append(kv)
    else:
        c["overrides"].append(item)
yaml.safe_dump(c, open(f"{d}/cmp.yaml", "w"))
PY
    "$PY" -m mim compare --config "$d/cmp.yaml" > "$d/cmp.log" 2>&1 \
        || { echo "FAILED: $name (compare, $d/cmp.log)"; return; }
    {
        echo "=== $name: pretraining $((t1 - t0)) s, compare $((SECONDS - t1)) s | MAE: $mae |" \
             "supervised: $sup | compare: $extras"
        sed -n '/^| init/,/^$/p' "$d/cmp/report.md"
    } > "$OUT/$name.txt"
    cat "$OUT/$name.txt"
}

DEFAULT_VARIANTS="mae8|train.epochs=8 method.mask_ratio=0.75|train.epochs=4|C:seeds=[0,1,2]
mae8_normpix|train.epochs=8 method.mask_ratio=0.75 method.norm_pix_loss=true|train.epochs=6|C:seeds=[0,1,2]
mae12|train.epochs=12 method.mask_ratio=0.75|-|C:seeds=[0,1,2]
mae12_normpix|train.epochs=12 method.mask_ratio=0.75 method.norm_pix_loss=true|-|C:seeds=[0,1,2]
mae8_mask0.6|train.epochs=8 method.mask_ratio=0.6|-|C:seeds=[0,1,2]
mae16_normpix|train.epochs=16 method.mask_ratio=0.75 method.norm_pix_loss=true|-|C:seeds=[0,1,2]
mae8_ftlr5e-4|train.epochs=8 method.mask_ratio=0.75|-|C:seeds=[0,1,2] optim.base_lr=4e-3
mae8_ftlr2e-3|train.epochs=8 method.mask_ratio=0.75|-|C:seeds=[0,1,2] optim.base_lr=1.6e-2"
PARALLEL="${PARALLEL:-8}"
while IFS='|' read -r name mae sup extras; do
    case "$name" in ''|\#*) continue;; esac
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 1; done
    variant "$name" "$mae" "$sup" "$extras" &
done < <(if [ $# -gt 0 ]; then cat "$1"; else echo "$DEFAULT_VARIANTS"; fi)
wait
