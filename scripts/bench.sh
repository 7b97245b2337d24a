#!/usr/bin/env bash
# The main job (README): sets up ./.venv, builds fusedrnn, runs the benchmark CLI.
# Arguments are passed to `python -m fusedrnn.bench` (default: --quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
if [ "$#" -eq 0 ]; then set -- --quick; fi
exec "$ROOT/.venv/bin/python" -m fusedrnn.bench "$@"
