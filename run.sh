#!/usr/bin/env bash
# Set everything up, then run the search: `bash run.sh` runs `python -m tuner --defense ngf`
# on the bundled digits dataset; any arguments replace `--defense ngf`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
if [ $# -eq 0 ]; then set -- --defense ngf; fi
exec .venv/bin/python -m tuner "$@"
