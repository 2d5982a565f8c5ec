#!/usr/bin/env bash
# Set up a virtual environment for cachescope in .venv (idempotent).
#   bash scripts/bootstrap.sh        -> the package and its CLI
#   bash scripts/bootstrap.sh test   -> also everything the tests need (Python side)
# The CPU build of torch is pinned first: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip >/dev/null 2>&1 || true
$PIP install --quiet "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
    $PIP install --quiet -e ".[test]"
    # labml-nn's declared dependencies pull torchvision, which breaks beside this torch.
    $PIP install --quiet --no-deps labml-nn labml
    $PIP install --quiet tokenizers einops pyyaml gitpython
else
    $PIP install --quiet -e ".[cli]"
fi
echo "cachescope: environment ready in .venv"
