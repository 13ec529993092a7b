"""Sampling speed of the unified model against the memory-bandwidth bound.

    python scripts/bench_sampler.py                                                  # small config, CPU
    python scripts/bench_sampler.py --model 1b --device cuda --dtype bfloat16        # ~1B config, GPU

Decoding one token per row reads every weight once per step, so a step cannot be faster than
weight_bytes / memory_bandwidth (the bound; KV-cache reads come on top). The script measures the device's read
bandwidth (a large tensor reduction), then times the real `Sampler` on randomly initialised weights (speed does
not depend on what the weights learned):
  - image mode (text -> one picture of --grid codes, 1,024 for 32x32), batch 1 and 8, guidance none / 2way / 3way;
  - text mode, batch 1 and 8.
Reports decode tokens/s per document stream, steps/s, the bound and the fraction of it reached, and seconds per
picture. Results go to OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unified_lm.generate.sampler import Sampler
from unified_lm.generate.sampling import SamplingConfig
from unified_lm.generate.segments import Prompt
from unified_lm.model.config import preset
from unified_lm.model.transformer import UnifiedTransformer
from unified_lm.tokens.text_corpus import read_texts
from unified_lm.tokens.vocab import Vocabulary, train_text_model


CAPTION = "a small red circle at the top left and a large blue square at the bottom right."


def read_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second for reading a large fp32 tensor once (best of 5 reductions)."""
    data = torch.ones(megabytes * (1 << 20) // 4, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        data.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: UnifiedTransformer) -> int:
    """Bytes read per decode step: every weight except the embedding table (a decode step gathers B rows of it;
    with tied embeddings the table is read whole as the output head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tied_embeddings:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset (tiny, small, 350m, 1b, 7b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--grid", type=int, default=32, help="picture side in codes (32 -> 1,024 tokens)")
    parser.add_argument("--codebook-size", type=int, default=8192)
    parser.add_argument("--text-vocab", type=int, default=4000)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--guidance", default="none,2way,3way")
    parser.add_argument("--text-tokens", type=int, default=256, help="tokens per document in the text-mode runs")
    parser.add_argument("--bandwidth-mb", type=int, default=0, help="bandwidth probe size (default 512 CPU, 4096 GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the static decode step")
    parser.add_argument("--static", choices=("auto", "on", "off"), default="auto",
                        help="static-shape decode step (auto: on CUDA, where it is replayed as a CUDA graph)")
    parser.add_argument("--out", default="runs/bench_sampler")
    return parser.parse_args()


def random_model(args, device: torch.device, dtype: torch.dtype) -> tuple[Vocabulary, UnifiedTransformer]:
    """A vocabulary (sentencepiece on the default English text + the codebook) and the preset with random weights:
    speed does not depend on what the weights learned."""
    torch.manual_seed(0)
    texts = (text for _, text in zip(range(3000), read_texts("default")))
    vocab = Vocabulary(train_text_model(texts, args.text_vocab), args.codebook_size,
                       {"name": "bench", "codebook_size": args.codebook_size})
    config = preset(args.model).model
    config.vocab_size = vocab.size
    config.max_seq_len = max(config.max_seq_len, args.grid * args.grid + 64)
    return vocab, UnifiedTransformer(config).to(device=device, dtype=dtype).eval()


def forbid_eos(vocab: Vocabulary):
    """A logits processor that never lets <eos> be drawn, so every text document runs its whole budget."""
    def block_eos(logits):
        return logits.index_fill(1, torch.tensor([vocab.special.eos], device=logits.device), float("-inf"))
    return block_eos


def run_case(sampler: Sampler, vocab: Vocabulary, args, mode: str, guidance: str, batch: int, bound: float) -> dict:
    """One timed generate call of `batch` documents; the sampler's own decode statistics."""
    settings = SamplingConfig.from_dict({
        "mode": mode, "max_new_tokens": args.grid * args.grid + 1 if mode == "image" else args.text_tokens,
        "guidance": {"mode": guidance}, "text": {"temperature": 1.0, "top_p": 1.0}})
    prompts = [Prompt([CAPTION]) for _ in range(batch)]
    block_eos = forbid_eos(vocab) if mode == "text" else None
    if args.compile:  # compile this case's shapes outside the timed run
        sampler.generate(prompts, settings, logits_processor=block_eos)
    sampler.stats = type(sampler.stats)()
    start = time.perf_counter()
    documents = sampler.generate(prompts, settings, logits_processor=block_eos)
    seconds = time.perf_counter() - start
    stats = sampler.stats
    steps_per_s = stats.decode_steps / stats.decode_seconds
    result = {"mode": mode, "guidance": guidance, "batch": batch, "tokens": stats.tokens,
              "decode_steps": stats.decode_steps, "seconds": round(seconds, 3),
              "prefill_seconds": round(stats.prefill_seconds, 4),
              "decode_tokens_per_s": round(stats.tokens_per_second, 1), "steps_per_s": round(steps_per_s, 1),
              "fraction_of_bound": round(steps_per_s / bound, 3)}
    if mode == "image":
        assert all(len(d.images) == 1 for d in documents)
        result["seconds_per_picture"] = round(seconds / batch, 3)
    return result


def write_results(out: Path, header: dict, results: list[dict], step: str) -> None:
    """OUT/results.json and OUT/results.md (a table, also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")
    lines = [f"{header['model']} ({header['parameters'] / 1e6:.1f}M parameters, {header['dtype']}, {step}) on "
             f"{header['device']}: read bandwidth {header['read_bandwidth_gb_s']} GB/s, "
             f"{header['weight_mb_per_step']} MB of weights per step, bound {header['bound_steps_per_s']} steps/s", "",
             "| mode | guidance | batch | decode tokens/s | steps/s | of bound | s per picture |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['guidance']} | {r['batch']} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['steps_per_s']:.0f} | {100 * r['fraction_of_bound']:.0f}% | {r.get('seconds_per_picture', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    vocab, model = random_model(args, device, dtype)
    bandwidth = read_bandwidth(device, args.bandwidth_mb or (4096 if device.type == "cuda" else 512))
    step_bytes = weight_bytes(model)
    bound = bandwidth / step_bytes
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {parameters / 1e6:.1f}M parameters, vocab {vocab.size}, {args.dtype} on {device}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {step_bytes / 1e6:.1f} MB of weights per step -> "
          f"bound {bound:.0f} steps/s", flush=True)
    static = {"auto": None, "on": True, "off": False}[args.static]
    sampler = Sampler(model, vocab, (args.grid, args.grid), static=static, compile=args.compile)
    cases = [("image", guidance, int(b)) for b in args.batches.split(",") for guidance in args.guidance.split(",")]
    cases += [("text", "none", int(b)) for b in args.batches.split(",")]
    sampler.generate([Prompt([CAPTION])], SamplingConfig(mode="text", max_new_tokens=8))  # warm-up
    results = []
    for mode, guidance, batch in cases:
        results.append(run_case(sampler, vocab, args, mode, guidance, batch, bound))
        print(json.dumps(results[-1]), flush=True)
    header = {"model": args.model, "static": sampler.static, "compile": args.compile, "parameters": parameters,
              "vocab_size": vocab.size, "dtype": args.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "grid": args.grid, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
              "weight_mb_per_step": round(step_bytes / 1e6, 2), "bound_steps_per_s": round(bound, 1)}
    step = "compiled static step" if args.compile else ("static step (CUDA graph on GPU)" if sampler.static else "eager")
    write_results(Path(args.out), header, results, step)

if __name__ == "__main__":
    main()
