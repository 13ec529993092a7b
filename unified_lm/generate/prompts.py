"""Prompts for `unified-lm sample`: text and picture files -> `Prompt`s whose pictures are vqtok codes (or, for
the continuous encoder-adapter path, pixels for the model's image encoder).

A prompts file is JSONL, one prompt per line, in the documents format's segment style:

    {"segments": [{"image": "cat.png"}, {"text": "Question: what is this? Answer:"}], "seed": 3}
    {"text": "a red circle at the top left."}          (shorthand for one text segment)

Relative picture paths are resolved against the file's directory. Pictures are encoded at the resolution
that gives the model's picture grid (grid * the tokenizer's downsample factor), so a prompt picture has the
shape of the pictures the model was trained on.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from runkit.files import read_jsonl
from unified_lm.generate.segments import ContinuousPicture, Prompt
from unified_lm.tokens.documents import check_keys, unicode_text

PromptSpec = list  # segments: str (text) or Path (a picture file)


def read_prompt_file(path: str | os.PathLike) -> list[tuple[PromptSpec, int | None]]:
    path = Path(path)
    specs = []
    for where, record in read_jsonl(path, "prompts"):
        if not isinstance(record, dict) or ("segments" not in record and "text" not in record):
            raise ValueError(f"{where}: expected an object with 'segments' (or 'text')")
        check_keys(record, ("segments", "text", "seed"), where)
        segments = record.get("segments", [{"text": record.get("text")}])
        if not isinstance(segments, list) or not segments:
            raise ValueError(f"{where}: 'segments' must be a non-empty list")
        spec: PromptSpec = []
        for segment in segments:
            if isinstance(segment, dict) and len(segment) == 1 and isinstance(segment.get("text"), str):
                spec.append(unicode_text(segment["text"], where))
            elif isinstance(segment, dict) and len(segment) == 1 and isinstance(segment.get("image"), str):
                spec.append((path.parent / unicode_text(segment["image"], where)).resolve())
            else:
                raise ValueError(f"{where}: each segment must be {{\"text\": str}} or {{\"image\": path}}, got {segment!r}")
        seed = record.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: 'seed' must be an integer, got {seed!r}")
        specs.append((spec, seed))
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


def encode_pictures(paths: list[Path], tokenizer, grid: tuple[int, int] | None,
                    batch_size: int = 32) -> dict[Path, np.ndarray]:
    """Picture files -> (h, w) codes, encoded at grid * downsample factor (the tokenizer's resolution when the
    grid is unknown), `batch_size` at a time. Missing or unreadable files raise errors naming them."""
    from vqtok.images import load_rgb, preprocess, to_tensor

    if not paths:
        return {}
    if tokenizer is None:
        raise ValueError("the prompt holds pictures; give the vqtok tokenizer (--tokenizer VQRUN) to encode them")
    factor = tokenizer.downsample_factor
    if grid is not None and grid[0] != grid[1]:
        raise ValueError(f"prompt pictures are encoded square; the model's grid {grid[0]}x{grid[1]} is not")
    resolution = grid[0] * factor if grid is not None else tokenizer.config.model.resolution
    device = next(tokenizer.parameters()).device
    unique = list(dict.fromkeys(paths))
    for path in unique:
        if not Path(path).is_file():
            raise FileNotFoundError(f"prompt picture not found: {path}")
    codes = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        resample = tokenizer.config.model.resample  # Chameleon's tokenizer: Lanczos both ways
        pixels = torch.stack([to_tensor(preprocess(load_rgb(p), resolution, resample)) for p in chunk]).to(device)
        with torch.no_grad():
            codes.update(zip(chunk, tokenizer.encode(pixels).cpu().numpy()))
    return codes


def continuous_pictures(paths: list[Path], image_size: int) -> dict[Path, ContinuousPicture]:
    """Picture files -> pixels for the continuous path, square-cropped and resized to the encoder's input size
    (as `unified-lm prepare --encoder` stores them). Missing or unreadable files raise errors naming them."""
    from vqtok.images import load_rgb, preprocess, to_tensor

    pictures = {}
    for path in dict.fromkeys(paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"prompt picture not found: {path}")
        pictures[path] = ContinuousPicture(to_tensor(preprocess(load_rgb(path), image_size)))
    return pictures


def build_prompts(specs: list[tuple[PromptSpec, int | None]], tokenizer, grid: tuple[int, int] | None,
                  continuous_size: int | None = None) -> list[Prompt]:
    """Prompts whose pictures are vqtok codes, or, with `continuous_size` (the continuous path), pixels of that
    size for the model's image encoder."""
    paths = [s for spec, _ in specs for s in spec if isinstance(s, Path)]
    if continuous_size:
        pictures = continuous_pictures(paths, continuous_size)
    else:
        pictures = encode_pictures(paths, tokenizer, grid)
    return [Prompt([pictures[s] if isinstance(s, Path) else s for s in spec], seed) for spec, seed in specs]
