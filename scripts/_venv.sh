# Sourced by demo.sh and test.sh: create .venv once and install mim into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.mim-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
    python -m pip install --quiet -e "$ROOT[${MIM_EXTRAS:-test}]" 2>&1 | grep -v "is ignored" || true
    python -c "import mim" # fail here, not later, if the install did not work
    touch "$STAMP"
fi
