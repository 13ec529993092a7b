"""Classifier-free guidance sweep: text -> picture on every held-out caption of a world, one trained model, each
guidance setting with the same seeds, scored by the world's checker (colour+shape per object, whole scene exact),
with standard errors. Writes OUT/cfg_sweep.json and OUT/cfg_sweep.md.

    python scripts/bench_cfg.py --ckpt runs/quickstart/lm --tokenizer runs/quickstart/tokenizer \
        --world runs/quickstart/world --out runs/cfg_sweep [--scales 1.5,3,5] [--count 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runkit.files import atomic_write_text  # noqa: E402
from unified_lm.eval.evaluate import EvalSettings, Evaluator, load_world_tasks, percent  # noqa: E402
from unified_lm.model.checkpoint import load_model  # noqa: E402
from vqtok.checkpoint import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scales", default="1.5,3,5", help="2-way CFG scales, besides no guidance")
    parser.add_argument("--count", type=int, default=0, help="held-out captions (0: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    loaded = load_model(args.ckpt, args.device)
    tokenizer, meta = load_tokenizer(args.tokenizer, args.device)
    loaded.vocab.check_tokenizer(meta["tokenizer"], f"tokenizer {args.tokenizer}")
    settings = [("none", 1.0)] + [("2way", float(scale)) for scale in args.scales.split(",")]
    captions = load_world_tasks(args.world, EvalSettings(count=args.count)).captions
    rows = []
    for guidance, scale in settings:
        config = EvalSettings(count=args.count, guidance=guidance, guidance_scale=scale, baselines=False)
        start = time.perf_counter()
        evaluator = Evaluator(loaded.model, loaded.vocab, tokenizer, loaded.image_grid, config)
        result, chance = evaluator.text_to_image(captions)
        rows.append({"guidance": guidance, "scale": scale, "prompts": len(captions), **result.metrics,
                     "chance_colour_shape": chance.metrics["colour_shape"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cfg_sweep.json", json.dumps({"checkpoint": str(loaded.directory),
                                                          "step": loaded.meta.get("step"), "rows": rows}, indent=1))
    lines = ["| guidance | colour+shape per object | whole scene exact | colour | shape | chance colour+shape | "
             "seconds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        name = "none" if row["guidance"] == "none" else f"2-way, scale {row['scale']:g}"
        cells = [percent(row["colour_shape"], row["colour_shape_se"]), percent(row["exact"], row["exact_se"]),
                 percent(row["colour"]), percent(row["shape"]), percent(row["chance_colour_shape"]), row["seconds"]]
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    atomic_write_text(out / "cfg_sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
