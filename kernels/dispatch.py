"""When to run a Triton kernel instead of its PyTorch reference: one rule for every dispatch point.

Triton runs on CUDA tensors when triton imports, unless KERNELS_REFERENCE=1 (A/B comparisons and debugging on a
GPU). Everywhere else (CPU, MPS, no triton) the reference runs. Tests call the Triton entry points directly on
CPU tensors under TRITON_INTERPRET=1, which must be set before the kernel modules are imported.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # e.g. macOS wheels of torch without triton
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: every tensor on CUDA, triton importable, and no KERNELS_REFERENCE=1 override."""
    if not HAVE_TRITON or os.environ.get("KERNELS_REFERENCE", "0") == "1":
        return False
    return all(t.is_cuda for t in tensors)
