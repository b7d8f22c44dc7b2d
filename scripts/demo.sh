#!/usr/bin/env bash
# Fresh machine: creates .venv, installs mim, runs the built-in demo end to end (no download).
# MAE pretraining of a small ViT on the synthetic shapes set; prints where the results are.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
mim pretrain --config configs/pretrain/demo.yaml "$@"
