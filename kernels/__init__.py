"""kernels: Triton kernels with plain-PyTorch references beside them. Imports nothing of this project.

Dispatch points (each picks a Triton kernel on CUDA once one exists, the PyTorch reference elsewhere):
- `kernels.attention.attention`: causal attention over packed sequences (no token sees another document).
- `kernels.attention.cached_attention`: new queries over a KV cache (incremental decoding; grouped-query heads
  folded into the query length so the cache is never repeated), masked by `cached_attention_mask`.
- `kernels.linear_cross_entropy.linear_cross_entropy`: LM head + cross-entropy + log Z for the z-loss.
- `vqtok.lookup.nearest_code`: codebook lookup (the fused distance+argmin kernel plugs in there).
Only the PyTorch references are built so far.
"""
