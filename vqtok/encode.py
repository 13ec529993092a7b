"""`vqtok encode` / `vqtok decode`: images <-> token store, batched, resumable, multi-process.

encode: every rank lists the same sorted files, drops those any earlier run already encoded, takes every
world_size-th of the rest, and appends to its own shards; rank 0 writes the manifest once all ranks finish.
Bad files are listed with their reason and never stop the run.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runkit.distributed import DistributedContext, setup_distributed
from runkit.files import confined

from .checkpoint import load_tokenizer
from .config import BOUNDS
from .images import BadImageError, atomic_save_png, list_images, load_rgb, preprocess, to_tensor, to_uint8
from .token_store import ShardWriter, TokenStore, encoded_sources, write_failures, write_manifest

log = logging.getLogger(__name__)
MAX_RESOLUTION = BOUNDS["model.resolution"][1]


@dataclass
class EncodeSummary:
    encoded: int = 0  # images encoded by this run (all ranks when read from rank 0's manifest)
    skipped: int = 0  # already in the store from an earlier run
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    total_in_store: int = 0
    rank: int = 0  # the process that produced this summary; rank 0's covers every rank

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


class _EncodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], sources: list[str], resolution: int, resample: str = "auto"):
        self.paths, self.sources, self.resolution, self.resample = paths, sources, resolution, resample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.sources[index], to_tensor(preprocess(load_rgb(self.paths[index]), self.resolution, self.resample)), None
        except BadImageError as err:
            return self.sources[index], None, err.reason


def _collate(items):
    return items


def _relative_sources(paths: list[Path], root: Path) -> list[str]:
    base = root if root.is_dir() else root.parent
    return [p.relative_to(base).as_posix() for p in paths]


def encode_images(images: str | os.PathLike, ckpt: str | os.PathLike, out: str | os.PathLike, batch_size: int = 16,
                  device: str | None = None, num_workers: int = 0, shard_tokens: int | None = None,
                  progress: bool = True, context: DistributedContext | None = None,
                  resolution: int | None = None) -> EncodeSummary:
    """resolution: square side images are resized/cropped to before encoding (default: the tokenizer's); the
    tokenizer is fully convolutional, so e.g. 64 px pictures give (64 / f)^2 tokens each."""
    context = context or setup_distributed(device)
    start = time.perf_counter()
    model, meta = load_tokenizer(ckpt, context.device)
    resolution = resolution or model.config.model.resolution
    if not 0 < resolution <= MAX_RESOLUTION:
        raise ValueError(f"--resolution {resolution} must be in [1, {MAX_RESOLUTION}] pixels")
    if resolution % model.config.model.downsample_factor:
        raise ValueError(f"--resolution {resolution} must be a multiple of the tokenizer's downsampling factor "
                         f"{model.config.model.downsample_factor}")
    root = Path(images)
    paths = list_images(root)
    sources = _relative_sources(paths, root)
    writer_kwargs = {"shard_tokens": shard_tokens} if shard_tokens else {}
    if context.is_main:  # create store.json before anyone else looks at it
        ShardWriter(out, meta["tokenizer"], model.codebook_size, rank=0, **writer_kwargs).close()
    context.barrier()
    writer = ShardWriter(out, meta["tokenizer"], model.codebook_size, rank=context.rank, **writer_kwargs)
    context.barrier()  # every rank repaired its shards before anyone reads the indexes
    done = encoded_sources(out)
    context.barrier()
    todo = [(p, s) for p, s in zip(paths, sources) if s not in done]
    mine = todo[context.rank :: context.world_size]
    summary = EncodeSummary(skipped=len(paths) - len(todo), rank=context.rank)
    dataset = _EncodeDataset([p for p, _ in mine], [s for _, s in mine], resolution, model.config.model.resample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    bar = _Progress(len(mine), progress and context.is_main)
    try:
        for batch in loader:
            good = [(source, tensor) for source, tensor, _ in batch if tensor is not None]
            for source, _, reason in batch:
                if reason is not None:
                    summary.failures.append({"source": source, "reason": reason})
                    log.warning("cannot encode %s: %s", source, reason)
            if good:
                codes = model.encode(torch.stack([t for _, t in good]).to(context.device))
                writer.append([s for s, _ in good], codes.cpu().numpy())
                summary.encoded += len(good)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    write_failures(out, context.rank, summary.failures)
    if context.enabled:  # rank 0 reports the whole job
        count = torch.tensor([summary.encoded])
        torch.distributed.all_reduce(count)
        summary.encoded = int(count)
    summary.seconds = time.perf_counter() - start
    if context.is_main:
        manifest = write_manifest(out, context.world_size, {"source_root": str(root.resolve()), "resolution": resolution})
        summary.total_in_store = manifest["num_images"]
        summary.failures = manifest["failures"]
    return summary


class _Progress:
    """Minimal progress line on stderr (tqdm when available)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_store_matches(store: TokenStore, meta: dict, ckpt: str | os.PathLike, same_weights: bool = True) -> None:
    """Refuse to decode tokens with a tokenizer other than the one that wrote them (or, with
    same_weights=False, at least one with the same codebook size)."""
    mine, theirs = meta["tokenizer"], store.tokenizer
    if store.codebook_size != mine["codebook_size"]:
        raise ValueError(f"token store {store.root} has codebook size {store.codebook_size} but tokenizer {ckpt} has "
                         f"{mine['codebook_size']}")
    if same_weights and theirs.get("weights_sha256") != mine.get("weights_sha256"):
        raise ValueError(f"token store {store.root} was written by tokenizer weights {theirs.get('weights_sha256', '?')[:12]}, "
                         f"not by {ckpt} ({mine['weights_sha256'][:12]}); pass --allow-other-tokenizer to decode anyway")


def decode_store(tokens: str | os.PathLike, ckpt: str | os.PathLike, out: str | os.PathLike, batch_size: int = 16,
                 device: str | None = None, allow_other_tokenizer: bool = False, progress: bool = True) -> int:
    """Write one PNG per stored image (source path with .png); existing outputs are kept. Returns PNGs written.
    Every output path is checked before the first is written: a source name leading out of `out` (absolute,
    `..`, a symlink) is refused, naming the store and the name."""
    context = setup_distributed(device)
    store = TokenStore(tokens)
    model, meta = load_tokenizer(ckpt, context.device)
    check_store_matches(store, meta, ckpt, same_weights=not allow_other_tokenizer)
    out = Path(out)
    targets = [confined(out, str(Path(source).with_suffix("")) + ".png", f"token store {store.root}: source")
               for source in store.sources]
    pending = [i for i in range(len(store))[context.rank :: context.world_size] if not targets[i].exists()]
    by_grid: dict[tuple[int, int], list[int]] = {}
    for index in pending:
        by_grid.setdefault(store[index].grid, []).append(index)
    written = 0
    bar = _Progress(len(pending), progress and context.is_main)
    for grid, indices in by_grid.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            codes = torch.from_numpy(np.stack([store[i].tokens.astype(np.int64).reshape(grid) for i in chunk]))
            if codes.numel() and int(codes.max()) >= model.codebook_size:
                bad = next(i for i in chunk if int(store[i].tokens.max()) >= model.codebook_size)
                raise ValueError(f"token store {store.root}: {store.sources[bad]!r} holds code "
                                 f"{int(store[bad].tokens.max())}, outside the tokenizer's {model.codebook_size} codes")
            pictures = to_uint8(model.decode(codes.to(context.device)))
            for index, picture in zip(chunk, pictures):
                atomic_save_png(picture, targets[index])
                written += 1
            bar.update(len(chunk))
    bar.close()
    context.barrier()
    return written
