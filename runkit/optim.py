"""Optimizer parameter groups: weight decay on the weight matrices, none on the rest (norms, biases, tables).

Which module types count as weight matrices is each trainer's rule, passed in: unified_lm decays Linear, Embedding
and its OutputHead (not the ViT's Conv2d patch embedding), the image encoder decays Linear, Conv2d and Embedding,
and vqtok decays every parameter (one AdamW group, no split). The split itself is this one.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def weight_ids(model: torch.nn.Module, kinds: tuple[type, ...]) -> set[int]:
    """ids of the `weight` of every module of `kinds` (the decayed parameters). Chosen by module type, not by
    tensor rank: ZeRO-3 partitions parameters to 1-D."""
    return {id(m.weight) for m in model.modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None}


def decay_groups(params: Iterable[torch.nn.Parameter], decayed: set[int], weight_decay: float, **settings) -> list[dict]:
    """[the decayed parameters with `weight_decay`, the others with 0.0], each group with `settings` (e.g. lr),
    parameters in the order given (the order optimizer state is saved and restored in). Groups may be empty."""
    params = list(params)
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay, **settings},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0, **settings}]
