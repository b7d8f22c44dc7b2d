#!/usr/bin/env bash
# Here (with internet or a PyPI mirror): download into .whl/ the wheels scripts/gpu_bench.sh needs
# on the bare GPU image (Python 3.12, x86-64), which has torch, transformers, accelerate but not
# datasets; timm is pinned to the version mim is tested with. pyarrow (55 MB of the 64 MiB a
# device call may carry) is only installed there if the image's own is too old for datasets;
# NO_PYARROW=1 leaves it out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || grep -qx "/.whl/" .gitignore \
    || echo "/.whl/" >> "$(git rev-parse --git-path info/exclude)"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
       --implementation cp "${PLAT[@]}" -d .whl "$@"; }
dl "timm==1.0.31" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "pycocotools==2.0.11"
[ -n "${NO_PYARROW:-}" ] || dl "pyarrow==26.0.1"
ls -la .whl
du -sh .whl
