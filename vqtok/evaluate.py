"""`vqtok eval`: reconstruction quality, codebook health and code stability of a trained tokenizer.

Reports PSNR and SSIM (mean over images), codebook usage (fraction of codes that appear at least once on the
evaluation set) and code perplexity, and LPIPS when real trunk weights exist. Usage on a small evaluation set
is bounded by tokens / codebook_size, so that bound is reported beside it.

Usage says nothing about whether a model can learn the codes, so beside it (vqtok.metrics):
- stability_noise: share of codes unchanged when every pixel value moves by +-1/255 (random sign);
- stability_reencode: share of codes unchanged when the tokenizer's own reconstruction (saved as 8-bit pixels,
  as a generated picture is) is encoded again;
- with `labels` (what each region of each picture shows, `--labels FILE`): H(code | content) and
  H(content | code) in nats, and the share of tokens carrying their content's most frequent code.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from runkit.files import read_jsonl

from .checkpoint import load_tokenizer
from .data import load_eval_images, resolve_image_paths
from .losses import build_lpips, find_lpips_trunk
from .metrics import agreement, code_statistics, conditional_entropy, psnr, ssim, token_labels


def perturb(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] with every value moved one 8-bit level (1/255 of the range) up or down at
    random (seeded), clamped to the range: an imperceptible change that a stable tokenizer ignores."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU, so the noise is the same on every device
    signs = torch.randint(0, 2, images.shape, generator=generator, dtype=torch.int8).float() * 2 - 1
    return (images + signs.to(images.device) * (2 / 255)).clamp(-1, 1)


def as_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] pictures to the 256 levels a PNG stores (and back to [-1, 1])."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def reconstruction_metrics(model, images: torch.Tensor, batch_size: int = 8, lpips_model=None,
                           labels: list[list[list[str]]] | None = None) -> dict:
    """images (N, 3, R, R) in [-1, 1] -> PSNR/SSIM (mean over images, dB / unitless), codebook usage and code
    perplexity, code stability (module docstring) of a VQModel (trained or not: the untrained model is the
    baseline in `unified-lm eval`). labels: per image, a grid of region labels (`metrics.token_labels`), for the
    conditional entropies of codes and content."""
    device = next(model.parameters()).device
    psnrs, ssims, lpips_values, indices, reconstructions, noisy, reencoded = [], [], [], [], [], [], []
    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size].to(device)
        codes = model.encode(batch)
        reconstruction = model.decode(codes).clamp(-1, 1)
        indices.append(codes.cpu())
        reconstructions.append(reconstruction.cpu())
        noisy.append(model.encode(perturb(batch, seed=first)).cpu())
        reencoded.append(model.encode(as_8bit(reconstruction)).cpu())
        psnrs.append(psnr(batch, reconstruction).cpu())
        ssims.append(ssim(batch, reconstruction).cpu())
        if lpips_model is not None:
            lpips_values.append(lpips_model.to(device)(batch, reconstruction).flatten().cpu())
    codes = torch.cat(indices)
    stats = code_statistics(codes, model.codebook_size)
    metrics = {
        "images": len(images), "grid": list(codes.shape[1:]),
        "psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
        "lpips": float(torch.cat(lpips_values).mean()) if lpips_values else None,
        "codebook_usage": stats["usage"], "used_codes": stats["used_codes"], "code_perplexity": stats["perplexity"],
        "tokens": stats["tokens"], "usage_upper_bound": min(1.0, stats["tokens"] / model.codebook_size),
        "stability_noise": agreement(codes, torch.cat(noisy)),
        "stability_reencode": agreement(codes, torch.cat(reencoded)),
    }
    if labels is not None:
        if len(labels) != len(codes):
            raise ValueError(f"{len(labels)} label grids for {len(codes)} pictures")
        grid = tuple(codes.shape[1:])
        content = conditional_entropy(codes, [label for cells in labels for label in token_labels(cells, grid)])
        metrics["content"] = content
    metrics["reconstructions"] = torch.cat(reconstructions)  # (N, 3, R, R) in [-1, 1]; callers drop it before JSON
    return metrics


def read_region_labels(path: str | os.PathLike) -> dict[Path, list[list[str]]]:
    """A labels file: JSONL, one picture per line, {"image": PATH (relative to the file), "cells": [[LABEL, ...],
    ...]}, a rectangular grid of strings naming what each region of the picture shows (`unified-lm world` writes
    one for its pictures). Returns resolved image path -> cells; every problem names the file and line."""
    labels: dict[Path, list[list[str]]] = {}
    for where, record in read_jsonl(path, "labels"):
        if not isinstance(record, dict) or set(record) != {"image", "cells"} or not isinstance(record["image"], str):
            raise ValueError(f"{where}: expected exactly {{\"image\": PATH, \"cells\": [[LABEL, ...], ...]}}")
        cells = record["cells"]
        if (not isinstance(cells, list) or not cells or not all(isinstance(row, list) for row in cells)
                or len({len(row) for row in cells}) != 1 or not cells[0]
                or not all(isinstance(label, str) for row in cells for label in row)):
            raise ValueError(f"{where}: 'cells' must be a non-empty rectangular grid of strings")
        labels[(Path(path).parent / record["image"]).resolve()] = cells
    if not labels:
        raise ValueError(f"{path}: no labelled pictures")
    return labels


@torch.no_grad()
def evaluate(ckpt: str | os.PathLike, data: str | os.PathLike | None = None, batch_size: int = 8,
             device: str | None = None, lpips_weights: str | None = None, lpips_net: str = "vgg",
             labels: str | os.PathLike | None = None, resolution: int | None = None) -> dict:
    """`labels`: a region-labels file (`read_region_labels`); its pictures are the evaluation set, and the
    conditional entropies of codes and content are added. `resolution`: encode at this size (default: the
    tokenizer's)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_tokenizer(ckpt, device)
    resolution = resolution or model.config.model.resolution
    region_labels = read_region_labels(labels) if labels else None
    if region_labels is not None and data is not None:
        raise ValueError("give --data or --labels (whose pictures are then evaluated), not both")
    paths = list(region_labels) if region_labels is not None else resolve_image_paths(data, split="heldout")
    images, kept, bad = load_eval_images(paths, resolution)
    lpips_model = build_lpips(lpips_net, lpips_weights) if lpips_weights or find_lpips_trunk(lpips_net) else None
    start = time.perf_counter()
    metrics = reconstruction_metrics(model, images, batch_size, lpips_model,
                                     [region_labels[p] for p in kept] if region_labels is not None else None)
    metrics.pop("reconstructions")
    seconds = time.perf_counter() - start
    return {
        "checkpoint": str(ckpt), "step": meta.get("step"), "tokenizer": meta["tokenizer"],
        "data": str(labels or data or "default held-out photos"),
        "bad_files": [{"source": e.path, "reason": e.reason} for e in bad],
        "resolution": resolution, **metrics,
        "lpips_note": None if metrics["lpips"] is not None else "LPIPS not computed: no real trunk weights (torch hub cache or --lpips-weights)",
        "seconds": seconds, "images_per_second": len(kept) / seconds if seconds else None,
    }
