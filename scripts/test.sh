#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, then run the whole test suite (what CI runs).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
