"""Codebook lookup: for every vector, the index of (and distance to) the nearest codebook row, without the N x K matrix.

Encoding images with a VQ tokenizer compares every latent vector with every code. Written as a matmul plus
argmin, the (N, K) distance matrix of 256 images x 1024 tokens against 8192 codes is 2.1e9 fp32 values, 8.6 GB.
The Triton kernel tiles over K instead: each program owns BLOCK_N vectors, computes their distances to one
BLOCK_K tile of codes at a time (tl.dot over D in BLOCK_D chunks, fp32 accumulation) and folds the tile into a
running (minimum, argmin) per vector, so extra memory is O(N + K): the outputs and the codes' squared norms.
The PyTorch reference tiles over N (peak memory O(chunk_size * K)) and runs wherever the kernel does not.

Contract shared by both (so either can answer for the other):
- vectors (N, D), codebook (K, D); fp32, bf16 or fp16 (other floating dtypes are computed as fp32). Mixed dtypes
  are promoted to the wider type, which loses nothing since the distances are fp32 anyway.
- metric "l2": distance = squared Euclidean distance ||v - c||^2 = ||v||^2 - 2 v.c + ||c||^2 in fp32, clamped at
  0 (the expansion can round slightly below zero for v == c).
- metric "cosine": distance = 1 - v.c, the cosine distance when callers pass l2-normalised rows (in [0, 2] up to
  rounding); the nearest code is the one with the largest dot product. Rows are not normalised here.
- ties go to the lowest index, like torch.argmin.
- returns (indices int64 (N,), distances fp32 (N,)). N = 0 gives empty outputs; K = 0 is an error.
"""
from __future__ import annotations

import torch

from kernels.dispatch import HAVE_TRITON, interpreting, use_triton

METRICS = ("l2", "cosine")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(vectors: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if vectors.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"codebook lookup expects (N, D) vectors and a (K, D) codebook, got shapes "
                         f"{tuple(vectors.shape)} and {tuple(codebook.shape)}")
    if vectors.shape[1] != codebook.shape[1]:
        raise ValueError(f"vector width {vectors.shape[1]} does not match codebook width {codebook.shape[1]}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty (K = 0): there is no nearest code")
    if not (vectors.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"codebook lookup needs floating-point inputs, got {vectors.dtype} and {codebook.dtype}")
    if vectors.device != codebook.device:
        raise ValueError(f"vectors are on {vectors.device} but the codebook is on {codebook.device}")


def _empty_result(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(0, dtype=torch.long, device=vectors.device),
            torch.empty(0, dtype=torch.float32, device=vectors.device))


def codebook_lookup_reference(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                              chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference, chunked over N: (N, D) vectors, (K, D) codebook -> (indices int64 (N,), distances fp32 (N,)).

    Math in fp32 whatever the input dtype; peak extra memory is one (chunk_size, K) fp32 block. Distances as in
    the module docstring (squared Euclidean for "l2", 1 - dot for "cosine").
    """
    _check_inputs(vectors, codebook, metric)
    if vectors.shape[0] == 0:
        return _empty_result(vectors)
    codes = codebook.float()
    code_sq_norms = codes.pow(2).sum(dim=1) if metric == "l2" else None
    indices = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    distances = torch.empty(vectors.shape[0], dtype=torch.float32, device=vectors.device)
    for start in range(0, vectors.shape[0], chunk_size):
        block = vectors[start : start + chunk_size].float()
        dots = block @ codes.T  # (chunk, K)
        if metric == "l2":
            # ||v||^2 is constant per row and does not move the argmin, but keeping it makes the minimum the
            # distance itself (and near-ties resolve as a full distance would).
            dist = block.pow(2).sum(dim=1, keepdim=True) - 2 * dots + code_sq_norms
            best, best_index = dist.min(dim=1)
            best = best.clamp_min(0.0)
        else:
            # argmin of -dot, not of 1 - dot: subtracting from 1 would round distinct small dots into ties.
            best, best_index = (-dots).min(dim=1)
            best = 1.0 + best
        # Tensor.min(dim) returns the first index of the minimum, exactly like argmin (documented since 1.7).
        indices[start : start + chunk_size] = best_index
        distances[start : start + chunk_size] = best
    return indices, distances


if HAVE_TRITON:
    import triton
    import triton.language as tl

    if interpreting():
        # The interpreter cannot benchmark (autotune needs a driver) and pays per program instance: one config,
        # big blocks (1024 x 2048 x 128 measured: 1.5 s with these, 12 s with 64 x 128 x 64). Tests that need
        # several tiles per dimension pass block_sizes explicitly.
        _CONFIGS = [triton.Config({"BLOCK_N": 128, "BLOCK_K": 256, "BLOCK_D": 64})]
    else:
        # The (BLOCK_N, BLOCK_K) fp32 accumulator lives in registers: 128 x 256 needs 8 warps, 128 x 128 or
        # 64 x 256 fit 4. Configs too big for shared memory (fp32 operands, deep pipelines) are skipped by the
        # autotuner (OutOfResources).
        _CONFIGS = [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for n, k, d, w, s in [
                (64, 64, 32, 4, 2),
                (64, 128, 64, 4, 4),
                (64, 256, 64, 4, 3),
                (128, 64, 64, 4, 4),
                (128, 128, 32, 4, 4),
                (128, 128, 64, 4, 3),
                (128, 128, 64, 8, 3),
                (128, 256, 32, 8, 4),
                (128, 256, 64, 8, 3),
            ]
        ]

    @triton.jit
    def _codebook_lookup_kernel(
        vectors_ptr, codebook_ptr, code_sq_norms_ptr, indices_ptr, distances_ptr,
        N, K, D,
        stride_vn, stride_vd, stride_ck, stride_cd,
        IS_COSINE: tl.constexpr, UPCAST_LOADS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: BLOCK_N vectors against all K codes, BLOCK_K codes at a time.

        UPCAST_LOADS converts loaded tiles to fp32 before tl.dot (the interpreter keeps bf16 as raw bits); on
        GPUs bf16/fp16 tiles go to tl.dot as they are (tensor cores, fp32 accumulator). DOT_PRECISION is "ieee"
        for fp32 inputs, which tl.dot would otherwise round to tf32 (10-bit mantissa), and None (tl.dot's
        default, which only concerns fp32 operands) for bf16/fp16.
        """
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        row_offsets = rows.to(tl.int64) * stride_vn  # int64: N * D can exceed 2^31 elements
        dims = tl.arange(0, BLOCK_D)

        if not IS_COSINE:
            # ||v||^2 once per row, from the same values the dot products see.
            vector_sq_norms = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d_mask = d_start + dims < D
                v = tl.load(vectors_ptr + row_offsets[:, None] + (d_start + dims)[None, :] * stride_vd,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                vector_sq_norms += tl.sum(v * v, axis=1)

        best_distance = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k_start in range(0, K, BLOCK_K):
            codes = k_start + tl.arange(0, BLOCK_K)
            code_mask = codes < K
            code_offsets = codes.to(tl.int64) * stride_ck
            dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d_mask = d_start + dims < D
                v = tl.load(vectors_ptr + row_offsets[:, None] + (d_start + dims)[None, :] * stride_vd,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                # The codebook tile is loaded transposed, (BLOCK_D, BLOCK_K), so tl.dot gives (BLOCK_N, BLOCK_K).
                c = tl.load(codebook_ptr + code_offsets[None, :] + (d_start + dims)[:, None] * stride_cd,
                            mask=d_mask[:, None] & code_mask[None, :], other=0.0)
                if UPCAST_LOADS:
                    v = v.to(tl.float32)
                    c = c.to(tl.float32)
                dots = tl.dot(v, c, dots, input_precision=DOT_PRECISION)
            if IS_COSINE:
                distance = -dots  # running minimum of -dot = maximum dot; 1 + min(-dot) is added at the end
            else:
                code_sq_norms = tl.load(code_sq_norms_ptr + codes, mask=code_mask, other=0.0)
                distance = vector_sq_norms[:, None] - 2.0 * dots + code_sq_norms[None, :]
            distance = tl.where(code_mask[None, :], distance, float("inf"))  # padding codes never win
            tile_min = tl.min(distance, axis=1)
            # Lowest index attaining the tile minimum (torch.argmin's tie rule), spelled out rather than relying
            # on tl.argmin's tie behaviour; K is larger than every real index.
            tile_index = tl.min(tl.where(distance == tile_min[:, None], codes[None, :], K), axis=1)
            # Strictly smaller only: an equal minimum in a later tile has a higher index and must lose.
            improved = tile_min < best_distance
            best_distance = tl.where(improved, tile_min, best_distance)
            best_index = tl.where(improved, tile_index, best_index)

        if IS_COSINE:
            best_distance = 1.0 + best_distance
        else:
            best_distance = tl.maximum(best_distance, 0.0)  # the expansion can round just below 0 when v == c
        tl.store(indices_ptr + rows, best_index.to(tl.int64), mask=row_mask)
        tl.store(distances_ptr + rows, best_distance, mask=row_mask)

    # Keyed on (K, D); the autotuner adds the tensors' dtypes to the key by itself.
    _codebook_lookup_autotuned = triton.autotune(configs=_CONFIGS, key=["K", "D"])(_codebook_lookup_kernel)


def _codebook_lookup_launch(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *,
                            out: tuple[torch.Tensor, torch.Tensor] | None = None,
                            block_sizes: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel. out: optional (indices int64 (N,), distances fp32 (N,)) buffers to write into
    (tests pass poisoned ones); block_sizes: optional (BLOCK_N, BLOCK_K, BLOCK_D) that bypasses autotuning (tests
    use small blocks to get several tiles per dimension from small inputs; each must be >= 16 for tl.dot)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use codebook_lookup_reference")
    _check_inputs(vectors, codebook, metric)
    num_vectors, width = vectors.shape
    num_codes = codebook.shape[0]
    if out is None:
        indices = torch.empty(num_vectors, dtype=torch.long, device=vectors.device)
        distances = torch.empty(num_vectors, dtype=torch.float32, device=vectors.device)
    else:
        indices, distances = out
        for buffer, dtype, name in ((indices, torch.long, "indices"), (distances, torch.float32, "distances")):
            if (buffer.shape != (num_vectors,) or buffer.dtype != dtype or not buffer.is_contiguous()
                    or buffer.device != vectors.device):
                raise ValueError(f"out {name} must be a contiguous {dtype} ({num_vectors},) tensor on {vectors.device}")
    if num_vectors == 0:
        return indices, distances

    # tl.dot needs both operands in one dtype: promote (bf16 + fp32 -> fp32, bf16 + fp16 -> fp32).
    dtype = torch.promote_types(vectors.dtype, codebook.dtype)
    if dtype not in KERNEL_DTYPES:
        dtype = torch.float32  # e.g. fp64: the contract is fp32 math
    vectors, codebook = vectors.to(dtype), codebook.to(dtype)
    is_cosine = metric == "cosine"
    flags = dict(IS_COSINE=is_cosine, UPCAST_LOADS=interpreting(),
                 DOT_PRECISION="ieee" if dtype == torch.float32 else None)
    # (K,) fp32, computed once here rather than in every program; cosine never reads it.
    code_sq_norms = distances if is_cosine else codebook.float().pow(2).sum(dim=1)

    args = (vectors, codebook, code_sq_norms, indices, distances,
            num_vectors, num_codes, width,
            vectors.stride(0), vectors.stride(1), codebook.stride(0), codebook.stride(1))
    if block_sizes is None:
        grid = lambda meta: (triton.cdiv(num_vectors, meta["BLOCK_N"]),)  # noqa: E731
        _codebook_lookup_autotuned[grid](*args, **flags)
    else:
        block_n, block_k, block_d = block_sizes
        _codebook_lookup_kernel[(triton.cdiv(num_vectors, block_n),)](
            *args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return indices, distances


def codebook_lookup_triton(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                           chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel: (N, D) vectors, (K, D) codebook -> (indices int64 (N,), distances fp32 (N,)).

    Same contract as codebook_lookup_reference; chunk_size is accepted for interchangeability and unused (the
    kernel needs no chunking). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    return _codebook_lookup_launch(vectors, codebook, metric)


def codebook_lookup(vectors: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                    chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the Triton kernel on CUDA (kernels.dispatch.use_triton), the PyTorch reference elsewhere.

    vectors (N, D), codebook (K, D) -> (indices int64 (N,), distances fp32 (N,)); see the module docstring.
    """
    if use_triton(vectors, codebook):
        return codebook_lookup_triton(vectors, codebook, metric, chunk_size)
    return codebook_lookup_reference(vectors, codebook, metric, chunk_size)
