"""LM head + cross-entropy + z-loss: the single dispatch point for the transformer's loss.

    loss = sum_i token_weight_i * (ce_i + z_loss_weight * log_z_i ** 2)

over tokens whose target is not `ignore_index`, where log_z is the softmax normaliser (Chameleon's z-loss) and
ce_i = log_z_i - logit_i[target_i]. The caller chooses the weights (mask / target count for a mean), so packing,
loss masks and gradient accumulation stay the caller's business. Per-token ce and log Z come back detached for
logging.

The reference materialises the (N, V) logits in fp32 and lets autograd differentiate them: at N = 16k tokens and
a 65k vocabulary that is 4 GB of logits plus as much again for their gradient, the largest activation in
training. The fused path (CUDA) never holds more than one chunk of rows:

    for each chunk of rows:  logits = hidden[rows] @ weight.T          (cuBLAS, input dtype, fp32 accumulate)
                             Triton: per row, online log-sum-exp over V -> ce, log Z; then overwrite the logits
                                     in place with d loss / d logits = w * ((1 + 2 z log Z) softmax - onehot)
                             grad_hidden[rows] = dlogits @ weight;  grad_weight += dlogits.T @ hidden[rows]

The gradients are computed in the forward pass (the loss is a weighted sum, so d loss / d logits is known
there) and only scaled by the incoming gradient in backward: three matmuls like the unfused version, no
recomputation, and the logits never exist beyond one chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.dispatch import HAVE_TRITON, interpreting, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # logits of one chunk of rows, in the input dtype


class LinearCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # scalar fp32 with gradient to hidden and weight
    ce: torch.Tensor  # (N,) fp32 detached; 0 where the target is ignored
    log_z: torch.Tensor  # (N,) fp32 detached; 0 where the target is ignored


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  token_weights: torch.Tensor | None) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy expects hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights must have shape ({hidden.shape[0]},), got {tuple(token_weights.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")


def _default_weights(targets: torch.Tensor, token_weights: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """(N,) fp32 (or fp64): the given weights, or 1 / (number of kept targets) for a mean; 0 at ignored targets."""
    kept = targets != ignore_index
    if token_weights is None:
        return kept.float() / kept.sum().clamp(min=1)
    return token_weights.to(torch.promote_types(token_weights.dtype, torch.float32)) * kept


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   token_weights: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                                   ignore_index: int = IGNORE_INDEX) -> LinearCrossEntropyOutput:
    """hidden: (N, H); weight: (V, H); targets: (N,) int64 in [0, V) or ignore_index; token_weights: (N,) or None
    (mean over kept targets). The logits are computed in the inputs' dtype (bf16 on GPU, as usual for LM heads)
    and the softmax statistics in fp32 (fp64 for fp64 inputs)."""
    _check_inputs(hidden, weight, targets, token_weights)
    weights = _default_weights(targets, token_weights, ignore_index)
    kept = targets != ignore_index
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 inputs stay fp64 (exact tests)
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, torch.where(kept, targets, 0)[:, None]).squeeze(1)
    ce = torch.where(kept, log_z - target_logit, 0.0)
    log_z = torch.where(kept, log_z, 0.0)
    loss = (weights * (ce + z_loss_weight * log_z.pow(2))).sum()
    return LinearCrossEntropyOutput(loss, ce.detach(), log_z.detach())


if HAVE_TRITON:

    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, logits_row_stride, targets_ptr, weights_ptr, ce_ptr, log_z_ptr,
                                   vocab_size, z_loss_weight, ignore_index,
                                   WRITE_GRADIENT: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per row: log Z and ce, then (optionally) d loss / d logits written over the logits."""
        row = tl.program_id(0).to(tl.int64)
        row_logits = logits_ptr + row * logits_row_stride
        target = tl.load(targets_ptr + row)
        kept = target != ignore_index
        # An out-of-range target (a vocabulary mismatch) gives a NaN loss rather than a read out of bounds: the
        # trainer's finite-loss check then stops the run, with no host sync here to check it.
        in_range = (target >= 0) & (target < vocab_size)
        offsets = tl.arange(0, BLOCK_V)

        # Pass 1: online max and sum of exponentials over the vocabulary, in fp32 whatever the logits dtype.
        running_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            columns = start + offsets
            block = tl.load(row_logits + columns, mask=columns < vocab_size, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, block)
            # A lane that has only seen padding (-inf) shifts by 0 instead, so no -inf - -inf = NaN appears.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(block - shift)
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
        log_z = row_max + tl.log(total)
        safe_target = tl.where(in_range, target, 0)
        target_logit = tl.load(row_logits + safe_target).to(tl.float32)
        ce = tl.where(in_range, log_z - target_logit, float("nan"))
        tl.store(ce_ptr + row, tl.where(kept, ce, 0.0))
        tl.store(log_z_ptr + row, tl.where(kept, log_z, 0.0))

        if WRITE_GRADIENT:
            # d/dlogit_j of w * (log Z - logit_t + z * log Z^2) = w * ((1 + 2 z log Z) softmax_j - [j == t])
            token_weight = tl.where(kept, tl.load(weights_ptr + row), 0.0)
            softmax_scale = token_weight * (1.0 + 2.0 * z_loss_weight * log_z)
            for start in range(0, vocab_size, BLOCK_V):
                columns = start + offsets
                in_vocab = columns < vocab_size
                block = tl.load(row_logits + columns, mask=in_vocab, other=0.0).to(tl.float32)
                gradient = softmax_scale * tl.exp(block - log_z) - tl.where(columns == target, token_weight, 0.0)
                tl.store(row_logits + columns, gradient.to(logits_ptr.dtype.element_ty), mask=in_vocab)


def _block_v(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): wide blocks on GPU (few loop trips over a 65k vocabulary); smaller in the
    interpreter, whose cost grows with the block's element count per program."""
    block = triton.next_power_of_2(vocab_size)
    if interpreting():
        return min(block, 1024), 4
    block = min(block, 8192)
    return block, 16 if block >= 4096 else 8


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                              z_loss_weight: float, ignore_index: int, write_gradient: bool,
                              ce: torch.Tensor, log_z: torch.Tensor) -> None:
    """Launch the row kernel. logits: (n, V) with unit column stride, overwritten by d loss / d logits when
    write_gradient; targets (n,) int64; weights (n,) fp32; ce, log_z: (n,) fp32 outputs."""
    if logits.shape[0] == 0:
        return
    block_v, num_warps = _block_v(logits.shape[1])
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, logits.stride(0), targets, weights, ce, log_z, logits.shape[1], float(z_loss_weight), ignore_index,
        WRITE_GRADIENT=write_gradient, BLOCK_V=block_v, num_warps=num_warps)


def _chunk_rows(vocab_size: int, element_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(128, CHUNK_BYTES // (vocab_size * element_size) // 128 * 128)


def _accumulate_product(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator (fp32) += left @ right, with low-precision inputs. The fp32 accumulator keeps the sum over
    chunks exact to fp32. cuBLAS accumulates bf16 products into an fp32 output in place (addmm's out_dtype,
    torch >= 2.8 on CUDA; out=accumulator is the same in-place beta=1 GEMM as addmm_); elsewhere the product is
    rounded to the input dtype first (one temporary of the accumulator's shape in that dtype)."""
    if accumulator.dtype == left.dtype:
        accumulator.addmm_(left, right)
        return
    if accumulator.is_cuda:
        try:
            torch.addmm(accumulator, left, right, out_dtype=accumulator.dtype, out=accumulator)
            return
        except (RuntimeError, TypeError):
            pass
    accumulator.add_(left @ right)


def _fused_forward(hidden, weight, targets, weights, z_loss_weight, ignore_index, chunk_size,
                   need_hidden_grad, need_weight_grad):
    """Chunked loss (and gradients when needed). Returns loss, ce, log_z, grad_hidden or None, grad_weight or None."""
    rows, vocab_size = hidden.shape[0], weight.shape[0]
    write_gradient = need_hidden_grad or need_weight_grad
    ce = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    log_z = torch.empty_like(ce)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    step = _chunk_rows(vocab_size, hidden.element_size(), chunk_size)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        hidden_chunk = hidden[start:stop]
        logits = hidden_chunk @ weight.t()  # (rows, V) in the input dtype; becomes d loss / d logits in place
        cross_entropy_rows_triton(logits, targets[start:stop], weights[start:stop], z_loss_weight, ignore_index,
                                  write_gradient, ce[start:stop], log_z[start:stop])
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if need_weight_grad:
            _accumulate_product(grad_weight, logits.t(), hidden_chunk)
    loss = (weights * (ce + z_loss_weight * log_z.pow(2))).sum()
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, ce, log_z, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, z_loss_weight, ignore_index, chunk_size):
        loss, ce, log_z, grad_hidden, grad_weight = _fused_forward(
            hidden, weight, targets, weights, z_loss_weight, ignore_index, chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.mark_non_differentiable(ce, log_z)
        return loss, ce, log_z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_log_z):
        saved = iter(ctx.saved_tensors)
        # The gradients were computed for d loss = 1; the chain rule only scales them.
        grad_hidden = next(saved) * grad_loss if ctx.has_grads[0] else None
        grad_weight = next(saved) * grad_loss if ctx.has_grads[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                token_weights: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                                ignore_index: int = IGNORE_INDEX,
                                chunk_size: int | None = None) -> LinearCrossEntropyOutput:
    """The fused path (same arguments and results as the reference). chunk_size: rows per chunk (default: as
    many as keep one chunk's logits within 256 MB). Gradients w.r.t. token_weights are not computed."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use linear_cross_entropy_reference")
    _check_inputs(hidden, weight, targets, token_weights)
    weights = _default_weights(targets, token_weights, ignore_index).detach().contiguous()
    arguments = (hidden.contiguous(), weight.contiguous(), targets.contiguous(), weights, float(z_loss_weight),
                 int(ignore_index), chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyOutput(*_FusedLinearCrossEntropy.apply(*arguments))
    loss, ce, log_z, _, _ = _fused_forward(*arguments, need_hidden_grad=False, need_weight_grad=False)
    return LinearCrossEntropyOutput(loss, ce, log_z)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                         ignore_index: int = IGNORE_INDEX) -> LinearCrossEntropyOutput:
    """Dispatch: the fused Triton path on CUDA, the PyTorch reference elsewhere.

    Target ids are not range-checked here (that would sync the GPU every step): the reference raises on an
    out-of-range id and the fused path returns a NaN loss. A packed dataset carries the fingerprint of the
    vocabulary its ids come from, and training refuses a model whose vocab_size differs.
    """
    if use_triton(hidden, weight):
        return linear_cross_entropy_triton(hidden, weight, targets, token_weights, z_loss_weight, ignore_index)
    return linear_cross_entropy_reference(hidden, weight, targets, token_weights, z_loss_weight, ignore_index)
