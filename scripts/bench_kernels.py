"""The three Triton kernels against their PyTorch baselines, side by side in one run.

    python scripts/bench_kernels.py --out runs/bench_kernels            # GPU: the issue's sizes (a few minutes)
    python scripts/bench_kernels.py --out runs/bench_kernels_cpu --small  # CPU: tiny sizes, Triton interpreted

1. Codebook lookup, N=262,144 vectors, K=8,192 codes, D=256, fp32 and bf16: ours vs torch matmul-expansion +
   argmin, torch.cdist + argmin and vector-quantize-pytorch's own distance + argmax. Time (ms) and extra memory
   (peak allocated above the inputs, MB). Then a vqtok `chameleon`-preset encode (8,192 x 256 codebook) with the
   lookup dispatched to the reference and to the kernel: total encode time and the time spent in lookup.
2. Attention forward + backward, causal, bf16, head dim 128, 16 heads, 16k tokens per step at sequence lengths
   1k-8k: ours vs the best backend of torch's scaled_dot_product_attention (flash, cuDNN, memory-efficient), in
   TFLOP/s (causal FLOPs: forward 2 * 2 * B * H * T^2 * D / 2, backward 2.5x forward). Plus packed rows
   (8k tokens of 1k-token documents: ours with document ids vs SDPA with the boolean mask) and grouped-query.
3. LM head + cross-entropy + z-loss, N=16,384, H=4,096, V=65,536, bf16, forward + backward: ours vs logits +
   F.cross_entropy + z-loss in PyTorch (and torch's F.linear_cross_entropy, which has no z-loss, where present).
   Time and peak memory above the inputs.

Timings are medians of CUDA-event-timed repetitions after warm-up (autotuning happens in warm-up). --small runs
every path at toy sizes on whatever device there is (under TRITON_INTERPRET=1 on CPU): it checks the script,
its numbers mean nothing. Results go to OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules define their @triton.jit functions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch.nn.functional as F  # noqa: E402

from kernels.attention import attention_reference, attention_triton  # noqa: E402
from kernels.codebook_lookup import codebook_lookup_reference, codebook_lookup_triton  # noqa: E402
from kernels.linear_cross_entropy import (  # noqa: E402
    linear_cross_entropy_reference,
    linear_cross_entropy_triton,
)

MB = 2**20


@contextlib.contextmanager
def reference_kernels(enabled: bool):
    """KERNELS_REFERENCE=1 inside: every dispatch point runs its PyTorch reference."""
    previous = os.environ.get("KERNELS_REFERENCE")
    os.environ["KERNELS_REFERENCE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KERNELS_REFERENCE", None)
        else:
            os.environ["KERNELS_REFERENCE"] = previous


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_extra_mb(self, function) -> float | None:
        """Peak allocated memory during one call, above what was allocated before it (CUDA only). One untimed
        call first: a Triton kernel's first call autotunes, and the autotuner's benchmark allocates a 256 MB
        cache-flush buffer that is not the kernel's memory."""
        if self.device.type != "cuda":
            return None
        function()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        function()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - before) / MB

    def median_ms(self, function) -> float:
        for _ in range(self.warmup):
            function()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                stop.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(stop))
            else:
                begin = time.perf_counter()
                function()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def measure(self, function) -> dict:
        """{ms, extra_mb} or {error} when the call fails (out of memory, unsupported dtype or backend)."""
        try:
            extra = self.peak_extra_mb(function)
            return {"ms": self.median_ms(function), "extra_mb": extra}
        except (RuntimeError, NotImplementedError, ValueError) as error:  # OOM is a RuntimeError subclass
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}


# ---------------------------------------------------------------------------------------------- codebook lookup
def matmul_argmin(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The textbook baseline: the whole (N, K) fp32 distance matrix, then argmin."""
    vectors, codebook = vectors.float(), codebook.float()
    distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)
    return distances.argmin(1)


def cdist_argmin(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(vectors.float(), codebook.float()).argmin(1)


def vector_quantize_pytorch_lookup():
    """vector-quantize-pytorch's own distance (its `cdist`: -2 v.c + norms, clamp, sqrt) and argmax of -distance,
    as its EuclideanCodebook does at inference; None when the package is not installed."""
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import cdist
    except ImportError:
        return None

    def lookup(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return (-cdist(vectors[None], codebook[None]))[0].argmax(-1)

    return lookup


def bench_lookup(timer: Timer, device: torch.device, small: bool) -> list[dict]:
    rows, codes, width = (2048, 512, 64) if small else (262_144, 8_192, 256)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        results += bench_lookup_dtype(timer, device, rows, codes, width, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def bench_lookup_dtype(timer: Timer, device: torch.device, rows: int, codes: int, width: int,
                       dtype: torch.dtype) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(0)
    codebook = torch.randn(codes, width, device=device, generator=generator).to(dtype)
    vectors = torch.randn(rows, width, device=device, generator=generator).to(dtype)
    expected = codebook_lookup_reference(vectors, codebook)[0]
    candidates = {"torch matmul + argmin": matmul_argmin, "torch.cdist + argmin": cdist_argmin,
                  "vector-quantize-pytorch": vector_quantize_pytorch_lookup(),
                  "ours (Triton)": lambda v, c: codebook_lookup_triton(v, c)[0]}
    results = []
    for name, function in candidates.items():
        row = {"kernel": "codebook lookup", "dtype": str(dtype).removeprefix("torch."), "N": rows, "K": codes,
               "D": width, "implementation": name}
        if function is None:
            row["error"] = "not installed"
        else:
            row.update(timer.measure(lambda f=function: f(vectors, codebook)))
            if "error" not in row:
                row["agreement"] = float((function(vectors, codebook) == expected).float().mean())
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def bench_vqtok_encode(timer: Timer, device: torch.device, small: bool) -> list[dict]:
    """Time of a vqtok encode with the lookup on the reference and on the kernel, and of the lookup alone."""
    from vqtok.config import preset
    from vqtok.model import VQModel

    config = preset("tiny" if small else "chameleon")
    model = VQModel(config).to(device).eval()
    batch, size = (2, 32) if small else (16, 512)  # Chameleon's 512 px: 32 x 32 = 1,024 codes per image
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    latents = model.quant_conv(model.encoder(images)).detach()
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    codebook = model.quantizer.codebook.float().detach()
    results = []
    for name, use_reference in (("reference lookup", True), ("Triton lookup", False)):
        with reference_kernels(use_reference), torch.no_grad():
            encode = timer.measure(lambda: model.encode(images))
            lookup = timer.measure(lambda: model.quantizer.indices(latents))
        row = {"kernel": "vqtok encode", "preset": "tiny" if small else "chameleon", "images": batch, "size": size,
               "vectors": vectors.shape[0], "K": codebook.shape[0], "D": codebook.shape[1], "implementation": name,
               "encode_ms": encode.get("ms"), "lookup_ms": lookup.get("ms"),
               "error": encode.get("error") or lookup.get("error")}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


# --------------------------------------------------------------------------------------------------- attention
def causal_flops(batch: int, heads: int, length: int, head_dim: int, document_length: int | None = None) -> float:
    """Forward FLOPs of causal attention (two matmuls, half the square); per document when packed."""
    span = document_length or length
    return 4 * batch * heads * head_dim * (length // span) * span * span / 2


def sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"default": contextlib.nullcontext}
    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return {name: (lambda member=member: sdpa_kernel(getattr(SDPBackend, member)))
            for name, member in names.items() if hasattr(SDPBackend, member)}


def bench_attention(timer: Timer, device: torch.device, small: bool) -> list[dict]:
    dtype = torch.float32 if small else torch.bfloat16
    heads, head_dim, tokens = (2, 16, 256) if small else (16, 128, 16_384)
    lengths = [64, 128] if small else [1024, 2048, 4096, 8192]
    cases = [(length, heads, None) for length in lengths]
    cases.append((lengths[-1], heads, lengths[-1] // 8))  # packed: 8 documents per row
    cases.append((lengths[-2], heads // 4 if heads >= 4 else 1, None))  # grouped-query: 4 query heads per kv head
    results = []
    for length, kv_heads, document_length in cases:
        results += bench_attention_case(timer, device, dtype, max(1, tokens // length), heads, kv_heads, length,
                                        head_dim, document_length)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def bench_attention_case(timer: Timer, device: torch.device, dtype: torch.dtype, batch: int, heads: int,
                         kv_heads: int, length: int, head_dim: int, document_length: int | None) -> list[dict]:
    q = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad_out = torch.randn_like(q)
    document_ids = None
    if document_length is not None:
        document_ids = (torch.arange(length, device=device) // document_length).expand(batch, length)
    forward_flops = causal_flops(batch, heads, length, head_dim, document_length)

    def timed(function, backward: bool):
        def call():
            out = function()
            if backward:
                torch.autograd.grad(out, (q, k, v), grad_out)
        return call

    implementations = {"ours (Triton)": lambda: attention_triton(q, k, v, document_ids)}
    for name, context in sdpa_backends().items():
        def sdpa(context=context):
            with context():
                return attention_reference(q, k, v, document_ids)
        implementations[f"SDPA {name}"] = sdpa
    results = []
    for name, function in implementations.items():
        row = {"kernel": "attention", "dtype": str(dtype).removeprefix("torch."), "batch": batch, "heads": heads,
               "kv_heads": kv_heads, "T": length, "D": head_dim, "document_length": document_length,
               "implementation": name}
        forward = timer.measure(timed(function, backward=False))
        both = timer.measure(timed(function, backward=True))
        if "error" in forward or "error" in both:
            row["error"] = forward.get("error") or both.get("error")
        else:
            row.update(forward_ms=forward["ms"], forward_backward_ms=both["ms"],
                       forward_tflops=forward_flops / forward["ms"] / 1e9,
                       forward_backward_tflops=3.5 * forward_flops / both["ms"] / 1e9)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


# ------------------------------------------------------------------------------------------------- fused loss
def pytorch_loss(hidden, weight, targets, z_loss_weight):
    """What a plain LM head does: the (N, V) logits, F.cross_entropy, and z-loss from logsumexp."""
    logits = (hidden @ weight.t()).float()
    log_z = torch.logsumexp(logits, dim=-1)
    return F.cross_entropy(logits, targets) + z_loss_weight * log_z.pow(2).mean()


def bench_loss(timer: Timer, device: torch.device, small: bool) -> list[dict]:
    rows, width, vocab = (48, 64, 1000) if small else (16_384, 4_096, 65_536)
    dtype = torch.float32 if small else torch.bfloat16
    z_loss_weight = 1e-4
    hidden = (torch.randn(rows, width, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, device=device) * width**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device)
    implementations = {
        "PyTorch logits + cross_entropy + z-loss": lambda: pytorch_loss(hidden, weight, targets, z_loss_weight),
        "reference (kernels/, per-token)": lambda: linear_cross_entropy_reference(hidden, weight, targets, None,
                                                                                  z_loss_weight).loss,
        "ours (fused Triton)": lambda: linear_cross_entropy_triton(hidden, weight, targets, None,
                                                                   z_loss_weight).loss,
    }
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.12: chunked, no z-loss
        implementations["torch F.linear_cross_entropy (no z-loss)"] = lambda: F.linear_cross_entropy(
            hidden, weight, targets)
    results = []
    for name, function in implementations.items():
        def call(function=function):
            hidden.grad = weight.grad = None
            function().backward()

        row = {"kernel": "linear cross-entropy", "dtype": str(dtype).removeprefix("torch."), "N": rows, "H": width,
               "V": vocab, "implementation": name}
        row.update(timer.measure(call))
        if "error" not in row:
            row["loss"] = float(function().detach())
        results.append(row)
        print(json.dumps(row), flush=True)
    hidden.grad = weight.grad = None
    return results


# ----------------------------------------------------------------------------------------------------- report
def markdown(results: list[dict]) -> str:
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        rows = [r for r in results if r["kernel"] == kernel]
        keys = list(dict.fromkeys(key for r in rows for key in r if key != "kernel"))
        lines += [f"### {kernel}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_kernels")
    parser.add_argument("--small", action="store_true", help="toy sizes: checks the script (CPU: interpreted)")
    parser.add_argument("--only", choices=["lookup", "encode", "attention", "loss"], action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        parser.error("the full sizes need a GPU; use --small on CPU")
    timer = Timer(device, warmup=0 if args.small else 3, repeats=1 if args.small else args.repeats)
    sections = {"lookup": bench_lookup, "encode": bench_vqtok_encode, "attention": bench_attention,
                "loss": bench_loss}
    results = []
    for name in args.only or sections:
        results += sections[name](timer, device, args.small)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "small": args.small, "triton_interpret": os.environ.get(
                       "TRITON_INTERPRET", "0")}
    try:
        import triton
        environment["triton"] = triton.__version__
    except ImportError:
        pass
    (out / "results.json").write_text(json.dumps({"environment": environment, "results": results}, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(f"Environment: {json.dumps(environment)}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
