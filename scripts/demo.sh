#!/usr/bin/env bash
# Fresh machine: creates .venv, installs mim, runs the whole story on the built-in synthetic shapes
# (no download): MAE pretraining, a supervised pretraining of the same encoder on labels of other
# synthetic images, then `mim compare` of scratch / supervised / MAE fine-tuned at 10% and 100% of
# the labels with 2 seeds; prints the report's table. Rerunning skips what is finished.
# Knobs (environment): PRETRAIN_EPOCHS overrides both pretrainings' epochs (configs: 8 MAE, 4
# supervised). Extra arguments go to both `mim pretrain` commands as key=value overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
EPOCHS=(${PRETRAIN_EPOCHS:+train.epochs=$PRETRAIN_EPOCHS})
done_run() { [ -f "runs/$1/summary.json" ]; }  # finished runs are not trained again

echo "== 1/3 MAE pretraining (labels unused)"
done_run demo-pretrain || mim pretrain --config configs/pretrain/demo.yaml "${EPOCHS[@]}" "$@"
echo "== 2/3 supervised pretraining (labels of other synthetic images)"
done_run demo-supervised || mim pretrain --config configs/pretrain/supervised_demo.yaml \
    "${EPOCHS[@]}" "$@"
echo "== 3/3 compare scratch / supervised / mae"
mim compare --config configs/compare/demo.yaml   # prints the report's table at the end
echo
sed -n '/^## Budget/,/^## Inits/p' runs/demo-compare/report.md | sed '$d'  # its budget
echo "Full report: runs/demo-compare/report.md (budget and caveats), label_efficiency.png, curves.png"
