"""LM head + cross-entropy + log Z: the single dispatch point for the transformer's loss.

Returns per-token cross-entropy and log Z (the softmax normaliser), from which the caller builds
`ce + z_loss_weight * log_z**2` and per-modality means. The reference materialises the (N, V) logits in fp32;
the fused Triton kernel (MISSION: never materialise the logits of a 65k vocabulary) will replace it on CUDA.
"""
from __future__ import annotations

import torch


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: (N, D); weight: (V, D); targets: (N,) in [0, V). Returns (ce, log_z), each (N,) fp32.

    The logits are computed in the inputs' dtype (bf16 on GPU, as usual for LM heads) and the softmax
    statistics in fp32."""
    logits = (hidden @ weight.t()).float()
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    return log_z - target_logit, log_z


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the PyTorch reference on every device until the Triton kernel lands.

    Target ids are not range-checked here (that would sync the GPU every step); a packed dataset carries the
    fingerprint of the vocabulary its ids come from, and training refuses a model whose vocab_size differs.
    """
    return linear_cross_entropy_reference(hidden, weight, targets)
