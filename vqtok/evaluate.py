"""`vqtok eval`: reconstruction quality and codebook health of a trained tokenizer on held-out images.

Reports PSNR and SSIM (mean over images), codebook usage (fraction of codes that appear at least once on the
evaluation set) and code perplexity, and LPIPS when real trunk weights exist. Usage on a small evaluation set
is bounded by tokens / codebook_size, so that bound is reported beside it.
"""
from __future__ import annotations

import os
import time

import torch

from .checkpoint import load_tokenizer
from .data import load_eval_images, resolve_image_paths
from .losses import build_lpips, find_lpips_trunk
from .metrics import code_statistics, psnr, ssim


@torch.no_grad()
def reconstruction_metrics(model, images: torch.Tensor, batch_size: int = 8, lpips_model=None) -> dict:
    """images (N, 3, R, R) in [-1, 1] -> PSNR/SSIM (mean over images, dB / unitless), codebook usage and code
    perplexity of a VQModel (trained or not: the untrained model is the baseline in `unified-lm eval`)."""
    device = next(model.parameters()).device
    psnrs, ssims, lpips_values, indices, reconstructions = [], [], [], [], []
    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size].to(device)
        codes = model.encode(batch)
        reconstruction = model.decode(codes).clamp(-1, 1)
        indices.append(codes.cpu())
        reconstructions.append(reconstruction.cpu())
        psnrs.append(psnr(batch, reconstruction).cpu())
        ssims.append(ssim(batch, reconstruction).cpu())
        if lpips_model is not None:
            lpips_values.append(lpips_model.to(device)(batch, reconstruction).flatten().cpu())
    stats = code_statistics(torch.cat(indices), model.codebook_size)
    return {
        "images": len(images), "grid": list(indices[0].shape[1:]),
        "psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
        "lpips": float(torch.cat(lpips_values).mean()) if lpips_values else None,
        "codebook_usage": stats["usage"], "used_codes": stats["used_codes"], "code_perplexity": stats["perplexity"],
        "tokens": stats["tokens"], "usage_upper_bound": min(1.0, stats["tokens"] / model.codebook_size),
        "reconstructions": torch.cat(reconstructions),  # (N, 3, R, R) in [-1, 1]; callers drop it before JSON
    }


@torch.no_grad()
def evaluate(ckpt: str | os.PathLike, data: str | os.PathLike | None = None, batch_size: int = 8,
             device: str | None = None, lpips_weights: str | None = None, lpips_net: str = "vgg") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_tokenizer(ckpt, device)
    paths = resolve_image_paths(data, split="heldout")
    images, kept, bad = load_eval_images(paths, model.config.model.resolution)
    lpips_model = build_lpips(lpips_net, lpips_weights) if lpips_weights or find_lpips_trunk(lpips_net) else None
    start = time.perf_counter()
    metrics = reconstruction_metrics(model, images, batch_size, lpips_model)
    metrics.pop("reconstructions")
    seconds = time.perf_counter() - start
    return {
        "checkpoint": str(ckpt), "step": meta.get("step"), "tokenizer": meta["tokenizer"],
        "data": str(data) if data else "default held-out photos",
        "bad_files": [{"source": e.path, "reason": e.reason} for e in bad],
        "resolution": model.config.model.resolution, **metrics,
        "lpips_note": None if metrics["lpips"] is not None else "LPIPS not computed: no real trunk weights (torch hub cache or --lpips-weights)",
        "seconds": seconds, "images_per_second": len(kept) / seconds if seconds else None,
    }
