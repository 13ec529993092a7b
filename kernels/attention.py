"""Causal self-attention over packed sequences: the single dispatch point the transformer calls.

Packed rows hold several documents; `document_ids` (B, T) gives each token's document, and a token attends only
to earlier-or-equal positions of its own document. With `document_ids=None` the plain causal mask applies.
Grouped-query attention: k and v may carry fewer heads than q (n_heads must be a multiple of n_kv_heads).

Two implementations:
- `attention_reference`: PyTorch SDPA with a materialised (B, 1, T, T) boolean mask. The ground truth.
- `attention_triton`: a FlashAttention-2 style Triton kernel (forward and backward through a
  torch.autograd.Function) that never materialises scores or masks. The forward walks key blocks with an online
  softmax in fp32 and saves the log-sum-exp of every row; the backward computes delta = rowsum(dO * O), then
  dK/dV in one kernel over key blocks (looping over all query heads that share a key/value head, so no atomics
  and no repeated k/v) and dQ in another over query blocks. Softmax scale 1/sqrt(D); head dims 16..128 (powers
  of two); fp16, bf16 or fp32 inputs.

Masking and block skipping: documents are contiguous runs of equal ids in a row (as the packer writes them).
PyTorch precomputes, per token, the index where its document starts and one past where it ends. Query t may
attend to key s iff doc_start[t] <= s <= t. A query block therefore only visits key blocks from the one holding
the document start of its first query up to the diagonal, and a key block only visits query blocks from the
diagonal up to the document end of its last key: blocks that are masked out entirely are never loaded. Without
document_ids only the causal part applies (blocks above the diagonal are skipped). Unlike the reference, an id
that reappears in a later, separate run counts as a new document (as for RoPE positions in unified_lm.model).

Dispatch (`attention`): the Triton kernel when `kernels.dispatch.use_triton(q, k, v)` holds (CUDA tensors,
triton importable, no KERNELS_REFERENCE=1), dropout_p == 0, the head dim is supported and the dtype is fp16,
bf16 or fp32; the reference otherwise. Attention dropout (dropout_p > 0 in training) always runs the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import HAVE_TRITON, interpreting, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl
else:  # CPU-only installs without triton: the kernels below get defined but never launched
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **_: (lambda fn: fn), Config=lambda *_, **__: None)
    tl = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True where query t may attend to key s."""
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document)[:, None]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, H_kv, T, D); document_ids: (B, T) or None. Returns (B, H, T, D)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(document_ids), dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel


def _configs(interpreter_block_m: int, interpreter_block_n: int, gpu_blocks: list[tuple[int, int, int, int]]):
    """One config in the interpreter (autotune's benchmark step needs a GPU); else (BLOCK_M, BLOCK_N, warps,
    stages) candidates. BLOCK_M != BLOCK_N is fine: the diagonal is handled by per-element masks."""
    if interpreting():
        return [triton.Config({"BLOCK_M": interpreter_block_m, "BLOCK_N": interpreter_block_n}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in gpu_blocks]


# Interpreter configs: unequal blocks shorter than the test sequences (T ~ 40..70), so tests cross block edges,
# skip blocks and exercise the diagonal with BLOCK_M != BLOCK_N, while staying few (the interpreter pays per
# program and per loop step).
_FORWARD_CONFIGS = _configs(64, 32, [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                     (64, 64, 4, 4), (128, 64, 4, 2)])
_DKDV_CONFIGS = _configs(32, 64, [(64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 4, 3), (128, 128, 8, 2),
                                  (32, 128, 4, 3)])
_DQ_CONFIGS = _configs(64, 32, [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2),
                                (128, 32, 4, 3)])
_DELTA_BLOCK = 64


def _prune_for_fp32(configs, named_args, **kwargs):
    """Autotune pruning for fp32 inputs: keep the 64 x 64 configs, plus a 2-stage one whose k/v buffers fit shared
    memory at head dim 128 (2 x 64 x 128 x 4 B x 2 stages = 128 KB). fp32 IEEE dots are FMA loops, not tensor-core
    instructions (TF32 would cost ~1e-3): bigger fp32 tiles hold twice the registers of bf16 ones, and every
    config is a long compile (on an H100 the fp32 head-dim-128 test did not finish in 250 s).
    fp16/bf16 keep every config."""
    if named_args["Q"].dtype != torch.float32:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64]
    return small + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]


_PRUNE = {"early_config_prune": _prune_for_fp32}


@triton.jit
def _load_rows(base, row_stride, rows, seq_len, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), HEAD_DIM) tile of a (T, HEAD_DIM) matrix; rows at or past seq_len read as 0."""
    dims = tl.arange(0, HEAD_DIM)
    tile = tl.load(base + rows[:, None] * row_stride + dims[None, :], mask=rows[:, None] < seq_len, other=0.0)
    if UPCAST:  # the interpreter keeps bf16 as raw bits: convert before any arithmetic
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(base, row_stride, rows, seq_len, tile, HEAD_DIM: tl.constexpr):
    """Write a (len(rows), HEAD_DIM) tile into a (T, HEAD_DIM) matrix, converted to its dtype; skips rows >= T."""
    dims = tl.arange(0, HEAD_DIM)
    tl.store(base + rows[:, None] * row_stride + dims[None, :], tile.to(base.dtype.element_ty),
             mask=rows[:, None] < seq_len)


@triton.jit
def _document_starts(doc_start_row, queries, seq_len, HAS_DOCUMENTS: tl.constexpr):
    """(len(queries),) first key each query may see: its document's start, or 0 without documents."""
    starts = tl.zeros_like(queries)
    if HAS_DOCUMENTS:
        starts = tl.load(doc_start_row + queries, mask=queries < seq_len, other=0)
    return starts


@triton.jit
def _allowed(queries, keys, query_doc_starts):
    """(len(queries), len(keys)) bool: causal and inside the query's document. Padding queries (>= T) need no
    mask: they read q = dO = 0, so they add nothing to dK/dV, and their outputs are never stored."""
    return (keys[None, :] <= queries[:, None]) & (keys[None, :] >= query_doc_starts[:, None])


@triton.jit
def _key_block_range(doc_start_row, block_first_query, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_DOCUMENTS: tl.constexpr):
    """Key range [lo, hi) a query block must visit: lo is the key block holding its first query's document start
    (documents are contiguous, so later queries start no earlier), hi the end of the diagonal block."""
    lo = 0
    if HAS_DOCUMENTS:
        lo = tl.load(doc_start_row + block_first_query) // BLOCK_N * BLOCK_N
    hi = tl.minimum(block_first_query + BLOCK_M, seq_len)
    return lo, hi


@triton.jit
def _query_block_range(doc_end_row, block_first_key, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_DOCUMENTS: tl.constexpr):
    """Query range [lo, hi) a key block must visit: from the query block holding its first key (causal) up to
    the end of its last key's document."""
    lo = block_first_key // BLOCK_M * BLOCK_M
    hi = seq_len
    if HAS_DOCUMENTS:
        hi = tl.load(doc_end_row + tl.minimum(block_first_key + BLOCK_N, seq_len) - 1)
    return lo, hi


@triton.autotune(configs=_FORWARD_CONFIGS, key=["HEAD_DIM", "seq_len"], prune_configs_by=_PRUNE)
@triton.jit
def _forward_kernel(Q, K, V, OUT, LSE, DOC_START,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    heads, heads_per_kv, seq_len, sm_scale,
                    HEAD_DIM: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, batch * head) per program: OUT rows and their base-2 log-sum-exp in LSE (B, H, T)."""
    block_first_query = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * stride_b may pass 2**31
    batch, head = batch_head // heads, batch_head % heads
    kv_head = head // heads_per_kv
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    doc_start_row = DOC_START + batch * seq_len

    queries = block_first_query + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, stride_qt, queries, seq_len, HEAD_DIM, UPCAST)
    query_doc_starts = _document_starts(doc_start_row, queries, seq_len, HAS_DOCUMENTS)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): scores in base 2 for exp2
    # A finite initial max keeps exp2(m_old - m_new) at 1, not NaN, for rows with every key so far masked.
    row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, hi = _key_block_range(doc_start_row, block_first_query, seq_len, BLOCK_M, BLOCK_N, HAS_DOCUMENTS)
    for block_first_key in range(lo, hi, BLOCK_N):
        keys = block_first_key + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, stride_kt, keys, seq_len, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, stride_vt, keys, seq_len, HEAD_DIM, UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(_allowed(queries, keys, query_doc_starts), scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    _store_rows(OUT + batch * stride_ob + head * stride_oh, stride_ot, queries, seq_len,
                acc / row_sum[:, None], HEAD_DIM)
    tl.store(LSE + batch_head * seq_len + queries, row_max + tl.log2(row_sum), mask=queries < seq_len)


@triton.jit
def _delta_kernel(OUT, GRAD_OUT, DELTA, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
                  heads, seq_len, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """DELTA (B, H, T) fp32 = rowsum(dO * O): the softmax-backward term shared by every key of a row."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // heads, batch_head % heads
    out = _load_rows(OUT + batch * stride_ob + head * stride_oh, stride_ot, rows, seq_len, HEAD_DIM, UPCAST)
    grad = _load_rows(GRAD_OUT + batch * stride_gb + head * stride_gh, stride_gt, rows, seq_len, HEAD_DIM, UPCAST)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(DELTA + batch_head * seq_len + rows, delta, mask=rows < seq_len)


@triton.jit
def _probs_and_score_grads(q, k, v, grad_out, lse, delta, allowed, qk_scale, DOT_PRECISION: tl.constexpr):
    """Recompute the (BLOCK_M, BLOCK_N) probabilities P from the saved log-sum-exp, and dS = P * (dP - delta)
    (the gradient w.r.t. the scaled scores)."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(tl.where(allowed, scores - lse[:, None], float("-inf")))
    grad_p = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (grad_p - delta[:, None])


@triton.autotune(configs=_DKDV_CONFIGS, key=["HEAD_DIM", "seq_len"], prune_configs_by=_PRUNE)
@triton.jit
def _dkdv_kernel(Q, K, V, GRAD_OUT, LSE, DELTA, DOC_START, DOC_END, DK, DV,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
                 stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                 heads, heads_per_kv, seq_len, sm_scale,
                 HEAD_DIM: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (key block, batch * kv head) per program: dK and dV summed over every query head of the group."""
    block_first_key = tl.program_id(0) * BLOCK_N
    batch_kv_head = tl.program_id(1).to(tl.int64)
    kv_heads = heads // heads_per_kv
    batch, kv_head = batch_kv_head // kv_heads, batch_kv_head % kv_heads
    keys = block_first_key + tl.arange(0, BLOCK_N)
    k = _load_rows(K + batch * stride_kb + kv_head * stride_kh, stride_kt, keys, seq_len, HEAD_DIM, UPCAST)
    v = _load_rows(V + batch * stride_vb + kv_head * stride_vh, stride_vt, keys, seq_len, HEAD_DIM, UPCAST)
    doc_start_row = DOC_START + batch * seq_len
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): scores in base 2 for exp2
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, hi = _query_block_range(DOC_END + batch * seq_len, block_first_key, seq_len, BLOCK_M, BLOCK_N,
                                HAS_DOCUMENTS)
    for head in range(kv_head * heads_per_kv, (kv_head + 1) * heads_per_kv):
        q_base = Q + batch * stride_qb + head * stride_qh
        grad_base = GRAD_OUT + batch * stride_gb + head * stride_gh
        row_stats = (batch * heads + head) * seq_len  # offset of this head's rows in LSE and DELTA
        for block_first_query in range(lo, hi, BLOCK_M):
            queries = block_first_query + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, stride_qt, queries, seq_len, HEAD_DIM, UPCAST)
            grad_out = _load_rows(grad_base, stride_gt, queries, seq_len, HEAD_DIM, UPCAST)
            lse = tl.load(LSE + row_stats + queries, mask=queries < seq_len, other=0.0)
            delta = tl.load(DELTA + row_stats + queries, mask=queries < seq_len, other=0.0)
            allowed = _allowed(queries, keys, _document_starts(doc_start_row, queries, seq_len, HAS_DOCUMENTS))
            p, grad_scores = _probs_and_score_grads(q, k, v, grad_out, lse, delta, allowed, qk_scale,
                                                    DOT_PRECISION)
            dv += tl.dot(tl.trans(p.to(grad_out.dtype)), grad_out, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=DOT_PRECISION)
    _store_rows(DK + batch * stride_dkb + kv_head * stride_dkh, stride_dkt, keys, seq_len, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + batch * stride_dvb + kv_head * stride_dvh, stride_dvt, keys, seq_len, dv, HEAD_DIM)


@triton.autotune(configs=_DQ_CONFIGS, key=["HEAD_DIM", "seq_len"], prune_configs_by=_PRUNE)
@triton.jit
def _dq_kernel(Q, K, V, GRAD_OUT, LSE, DELTA, DOC_START, DQ,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
               stride_dqb, stride_dqh, stride_dqt,
               heads, heads_per_kv, seq_len, sm_scale,
               HEAD_DIM: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, batch * head) per program: dQ over the same key blocks the forward visited."""
    block_first_query = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // heads, batch_head % heads
    kv_head = head // heads_per_kv
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    doc_start_row = DOC_START + batch * seq_len

    queries = block_first_query + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, stride_qt, queries, seq_len, HEAD_DIM, UPCAST)
    grad_out = _load_rows(GRAD_OUT + batch * stride_gb + head * stride_gh, stride_gt, queries, seq_len, HEAD_DIM,
                          UPCAST)
    lse = tl.load(LSE + batch_head * seq_len + queries, mask=queries < seq_len, other=0.0)
    delta = tl.load(DELTA + batch_head * seq_len + queries, mask=queries < seq_len, other=0.0)
    query_doc_starts = _document_starts(doc_start_row, queries, seq_len, HAS_DOCUMENTS)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): scores in base 2 for exp2
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, hi = _key_block_range(doc_start_row, block_first_query, seq_len, BLOCK_M, BLOCK_N, HAS_DOCUMENTS)
    for block_first_key in range(lo, hi, BLOCK_N):
        keys = block_first_key + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, stride_kt, keys, seq_len, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, stride_vt, keys, seq_len, HEAD_DIM, UPCAST)
        allowed = _allowed(queries, keys, query_doc_starts)
        _, grad_scores = _probs_and_score_grads(q, k, v, grad_out, lse, delta, allowed, qk_scale, DOT_PRECISION)
        dq += tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION)
    _store_rows(DQ + batch * stride_dqb + head * stride_dqh, stride_dqt, queries, seq_len, dq * sm_scale, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Launchers and autograd


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) document ids -> (starts, ends), each (B, T) int32 contiguous: the index of the first token of each
    token's document and one past its last. A document is a run of equal consecutive ids."""
    batch, length = document_ids.shape
    index = torch.arange(length, dtype=torch.int32, device=document_ids.device).expand(batch, length)
    changes = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T - 1): a new document begins at t + 1
    edge = torch.ones(batch, 1, dtype=torch.bool, device=document_ids.device)
    begins, finishes = torch.cat([edge, changes], dim=1), torch.cat([changes, edge], dim=1)
    starts = torch.where(begins, index, 0).cummax(dim=1).values
    ends = torch.where(finishes, index + 1, length).flip(1).cummin(dim=1).values.flip(1)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, H, T, D) tensor; the kernels need unit stride along D."""
    assert t.stride(-1) == 1, "the head dim must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and need D contiguous; transposed (B, H, T, D) views already are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_flags(q: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Compile-time flags shared by every kernel. fp32 dots use IEEE precision (TF32 would cost ~1e-3)."""
    upcast = interpreting()
    return dict(HEAD_DIM=q.shape[-1], HAS_DOCUMENTS=bounds is not None, UPCAST=upcast,
                DOT_PRECISION="ieee" if upcast or q.dtype == torch.float32 else "tf32")


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bounds: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out (B, H, T, D) and lse (B, H, T) fp32, base-2 log-sum-exp of the scaled scores. q: (B, H, T, D);
    k, v: (B, H_kv, T, D); bounds from `document_bounds` or None. Every element of out and lse is written."""
    batch, heads, length, head_dim = q.shape
    doc_start = bounds[0] if bounds is not None else lse  # never read without documents
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _forward_kernel[grid](q, k, v, out, lse, doc_start, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          heads, heads // k.shape[1], length, 1.0 / math.sqrt(head_dim), **_kernel_flags(q, bounds))


def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        grad_out: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None,
                        dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Fill dq (like q) and dk, dv (like k) from the forward's out and lse and grad_out (like out)."""
    batch, heads, length, head_dim = q.shape
    flags = _kernel_flags(q, bounds)
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(length, _DELTA_BLOCK), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, length, HEAD_DIM=head_dim,
        UPCAST=flags["UPCAST"], BLOCK=_DELTA_BLOCK)
    doc_start, doc_end = bounds if bounds is not None else (lse, lse)  # never read without documents
    shared = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    scalars = (heads, heads // k.shape[1], length, 1.0 / math.sqrt(head_dim))
    dkdv_grid = lambda meta: (triton.cdiv(length, meta["BLOCK_N"]), batch * k.shape[1])  # noqa: E731
    _dkdv_kernel[dkdv_grid](q, k, v, grad_out, lse, delta, doc_start, doc_end, dk, dv, *shared, *_strides(dk),
                            *_strides(dv), *scalars, **flags)
    dq_grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _dq_kernel[dq_grid](q, k, v, grad_out, lse, delta, doc_start, dq, *shared, *_strides(dq), *scalars, **flags)


class _TritonAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the log-sum-exp; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, document_ids):
        q, k, v = (_unit_stride_last(t) for t in (q, k, v))
        bounds = document_bounds(document_ids) if document_ids is not None else None
        out = torch.empty_like(q)  # keeps q's layout: a transposed (B, T, H, D) view stays one downstream
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        _attention_forward(q, k, v, bounds, out, lse)
        ctx.save_for_backward(q, k, v, out, lse, *(bounds if bounds is not None else (None, None)))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        bounds = (doc_start, doc_end) if doc_start is not None else None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _attention_backward(q, k, v, out, lse, _unit_stride_last(grad_out), bounds, dq, dk, dv)
        return dq, dk, dv, None


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel, differentiable. q: (B, H, T, D); k, v: (B, H_kv, T, D), same dtype (fp16, bf16 or
    fp32), D a power of two in 16..128, H a multiple of H_kv; document_ids: (B, T) or None. Returns
    (B, H, T, D). No dropout. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if not triton_supports(q, k, v):
        raise ValueError(f"unsupported for the Triton kernel: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype}")
    return _TritonAttention.apply(q, k, v, document_ids)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel handles: self-attention (same T), supported head dim and dtype, and whole
    groups of query heads per key/value head."""
    return (HAVE_TRITON and q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]
            and q.shape[2:] == k.shape[2:] and q.shape[1] % k.shape[1] == 0 and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and q.dtype in SUPPORTED_DTYPES and q.dtype == k.dtype == v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Dispatch. q: (B, H, T, D); k, v: (B, H_kv, T, D); document_ids: (B, T) or None. Returns (B, H, T, D).

    The Triton kernel on CUDA (`use_triton`) when dropout_p == 0 and `triton_supports(q, k, v)`; the reference
    otherwise. The kernel has no attention dropout, so training with dropout_p > 0 runs the reference."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if dropout_p == 0.0 and use_triton(q, k, v) and triton_supports(q, k, v):
        return attention_triton(q, k, v, document_ids)
    return attention_reference(q, k, v, document_ids, dropout_p)


def cached_attention_mask(query_start: int | torch.Tensor, length: int, key_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool: which of the S cache slots each of T new queries (slots [query_start, query_start + T))
    may attend to. A query sees earlier-or-equal valid slots; a padding query sees only itself, which keeps its
    (unused) output finite so it cannot poison later steps. `query_start` may be a 0-d tensor (static shapes
    for CUDA graphs); key_valid: (B, S) bool, False at padding and unwritten slots."""
    device = key_valid.device
    query_slots = query_start + torch.arange(length, device=device)[:, None]
    key_slots = torch.arange(key_valid.shape[1], device=device)[None, :]
    allowed = (key_slots <= query_slots)[None] & (key_valid[:, None, :] | (key_slots == query_slots)[None])
    return allowed[:, None]


def cached_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of new queries over a key/value cache (incremental decoding).

    q: (B, H, T, D); k, v: (B, H_kv, S, D); mask: (B, 1, T, S) from `cached_attention_mask`. Grouped-query heads
    are folded into the query length ((B, H_kv, G * T, D) against the un-repeated cache), so the cache is never
    copied per step.
    """
    batch, heads, length, head_dim = q.shape
    groups = heads // k.shape[1]
    if groups > 1:
        q = q.reshape(batch, k.shape[1], groups * length, head_dim)  # head j * G + g -> row g * T + t of group j
        mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * length, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, heads, length, head_dim)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dispatch for decoding with a KV cache: the PyTorch reference on every device until a kernel lands."""
    return cached_attention_reference(q, k, v, mask)


def max_attention_logit(q: torch.Tensor, k: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Largest |q.k| / sqrt(D) over allowed (causal, same-document) pairs: Chameleon's divergence signal.

    One batch row at a time, so the fp32 (H, T, T) scores of a single row are the peak extra memory."""
    groups = q.shape[1] // k.shape[1]
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    largest = torch.zeros((), device=q.device)
    for row in range(q.shape[0]):
        keys = k[row].repeat_interleave(groups, dim=0) if groups > 1 else k[row]
        scores = (q[row].float() @ keys.float().transpose(-1, -2)).abs_().mul_(q.shape[-1] ** -0.5)
        allowed = causal if document_ids is None else document_causal_mask(document_ids[row : row + 1])[0]
        largest = torch.maximum(largest, scores.masked_fill_(~allowed, 0.0).amax())
    return largest
