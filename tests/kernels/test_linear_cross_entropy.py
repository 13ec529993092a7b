"""The fused linear + cross-entropy + z-loss kernel against its PyTorch reference (Triton's interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

import kernels.linear_cross_entropy as lce
from kernels.linear_cross_entropy import (
    IGNORE_INDEX,
    cross_entropy_rows_triton,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_cross_entropy_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(seed: int, rows: int, width: int, vocab: int, dtype: torch.dtype, ignored: int = 3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.7  # logits of a few units: a peaked softmax
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[torch.randperm(rows, generator=generator)[:ignored]] = IGNORE_INDEX
    token_weights = torch.rand(rows, generator=generator)
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), token_weights.to(DEVICE))


def run_with_grads(function, hidden, weight, targets, token_weights, z_loss_weight, upstream=1.0, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = function(hidden, weight, targets, token_weights, z_loss_weight, **kwargs)
    out.loss.backward(torch.tensor(upstream, device=hidden.device))
    return out, hidden.grad, weight.grad


# (rows, width, vocab, chunk rows): tails everywhere (rows % chunk, vocab % the interpreter's 1024-wide block),
# a vocabulary over two blocks, one chunk holding everything, and a single row.
SHAPES = [(37, 24, 300, 16), (20, 16, 1500, 7), (9, 32, 64, None), (1, 8, 5, None)]


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_fp32_loss_and_gradients_match_reference(seed, shape):
    rows, width, vocab, chunk = shape
    inputs = make_inputs(seed, rows, width, vocab, torch.float32, ignored=min(3, rows - 1))
    fused, grad_hidden, grad_weight = run_with_grads(linear_cross_entropy_triton, *inputs, 1e-2, upstream=2.0,
                                                     chunk_size=chunk)
    # Reference in fp64: the fp32 kernel should agree with the exact values to fp32 rounding.
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    ref, ref_grad_hidden, ref_grad_weight = run_with_grads(linear_cross_entropy_reference, *exact, 1e-2, upstream=2.0)
    torch.testing.assert_close(fused.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.ce.double(), ref.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.log_z.double(), ref.log_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden.double(), ref_grad_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.double(), ref_grad_weight, rtol=1e-5, atol=1e-5)
    ignored = inputs[2] == IGNORE_INDEX
    assert (fused.ce[ignored] == 0).all() and (fused.log_z[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_on_the_same_inputs(dtype):
    inputs = make_inputs(11 if dtype == torch.bfloat16 else 12, 29, 32, 700, dtype)
    fused, grad_hidden, grad_weight = run_with_grads(linear_cross_entropy_triton, *inputs, 1e-3, chunk_size=8)
    ref, ref_grad_hidden, ref_grad_weight = run_with_grads(linear_cross_entropy_reference, *inputs, 1e-3)
    # Both compute the logits in the input dtype and the softmax statistics in fp32, so ce and log Z agree to
    # fp32 rounding. The gradients pass through d loss / d logits rounded to the input dtype (as autograd's
    # .float() backward does in the reference) and a low-precision matmul: allow a few ulp of the largest value.
    torch.testing.assert_close(fused.ce, ref.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.log_z, ref.log_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-5)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for got, want in ((grad_hidden, ref_grad_hidden), (grad_weight, ref_grad_weight)):
        assert got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= 4 * ulp * want.float().abs().max()


def test_default_weights_give_the_mean_over_kept_targets():
    hidden, weight, targets, _ = make_inputs(21, 15, 16, 100, torch.float32, ignored=5)
    fused = linear_cross_entropy_triton(hidden, weight, targets)
    kept = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-6)
    assert kept.sum() == 10


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets, token_weights = make_inputs(31, 6, 8, 50, torch.float32)
    targets = torch.full_like(targets, IGNORE_INDEX)
    fused, grad_hidden, grad_weight = run_with_grads(linear_cross_entropy_triton, hidden, weight, targets,
                                                     token_weights, 1e-4)
    assert fused.loss.item() == 0.0 and (fused.ce == 0).all() and (fused.log_z == 0).all()
    assert (grad_hidden == 0).all() and (grad_weight == 0).all()


def test_row_kernel_overwrites_poisoned_outputs_and_writes_the_logit_gradient():
    generator = torch.Generator().manual_seed(41)
    logits = torch.randn(13, 1100, generator=generator).to(DEVICE)
    targets = torch.randint(0, 1100, (13,), generator=generator).to(DEVICE)
    targets[4] = IGNORE_INDEX
    weights = torch.rand(13, generator=generator).to(DEVICE)
    ce = torch.full((13,), float("nan"), device=DEVICE)
    log_z = torch.full((13,), float("nan"), device=DEVICE)
    gradient = logits.clone()
    cross_entropy_rows_triton(gradient, targets, weights, 0.1, IGNORE_INDEX, True, ce, log_z)
    expected_log_z = torch.logsumexp(logits.double(), dim=1)
    kept = targets != IGNORE_INDEX
    torch.testing.assert_close(log_z.double()[kept], expected_log_z[kept], rtol=1e-6, atol=1e-6)
    assert ce[4] == 0 and log_z[4] == 0 and (gradient[4] == 0).all()
    # d/dlogits of w * (ce + 0.1 log Z^2), by autograd in fp64
    exact = logits.double().requires_grad_()
    row_log_z = torch.logsumexp(exact, dim=1)
    picked = exact.gather(1, torch.where(kept, targets, 0)[:, None]).squeeze(1)
    ((row_log_z - picked + 0.1 * row_log_z**2) * weights.double() * kept).sum().backward()
    torch.testing.assert_close(gradient.double(), exact.grad, rtol=1e-5, atol=1e-6)


def test_out_of_range_target_gives_nan_loss_not_a_wild_read():
    hidden, weight, targets, token_weights = make_inputs(51, 4, 8, 20, torch.float32, ignored=0)
    targets[2] = 20
    assert torch.isnan(linear_cross_entropy_triton(hidden, weight, targets, token_weights).loss)


def test_forward_without_gradients_gives_the_same_numbers():
    inputs = make_inputs(61, 17, 16, 200, torch.float32)
    with_grads = linear_cross_entropy_triton(inputs[0].requires_grad_(), *inputs[1:], 1e-2, chunk_size=5)
    with torch.no_grad():
        without = linear_cross_entropy_triton(*inputs, 1e-2, chunk_size=5)
    assert not without.loss.requires_grad
    torch.testing.assert_close(with_grads.loss.detach(), without.loss)
    torch.testing.assert_close(with_grads.ce, without.ce)


def test_bad_shapes_are_refused_with_the_field_named():
    hidden, weight, targets, token_weights = make_inputs(71, 4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:2])
    with pytest.raises(ValueError, match="token_weights"):
        linear_cross_entropy(hidden, weight, targets, token_weights[:3])
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(hidden, weight.double(), targets)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dispatch")
def test_cpu_dispatch_runs_the_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(lce, "linear_cross_entropy_triton", refuse)
    inputs = make_inputs(81, 6, 8, 30, torch.float32)
    torch.testing.assert_close(linear_cross_entropy(*inputs, 1e-4).loss,
                               linear_cross_entropy_reference(*inputs, 1e-4).loss)


def test_model_loss_and_gradients_through_the_fused_path(monkeypatch):
    """The unified model's loss (mask, per-step denominator, z-loss) is the same through either path."""
    from unified_lm.model.config import ModelConfig
    from unified_lm.model.transformer import Targets, UnifiedTransformer

    torch.manual_seed(91)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16,
                         z_loss_weight=1e-2, dropout=0.0)
    model = UnifiedTransformer(config).to(DEVICE)
    tokens = torch.randint(0, 97, (2, 12), device=DEVICE)
    targets = torch.randint(0, 97, (2, 12), device=DEVICE)
    mask = torch.rand(2, 12, device=DEVICE) > 0.3

    def loss_and_grads():
        model.zero_grad()
        out = model(tokens, targets=Targets(targets, mask, denominator=20.0))
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(lce, "use_triton", lambda *tensors: False)
    reference, reference_grads = loss_and_grads()
    monkeypatch.setattr(lce, "use_triton", lambda *tensors: True)
    fused, fused_grads = loss_and_grads()
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.sums, reference.sums, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
