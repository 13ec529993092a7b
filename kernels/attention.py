"""Causal self-attention over packed sequences: the single dispatch point the transformer calls.

Packed rows hold several documents; `document_ids` (B, T) gives each token's document, and a token attends only
to earlier-or-equal positions of its own document. With `document_ids=None` the plain causal mask applies
(PyTorch then uses its flash/memory-efficient kernels). Grouped-query attention: k and v may carry fewer heads
than q (n_heads must be a multiple of n_kv_heads).

The reference materialises a (B, 1, T, T) boolean mask; a Triton kernel that derives the mask from
`document_ids` block by block will replace it on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Dispatch: the PyTorch reference on every device until the Triton kernel lands."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
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
