"""The quickstart on the embedded default data (for now: the tokenizer part of the whole loop).

    bash scripts/quickstart.sh            # = setup + python scripts/quickstart.py
    python scripts/quickstart.py --steps 600 --out runs/quickstart-long

Stages (each prints the `vqtok` command it runs; re-running reuses finished stages, --redo starts over):
  1. photos  copy the embedded photo set (scikit-image's bundled photographs) to OUT/photos/{train,heldout}
  2. train   vqtok train --config small --data OUT/photos/train --steps N --out OUT/tokenizer
  3. encode  vqtok encode OUT/photos --ckpt OUT/tokenizer --out OUT/tokens
  4. decode  vqtok decode OUT/tokens --ckpt OUT/tokenizer --out OUT/decoded
  5. eval    vqtok eval --ckpt OUT/tokenizer --data OUT/photos/heldout  -> OUT/metrics.json
  6. grid    held-out originals above their reconstructions -> OUT/reconstructions.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vqtok.cli import main as vqtok
from vqtok.data import default_photo_paths
from vqtok.images import atomic_save_png, load_rgb, preprocess


def stage(name: str, argv: list[str]) -> None:
    print(f"\n== {name}: vqtok {' '.join(map(str, argv))}", flush=True)
    start = time.perf_counter()
    code = vqtok([str(a) for a in argv])
    if code not in (0, 1):
        sys.exit(f"stage {name} failed with exit status {code}")
    print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def copy_photos(out: Path) -> None:
    for split in ("train", "heldout"):
        folder = out / "photos" / split
        folder.mkdir(parents=True, exist_ok=True)
        for path in default_photo_paths(split):
            if not (folder / path.name).exists():
                shutil.copy2(path, folder / path.name)


def reconstruction_grid(out: Path, resolution: int) -> Path:
    originals = sorted((out / "photos" / "heldout").iterdir())
    top = [preprocess(load_rgb(p), resolution) for p in originals]
    bottom = [np.asarray(Image.open(out / "decoded" / "heldout" / (p.stem + ".png")).convert("RGB")) for p in originals]
    pad = 4
    canvas = np.full((2 * resolution + 3 * pad, len(top) * (resolution + pad) + pad, 3), 255, np.uint8)
    for column, (a, b) in enumerate(zip(top, bottom)):
        left = pad + column * (resolution + pad)
        canvas[pad : pad + resolution, left : left + resolution] = a
        canvas[2 * pad + resolution : 2 * pad + 2 * resolution, left : left + resolution] = b
    path = out / "reconstructions.png"
    atomic_save_png(canvas, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=200, help="tokenizer training steps (~0.75 s each on 2 CPU cores)")
    parser.add_argument("--redo", action="store_true", help="delete OUT and run every stage again")
    args = parser.parse_args()
    out = Path(args.out)
    if args.redo:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    print("== photos: embedded default set -> " + str(out / "photos"), flush=True)
    copy_photos(out)
    stage("train", ["train", "--config", args.config, "--data", out / "photos" / "train", "--eval-data",
                    out / "photos" / "heldout", "--steps", args.steps, "--out", out / "tokenizer"])
    stage("encode", ["encode", out / "photos", "--ckpt", out / "tokenizer", "--out", out / "tokens"])
    stage("decode", ["decode", out / "tokens", "--ckpt", out / "tokenizer", "--out", out / "decoded"])
    stage("eval", ["eval", "--ckpt", out / "tokenizer", "--data", out / "photos" / "heldout",
                   "--json-out", out / "metrics.json"])
    metrics = json.loads((out / "metrics.json").read_text())
    grid = reconstruction_grid(out, metrics["resolution"])
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f}s")
    print(f"  held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, codebook usage "
          f"{100 * metrics['codebook_usage']:.1f}% of {metrics['tokenizer']['codebook_size']} "
          f"(at most {100 * metrics['usage_upper_bound']:.1f}% on {metrics['tokens']} tokens), perplexity {metrics['code_perplexity']:.0f}")
    print(f"  reconstructions: {grid}\n  metrics: {out / 'metrics.json'}\n  tokens: {out / 'tokens'}")


if __name__ == "__main__":
    main()
