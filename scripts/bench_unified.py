"""Training throughput of the unified transformer through the real entry point (`deepspeed scripts/train_unified.py`).

    python scripts/bench_unified.py                                    # small config, CPU, 1 and 2 processes
    python scripts/bench_unified.py --model 350m --seq-len 2048 --micro-batch 8 --processes 1 --steps 40   # GPU MFU

Each run launches the DeepSpeed launcher with N processes on a packed dataset (`--data`, or a synthetic one of
random text and image tokens with the given vocabulary shape), logs every `--log-every` steps, and reports the
median tokens/s (and MFU on GPU) over the log windows after the first (warm-up). Results go to
OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runkit.distributed import free_port
from unified_lm.data.packing import pack_documents, write_dataset
from unified_lm.tokens.documents import EncodedDocument
from unified_lm.tokens.vocab import Vocabulary, train_text_model


def synthetic_dataset(out: Path, seq_len: int, rows: int, text_vocab: int, codebook_size: int, seed: int = 0) -> Path:
    """Random interleaved documents (text runs and 8x8..32x32 images) packed into `rows` rows: only the shapes
    matter for throughput."""
    if (out / "dataset.json").exists():
        return out
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20000)]
    texts = (" ".join(rng.choice(words, 50)) for _ in range(4000))
    vocab = Vocabulary(train_text_model(texts, text_vocab), codebook_size, {"name": "synthetic", "codebook_size": codebook_size})

    def documents():
        while True:
            pieces = [np.array([vocab.special.bos])]
            for _ in range(rng.integers(1, 4)):
                pieces.append(rng.integers(0, vocab.text_size, rng.integers(10, 100)))
                side = int(rng.choice([8, 16, 32]))
                pieces.append(vocab.image_ids(rng.integers(0, codebook_size, (side, side))))
            pieces.append(np.array([vocab.special.eos]))
            tokens = np.concatenate(pieces)
            yield EncodedDocument(tokens, np.ones(len(tokens), bool))

    packed = pack_documents(documents(), seq_len + 1, vocab.special.pad)
    limited = (row for row, _ in zip(packed, range(rows)))
    write_dataset(out, limited, vocab, seq_len + 1, rows_per_shard=4096, extra={"synthetic": True})
    return out


def run(args, data: Path, processes: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", str(processes), "--master_port", str(free_port()),
               str(REPO / "scripts" / "train_unified.py"), "--model", args.model, "--data", str(data), "--out", str(out),
               "--deepspeed_config", str(REPO / "configs" / "deepspeed" / f"zero{args.zero}.json"),
               "--steps", str(args.steps), "--set", f"train.micro_batch_size={args.micro_batch}",
               "--set", f"train.log_every={args.log_every}", "--set", "train.stats_every=1000000",
               "--set", f"train.checkpoint_every={10 * args.steps}", "--set", "train.warmup_steps=5"]
    for pair in args.set:
        command += ["--set", pair]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"run with {processes} process(es) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    header = next(line for line in result.stdout.splitlines() if line.startswith("[train]") and "parameters" in line)
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {"processes": processes, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(mfu) if mfu else None, "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "steps": args.steps, "wall_s": round(wall, 1), "run": header}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="packed dataset (default: a synthetic one in OUT/data)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=512, help="synthetic rows")
    parser.add_argument("--rows", type=int, default=512, help="synthetic rows to write")
    parser.add_argument("--text-vocab", type=int, default=4000)
    parser.add_argument("--codebook-size", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", default="runs/bench_unified")
    args = parser.parse_args()
    out = Path(args.out)
    shape = f"seq{args.seq_len}-rows{args.rows}-text{args.text_vocab}-codes{args.codebook_size}"
    data = Path(args.data) if args.data else synthetic_dataset(out / f"data-{shape}", args.seq_len, args.rows,
                                                                 args.text_vocab, args.codebook_size)
    results = []
    for processes in args.processes:
        result = run(args, data, processes, out / f"run_p{processes}")
        results.append(result)
        print(json.dumps(result), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    lines = ["| processes | tokens/s (median) | MFU | loss first -> last | wall s |", "|---|---|---|---|---|"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {r['processes']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['first_loss']:.3f} -> "
                     f"{r['last_loss']:.3f} | {r['wall_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
