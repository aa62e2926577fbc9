#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned stack, colossalai 0.5.0 without its dependency pins,
# and this package in editable mode. Idempotent: a second run only checks a stamp.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
COLOSSALAI_VERSION=0.5.0
cd "$ROOT"

stamp_inputs() { cat requirements.txt requirements-dev.txt setup.py; echo "colossalai==$COLOSSALAI_VERSION"; }
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$want" ]] \
   && "$VENV/bin/python" -c "import colossalai, colossal_llama" 2>/dev/null; then
  echo "[setup_env] $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=24" >/dev/null
echo "[setup_env] installing pinned requirements into $VENV"
"${PIP[@]}" install -r requirements.txt -r requirements-dev.txt
# colossalai pins torch<=2.5.1 and pulls several GB; its import-time needs are in requirements.txt.
"${PIP[@]}" install --no-deps "colossalai==$COLOSSALAI_VERSION"
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import torch, transformers, colossalai, colossal_llama; print('[setup_env] torch', torch.__version__, '| transformers', transformers.__version__, '| colossalai', colossalai.__version__)"
echo "$want" > "$VENV/.setup-stamp"
