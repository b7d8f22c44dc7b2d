#!/usr/bin/env bash
# The GPU benchmark, one prepared run for a bare 1x H100 / H200 machine (at most about 9 minutes).
#
#   bash scripts/gpu_wheels.sh          # here, once: the packages the GPU image lacks, into .whl/
#   bash scripts/gpu_bench.sh           # there, from the repository root; carry .whl along
#
# Writes to $OUT (default ./gpu_bench_out): log.txt (everything), env.txt, gpu_suite.{md,json}
# (ViT-B/16 MAE bf16, eager and compiled, against ViTMAEForPreTraining; MFU; the non-finite guard;
# input pipeline; a real run's data wait) and scaling.{md,json} (batch and image size).
# A failing part is reported and the script goes on to the next one.
# PARTS (default "suite scaling") picks parts; "variants" times mim's compile scopes and attention
# kernels against the reference at the GPU suite's case (variants.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_bench_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
set -x
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

# Carried wheels (scripts/gpu_wheels.sh) go first on the path; pyarrow only if datasets needs it.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl | grep -v pyarrow) || echo "PART FAILED: wheels"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import datasets" 2>/dev/null && compgen -G ".whl/pyarrow-*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/pyarrow-*.whl || echo "PART FAILED: pyarrow wheel"
    fi
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

{
    date -u; uname -a; nvidia-smi; lscpu | grep -E "Model name|^CPU\(s\)"; free -g
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    for m in timm transformers accelerate datasets PIL torchvision numpy pyarrow; do
        "$PY" -c "import $m; print('$m', $m.__version__)" || echo "$m: not importable"
    done
} 2>&1 | tee "$OUT/env.txt"

run_part() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    echo "PART $name: rc=$rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || echo "PART FAILED: $name (rc=$rc)"
}

PARTS="${PARTS:-suite scaling}"
[[ " $PARTS " == *" suite "* ]] && run_part gpu-suite 400 "$PY" -m mim benchmark --suite gpu \
    --json "$OUT/gpu_suite.json" --markdown "$OUT/gpu_suite.md"
[[ " $PARTS " == *" scaling "* ]] && run_part scaling 120 "$PY" -m mim benchmark --suite scaling \
    --modes eager --rounds 5 --budget 60 --batches 64,128,256 --sizes 224,384,512 --size-batch 64 \
    --json "$OUT/scaling.json" --markdown "$OUT/scaling.md"
[[ " $PARTS " == *" variants "* ]] && run_part variants 330 "$PY" -m mim benchmark \
    model.arch=vit_base_patch16_224 method.decoder_dim=512 method.decoder_depth=8 \
    method.decoder_heads=16 data.batch_size=256 train.mixed_precision=bf16 --impls mim,mim-whole,mim-flash,reference --modes compile --rounds 8 --budget 45 \
    --json "$OUT/variants.json" --markdown "$OUT/variants.md"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
echo "done in $SECONDS s; results in $OUT"
