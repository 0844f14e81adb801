#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the pinned versions (constraints.txt;
# torch 2.14.1 and torchvision 0.29.1, a CUDA build that also runs on the CPU) and this project
# installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing pinned dependencies (first run only; a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
