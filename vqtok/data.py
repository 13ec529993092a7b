"""Training and evaluation data for the tokenizer.

- `default_photo_paths()`: the embedded default photo set, read from the photographs bundled with scikit-image
  (public domain / CC0), split into training photos and held-out photos (whole photos, never crops of a
  training photo).
- `CropDataset` + `StepBatchSampler`: each training batch is a pure function of (seed, step, rank), so resuming
  at step s reproduces exactly the batches an uninterrupted run would have drawn, for any number of workers.
"""
from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .images import BadImageError, list_images, load_rgb, preprocess, resize_shorter_side, to_tensor

log = logging.getLogger(__name__)

# scikit-image's bundled photographs (synthetic pictures such as logo/horse/chessboard are left out).
DEFAULT_TRAIN_PHOTOS = (
    "astronaut.png", "brick.png", "cell.png", "clock_motion.png", "coins.png", "gravel.png",
    "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "text.png",
)
DEFAULT_HELDOUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "grass.png")


def default_photo_dir() -> Path:
    try:
        import skimage
    except ImportError:
        raise RuntimeError("the embedded default photo set needs scikit-image (pip install 'chameleon-lab[data]'); "
                           "or pass --data DIR") from None
    return Path(skimage.__file__).parent / "data"


def default_photo_paths(split: str = "train") -> list[Path]:
    """Paths of the default photos for split 'train', 'heldout' or 'all'."""
    names = {"train": DEFAULT_TRAIN_PHOTOS, "heldout": DEFAULT_HELDOUT_PHOTOS,
             "all": DEFAULT_TRAIN_PHOTOS + DEFAULT_HELDOUT_PHOTOS}
    if split not in names:
        raise ValueError(f"unknown split {split!r}; use train, heldout or all")
    root = default_photo_dir()
    paths = [root / name for name in names[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"default photos missing from scikit-image: {missing}")
    return paths


def resolve_image_paths(data: str | os.PathLike | None, split: str = "train") -> list[Path]:
    """--data DIR (recursive image folder or one file), or the default photos when None."""
    if data is None:
        return default_photo_paths(split)
    paths = list_images(data)
    if not paths:
        raise FileNotFoundError(f"no image files (by extension) under {data}")
    return paths


class CropDataset(torch.utils.data.Dataset):
    """Random training crops: shorter side resized to resolution * U(scale_range), random crop, random h-flip,
    and (optionally) a random RGB channel permutation, which multiplies the colours a small photo set covers
    (a reconstruction objective has no reason to prefer the original channel order).

    Items are requested as (image_index, augmentation_seed) pairs so the crop is reproducible. Decoded,
    pre-shrunk images are cached per worker (bounded) because photos are decoded far more often than they
    change. Bad files are logged once and replaced by the next usable image, never crash a long run.
    """

    def __init__(self, paths: list[Path], resolution: int, crop_size: int, scale_range=(1.0, 1.5),
                 permute_channels: bool = False, cache_images: int = 256):
        if not paths:
            raise ValueError("CropDataset needs at least one image")
        self.paths = list(paths)
        self.resolution = resolution
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.permute_channels = permute_channels
        self.bad: set[int] = set()
        self._decode = lru_cache(maxsize=cache_images)(self._decode_uncached)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode_uncached(self, index: int) -> np.ndarray:
        # Keep the largest scale this dataset can ask for, so later resizes only ever shrink.
        image = load_rgb(self.paths[index])
        largest = math.ceil(self.resolution * self.scale_range[1])
        if min(image.shape[:2]) > largest:
            image = resize_shorter_side(image, largest)
        return image

    def _usable(self, index: int) -> np.ndarray:
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            if candidate in self.bad:
                continue
            try:
                return self._decode(candidate)
            except BadImageError as err:
                self.bad.add(candidate)
                log.warning("skipping training image %s", err)
        raise RuntimeError(f"none of the {len(self.paths)} training images could be read")

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        rng = np.random.default_rng(seed)
        image = self._usable(index)
        shorter = max(self.crop_size, round(self.resolution * rng.uniform(*self.scale_range)))
        image = resize_shorter_side(image, shorter)
        height, width = image.shape[:2]
        top = int(rng.integers(0, height - self.crop_size + 1))
        left = int(rng.integers(0, width - self.crop_size + 1))
        crop = image[top : top + self.crop_size, left : left + self.crop_size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if self.permute_channels:
            crop = crop[..., rng.permutation(3)]
        return to_tensor(crop)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start..steps-1, this rank's share of the global batch as (index, seed) pairs.

    Global sample number p = step * global_batch + slot walks through a fresh permutation per epoch
    (epoch = p // N), so every image is seen once per epoch; ranks take disjoint slots of each global batch.
    """

    def __init__(self, num_images: int, global_batch: int, steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.num_images, self.global_batch, self.steps = num_images, global_batch, steps
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        per_rank = self.global_batch // self.world_size
        items = []
        for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            position = step * self.global_batch + slot
            epoch, offset = divmod(position, self.num_images)
            items.append((int(self._permutation(epoch)[offset]), int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])))
        return items

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield self.batch(step)


def load_eval_images(paths: list[Path], resolution: int) -> tuple[torch.Tensor, list[Path], list[BadImageError]]:
    """Held-out images at the tokenizer's view (shorter side -> resolution, centre crop): (N, 3, R, R) in [-1, 1]."""
    tensors, kept, bad = [], [], []
    for path in paths:
        try:
            tensors.append(to_tensor(preprocess(load_rgb(path), resolution)))
            kept.append(path)
        except BadImageError as err:
            bad.append(err)
    if not tensors:
        raise RuntimeError(f"none of the {len(paths)} evaluation images could be read")
    return torch.stack(tensors), kept, bad

