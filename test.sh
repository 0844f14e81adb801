#!/usr/bin/env bash
# Set everything up, then run the test suite (CPU only, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest --timeout=600 --durations=15 "$@"
