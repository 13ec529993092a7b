"""Is the written word still in what the language model sees? A linear probe on each path's view of the word's cell.

The understanding comparison asks both paths "what word is written in the picture?". Before blaming the language
model, this measures whether the word survives the picture's way in: a logistic-regression probe (six words) is
fit on the world's training pictures that hold a word and scored on the held-out ones, given the word's cell
(so the probe reads identity, not location), and again from the whole picture, from
- pixels: the cell's raw pixels (the information there is to read);
- vqtok codes: the cell's codes as one-hot vectors (what the discrete path sees);
- encoder patches: the frozen contrastive encoder's patch outputs over the cell (what the continuous path's
  adapter reads).
Writes OUT/probe_word.json and prints a markdown table.

    python scripts/probe_word.py --world runs/quickstart/world --tokenizer runs/quickstart/tokenizer \
        --encoder runs/quickstart/encoder --out runs/probe_word
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runkit.files import atomic_write_text  # noqa: E402
from unified_lm.generate.prompts import encode_pictures  # noqa: E402
from unified_lm.vision.contrastive import load_encoder, load_pictures  # noqa: E402
from unified_lm.world.corpus import CELLS, WORDS, read_documents, read_scenes  # noqa: E402
from vqtok.checkpoint import load_tokenizer  # noqa: E402


def word_pictures(world: Path, split: str) -> list[tuple[Path, str, int]]:
    """(picture, word, cell index) for every picture of the split's documents that holds a word."""
    scenes = read_scenes(world)
    found = {}
    for document in read_documents(world, split):
        for segment in document["segments"]:
            scene = scenes.get(segment.get("image"))
            if scene is not None and scene.word is not None:
                found[segment["image"]] = (world / segment["image"], scene.word, CELLS.index(scene.word_cell))
    return list(found.values())


def cell_slice(values: torch.Tensor, cell: int) -> torch.Tensor:
    """(C, S, S) values over a 3x3-cell picture -> the cell's (C, S/3, S/3) block, flattened."""
    size = values.shape[-1] // 3
    row, column = divmod(cell, 3)
    return values[:, row * size:(row + 1) * size, column * size:(column + 1) * size].reshape(-1)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          steps: int = 500, weight_decay: float = 1e-3) -> float:
    """Multinomial logistic regression (features standardised on the training set); held-out accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], len(WORDS))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def features(items: list[tuple[Path, str, int]], view: str, tokenizer, encoder, size: int) -> torch.Tensor:
    """(B, F) features of each picture's word cell; views ending in "_anywhere" read the whole picture instead
    (a bag of codes; every encoder patch), so the probe must also find the word."""
    paths, cells = [path for path, _, _ in items], [cell for _, _, cell in items]
    if view == "codes_anywhere":
        grid = size // tokenizer.downsample_factor
        codes = encode_pictures(paths, tokenizer, (grid, grid))
        return torch.stack([torch.bincount(torch.as_tensor(codes[p]).reshape(-1).long(),
                                           minlength=tokenizer.config.quantizer.codebook_size).float() for p in paths])
    if view == "encoder_anywhere":
        with torch.no_grad():
            return encoder.vision(load_pictures(paths, encoder.config.vision.image_size)).patches.flatten(1)
    if view == "pixels":
        pictures = load_pictures(paths, size)  # (B, 3, S, S)
        return torch.stack([cell_slice(picture, cell) for picture, cell in zip(pictures, cells)])
    if view == "codes":
        grid = size // tokenizer.downsample_factor
        codes = encode_pictures(paths, tokenizer, (grid, grid))
        one_hot = F.one_hot(torch.stack([torch.as_tensor(codes[p]) for p in paths]).long(),
                            tokenizer.config.quantizer.codebook_size)  # (B, h, w, K)
        return torch.stack([cell_slice(o.permute(2, 0, 1).float(), cell) for o, cell in zip(one_hot, cells)])
    with torch.no_grad():  # encoder patches
        patches = encoder.vision(load_pictures(paths, encoder.config.vision.image_size)).patches  # (B, P, W)
    grid = int(patches.shape[1] ** 0.5)
    grids = patches.transpose(1, 2).reshape(len(paths), -1, grid, grid)
    return torch.stack([cell_slice(g, cell) for g, cell in zip(grids, cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=48, help="picture size in pixels (the world's)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    world = Path(args.world)
    tokenizer, _ = load_tokenizer(args.tokenizer, "cpu")
    encoder, _ = load_encoder(args.encoder, "cpu")
    train, heldout = word_pictures(world, "train"), word_pictures(world, "heldout")
    train_y = torch.tensor([WORDS.index(word) for _, word, _ in train])
    test_y = torch.tensor([WORDS.index(word) for _, word, _ in heldout])
    majority = (test_y == torch.bincount(train_y).argmax()).float().mean().item()
    rows = {"pictures": {"train": len(train), "heldout": len(heldout)}, "majority_word": majority, "probe": {}}
    for view in ("pixels", "codes", "encoder", "codes_anywhere", "encoder_anywhere"):
        accuracy = probe(features(train, view, tokenizer, encoder, args.size), train_y,
                         features(heldout, view, tokenizer, encoder, args.size), test_y)
        rows["probe"][view] = accuracy
        print(f"{view}: {100 * accuracy:.1f}%", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe_word.json", json.dumps(rows, indent=1) + "\n")
    error = lambda p: 100 * (p * (1 - p) / len(heldout)) ** 0.5  # noqa: E731
    print(f"| what the probe reads ({len(train)} training, {len(heldout)} held-out pictures with a word) | "
          "held-out word accuracy |\n|---|---|")
    names = {"pixels": "the cell's pixels", "codes": "the cell's vqtok codes (discrete path)",
             "encoder": "the encoder's patches over the cell (continuous path)",
             "codes_anywhere": "the whole picture's codes, as a bag (discrete path; the probe must find the word)",
             "encoder_anywhere": "every encoder patch of the picture (continuous path; must find the word)"}
    for view, accuracy in rows["probe"].items():
        print(f"| {names[view]} | {100 * accuracy:.1f}% ± {error(accuracy):.1f} |")
    print(f"| the commonest word (chance) | {100 * majority:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
