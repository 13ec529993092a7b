"""Nearest-code search: THE one function the inference path uses to turn vectors into code indices.

Everything that encodes images goes through `nearest_code`, so a fused kernel (kernels/, distance + argmin
without the N x K matrix) can replace the body on CUDA without touching callers. This reference tiles over N
so peak memory is O(chunk * K) rather than O(N * K).
"""
from __future__ import annotations

import torch


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest codebook row for each vector.

    vectors: (N, D); codebook: (K, D), same D. metric "l2" (squared Euclidean) or "cosine" (max dot product of
    l2-normalised rows; callers pass normalised vectors). Computation in fp32 whatever the input dtype.
    Ties go to the lowest index, like torch.argmin. Returns int64 (N,).
    """
    if vectors.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"nearest_code expects (N, D) vectors and (K, D) codebook, got {tuple(vectors.shape)} and {tuple(codebook.shape)}")
    if vectors.shape[1] != codebook.shape[1]:
        raise ValueError(f"vector width {vectors.shape[1]} does not match codebook width {codebook.shape[1]}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")
    codes = codebook.float()
    code_sq_norms = codes.pow(2).sum(dim=1) if metric == "l2" else None
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], chunk_size):
        block = vectors[start : start + chunk_size].float()
        dots = block @ codes.T  # (chunk, K)
        if metric == "l2":
            # ||v - c||^2 = ||v||^2 - 2 v.c + ||c||^2; ||v||^2 is constant per row, so it does not move the argmin
            # but keeping it makes near-ties resolve exactly as a full distance would.
            dist = block.pow(2).sum(dim=1, keepdim=True) - 2 * dots + code_sq_norms
            out[start : start + chunk_size] = dist.argmin(dim=1)
        else:
            out[start : start + chunk_size] = (-dots).argmin(dim=1)
    return out
