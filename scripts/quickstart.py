"""The quickstart on the embedded default data: tokenizer -> encode -> vocabulary -> prepare -> DeepSpeed training.

    bash scripts/quickstart.sh            # = setup + python scripts/quickstart.py
    python scripts/quickstart.py --steps 600 --lm-steps 400 --out runs/quickstart-long

Stages (each prints the command it runs; re-running reuses finished stages, --redo starts over):
  1. photos   copy the embedded photo set (scikit-image's bundled photographs) to OUT/photos/{train,heldout}
  2. train    vqtok train --config small --data OUT/photos/train --steps N --out OUT/tokenizer
  3. encode   vqtok encode OUT/photos --ckpt OUT/tokenizer --out OUT/tokens
  4. decode   vqtok decode OUT/tokens --ckpt OUT/tokenizer --out OUT/decoded
  5. eval     vqtok eval --ckpt OUT/tokenizer --data OUT/photos/heldout  -> OUT/metrics.json
  6. grid     held-out originals above their reconstructions -> OUT/reconstructions.png
  7. world    unified-lm world --out OUT/world                 (procedural captioned world, 64x64 pictures)
  8. encode   vqtok encode OUT/world/images --resolution 64   (8x8 = 64 tokens per picture)
  9. vocab    unified-lm vocab --tokenizer OUT/tokenizer --world OUT/world --text default (Wikipedia summaries)
 10. prepare  unified-lm prepare OUT/world/documents.jsonl --split train --text-documents 300 -> OUT/packed
 11. lm       deepspeed --num_gpus 1 scripts/train_unified.py --model small ... --out OUT/lm (ZeRO-2)
 12. sample   unified-lm sample --ckpt OUT/lm --tokenizer OUT/tokenizer --prompts ... --mode interleaved|image|understanding
              on held-out world prompts -> OUT/samples/<mode>/index.html (open it in a browser)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from unified_lm.cli import main as unified_lm
from vqtok.cli import main as vqtok
from vqtok.data import default_photo_paths
from vqtok.distributed import free_port
from vqtok.images import atomic_save_png, load_rgb, preprocess


def stage(name: str, argv: list, command=vqtok, program: str = "vqtok") -> None:
    print(f"\n== {name}: {program} {' '.join(map(str, argv))}", flush=True)
    start = time.perf_counter()
    code = command([str(a) for a in argv])
    if code not in (0, 1):
        sys.exit(f"stage {name} failed with exit status {code}")
    print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def launch(name: str, argv: list) -> None:
    """Run a launcher command (the deepspeed launcher starts its own processes)."""
    argv = [str(a) for a in argv]
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(argv).returncode
    if code != 0:
        sys.exit(f"stage {name} failed with exit status {code}")
    print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def train_unified_model(out: Path, steps: int) -> dict:
    """Stages 7-11: the world corpus through the small unified model, trained with DeepSpeed (ZeRO-2)."""
    stage("world", ["world", "--out", out / "world", "--scenes", 1000, "--seed", 0, "--image-size", 64],
          unified_lm, "unified-lm")
    stage("encode world", ["encode", out / "world" / "images", "--ckpt", out / "tokenizer", "--out",
                           out / "world_tokens", "--resolution", 64, "--quiet"])
    if not (out / "vocab" / "vocab.json").exists():
        stage("vocab", ["vocab", "--tokenizer", out / "tokenizer", "--world", out / "world", "--text", "default",
                        "--text-vocab-size", 4000, "--out", out / "vocab"], unified_lm, "unified-lm")
    if not (out / "packed" / "dataset.json").exists():
        stage("prepare", ["prepare", out / "world" / "documents.jsonl", "--vocab", out / "vocab", "--tokens",
                          out / "world_tokens", "--split", "train", "--seq-len", 512, "--text-documents", 300,
                          "--out", out / "packed"], unified_lm, "unified-lm")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    resume = ["--resume"] if (out / "lm" / "latest").exists() else []
    launch("lm", [deepspeed, "--num_gpus", 1, "--master_port", free_port(), REPO / "scripts" / "train_unified.py",
                  "--model", "small", "--data", out / "packed", "--out", out / "lm", "--deepspeed_config",
                  REPO / "configs" / "deepspeed" / "zero2.json", "--steps", steps, "--set", "train.micro_batch_size=4",
                  "--set", "train.warmup_steps=15", "--set", "train.log_every=10", "--set", "train.checkpoint_every=50",
                  *resume])
    records = [json.loads(line) for line in (out / "lm" / "log.jsonl").read_text().splitlines()]
    return {"first": records[0], "last": records[-1]}


def held_out_prompts(world: Path, count: int) -> dict[str, list[dict]]:
    """Prompts from documents the model never trained on: story openings (interleaved), captions (image) and
    questions about pictures (understanding)."""
    prompts: dict[str, list[dict]] = {"interleaved": [], "image": [], "understanding": []}
    for line in (world / "documents.jsonl").read_text().splitlines():
        document = json.loads(line)
        if document["split"] != "heldout":
            continue
        segments = document["segments"]
        if document["kind"] == "story":
            prompts["interleaved"].append({"segments": [segments[0]]})
        elif document["kind"] == "text_to_image":
            prompts["image"].append({"segments": [segments[0]]})
        elif document["kind"] == "qa":
            question = segments[1]["text"].split(" Answer:")[0] + " Answer:"
            prompts["understanding"].append({"segments": [{"image": str((world / segments[0]["image"]).resolve())},
                                                          {"text": question}]})
    return {mode: items[:count] for mode, items in prompts.items()}


def sample_documents(out: Path) -> dict[str, Path]:
    """Stage 12: sample from the trained model; returns each mode's HTML page."""
    pages = {}
    settings = {"interleaved": ["--max-new-tokens", 320, "--max-images", 3],
                "image": ["--cfg", "2way", "--cfg-scale", 2.0], "understanding": ["--max-new-tokens", 24]}
    for mode, prompts in held_out_prompts(out / "world", count=4).items():
        file = out / "samples" / f"prompts-{mode}.jsonl"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        stage(f"sample {mode}", ["sample", "--ckpt", out / "lm", "--tokenizer", out / "tokenizer", "--prompts", file,
                                 "--mode", mode, "--out", out / "samples" / mode, *settings[mode]], unified_lm, "unified-lm")
        pages[mode] = out / "samples" / mode / "index.html"
    return pages


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
    parser.add_argument("--lm-steps", type=int, default=150, help="unified model steps (~1.5 s each on 2 CPU cores)")
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
    lm = train_unified_model(out, args.lm_steps)
    pages = sample_documents(out)
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f}s")
    print(f"  held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, codebook usage "
          f"{100 * metrics['codebook_usage']:.1f}% of {metrics['tokenizer']['codebook_size']} "
          f"(at most {100 * metrics['usage_upper_bound']:.1f}% on {metrics['tokens']} tokens), perplexity {metrics['code_perplexity']:.0f}")
    print(f"  reconstructions: {grid}\n  metrics: {out / 'metrics.json'}\n  tokens: {out / 'tokens'}")
    first, last = lm["first"], lm["last"]
    print(f"  unified model: loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}); "
          f"text {last['text_loss']:.3f}, image {last['image_loss']:.3f}; {last['tokens_per_s']:,.0f} tokens/s")
    print(f"  run: {out / 'lm'} (log.jsonl, loss.png, checkpoints/ with model.safetensors)")
    print(f"  sampled documents (open in a browser): {pages['interleaved']}")
    print(f"    text -> picture: {pages['image']}\n    picture -> answer: {pages['understanding']}")


if __name__ == "__main__":
    main()
