"""Training and evaluation data for the tokenizer.

- `default_photo_paths()`: the embedded default photo set, read from the photographs bundled with scikit-image
  (public domain / CC0), split into training photos and held-out photos (whole photos, never crops of a
  training photo).
- `resolve_sources()`: `--data DIR[@RES]` specs (repeatable) -> `ImageSource`s, each with its own scale.
- `CropDataset` + `StepBatchSampler`: each training batch is a pure function of (seed, step, rank), so resuming
  at step s reproduces exactly the batches an uninterrupted run would have drawn, for any number of workers.
  With several sources every source gets an equal share of the samples, whatever its number of files.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from runkit.batches import epoch_permutation

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


# Only a trailing "@<digits>" is a resolution, so folders such as "shots@home/" still work as plain paths.
_RESOLUTION_SUFFIX = re.compile(r"^(.*)@([0-9]+)$", re.DOTALL)


@dataclass(frozen=True)
class ImageSource:
    """One training source: its image files and the scale its crops are taken at.

    `resolution` (pixels) fixes the shorter side every image of the source is resized to before the crop
    (no scale jitter): use the size the images will be encoded at, e.g. 64 for 64 px pictures. None means the
    config's `model.resolution * U(train.scale_range)`, the right view of large photos.
    """

    name: str  # what the user wrote (folder or file), shown in errors and recorded with the run
    paths: tuple[Path, ...]
    resolution: int | None = None

    def describe(self) -> dict:
        return {"path": self.name, "resolution": self.resolution, "images": len(self.paths)}


def parse_data_spec(spec: str) -> tuple[str, int | None]:
    """`DIR` -> (DIR, None); `DIR@RES` -> (DIR, RES), RES a positive number of pixels.

    Only a trailing `@<digits>` is read as a resolution; any other '@' belongs to the path.
    Raises ValueError naming the spec when DIR is missing or RES is 0.
    """
    if not spec:
        raise ValueError("--data '': empty path (expected DIR or DIR@RES, e.g. photos/ or pictures/@64)")
    match = _RESOLUTION_SUFFIX.match(spec)
    if match is None:
        return spec, None
    path, digits = match.groups()
    if not path:
        raise ValueError(f"--data {spec!r}: missing DIR before '@{digits}' (expected DIR@RES, e.g. pictures/@64)")
    resolution = int(digits)
    if resolution <= 0:
        raise ValueError(f"--data {spec!r}: the resolution after '@' must be a positive number of pixels, got {digits}")
    return path, resolution


def resolve_sources(specs: Sequence[str] | None, split: str = "train") -> list[ImageSource]:
    """`--data` specs (each `DIR` or `DIR@RES`; DIR a recursive image folder or one file) -> ImageSources,
    in the order given. None or [] -> the embedded default photos (one source at the config's scale).

    Raises ValueError for a malformed spec and FileNotFoundError for a missing path or a folder without
    images, naming the spec.
    """
    if not specs:
        return [ImageSource(f"(embedded default photos, {split})", tuple(default_photo_paths(split)))]
    sources = []
    for spec in specs:
        spec = str(spec)
        path, resolution = parse_data_spec(spec)
        if not os.path.lexists(path):
            hint = ""
            if "@" in spec and resolution is None:
                hint = f"; a resolution suffix is '@' followed by digits (pixels), e.g. {spec.rsplit('@', 1)[0]}@64"
            raise FileNotFoundError(f"--data {spec!r}: no such file or folder: {path}{hint}")
        paths = list_images(path)
        if not paths:
            raise FileNotFoundError(f"--data {spec!r}: no image files (by extension) under {path}")
        sources.append(ImageSource(path, tuple(paths), resolution))
    return sources


def check_crop_fits(sources: Sequence[ImageSource], crop_size: int) -> None:
    """Refuse a fixed-resolution source smaller than the crop.

    Enlarging it to crop_size would silently train it at a scale it is never encoded at, which is what a
    fixed resolution exists to prevent; so the user picks: a smaller crop (all sources) or a larger @RES.
    """
    for source in sources:
        if source.resolution is not None and source.resolution < crop_size:
            raise ValueError(f"--data {source.name}@{source.resolution}: train.crop_size={crop_size} px is larger than "
                             f"the source's resolution {source.resolution} px; crops must fit in the resized image: "
                             f"use --set train.crop_size=N with N <= {source.resolution} (a multiple of the "
                             "downsample factor), or a larger @RES")


class CropDataset(torch.utils.data.Dataset):
    """Random training crops: shorter side resized to resolution * U(scale_range), random crop, random h-flip,
    and (optionally) a random RGB channel permutation, which multiplies the colours a small photo set covers
    (a reconstruction objective has no reason to prefer the original channel order).

    `sources` is a list of image paths (one source at the config's scale) or of `ImageSource`s. The images of
    a source with a fixed `resolution` R are resized so their shorter side is exactly R pixels (no jitter)
    before the same random crop / flip / permutation; R must be >= crop_size. Images are indexed 0..N-1 with
    the sources concatenated in order (`source_sizes` gives each source's count, for `StepBatchSampler`).

    Items are requested as (image_index, augmentation_seed) pairs so the crop is reproducible. Decoded,
    pre-shrunk images are cached per worker (bounded) because photos are decoded far more often than they
    change. Bad files are logged once and replaced by the next usable image of the same source (so the
    replacement is seen at the right scale), never crash a long run.
    """

    def __init__(self, sources: Sequence[Path] | Sequence[ImageSource], resolution: int, crop_size: int,
                 scale_range=(1.0, 1.5), permute_channels: bool = False, cache_images: int = 256):
        if sources and not all(isinstance(s, ImageSource) for s in sources):
            sources = [ImageSource(os.path.commonpath([str(p) for p in sources]), tuple(Path(p) for p in sources))]
        if not sources or not all(source.paths for source in sources):
            raise ValueError("CropDataset needs at least one image (in every source)")
        check_crop_fits(sources, crop_size)
        self.sources = list(sources)
        self.paths = [path for source in self.sources for path in source.paths]
        self.source_sizes = [len(source.paths) for source in self.sources]
        self._starts = np.cumsum([0] + self.source_sizes[:-1]).tolist()
        self._source_of = np.repeat(np.arange(len(self.sources)), self.source_sizes)
        self.resolution = resolution
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.permute_channels = permute_channels
        self.bad: set[int] = set()
        self._decode = lru_cache(maxsize=cache_images)(self._decode_uncached)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> list[dict]:
        """[{path, resolution (pixels or None), images}] per source, as recorded with the run."""
        return [source.describe() for source in self.sources]

    def interleaved_index(self, i: int) -> int:
        """The i-th image when taking the sources in turn (image i // K of source i % K, K sources): a balanced,
        deterministic order for passes that do not go through the sampler (k-means init). One source: i % N."""
        source, turn = i % len(self.sources), i // len(self.sources)
        return self._starts[source] + turn % self.source_sizes[source]

    def _decode_uncached(self, index: int) -> np.ndarray:
        image = load_rgb(self.paths[index])
        fixed = self.sources[self._source_of[index]].resolution
        if fixed is not None:  # the only size this image is ever cropped at: resize once, here
            return resize_shorter_side(image, fixed)
        # Keep the largest scale this dataset can ask for, so later resizes only ever shrink.
        largest = math.ceil(self.resolution * self.scale_range[1])
        if min(image.shape[:2]) > largest:
            image = resize_shorter_side(image, largest)
        return image

    def _usable(self, index: int) -> tuple[int, np.ndarray]:
        source = int(self._source_of[index])
        start, size = self._starts[source], self.source_sizes[source]
        for offset in range(size):
            candidate = start + (index - start + offset) % size
            if candidate in self.bad:
                continue
            try:
                return candidate, self._decode(candidate)
            except BadImageError as err:
                self.bad.add(candidate)
                log.warning("skipping training image %s", err)
        raise RuntimeError(f"none of the {size} training images of {self.sources[source].name} could be read")

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        rng = np.random.default_rng(seed)
        index, image = self._usable(index)
        fixed = self.sources[self._source_of[index]].resolution
        if fixed is None:
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

    `num_images` is an image count (one source) or the list of per-source counts (`CropDataset.source_sizes`;
    image indices are the sources concatenated in order). Global sample number p = step * global_batch + slot.

    One source: p walks through a fresh permutation per epoch (epoch = p // N), so every image is seen once
    per epoch. K > 1 sources, balanced by stratified rounds: samples K*r .. K*r+K-1 form round r, which holds
    exactly one sample of every source, in an order drawn per round. So each source gets 1/K of the samples
    (exactly, per K consecutive samples) whatever its size, and its q-th sample is in round q: it walks its own
    permutation per its own epoch (q // N_k), small sources repeating more often than large ones. Passing the
    same folder twice gives it twice the share. Everything is a function of (seed, p), so resume is exact.
    Ranks take disjoint slots of each global batch.
    """

    def __init__(self, num_images: int | Sequence[int], global_batch: int, steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.sizes = [int(num_images)] if np.ndim(num_images) == 0 else [int(n) for n in num_images]
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"every source needs at least one image, got sizes {self.sizes}")
        self.num_images, self.global_batch, self.steps = sum(self.sizes), global_batch, steps
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size
        self._starts = np.cumsum([0] + self.sizes[:-1]).tolist()
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation): the current epoch only
        self._order_round, self._order = -1, None

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            # One source keeps its historical seeding, so single-source runs draw the same batches as before.
            key = [self.seed, epoch] if len(self.sizes) == 1 else [self.seed, epoch, 1 + source]
            cached = (epoch, epoch_permutation(self.sizes[source], key))
            self._perms[source] = cached
        return cached[1]

    def index(self, position: int) -> int:
        """The image index of global sample number `position`."""
        if len(self.sizes) == 1:
            epoch, offset = divmod(position, self.sizes[0])
            return int(self._permutation(0, epoch)[offset])
        round_, turn = divmod(position, len(self.sizes))
        if round_ != self._order_round:
            # A fresh source order per round, so a fixed slot (e.g. one rank's) does not always get the same source.
            self._order = np.random.default_rng([self.seed, round_, len(self.sizes), 0x5EED]).permutation(len(self.sizes))
            self._order_round = round_
        source = int(self._order[turn])
        epoch, offset = divmod(round_, self.sizes[source])
        return self._starts[source] + int(self._permutation(source, epoch)[offset])

    def batch(self, step: int) -> list[tuple[int, int]]:
        per_rank = self.global_batch // self.world_size
        items = []
        for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            position = step * self.global_batch + slot
            items.append((self.index(position), int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])))
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

