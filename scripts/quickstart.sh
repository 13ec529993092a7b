#!/usr/bin/env bash
# The README's main command: set up (or reuse) .venv, then run the quickstart on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/quickstart.py "$@"
