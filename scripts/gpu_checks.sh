#!/usr/bin/env bash
# Correctness checks on a bare 1x H100 / H200 machine (about 3 minutes): the CUDA tests, then short
# runs of every job on the GPU in bf16 and fp16 (loss scaling), each checked for a finite, falling
# loss and a written summary; then FSDP pretraining runs, killed and resumed (fsdp_check). Carry
# .whl (bash scripts/gpu_wheels.sh) along; writes $OUT/checks.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_checks_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/checks.txt") 2>&1
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl | grep -v pyarrow) || echo "FAILED: wheels"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_detect_gpu.py tests/test_hog.py \
    tests/test_masking.py tests/test_masking_block.py || echo "FAILED: CUDA tests"

check() {  # name, job, overrides...: a short GPU run; its loss must be finite and fall
    local name=$1 job=$2; shift 2
    local t0=$SECONDS
    if timeout 150 "$PY" -m mim "$job" "$@" run.output_dir=/tmp/gpu_runs run.name="$name" \
        tracking.backend=none run.resume=none > "/tmp/$name.log" 2>&1; then
        "$PY" - "/tmp/gpu_runs/$name" "$name" $((SECONDS - t0)) <<'PY'
import json, math, sys
from pathlib import Path
run, name, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rec = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
loss = [r["loss"] for r in rec if "loss" in r]
s = json.loads((run / "summary.json").read_text())
ok = all(math.isfinite(v) for v in loss) and loss[-1] < loss[0]
extra = {k: v for k, v in s.get("final_metrics", {}).items() if k in ("top1", "map", "map_50")}
print(f"{'ok' if ok else 'FAILED'}: {name}: loss {loss[0]:.4f} -> {loss[-1]:.4f} over "
      f"{s.get('updates')} updates, {s.get('nonfinite_updates', 0)} non-finite, {extra} ({secs} s)")
PY
    else
        echo "FAILED: $name (exit $?)"; tail -5 "/tmp/$name.log"
    fi
}
SMALL=(train.log_every=5 data.num_workers=4)
PRE=("${SMALL[@]}" train.vis_every=0)
check mae-bf16 pretrain -c configs/pretrain/demo.yaml train.epochs=2 train.mixed_precision=bf16 "${PRE[@]}"
check mae-fp16 pretrain -c configs/pretrain/demo.yaml train.epochs=2 train.mixed_precision=fp16 "${PRE[@]}"
check mae-bf16-compile pretrain -c configs/pretrain/demo.yaml train.epochs=2 \
    train.mixed_precision=bf16 train.compile=true "${PRE[@]}"
check simmim-bf16 pretrain -c configs/pretrain/simmim_demo.yaml train.epochs=2 train.mixed_precision=bf16 "${PRE[@]}"
check maskfeat-fp16 pretrain -c configs/pretrain/maskfeat_demo.yaml train.epochs=2 train.mixed_precision=fp16 "${PRE[@]}"
check tokenizer-bf16 tokenizer -c configs/pretrain/tokenizer_demo.yaml train.epochs=2 train.mixed_precision=bf16 "${PRE[@]}"
check beit-bf16 pretrain -c configs/pretrain/beit_demo.yaml train.epochs=2 train.mixed_precision=bf16 \
    method.tokenizer=/tmp/gpu_runs/tokenizer-bf16 "${PRE[@]}"
check finetune-bf16 finetune -c configs/finetune/cls_demo.yaml init=/tmp/gpu_runs/mae-bf16 \
    train.epochs=3 train.mixed_precision=bf16 optim.base_lr=8e-3 "${SMALL[@]}"
check finetune-fp16 finetune -c configs/finetune/cls_demo.yaml init=/tmp/gpu_runs/mae-fp16 \
    train.epochs=3 train.mixed_precision=fp16 optim.base_lr=8e-3 "${SMALL[@]}"
check detect-bf16 detect -c configs/detect/demo.yaml init=/tmp/gpu_runs/mae-bf16 train.epochs=3 \
    train.mixed_precision=bf16 "${SMALL[@]}"

# FSDP (configs/accelerate/fsdp.yaml, bf16 from the launcher): pretraining with pictures every
# epoch and checkpoints, a reference run, then the same run SIGKILLed mid-way and relaunched;
# the relaunch must log the reference's losses and export the final checkpoint's encoder.
fsdp_check() {  # name, processes
    local name=$1 nproc=$2 t0=$SECONDS
    local launch=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml
                  --num_processes "$nproc" --main_process_port $((29600 + nproc)) -m mim pretrain
                  -c configs/pretrain/demo.yaml train.epochs=3 train.vis_every=1
                  train.save_every=4 train.log_every=1 data.num_workers=4 tracking.backend=none
                  run.output_dir=/tmp/gpu_runs run.resume=auto)
    if ! timeout 300 "${launch[@]}" run.name="$name-ref" > "/tmp/$name-ref.log" 2>&1; then
        echo "FAILED: $name reference (exit $?)"; grep "error" "/tmp/$name-ref.log" | tail -3
        return
    fi
    setsid "${launch[@]}" run.name="$name" > "/tmp/$name.log" 2>&1 &
    local pid=$!
    local lines=0
    while kill -0 $pid 2>/dev/null && [ "$lines" -lt 10 ]; do
        sleep 0.2; lines=$(cat "/tmp/gpu_runs/$name/metrics.jsonl" 2>/dev/null | wc -l)
    done
    kill -KILL -- -$pid 2>/dev/null; wait $pid 2>/dev/null
    timeout 300 "${launch[@]}" run.name="$name" >> "/tmp/$name.log" 2>&1 \
        || { echo "FAILED: $name relaunch (exit $?)"; tail -3 "/tmp/$name.log"; return; }
    "$PY" - /tmp/gpu_runs "$name" $((SECONDS - t0)) <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
root, name, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
loss = lambda run: [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
                       if l.strip()]
ref, got = loss(root / f"{name}-ref"), loss(root / name)
run = root / name
final = load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
enc = load_file(run / "encoder.safetensors")
same_enc = bool(enc) and all((v == final[f"encoder.vit.{k}"]).all() for k, v in enc.items())
diff = max(abs(a - b) for a, b in zip(ref, got)) if len(ref) == len(got) else float("inf")
pics = len(list(run.glob("recon_*.png")))
ok = diff < 1e-5 and same_enc and pics == 3
resumed = "resumed from" in (Path("/tmp") / f"{name}.log").read_text()
print(f"{'ok' if ok else 'FAILED'}: {name}: {len(got)} updates, resumed={resumed}, max |loss - "
      f"reference| {diff:.2e}, encoder export = final checkpoint's: {same_enc}, {pics} pictures "
      f"({secs} s)")
PY
}
fsdp_check fsdp-1proc 1
# NCCL refuses two ranks on one GPU; run it to record what this machine does.
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] && fsdp_check fsdp-2proc 2 \
    || { echo "== fsdp-2proc: one GPU; NCCL needs one GPU per process, trying anyway"; \
         fsdp_check fsdp-2proc-1gpu 2; }
echo "done in $SECONDS s"
