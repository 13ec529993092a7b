"""Tokenizer recipes side by side on what generation needs: are the codes a function of the picture's content?

    python scripts/bench_tokenizer_codes.py --out runs/bench_codes                  # every recipe, 1500 steps each
    python scripts/bench_tokenizer_codes.py --out runs/bench_codes --recipes old,patch --steps 300   # a quick look

Each recipe trains a tokenizer on the quickstart's data (the embedded training photos, a quarter of the samples,
and a 48 px world's training pictures, three quarters), then measures on 200 held-out world pictures and the 5
held-out photos:
- world PSNR and the checker's reading of the reconstructions (colour + shape per object: the ceiling of any
  generated picture);
- code stability: codes unchanged under +-1/255 noise, and when the reconstruction is encoded again;
- H(code | cell content) and H(cell content | code), in nats, from the world's ground truth (`vqtok eval
  --labels`): 0 and 0 mean one code per content and one content per code;
- photo PSNR and noise stability, so a recipe that only suits the world shows it.
Writes OUT/results.jsonl (one line per recipe, appended as each finishes; a re-run skips finished recipes) and
OUT/results.md. Training runs with one thread per recipe; `--jobs 2` runs two recipes at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = {"model.base_channels": 16, "model.num_groups": 4, "train.crop_size": 48, "train.lr": 1e-3,
        "loss.l2_weight": 1.0, "quantizer.codebook_size": 1024}
RECIPES = {  # name -> (description, overrides on top of `small` + BASE)
    "old": ("the old quickstart recipe: f8, picture-wide encoder, EMA + k-means + dead-code revival (0.05)",
            {"quantizer.dead_code_threshold": 0.05}),
    "patch": ("f8, patch encoder, autoencoder warm-up then k-means++ on its latents, no revival",
              {"model.encoder_context": "patch", "train.quantizer_warmup_steps": 0.4,
               "quantizer.dead_code_threshold": 0.0}),
    "patch_revival": ("f8, patch encoder, warm-up, k-means++, revival (0.05) from random batch latents",
                      {"model.encoder_context": "patch", "train.quantizer_warmup_steps": 0.4,
                       "quantizer.dead_code_threshold": 0.05}),
    "patch_worst": ("f8, patch encoder, warm-up, k-means++, revival (0.01) from the worst-fit latents",
                    {"model.encoder_context": "patch", "train.quantizer_warmup_steps": 0.4,
                     "quantizer.dead_code_threshold": 0.01, "quantizer.revive_from": "worst"}),
    "image_warmup": ("f8, picture-wide encoder, warm-up, no revival",
                     {"train.quantizer_warmup_steps": 0.4, "quantizer.dead_code_threshold": 0.0}),
    "fsq": ("f8, patch encoder, FSQ 8x5x5x5 = 1000 codes (no codebook to learn)",
            {"model.encoder_context": "patch", "quantizer.kind": "fsq", "quantizer.fsq_levels": [8, 5, 5, 5],
             "quantizer.codebook_size": 1000}),
    "f16_patch": ("f16 (one code per world cell), patch encoder, warm-up, no revival",
                  {"model.channel_multipliers": [1, 2, 2, 4, 4], "model.encoder_context": "patch",
                   "train.quantizer_warmup_steps": 0.4, "quantizer.dead_code_threshold": 0.0}),
}


def world_and_data(out: Path) -> tuple[Path, list[str]]:
    """The 48 px world (6000 scenes, as the old quickstart), its training pictures and the training photos."""
    from unified_lm.world.corpus import generate_world, read_documents
    from vqtok.data import default_photo_paths

    world = generate_world(out / "world", num_scenes=6000, seed=0, image_size=48).out_dir
    pictures, photos = out / "world_train", out / "photos_train"
    for folder in (pictures, photos):
        folder.mkdir(parents=True, exist_ok=True)
    for document in read_documents(world, "train"):
        for segment in document["segments"]:
            if "image" in segment and not (pictures / Path(segment["image"]).name).exists():
                os.link(world / segment["image"], pictures / Path(segment["image"]).name)
    for path in default_photo_paths("train"):
        if not (photos / path.name).exists():
            shutil.copy2(path, photos / path.name)
    return world, [str(photos)] + [f"{pictures}@48"] * 3


def run_recipe(name: str, out: Path, steps: int) -> dict:
    """Train one recipe (resuming) and measure it; returns the results row."""
    import torch

    from unified_lm.eval.evaluate import tokenizer_metrics
    from unified_lm.world.corpus import read_documents, read_scenes
    from vqtok.config import preset
    from vqtok.data import default_photo_paths, resolve_sources
    from vqtok.train import Trainer

    torch.set_num_threads(1)
    world, data = world_and_data(out)
    description, recipe = RECIPES[name]
    overrides = {**BASE, **recipe, "train.steps": steps, "train.log_every": 50, "train.checkpoint_every": steps,
                 "train.sample_every": steps}
    if "train.quantizer_warmup_steps" in overrides:  # given as a fraction of the steps
        overrides["train.quantizer_warmup_steps"] = round(overrides["train.quantizer_warmup_steps"] * steps)
    config = preset("small").with_overrides(overrides).validate()
    start = time.perf_counter()
    trainer = Trainer(config, out / "runs" / name, resolve_sources(data, "train"), [])
    trainer.resume()
    trainer.train()
    seconds = time.perf_counter() - start
    scenes = read_scenes(world)
    held = [(world / d["segments"][0]["image"], scenes[d["segments"][0]["image"]])
            for d in read_documents(world, "heldout") if d["kind"] == "image_to_text"][:200]
    grid = (48 // config.model.downsample_factor,) * 2  # world pictures at their native 48 px
    metrics = tokenizer_metrics(trainer.model.eval(), default_photo_paths("heldout"), held, grid)
    world_metrics, photos = metrics["world"], metrics["photos"]
    checker, content = world_metrics["checker"], world_metrics["content"]
    return {"recipe": name, "description": description, "steps": steps, "train_seconds": round(seconds),
            "world_psnr": world_metrics["psnr"], "ceiling_colour_shape": checker["colour_shape"],
            "ceiling_colour": checker["colour"], "ceiling_shape": checker["shape"], "ceiling_word": checker.get("word"),
            "stability_noise": world_metrics["stability_noise"],
            "stability_reencode": world_metrics["stability_reencode"],
            "code_given_content_nats": content["code_given_label"],
            "content_given_code_nats": content["label_given_code"],
            "codes_per_content": content["codes_per_label"], "world_codes_used": world_metrics["used_codes"],
            "photo_psnr": photos["psnr"], "photo_stability_noise": photos["stability_noise"]}


def table(rows: list[dict]) -> str:
    head = ("| recipe | steps | world PSNR dB | ceiling colour+shape | codes unchanged: noise / re-encode | "
            "H(code given content) nats | H(content given code) nats | codes per content | photo PSNR dB | "
            "photo codes unchanged by noise |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['recipe']}: {r['description']} | {r['steps']} | {r['world_psnr']:.2f} | "
                     f"{100 * r['ceiling_colour_shape']:.1f}% | {100 * r['stability_noise']:.1f}% / "
                     f"{100 * r['stability_reencode']:.1f}% | {r['code_given_content_nats']:.2f} | "
                     f"{r['content_given_code_nats']:.2f} | {r['codes_per_content']:.2f} | {r['photo_psnr']:.2f} | "
                     f"{100 * r['photo_stability_noise']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_codes")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained at once (one thread each)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single recipe and print its row
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.one:
        print("ROW " + json.dumps(run_recipe(args.one, out, args.steps)), flush=True)
        return
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        sys.exit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    out.mkdir(parents=True, exist_ok=True)
    world_and_data(out)  # once, before recipes run side by side
    results = out / "results.jsonl"
    done = {json.loads(line)["recipe"] for line in results.read_text().splitlines()} if results.exists() else set()
    todo = [n for n in names if n not in done]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name = todo.pop(0)
            print(f"[bench] training {name}: {RECIPES[name][0]}", flush=True)
            running.append((name, subprocess.Popen([sys.executable, __file__, "--out", str(out), "--steps",
                                                    str(args.steps), "--one", name], env=env,
                                                   stdout=subprocess.PIPE, text=True)))
        name, process = running.pop(0)
        output, _ = process.communicate()
        rows = [line[4:] for line in output.splitlines() if line.startswith("ROW ")]
        if process.returncode or not rows:
            sys.exit(f"recipe {name} failed (exit {process.returncode})")
        with open(results, "a") as handle:
            handle.write(rows[-1] + "\n")
        print(f"[bench] {name}: {rows[-1]}", flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
