"""The one place that works around a CPU-torch / CUDA-torchvision mismatch.

pip pairs torch==2.13.0 (CPU build) with torchvision 0.28.0, a CUDA build whose import fails with
`RuntimeError: operator torchvision::nms does not exist`. lpips (and transformers' Chameleon) import torchvision,
so they fail too. Declaring the two missing operator schemas before the import lets torchvision.models load
(torchvision.ops stays unusable, which nothing here needs). Applied only when the plain import fails.
"""
from __future__ import annotations

import importlib
import sys

_shim_library = None  # keep the Library object alive: dropping it would unregister the schemas


def import_torchvision():
    global _shim_library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _shim_library is None:
        _shim_library = torch.library.Library("torchvision", "DEF")
        _shim_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _shim_library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


def import_lpips():
    import_torchvision()
    return importlib.import_module("lpips")
