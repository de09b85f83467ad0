#!/usr/bin/env bash
# Create .venv and install Keel with every pinned dependency from uv.lock. Idempotent: a second run only checks.
# Python packages come from the lock; Debian packages from scripts/system-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Keel needs Python 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  echo "==> installing uv $UV_VERSION into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

export UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=.venv
# --inexact keeps uv itself (and the model-weight packages installed by scripts/install-local-model.sh) in the venv.
echo "==> installing Python dependencies from uv.lock"
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "    (the first time, this builds llama.cpp for the embedded local model: about 7-10 minutes on 2 cores;"
  echo "     the built wheel is cached, so later setups take seconds)"
fi
.venv/bin/uv sync --frozen --inexact --all-groups --extra local --extra nemo
