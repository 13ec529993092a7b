"""Nearest-code search: THE one function the inference path uses to turn vectors into code indices.

Everything that encodes images goes through `nearest_code`, a thin wrapper over kernels.codebook_lookup: on
CUDA the fused Triton kernel (distance + running argmin over tiles of codes, never the N x K distance matrix),
elsewhere the PyTorch reference chunked over N (peak memory O(chunk_size * K)). Callers never choose.
"""
from __future__ import annotations

import torch

from kernels.codebook_lookup import codebook_lookup


def nearest_code_with_distance(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                               chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row and the distance to it, for each vector.

    vectors: (N, D); codebook: (K, D), same D, K >= 1. Returns (indices int64 (N,), distances fp32 (N,)):
    squared Euclidean distance for metric "l2", 1 - dot product for "cosine" (the cosine distance of the
    l2-normalised rows callers pass). Math in fp32 whatever the input dtype; ties go to the lowest index, like
    torch.argmin. chunk_size bounds the reference's (chunk_size, K) working block; the kernel ignores it.
    """
    return codebook_lookup(vectors, codebook, metric, chunk_size)


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                 chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest codebook row for each vector: int64 (N,). See nearest_code_with_distance."""
    return codebook_lookup(vectors, codebook, metric, chunk_size)[0]
