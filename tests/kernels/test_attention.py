"""The Triton flash-attention kernel against the PyTorch reference, and the dispatch rule.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1), so the
shapes stay small; they still cross block edges (the interpreter uses 64x32 / 32x64 blocks), skip blocks, and
cover grouped-query heads, packed documents (single-token ones included) and lengths that are not a multiple of
the block size. The reference runs in fp64 on the same (rounded) inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels.attention as attention_module
from kernels.attention import (
    _attention_backward,
    _attention_forward,
    attention,
    attention_reference,
    attention_triton,
    document_bounds,
    document_causal_mask,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances on max |kernel - reference| relative to max |reference|. fp32: only summation order differs (the
# interpreter matches to ~1e-6). fp16/bf16: the kernel accumulates in fp32 but rounds its outputs (the
# interpreter truncates bf16: 1 ulp) and, on GPUs, the probabilities and dS before their matmuls. A few ulps:
# bf16 eps = 2**-7 ~ 7.8e-3 -> 2e-2; fp16 eps = 2**-10 ~ 9.8e-4 -> 5e-3.
FORWARD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
LSE_TOLERANCE = 1e-5  # fp32 in every case: products of fp16/bf16 inputs are exact in fp32


def document_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """[[document lengths of row 0], ...] -> (B, T) ids, each document a run of one id."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in rows])


def random_inputs(seed: int, batch: int, heads: int, kv_heads: int, length: int, head_dim: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, grad_out: (B, H, T, D); k, v: (B, H_kv, T, D). Drawn on CPU from a seeded generator (reproducible on
    every device), then moved and rounded to dtype."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, head_dim), (batch, kv_heads, length, head_dim),
              (batch, kv_heads, length, head_dim), (batch, heads, length, head_dim)]
    return tuple(torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes)


def reference_in_fp64(q, k, v, document_ids, grad_out):
    """Reference output, natural-log log-sum-exp (B, H, T) and (dq, dk, dv), in fp64 on CPU."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    document_ids = document_ids.cpu() if document_ids is not None else None
    out = attention_reference(q, k, v, document_ids)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.cpu().double())
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    length = q.shape[2]
    allowed = (document_causal_mask(document_ids) if document_ids is not None
               else torch.ones(length, length, dtype=torch.bool).tril())
    lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)
    return out.detach(), lse.detach(), *grads


def kernel_with_poisoned_outputs(q, k, v, document_ids, grad_out):
    """Forward and backward launchers writing into NaN-filled buffers: any element they fail to write shows.
    Returns out, natural-log log-sum-exp, dq, dk, dv."""
    bounds = document_bounds(document_ids.to(q.device)) if document_ids is not None else None
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
    _attention_forward(q, k, v, bounds, out, lse)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    _attention_backward(q, k, v, out, lse, grad_out, bounds, dq, dk, dv)
    return out, lse * math.log(2.0), dq, dk, dv  # the kernel keeps the log-sum-exp in base 2


def assert_matches(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """No NaN, and max |got - want| <= tolerance * max |want|."""
    got = got.detach().cpu().double()
    assert not got.isnan().any(), f"{name}: NaN (an element was not written)"
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance} * {scale:.3g}"


# (seed, dtype, batch, heads, kv_heads, head_dim, document lengths per row or the length T without documents)
CASES = [
    pytest.param(1, torch.float32, 1, 2, 2, 16, 37, id="fp32-causal-T37-d16"),
    pytest.param(2, torch.float32, 2, 4, 2, 32, [[1, 40, 1, 28], [10, 1, 1, 52, 6]], id="fp32-docs-gqa2-T70-d32"),
    pytest.param(3, torch.float32, 2, 4, 1, 16, [[70], [33, 1, 36]], id="fp32-docs-gqa4-T70-d16"),
    pytest.param(4, torch.float32, 1, 2, 1, 128, [[3, 1, 16]], id="fp32-docs-T20-d128"),
    pytest.param(5, torch.bfloat16, 2, 4, 2, 64, [[1, 40, 1, 28], [64, 6]], id="bf16-docs-gqa2-T70-d64"),
    pytest.param(6, torch.bfloat16, 1, 2, 2, 32, 37, id="bf16-causal-T37-d32"),
    pytest.param(7, torch.float16, 2, 2, 1, 64, [[5, 1, 1, 38], [45]], id="fp16-docs-gqa2-T45-d64"),
    pytest.param(8, torch.float16, 1, 4, 4, 32, 70, id="fp16-causal-T70-d32"),
]


@pytest.mark.parametrize("seed, dtype, batch, heads, kv_heads, head_dim, layout", CASES)
def test_kernel_matches_reference(seed, dtype, batch, heads, kv_heads, head_dim, layout):
    document_ids = document_ids_from_lengths(layout) if isinstance(layout, list) else None
    length = document_ids.shape[1] if document_ids is not None else layout
    q, k, v, grad_out = random_inputs(seed, batch, heads, kv_heads, length, head_dim, dtype)
    got = kernel_with_poisoned_outputs(q, k, v, document_ids, grad_out)
    want = reference_in_fp64(q, k, v, document_ids, grad_out)
    for name, got_tensor, want_tensor in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        tolerance = {"out": FORWARD_TOLERANCE[dtype], "lse": LSE_TOLERANCE}.get(name, GRAD_TOLERANCE[dtype])
        assert_matches(name, got_tensor, want_tensor, tolerance)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the middle document's own rows
def test_blocks_outside_a_document_are_never_read():
    """Block skipping: NaN in the middle document of [128, 128, 70] would reach the other two documents' outputs
    and gradients if any of their programs loaded a block of it (0 * NaN = NaN in the matmuls). Boundaries at
    multiples of 128 keep every block (32..128 tokens, any config) inside one document."""
    document_ids = document_ids_from_lengths([[128, 128, 70]])
    q, k, v, grad_out = random_inputs(15, 1, 2, 1, 326, 16, torch.float32)
    want = reference_in_fp64(q, k, v, document_ids, grad_out)
    middle = slice(128, 256)
    for t in (q, k, v, grad_out):
        t[:, :, middle] = float("nan")
    got = kernel_with_poisoned_outputs(q, k, v, document_ids, grad_out)
    outside = torch.ones(326, dtype=torch.bool)
    outside[middle] = False
    for name, got_tensor, want_tensor in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_matches(name, got_tensor[:, :, outside.to(got_tensor.device)], want_tensor[:, :, outside],
                       GRAD_TOLERANCE[torch.float32])


def test_autograd_on_transposed_views():
    """The model passes (B, T, H, D) projections transposed to (B, H, T, D): strided, non-contiguous inputs."""
    generator = torch.Generator().manual_seed(11)
    q_rows, k_rows, v_rows = (torch.randn(2, 45, heads, 32, generator=generator).to(DEVICE)
                              for heads in (4, 2, 2))
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (q_rows, k_rows, v_rows))
    assert not q.is_contiguous()
    document_ids = document_ids_from_lengths([[20, 1, 24], [45]]).to(DEVICE)
    weight = torch.randn(2, 4, 45, 32, generator=generator).to(DEVICE)
    out = attention_triton(q, k, v, document_ids)
    got = (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))
    want = reference_in_fp64(q, k, v, document_ids, weight)
    for name, got_tensor, want_tensor in zip(("out", "dq", "dk", "dv"), got, (want[0], *want[2:])):
        assert_matches(name, got_tensor, want_tensor, GRAD_TOLERANCE[torch.float32])


def test_document_bounds():
    document_ids = torch.tensor([[7, 7, 3, 5, 5, 5, 7], [0, 1, 2, 3, 4, 5, 6]])
    starts, ends = document_bounds(document_ids)
    assert starts.dtype == ends.dtype == torch.int32
    assert starts.tolist() == [[0, 0, 2, 3, 3, 3, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert ends.tolist() == [[2, 2, 3, 6, 6, 6, 7], [1, 2, 3, 4, 5, 6, 7]]


def test_cpu_dispatch_runs_the_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run on CPU tensors")

    monkeypatch.setattr(attention_module, "attention_triton", refuse)
    q, k, v, _ = (t.cpu() for t in random_inputs(12, 1, 2, 1, 9, 16, torch.float32))
    document_ids = document_ids_from_lengths([[4, 5]])
    torch.testing.assert_close(attention(q, k, v, document_ids), attention_reference(q, k, v, document_ids))


@pytest.mark.parametrize("dropout_p, head_dim, dtype, uses_kernel", [
    (0.0, 16, torch.float32, True),
    (0.1, 16, torch.float32, False),  # no dropout in the kernel: training with dropout runs the reference
    (0.0, 48, torch.float32, False),  # head dim not a power of two
    (0.0, 16, torch.float64, False),
])
def test_dispatch_rule(monkeypatch, dropout_p, head_dim, dtype, uses_kernel):
    """Pretend the tensors qualify for Triton (use_triton True) and record whether the kernel is chosen."""
    calls = []
    monkeypatch.setattr(attention_module, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(attention_module, "attention_triton", lambda *args: calls.append(args) or args[0])
    q, k, v, _ = (t.cpu() for t in random_inputs(13, 1, 2, 1, 8, head_dim, dtype))
    attention(q, k, v, None, dropout_p)
    assert bool(calls) == uses_kernel


def test_kernel_rejects_unsupported_head_dim():
    q, k, v, _ = random_inputs(14, 1, 2, 1, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="unsupported"):
        attention_triton(q, k, v)
