# Sourced by the Fashion-MNIST scripts: the venv, the repository root, one thread per run (two
# such runs share a 2-core machine well), offline tracking, and the output folder runs/fmnist.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
OUT=runs/fmnist
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
step() {  # name, marker, command...: runs it once (skipped when the marker exists), logs its
    # wall time to $TIMES
    local name=$1 marker=$2; shift 2
    if [ -e "$marker" ]; then echo "== $name: done ($marker)"; return; fi
    echo "== $name"
    local t0=$SECONDS
    "$@"
    echo "$name: $((SECONDS - t0)) s" | tee -a "$TIMES"
}
