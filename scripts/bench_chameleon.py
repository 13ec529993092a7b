"""This codebase vs transformers on the same Chameleon weights: forward and generation tokens/s, equal outputs.

    python scripts/bench_chameleon.py --out runs/bench_chameleon            # CPU, ~3 minutes
    python scripts/bench_chameleon.py --out runs/bench_chameleon --small    # seconds (the test runs this)

One random ChameleonForConditionalGeneration (transformers' format, built offline by unified_lm/interop/random_checkpoint.py:
Chameleon's vocabulary layout with an 8,192-code image table, QK-norm) is imported with
`unified_lm.interop.chameleon.import_chameleon`; both models then run in fp32 on the same ids, in one process:
1. forward: logits of a batch of mixed text+image rows (tokens/s; transformers' full forward with its eager
   and SDPA attention), and the largest logit difference (transformers masks image logits, so its lm_head on
   the final hidden states is compared);
2. text generation, greedy, KV cache: our Sampler (text mode) vs transformers' `generate` with the same
   forbidden ids (`suppress_tokens`); tokens/s and whether the generated ids are equal;
3. picture generation: our Sampler in image mode (a 32x32 grid, 1,024 tokens). transformers cannot
   generate pictures (its forward sets image logits to -inf), so there is no baseline.
Timings: medians of `--repeats` runs (forward: 2 more) after one warm-up, the contestants taking turns, torch
threads as set (default: all cores). speed_vs_ours > 1 means transformers was faster.
Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def race(functions: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """name -> (median seconds, last result). One warm-up call each, then the repetitions take turns (A B A B
    ...), so a slow spell of the machine falls on every contestant alike."""
    results = {name: function() for name, function in functions.items()}
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in functions}


def use_attention(hf, implementation: str):
    hf.config._attn_implementation = implementation
    hf.model.config._attn_implementation = implementation


def mixed_rows(vocab, batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids: <bos>, then text and 4x4 pictures of random codes in turn."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        ids = [vocab.special.bos]
        while len(ids) < length:
            ids += vocab.encode_text(" the red circle sits left of a blue square")
            ids += vocab.image_ids(rng.integers(0, vocab.codebook_size, (4, 4))).tolist()
        rows.append(ids[:length])
    return torch.tensor(rows)


def bench_forward(hf, model, ids: torch.Tensor, repeats: int) -> list[dict]:
    """1. One forward over mixed rows: ours and transformers' (eager and sdpa attention), and the largest logit
    difference."""
    def transformers_forward(implementation: str):
        def forward():
            use_attention(hf, implementation)
            return hf(ids).logits  # its full forward, image logits masked
        return forward

    with torch.no_grad():
        raced = race({"ours": lambda: model(ids), "transformers (eager)": transformers_forward("eager"),
                      "transformers (sdpa)": transformers_forward("sdpa")}, repeats + 2)
        ours_logits = raced["ours"][1]
        use_attention(hf, "sdpa")
        theirs = hf.lm_head(hf.model(ids).last_hidden_state)  # every logit, for the comparison
    difference = float((ours_logits - theirs).abs().max())
    rows = []
    for name, (seconds, _) in raced.items():
        row = {"what": "forward", "impl": name, "tokens_per_s": ids.numel() / seconds}
        if name != "ours":
            row["speed_vs_ours"] = raced["ours"][0] / seconds
        else:
            row["max_abs_logit_diff_vs_transformers"] = difference
        rows.append(row)
    return rows


def bench_text_generation(hf, sampler, vocab, batch: int, new_tokens: int, repeats: int) -> list[dict]:
    """2. Greedy text generation with the same allowed ids, batch 1 and `batch`: speed, and whether both sides
    generate the same ids."""
    from unified_lm.generate.sampling import ModalitySampling, SamplingConfig
    from unified_lm.generate.segments import Prompt

    prompts = [Prompt(["the red circle sits left of"]) for _ in range(batch)]
    config = SamplingConfig(mode="text", max_new_tokens=new_tokens, text=ModalitySampling(temperature=0.0))
    # <eos> is forbidden on both sides so that every row runs the whole budget (random weights pick it early);
    # transformers masks image ids itself, suppress_tokens removes what our text mode leaves out
    suppress = np.flatnonzero(~vocab.text_mask & ~vocab.image_mask).tolist()
    eos = vocab.special.eos

    def no_eos(logits: torch.Tensor) -> torch.Tensor:
        logits[:, eos] = float("-inf")
        return logits

    use_attention(hf, "sdpa")
    rows = []
    for rows_in_batch in (1, batch):
        prompt_ids = torch.tensor([sampler.encode_prompt(p, "text") for p in prompts[:rows_in_batch]])

        def hf_generate():
            with torch.no_grad():
                return hf.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, suppress_tokens=suppress, eos_token_id=eos,
                                   pad_token_id=vocab.special.pad)

        raced = race({"ours": lambda: sampler.generate(prompts[:rows_in_batch], config, logits_processor=no_eos),
                      "transformers generate": hf_generate}, repeats)
        (ours_seconds, documents), (hf_seconds, hf_out) = raced["ours"], raced["transformers generate"]
        ours_ids = [d.tokens for d in documents]
        hf_ids = [row[prompt_ids.shape[1]:].tolist() for row in hf_out]
        generated = sum(len(t) for t in ours_ids)
        rows.append({"what": f"text generation, batch {rows_in_batch}", "impl": "ours",
                     "tokens_per_s": generated / ours_seconds, "new_tokens": generated,
                     "same_ids_as_transformers": ours_ids == hf_ids})
        rows.append({"what": f"text generation, batch {rows_in_batch}", "impl": "transformers generate",
                     "tokens_per_s": sum(len(t) for t in hf_ids) / hf_seconds,
                     "new_tokens": sum(len(t) for t in hf_ids), "speed_vs_ours": ours_seconds / hf_seconds})
    return rows


def bench_pictures(sampler, batch: int, grid: int, repeats: int) -> list[dict]:
    """3. One picture per row (transformers cannot: its forward masks image logits)."""
    from unified_lm.generate.sampling import SamplingConfig
    from unified_lm.generate.segments import Prompt

    image_config = SamplingConfig(mode="image", max_new_tokens=grid * grid + 2, seed=0)
    picture_prompts = [Prompt(["a red circle"]) for _ in range(batch)]
    seconds, documents = race({"ours": lambda: sampler.generate(picture_prompts, image_config)},
                              max(1, repeats - 1))["ours"]
    drawn = sum(len(d.tokens) for d in documents)
    codes_ok = all(s.codes.shape == (grid, grid) for d in documents for s in d.segments if s.kind == "image")
    what = f"picture generation ({grid}x{grid} codes), batch {batch}"
    return [{"what": what, "impl": "ours", "tokens_per_s": drawn / seconds, "new_tokens": drawn,
             "pictures_complete": codes_ok},
            {"what": what, "impl": "transformers", "tokens_per_s": None,
             "note": "cannot generate pictures: ChameleonForConditionalGeneration masks image logits"}]


def write_results(out: Path, results: dict) -> None:
    """OUT/results.json and OUT/results.md (a table, also printed)."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Model: {json.dumps(results['model'])}; {results['machine']}", "",
             "| what | implementation | tokens/s | notes |", "| --- | --- | ---: | --- |"]
    for row in results["rows"]:
        notes = {k: v for k, v in row.items() if k not in ("what", "impl", "tokens_per_s")}
        speed = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        lines.append(f"| {row['what']} | {row['impl']} | {speed} | {json.dumps(notes) if notes else ''} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_chameleon")
    parser.add_argument("--small", action="store_true", help="toy sizes: checks the script, numbers mean little")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from unified_lm.generate.sampler import Sampler
    from unified_lm.interop.chameleon import import_chameleon
    from unified_lm.interop.random_checkpoint import build_hf_checkpoint
    from unified_lm.model.checkpoint import load_model

    if args.small:
        shape = dict(codebook_size=64, dim=64, layers=2, heads=4, kv_heads=2, text_vocab=300, max_positions=512)
        batch, length, new_tokens, grid, repeats = 2, 64, 16, 8, 1
    else:
        shape = dict(codebook_size=8192, dim=512, layers=6, heads=8, kv_heads=8, text_vocab=1000, max_positions=2048)
        batch, length, new_tokens, grid, repeats = 4, 512, 128, 32, args.repeats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_chameleon_"))
    torch.manual_seed(0)
    hf = build_hf_checkpoint(work / "hf", **shape)
    loaded = load_model(import_chameleon(work / "hf", work / "ours"))
    model, vocab = loaded.model, loaded.vocab
    sampler = Sampler(model, vocab, (grid, grid))
    parameters = sum(p.numel() for n, p in model.named_parameters())
    rows = (bench_forward(hf, model, mixed_rows(vocab, batch, length), repeats)
            + bench_text_generation(hf, sampler, vocab, batch, new_tokens, repeats)
            + bench_pictures(sampler, batch, grid, repeats))
    write_results(out, {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "transformers": __import__("transformers").__version__},
                        "model": {**shape, "vocab_size": vocab.size, "parameters": parameters}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
