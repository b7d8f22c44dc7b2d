#!/usr/bin/env bash
# Fresh machine: creates .venv, installs mim with its test extras, runs the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k masking`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q "$@"
