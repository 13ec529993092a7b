"""Benchmark the tokenizer: quantizer settings side by side, and encode throughput per preset.

    python scripts/bench_vqtok.py --out runs/bench_vqtok            # full: 3 settings x (short, long) + throughput
    python scripts/bench_vqtok.py --short 200 --long 600 --settings plain,ema,l2_lowdim --permute-channels 1

For each quantizer setting, trains the `small` preset on the embedded training photos for `--long` steps
(checkpoints kept at every `--short` steps), then evaluates the `--short` and `--long` checkpoints on the
held-out photos: PSNR, SSIM, codebook usage on the eval set (with its upper bound tokens/codebook), perplexity,
and the rolling training-window usage (last 65,536 indices). Then times `encode` (images/s) for the `small`
and `chameleon` presets. Prints a Markdown table and writes results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from runkit.files import atomic_write_text
from vqtok.config import preset
from vqtok.data import default_photo_paths
from vqtok.evaluate import evaluate
from vqtok.model import VQModel
from vqtok.train import Trainer

SETTINGS = {
    "plain": {"quantizer.ema": False, "quantizer.kmeans_init": False, "quantizer.dead_code_threshold": 0.0,
              "quantizer.codebook_dim": None, "quantizer.l2_normalized": False},
    "ema": {"quantizer.ema": True, "quantizer.kmeans_init": True, "quantizer.dead_code_threshold": 0.01,
            "quantizer.codebook_dim": None, "quantizer.l2_normalized": False},
    "l2_lowdim": {"quantizer.ema": True, "quantizer.kmeans_init": True, "quantizer.dead_code_threshold": 0.01,
                  "quantizer.codebook_dim": 8, "quantizer.l2_normalized": True},
}
DESCRIPTIONS = {
    "plain": "plain VQ (codebook learned by gradient; no EMA / k-means / revival), 64-d",
    "ema": "EMA + k-means init + dead-code revival, 64-d",
    "l2_lowdim": "l2-normalised 8-d lookup (LlamaGen) + EMA + k-means + revival",
}


def is_default(name: str) -> bool:
    return preset("small").with_overrides(SETTINGS[name]).quantizer == preset("small").quantizer


def train_setting(name: str, out: Path, short: int, long: int, permute_channels: bool) -> dict:
    run = out / name
    config = preset("small").with_overrides({**SETTINGS[name], "train.steps": long, "train.checkpoint_every": short,
                                              "train.sample_every": short, "train.keep_checkpoints": 100,
                                              "train.permute_channels": permute_channels})
    trainer = Trainer(config, run, default_photo_paths("train"), default_photo_paths("heldout"))
    trainer.resume()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    results = {}
    for steps in (short, long):
        metrics = evaluate(run / "checkpoints" / f"step_{steps:08d}")
        window = next(r for r in rows if r["step"] == steps)
        results[steps] = {"psnr": metrics["psnr"], "ssim": metrics["ssim"], "eval_usage": metrics["codebook_usage"],
                          "eval_usage_bound": metrics["usage_upper_bound"], "eval_perplexity": metrics["code_perplexity"],
                          "train_window_usage": window["codebook_usage"], "train_window_perplexity": window["code_perplexity"]}
    description = DESCRIPTIONS[name] + (" **(the small preset's quantizer)**" if is_default(name) else "")
    return {"setting": name, "description": description, "train_seconds_this_run": seconds, "results": results}


@torch.no_grad()
def encode_throughput(name: str, batch_size: int, repeats: int, device: str) -> dict:
    config = preset(name)
    model = VQModel(config).to(device).eval()
    size = config.model.resolution
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    model.encode(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.encode(images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"preset": name, "resolution": size, "grid": config.model.grid_size, "batch_size": batch_size,
            "images_per_second": batch_size * repeats / seconds, "device": device}


def markdown(results: dict) -> str:
    lines = [f"Training crops with random RGB channel permutation: {'yes' if results['permute_channels'] else 'no'}", "",
             "| quantizer setting | steps | PSNR (dB) | SSIM | eval usage (bound) | eval perplexity | train-window usage | train-window perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in results["settings"]:
        for steps, r in entry["results"].items():
            lines.append(f"| {entry['description']} | {steps} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                         f"{100 * r['eval_usage']:.1f}% ({100 * r['eval_usage_bound']:.1f}%) | {r['eval_perplexity']:.0f} | "
                         f"{100 * r['train_window_usage']:.1f}% | {r['train_window_perplexity']:.0f} |")
    lines += ["", "| preset | resolution -> grid | batch | encode images/s | device |", "|---|---|---|---|---|"]
    for t in results["throughput"]:
        lines.append(f"| {t['preset']} | {t['resolution']} -> {t['grid']}x{t['grid']} | {t['batch_size']} | "
                     f"{t['images_per_second']:.2f} | {t['device']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_vqtok")
    parser.add_argument("--short", type=int, default=200, help="the quickstart's budget, steps")
    parser.add_argument("--long", type=int, default=600, help="the longer CPU budget, steps")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-training", action="store_true", help="throughput only")
    parser.add_argument("--permute-channels", type=int, choices=(0, 1), default=int(preset("small").train.permute_channels),
                        help="colour augmentation: random RGB channel order per training crop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
               "permute_channels": bool(args.permute_channels), "settings": [], "throughput": []}
    if not args.skip_training:
        for name in args.settings.split(","):
            results["settings"].append(train_setting(name, out, args.short, args.long, bool(args.permute_channels)))
            atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    results["throughput"] = [encode_throughput("small", 8, 3, args.device), encode_throughput("chameleon", 1, 2, args.device)]
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    table = markdown(results)
    atomic_write_text(out / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
