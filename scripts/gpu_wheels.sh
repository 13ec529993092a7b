#!/usr/bin/env bash
# Wheels for the lent GPU machine, which has torch/triton/transformers but not these packages and no network:
# build them here (pure Python, --no-deps) into wheels/, carry wheels/ there, and install with
#   pip install --no-deps --no-index wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
.venv/bin/python -m pip wheel --no-deps -w wheels \
    vector-quantize-pytorch einops einx loguru torch-einops-utils frozendict deepspeed lpips hjson ninja py-cpuinfo
ls wheels
