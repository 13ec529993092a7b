#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at $VENV (default: .venv) and install the project.
# torch is pinned in the SAME pip command as everything else: without the pin, lpips -> torchvision would
# resolve the newest CUDA torch (several GB) on a CPU machine. Set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-data,test}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [ -f "$stamp" ]; then
    echo "[setup] reusing $VENV (dependencies up to date)"
    exit 0
fi
echo "[setup] installing $TORCH_SPEC and the project [$EXTRAS] into $VENV (first time: ~2 minutes)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Keep whatever torch is already present (e.g. a CUDA build on a GPU machine) and pin it.
    TORCH_SPEC="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
fi
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" -e ".[$EXTRAS]"
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
