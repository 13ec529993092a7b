"""Batches as a pure function of the step: every trainer walks an endless sequence of seeded per-epoch
permutations, so the rows of step s are known without replaying steps 0..s-1, and a resumed run draws exactly
the batches the interrupted one would have.

    global position p  ->  epoch p // N, offset p % N  ->  row permutation(seed, epoch)[offset]

Each trainer maps (step, micro-step, rank, slot) to positions its own way (unified_lm.data.packing.batch_indices,
unified_lm.train.encoder.batch_indices, vqtok.data.StepBatchSampler); the permutations are these.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHE_SIZE = 8  # a walk touches one or two epochs at a time (vqtok's sampler keeps each source's current one)


def epoch_permutation(count: int, key: Sequence[int]) -> np.ndarray:
    """np.random.default_rng(key).permutation(count), read-only, the last few remembered."""
    cache_key = (int(count), *map(int, key))
    order = _CACHE.get(cache_key)
    if order is None:
        order = np.random.default_rng(list(cache_key[1:])).permutation(count)
        order.flags.writeable = False
        _CACHE[cache_key] = order
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(cache_key)
    return order


def walk_rows(first: int, size: int, count: int, seed: int) -> np.ndarray:
    """Rows (int64) at global positions first .. first+size-1 of the epochs of `count` rows, epoch e being
    `epoch_permutation(count, (seed, e))`."""
    epochs, offsets = np.divmod(np.arange(first, first + size, dtype=np.int64), count)
    rows = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        rows[chosen] = epoch_permutation(count, (seed, int(epoch)))[offsets[chosen]]
    return rows
