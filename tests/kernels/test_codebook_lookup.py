"""The fused codebook-lookup kernel (distance + running argmin) against its PyTorch reference.

On CPU the kernel runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before the kernel module is
imported). Most cases pass small explicit blocks so that small inputs still span several tiles of N, K and D
with ragged tails; a few go through the default (autotuned on GPU) configuration.
"""
from __future__ import annotations

import pytest
import torch

import kernels.codebook_lookup as cl
from kernels.codebook_lookup import (
    _codebook_lookup_launch,
    codebook_lookup,
    codebook_lookup_reference,
    codebook_lookup_triton,
)
from vqtok.lookup import nearest_code, nearest_code_with_distance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METRICS = ["l2", "cosine"]
# >= 16 each (tl.dot's minimum on GPUs); with N=37, K=70, D=24 this gives 3 row programs (last one 5 rows),
# 3 code tiles (last one 6 codes) and 2 D chunks (last one 8 wide).
SMALL_BLOCKS = (16, 32, 16)

# fp32 inputs: kernel and reference do the same fp32 math in a different summation order, so they differ by a
# few fp32 ulps of the terms summed. For l2 the terms are ||v||^2, 2 v.c and ||c||^2, which cancel: the error is
# relative to their size, not to the (possibly much smaller) distance, hence tolerances scaled per row.
# bf16/fp16 inputs: both sides upcast the same low-precision values, and products of bf16/fp16 values are exact
# in fp32, so on CPU the agreement is fp32-level too; 1e-4 leaves room for GPU tensor cores, whose fp32
# accumulation of bf16/fp16 products is not bit-for-bit IEEE round-to-nearest.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def make_inputs(seed: int, n: int, k: int, d: int, dtype: torch.dtype, metric: str):
    """Half the vectors are codebook rows plus small noise (a clear nearest code: no near-ties), half are random
    (near-ties possible, handled by `assert_matches_reference`). Cosine rows are l2-normalised, as callers do."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=generator)
    near = n // 2
    owners = torch.randint(0, k, (near,), generator=generator)
    vectors = torch.cat([codebook[owners] + 0.05 * torch.randn(near, d, generator=generator),
                         torch.randn(n - near, d, generator=generator)])
    if metric == "cosine":
        vectors = torch.nn.functional.normalize(vectors, dim=1)
        codebook = torch.nn.functional.normalize(codebook, dim=1)
    return vectors.to(DEVICE, dtype), codebook.to(DEVICE, dtype), near


def exact_distances(vectors: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) fp64 distances of the given (possibly low-precision) values: the ground truth for small inputs."""
    v, c = vectors.double(), codebook.double()
    if metric == "l2":
        return (v[:, None, :] - c[None, :, :]).pow(2).sum(-1)
    return 1.0 - v @ c.T


def row_tolerance(vectors: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row absolute tolerance: relative tolerance x the size of the terms the distance is computed from."""
    v, c = vectors.double(), codebook.double()[indices]
    if metric == "l2":
        scale = v.pow(2).sum(1) + c.pow(2).sum(1)
    else:
        scale = v.norm(dim=1) * c.norm(dim=1)
    return RELATIVE_TOLERANCE[vectors.dtype] * (scale + 1.0)


def assert_matches_reference(result, vectors, codebook, metric, exact_rows: int):
    indices, distances = result
    ref_indices, ref_distances = codebook_lookup_reference(vectors, codebook, metric)
    n = vectors.shape[0]
    assert indices.dtype == torch.long and indices.shape == (n,) and indices.device == vectors.device
    assert distances.dtype == torch.float32 and distances.shape == (n,)
    assert ((indices >= 0) & (indices < codebook.shape[0])).all()
    tolerance = row_tolerance(vectors, codebook, ref_indices, metric)
    # Rows built as "code + small noise" have one clearly nearest code: the indices must be identical.
    assert torch.equal(indices[:exact_rows], ref_indices[:exact_rows])
    # Random rows can have two codes within fp32 rounding of each other; then summation order decides and either
    # index is right. Accept a different index only if its exact distance ties the reference's within tolerance.
    differ = indices != ref_indices
    if differ.any():
        exact = exact_distances(vectors, codebook, metric)
        rows = differ.nonzero().squeeze(1)
        gap = (exact[rows, indices[rows]] - exact[rows, ref_indices[rows]]).abs()
        assert (gap <= tolerance[rows]).all(), f"rows {rows.tolist()} pick codes that are not near-ties: {gap}"
    assert ((distances.double() - ref_distances.double()).abs() <= tolerance).all()
    # And the reference itself is right about the distance it reports.
    exact_best = exact_distances(vectors, codebook, metric).gather(1, ref_indices[:, None]).squeeze(1)
    if metric == "l2":
        exact_best = exact_best.clamp_min(0)
    assert ((ref_distances.double() - exact_best).abs() <= tolerance).all()


# (N, K, D): ragged tails in every dimension, one vector, one code, and more tiles per program.
SHAPES = [(37, 70, 24), (1, 70, 24), (37, 1, 24), (50, 200, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_small_blocks_match_reference(metric, dtype, shape):
    seed = 1000 * METRICS.index(metric) + 100 * DTYPES.index(dtype) + SHAPES.index(shape)
    vectors, codebook, near = make_inputs(seed, *shape, dtype, metric)
    result = _codebook_lookup_launch(vectors, codebook, metric, block_sizes=SMALL_BLOCKS)
    assert_matches_reference(result, vectors, codebook, metric, exact_rows=near)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_default_config_matches_reference(metric, dtype):
    seed = 7 + 10 * METRICS.index(metric) + DTYPES.index(dtype)
    vectors, codebook, near = make_inputs(seed, 300, 520, 72, dtype, metric)
    result = codebook_lookup_triton(vectors, codebook, metric)
    assert_matches_reference(result, vectors, codebook, metric, exact_rows=near)


@pytest.mark.parametrize("block_sizes", [SMALL_BLOCKS, None], ids=["small_blocks", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_take_lowest_index(metric, dtype, block_sizes):
    """Small integer and half-integer values make every distance exact in fp32 whatever the summation order, so
    ties are real ties: the kernel must pick the lowest index, within a tile and across tiles, like torch.argmin."""
    generator = torch.Generator().manual_seed(11 + DTYPES.index(dtype) + 3 * METRICS.index(metric))
    distinct = torch.randint(-2, 3, (12, 24), generator=generator).float()
    # 70 codes drawn from 12 distinct rows, each at least twice and shuffled: duplicates in the same tile and in
    # later tiles, and every vector's minimum is attained at least twice.
    rows = torch.cat([torch.arange(12), torch.arange(12), torch.randint(0, 12, (46,), generator=generator)])
    codebook = distinct[rows[torch.randperm(70, generator=generator)]]
    on_codes = codebook[torch.randint(0, 70, (12,), generator=generator)]
    pairs = torch.randint(0, 12, (12, 2), generator=generator)
    midpoints = (distinct[pairs[:, 0]] + distinct[pairs[:, 1]]) / 2  # equidistant from two distinct codes (l2)
    random_rows = torch.randint(-2, 3, (13, 24), generator=generator).float()
    vectors = torch.cat([on_codes, midpoints, random_rows])
    vectors, codebook = vectors.to(DEVICE, dtype), codebook.to(DEVICE, dtype)

    exact = exact_distances(vectors, codebook, metric)
    expected = exact.argmin(dim=1)  # torch.argmin: first index of the minimum
    assert (exact == exact.min(dim=1, keepdim=True).values).sum(1).gt(1).all(), "every row should have a tie"
    indices, distances = _codebook_lookup_launch(vectors, codebook, metric, block_sizes=block_sizes)
    assert torch.equal(indices, expected)
    assert torch.equal(distances.double(), exact.min(dim=1).values)
    ref_indices, ref_distances = codebook_lookup_reference(vectors, codebook, metric)
    assert torch.equal(ref_indices, expected) and torch.equal(ref_distances.double(), exact.min(dim=1).values)


@pytest.mark.parametrize("block_sizes", [SMALL_BLOCKS, None], ids=["small_blocks", "default"])
@pytest.mark.parametrize("metric", METRICS)
def test_padding_codes_never_win(metric, block_sizes):
    """K=70 leaves a partial last tile whose padding lanes load zero codes. Inputs where a zero code would be the
    nearest (l2: codes far from the origin, vectors near it; cosine: every real dot product negative) catch a
    missing mask."""
    generator = torch.Generator().manual_seed(61 + METRICS.index(metric))
    codebook = torch.randn(70, 24, generator=generator)
    vectors = torch.randn(37, 24, generator=generator)
    if metric == "l2":
        codebook, vectors = codebook + 5.0, 0.1 * vectors
    else:
        codebook = torch.nn.functional.normalize(codebook.abs(), dim=1)
        vectors = torch.nn.functional.normalize(-vectors.abs(), dim=1)
    vectors, codebook = vectors.to(DEVICE), codebook.to(DEVICE)
    result = _codebook_lookup_launch(vectors, codebook, metric, block_sizes=block_sizes)
    assert_matches_reference(result, vectors, codebook, metric, exact_rows=0)
    assert (result[1] > (1.0 if metric == "cosine" else 100.0)).all()  # far from a zero code's distance


@pytest.mark.parametrize("block_sizes", [SMALL_BLOCKS, None], ids=["small_blocks", "default"])
def test_l2_distance_to_an_identical_code_is_zero_not_negative(block_sizes):
    """||v||^2 - 2 v.c + ||c||^2 with c == v rounds to a few ulps of ||v||^2 either side of 0 (large norms make
    the ulps large); the reported distance must be clamped to >= 0."""
    generator = torch.Generator().manual_seed(71)
    codebook = 30.0 * torch.randn(70, 24, generator=generator).to(DEVICE)
    vectors = codebook[torch.randperm(70, generator=generator)[:37].to(DEVICE)]
    indices, distances = _codebook_lookup_launch(vectors, codebook, "l2", block_sizes=block_sizes)
    assert torch.equal(codebook[indices], vectors)
    assert (distances >= 0).all()
    assert (distances <= row_tolerance(vectors, codebook, indices, "l2")).all()
    ref_indices, ref_distances = codebook_lookup_reference(vectors, codebook, "l2")
    assert torch.equal(ref_indices, indices) and (ref_distances >= 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_poisoned_outputs_are_fully_overwritten(metric):
    vectors, codebook, near = make_inputs(21 + METRICS.index(metric), 37, 70, 24, torch.float32, metric)
    # Views into longer poisoned buffers: rows 0..36 must all be written, and nothing past them.
    index_buffer = torch.full((45,), -1, dtype=torch.long, device=DEVICE)
    distance_buffer = torch.full((45,), float("nan"), device=DEVICE)
    out = (index_buffer[:37], distance_buffer[:37])
    indices, distances = _codebook_lookup_launch(vectors, codebook, metric, out=out, block_sizes=SMALL_BLOCKS)
    assert indices.data_ptr() == index_buffer.data_ptr() and distances.data_ptr() == distance_buffer.data_ptr()
    assert (indices >= 0).all() and not distances.isnan().any()
    assert (index_buffer[37:] == -1).all() and distance_buffer[37:].isnan().all()
    assert_matches_reference((indices, distances), vectors, codebook, metric, exact_rows=near)


def test_strided_and_mixed_dtype_inputs():
    vectors, codebook, near = make_inputs(31, 37, 70, 24, torch.float32, "l2")
    # Non-contiguous views: the kernel reads through strides instead of copying.
    wide = torch.zeros(37, 48, device=DEVICE)
    wide[:, ::2] = vectors
    transposed_codes = codebook.T.contiguous().T
    result = _codebook_lookup_launch(wide[:, ::2], transposed_codes, "l2", block_sizes=SMALL_BLOCKS)
    assert_matches_reference(result, vectors, codebook, "l2", exact_rows=near)
    # bf16 vectors against an fp32 codebook (what the quantizer passes) are promoted to fp32; fp64 computes in fp32.
    low = vectors.bfloat16()
    indices, distances = codebook_lookup_triton(low, codebook)
    ref_indices, ref_distances = codebook_lookup_reference(low.float(), codebook)
    assert torch.equal(indices[:near], ref_indices[:near])
    torch.testing.assert_close(distances, ref_distances, rtol=1e-5, atol=1e-4)
    indices, distances = codebook_lookup_triton(vectors.double(), codebook.double())
    assert distances.dtype == torch.float32
    assert torch.equal(indices[:near], codebook_lookup_reference(vectors, codebook)[0][:near])


@pytest.mark.parametrize("function", [codebook_lookup_reference, codebook_lookup_triton, codebook_lookup],
                         ids=["reference", "triton", "dispatch"])
def test_bad_inputs_raise_clear_errors(function):
    vectors = torch.zeros(3, 4, device=DEVICE)
    codebook = torch.zeros(5, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(N, D\) vectors"):
        function(vectors[None], codebook)
    with pytest.raises(ValueError, match=r"\(N, D\) vectors"):
        function(vectors, codebook[0])
    with pytest.raises(ValueError, match="vector width 4 does not match codebook width 3"):
        function(vectors, codebook[:, :3])
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        function(vectors, codebook, "l1")
    with pytest.raises(ValueError, match="K = 0"):
        function(vectors, codebook[:0])
    with pytest.raises(TypeError, match="floating-point"):
        function(vectors.long(), codebook)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="is on"):
            function(vectors, codebook.cpu())
    # No vectors is not an error: empty outputs of the right dtypes.
    indices, distances = function(vectors[:0], codebook)
    assert indices.shape == (0,) and indices.dtype == torch.long
    assert distances.shape == (0,) and distances.dtype == torch.float32


def test_dispatch_uses_reference_off_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run here")

    monkeypatch.setattr(cl, "codebook_lookup_triton", refuse)
    if DEVICE == "cuda":
        monkeypatch.setenv("KERNELS_REFERENCE", "1")  # the override that forces the reference on a GPU
    vectors, codebook, _ = make_inputs(41, 37, 70, 24, torch.float32, "l2")
    indices, distances = codebook_lookup(vectors, codebook)
    ref_indices, ref_distances = codebook_lookup_reference(vectors, codebook)
    assert torch.equal(indices, ref_indices) and torch.equal(distances, ref_distances)


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatch picks the kernel only for CUDA tensors")
def test_dispatch_uses_kernel_on_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference must not run on CUDA")

    monkeypatch.delenv("KERNELS_REFERENCE", raising=False)
    monkeypatch.setattr(cl, "codebook_lookup_reference", refuse)
    vectors, codebook, near = make_inputs(42, 37, 70, 24, torch.float32, "l2")
    indices, _ = codebook_lookup(vectors, codebook)
    assert indices.shape == (37,)


@pytest.mark.parametrize("metric", METRICS)
def test_nearest_code_agrees_with_dispatch(metric):
    vectors, codebook, _ = make_inputs(51 + METRICS.index(metric), 37, 70, 24, torch.float32, metric)
    indices, distances = codebook_lookup(vectors, codebook, metric)
    assert torch.equal(nearest_code(vectors, codebook, metric), indices)
    with_distance = nearest_code_with_distance(vectors, codebook, metric, chunk_size=8)
    assert torch.equal(with_distance[0], indices)
    torch.testing.assert_close(with_distance[1], distances, rtol=1e-6, atol=1e-6)
