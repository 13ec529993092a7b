"""kernels: Triton kernels with plain-PyTorch references beside them. Imports nothing of this project.

Each dispatch point runs its Triton kernel on CUDA tensors and the PyTorch reference elsewhere (CPU, or
KERNELS_REFERENCE=1 anywhere; the rule is `kernels.dispatch.use_triton`). The references are the ground truth:
tests/test_kernel_*.py check every kernel against its reference in Triton's CPU interpreter (TRITON_INTERPRET=1),
forward and gradients, and scripts/bench_kernels.py times both side by side on a GPU.

- `kernels.codebook_lookup.codebook_lookup`: nearest code and its distance (squared L2 or cosine), tiled over
  the codebook with a running argmin, so the N x K distance matrix never exists. vqtok's encode path
  (`vqtok.lookup.nearest_code`) goes through it.
- `kernels.attention.attention`: causal, grouped-query FlashAttention-2 forward and backward over packed rows
  (no token sees another document; fully masked blocks are skipped). Attention dropout runs the reference.
- `kernels.attention.cached_attention`: new queries over a KV cache (incremental decoding); reference only.
- `kernels.linear_cross_entropy.linear_cross_entropy`: LM head + cross-entropy + z-loss, chunked over rows with
  gradients computed in the forward, so the (N, V) logits never exist beyond one chunk.
"""
