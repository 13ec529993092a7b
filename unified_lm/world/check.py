"""Reads a picture of the procedural world (unified_lm.world) back into facts, to score generated pictures.

Why it exists: text -> image quality in this world is exact, not a matter of taste. A caption asks for a
scene; the model draws a picture (decoded by the VQ tokenizer, so blurry, noisy, a little colour-shifted);
this module reads the picture back, cell by cell, and says which of the asked-for facts it shows.

It learns nothing. Everything it compares against comes from the world's own renderer and ground truth:
    1. split the picture into the 3x3 grid (float cell bounds, so 64 px pictures split as the renderer does);
    2. estimate the background (the picture's median colour) and remove a global tint;
    3. a cell is empty when its ink area (soft distance from the background) is well under the smallest
       thing the world draws (the word HI, ~5% of a cell; the smallest shape covers ~16%);
    4. ink that is grey (no hue) is a word, anything with hue is an object;
    5. an object's colour is the palette colour nearest the median of its strongest ink pixels;
    6. shape and size (or which word) are the template - a single object (or word) rendered by the world in
       that cell at this picture size - whose ink coverage correlates best with the cell's, searching over
       shifts of up to MAX_SHIFT pixels and a few blurs, so a displaced or soft shape still reads.

    reading = read_picture(pixels)          # (H, W, 3) uint8, square, H >= 24
    reading.to_scene()                      # best-effort Scene
    score_picture(reading, scene)           # {"position": .., "colour": .., ..., "exact": ..}
    aggregate([...]) / shuffled_scores(...) # averages, and the chance baseline (readings vs other scenes)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from unified_lm.world.corpus import (
    BACKGROUND_RGB,
    CELLS,
    COLOUR_RGB,
    SHAPES,
    SIZES,
    WORD_RGB,
    WORDS,
    Scene,
    WorldObject,
    render_scene,
    scene_facts,
)

MIN_SIZE = 24           # pixels per side: 8 per cell, below which the world's shapes are a few pixels
INK_START = 40.0        # RGB distance from the background where ink starts (at least; more in a noisy picture)
INK_RAMP = 120.0        # ... and how much further it is solid ink (every palette colour is > 220 away)
NOISE_SIGMAS = 4.0      # ink starts at least this many noise standard deviations from the background
EMPTY_AREA = 0.025      # ink area (fraction of a cell) under which a cell is empty: half the word HI's
GREY_RATIO = 0.2        # hue / distance of a word's ink is ~0.03; the greyest colour (green) is ~0.34
MAX_SHIFT = 2           # template search over +-2 px shifts in each direction ...
BLURS = (0.0, 1.0, 2.0)  # ... and over these Gaussian blurs (px): a decoded picture is softer than a render
BACKGROUND_TRUST = 60.0  # a median colour further than this from the background is not a world background
CORE_INSET = 0.1        # emptiness, word-or-object and colour look only this far (fraction of a cell) inside
                        # the cell: a large neighbour's blurred, shifted edge can reach across the border

_BACKGROUND = np.array(BACKGROUND_RGB, dtype=np.float32)
_TEMPLATE_OBJECTS = tuple((shape, size) for shape in SHAPES for size in SIZES)
_SHIFTS = tuple((dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1) for dx in range(-MAX_SHIFT, MAX_SHIFT + 1))


@dataclass(frozen=True)
class CellReading:
    kind: str                  # "empty" | "object" | "word"
    shape: str | None = None   # shape, colour and size are set for an object only
    colour: str | None = None
    size: str | None = None
    word: str | None = None    # set for a word only


@dataclass(frozen=True)
class PictureReading:
    cells: tuple[CellReading, ...]  # 9, in CELLS order

    @property
    def objects(self) -> tuple[WorldObject, ...]:
        return tuple(WorldObject(c.shape, c.colour, c.size, cell) for cell, c in zip(CELLS, self.cells)
                     if c.kind == "object")

    def to_scene(self) -> Scene:
        """The scene the picture shows. A word is kept only if exactly one cell reads as one."""
        words = [(c.word, cell) for cell, c in zip(CELLS, self.cells) if c.kind == "word"]
        word, word_cell = words[0] if len(words) == 1 else (None, None)
        return Scene(self.objects, word, word_cell)


# -----------------------------------------------------------------------------
# Templates: the world's own renderer, one thing per cell

def _cell_bounds(size: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) pixel bounds of each cell, in CELLS order; cells are size/3 wide (float)."""
    edges = [round(i * size / 3) for i in range(4)]
    return [(edges[r], edges[r + 1], edges[c], edges[c + 1]) for r in range(3) for c in range(3)]


def _coverage(diff: np.ndarray, ink_rgb) -> np.ndarray:
    """Fraction of each pixel covered by ink of `ink_rgb`, from its difference to the background (..., 3):
    an anti-aliased pixel is a*ink + (1-a)*background, so `a` is the projection onto ink - background."""
    direction = np.asarray(ink_rgb, dtype=np.float32) - _BACKGROUND
    return np.clip(diff @ direction / (direction @ direction), 0.0, 1.0)


def _shifted_crops(coverage: np.ndarray, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """The cell's crop of a full-picture coverage map at every shift in _SHIFTS: (len(_SHIFTS), h, w)."""
    top, bottom, left, right = bounds
    m = MAX_SHIFT
    padded = np.pad(coverage, m)  # blank beyond the picture's edge
    return np.stack([padded[top + m + dy:bottom + m + dy, left + m + dx:right + m + dx] for dy, dx in _SHIFTS])


def _normalised(maps: np.ndarray) -> np.ndarray:
    """(n, h, w) -> (n, h*w), each row centred and of unit length, so a dot product is a correlation."""
    flat = maps.reshape(len(maps), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)


@lru_cache(maxsize=4)
def _templates(size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per cell, normalised coverage maps of one thing rendered by the world at this picture size, at every
    blur in BLURS and shift in _SHIFTS: objects (len(_TEMPLATE_OBJECTS) * len(BLURS) * len(_SHIFTS), h*w)
    and words (len(WORDS) * len(BLURS) * len(_SHIFTS), h*w)."""
    def crops(scene: Scene, ink_rgb, bounds) -> np.ndarray:
        image = Image.fromarray(render_scene(scene, size))
        blurred = [np.asarray(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image, dtype=np.float32)
                   for blur in BLURS]
        return np.concatenate([_shifted_crops(_coverage(p - _BACKGROUND, ink_rgb), bounds) for p in blurred])

    objects, words = [], []
    for cell, bounds in zip(CELLS, _cell_bounds(size)):
        objects.append(_normalised(np.concatenate([
            crops(Scene((WorldObject(shape, "red", size_name, cell),)), COLOUR_RGB["red"], bounds)
            for shape, size_name in _TEMPLATE_OBJECTS])))
        words.append(_normalised(np.concatenate([crops(Scene((), word, cell), WORD_RGB, bounds) for word in WORDS])))
    return objects, words


def _best_match(coverage: np.ndarray, templates: np.ndarray) -> int:
    """Index (into the things drawn) of the template most like `coverage` at its best blur and shift.
    Correlation, not a difference: blur lowers and spreads ink, which would favour the smaller templates."""
    correlation = templates @ _normalised(coverage[None])[0]
    return int(correlation.argmax()) // (len(BLURS) * len(_SHIFTS))


# -----------------------------------------------------------------------------
# Reading

def _validate(pixels) -> None:
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 RGB, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3) RGB channels, got shape {pixels.shape}")
    if pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"pixels must be square, got {pixels.shape[0]}x{pixels.shape[1]}")
    if pixels.shape[0] < MIN_SIZE:
        raise ValueError(f"pixels must be at least {MIN_SIZE}x{MIN_SIZE}, got {pixels.shape[0]}x{pixels.shape[1]}")


def _read_cell(diff: np.ndarray, ink_start: float, object_templates: np.ndarray,
               word_templates: np.ndarray) -> CellReading:
    """One cell from its pixels' difference to the background (h, w, 3), tint removed."""
    inset = round(CORE_INSET * len(diff))
    core = diff[inset:len(diff) - inset, inset:len(diff) - inset]
    distance = np.linalg.norm(core, axis=-1)
    ink = np.clip((distance - ink_start) / INK_RAMP, 0.0, 1.0)
    if ink.mean() < EMPTY_AREA:
        return CellReading("empty")
    # Hue: the part of the difference off the grey axis. Black ink on a near-grey background has almost none.
    hue = np.linalg.norm(core - core.mean(axis=-1, keepdims=True), axis=-1)
    if (ink * hue).sum() < GREY_RATIO * (ink * distance).sum() and core[ink > 0].mean() < 0:
        return CellReading("word", word=WORDS[_best_match(_coverage(diff, WORD_RGB), word_templates)])
    # Colour from the strongest ink only: edges are blends with the background.
    strong = distance >= 0.7 * np.percentile(distance[ink > 0], 90)
    rgb = np.median(core[strong], axis=0) + _BACKGROUND
    colour = min(COLOUR_RGB, key=lambda name: np.sum((rgb - COLOUR_RGB[name]) ** 2))
    shape, size = _TEMPLATE_OBJECTS[_best_match(_coverage(diff, COLOUR_RGB[colour]), object_templates)]
    return CellReading("object", shape=shape, colour=colour, size=size)


def read_picture(pixels: np.ndarray) -> PictureReading:
    """Reads a world picture: pixels (H, W, 3) uint8 RGB, square, H >= MIN_SIZE -> one CellReading per cell."""
    _validate(pixels)
    size = pixels.shape[0]
    image = pixels.astype(np.float32)
    # A decoder may tint the whole picture; the background is most of it, so its median colour shows the tint.
    background = np.median(image.reshape(-1, 3), axis=0)
    if np.linalg.norm(background - _BACKGROUND) > BACKGROUND_TRUST:
        background = _BACKGROUND
    diff = image - background
    # Noise: the background's spread (median absolute deviation, robust to the ink), so noise is not ink.
    sigma = 1.4826 * np.median(np.abs(diff), axis=(0, 1)).max()
    ink_start = max(INK_START, NOISE_SIGMAS * float(sigma))
    object_templates, word_templates = _templates(size)
    cells = tuple(_read_cell(diff[top:bottom, left:right], ink_start, object_templates[i], word_templates[i])
                  for i, (top, bottom, left, right) in enumerate(_cell_bounds(size)))
    return PictureReading(cells)


# -----------------------------------------------------------------------------
# Scoring

# Averaged keys: per-object attribute accuracy (fractions of the scene's objects), whole-picture facts, the
# word (over scenes that have one) and the mean number of objects drawn where the scene has none.
ATTRIBUTES = ("position", "colour", "shape", "size", "colour_shape", "count", "exact", "word", "extra_objects")


def score_objects(said: dict, scene: Scene) -> dict[str, float]:
    """Per-object attribute accuracy: `said` maps a cell to what a picture or caption shows there (anything with
    .shape, .colour, .size); each of the scene's objects counts as placed when its cell holds something, and as
    right per attribute. Empty for a scene without objects."""
    if not scene.objects:
        return {}
    right = {key: 0 for key in ATTRIBUTES[:5]}
    for obj in scene.objects:
        found = said.get(obj.cell)
        if found is None:
            continue
        right["position"] += 1
        right["colour"] += found.colour == obj.colour
        right["shape"] += found.shape == obj.shape
        right["size"] += found.size == obj.size
        right["colour_shape"] += found.colour == obj.colour and found.shape == obj.shape
    return {key: count / len(scene.objects) for key, count in right.items()}


def score_picture(reading: PictureReading, scene: Scene) -> dict[str, float]:
    """How much of `scene` the picture shows. Object keys are absent for a scene without objects, "word"
    for a scene without a word."""
    read = dict(zip(CELLS, reading.cells))
    scores = score_objects({cell: found for cell, found in read.items() if found.kind == "object"}, scene)
    read_scene = reading.to_scene()
    occupied = {obj.cell for obj in scene.objects}
    scores["count"] = float(scene_facts(read_scene) == scene_facts(scene))
    scores["exact"] = float(read_scene == scene)
    if scene.word is not None:
        scores["word"] = float(read[scene.word_cell].kind == "word" and read[scene.word_cell].word == scene.word)
    scores["extra_objects"] = float(sum(obj.cell not in occupied for obj in reading.objects))
    return scores


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); nan for one value), NaNs left out."""
    values = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    if len(values) == 0:
        return math.nan, math.nan
    error = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), error


def aggregate(scores: Sequence[dict[str, float]], errors: bool = False) -> dict[str, float]:
    """Mean of each ATTRIBUTES key over the pictures whose scores have it (word: scenes with a word); with
    `errors`, also KEY_se, the standard error of that mean over the pictures."""
    means = {}
    for key in ATTRIBUTES:
        values = [score[key] for score in scores if key in score]
        if values:
            means[key], error = mean_and_error(values)
            if errors:
                means[f"{key}_se"] = error
    return means


def derangement(count: int, seed: int) -> list[int]:
    """A seeded permutation without fixed points (count >= 2): item i is paired with item result[i]. Each item
    takes the next one in a random cycle, so nothing meets itself."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    paired = np.empty(count, dtype=int)
    paired[order] = np.roll(order, -1)
    return paired.tolist()


def shuffled_scores(readings: Sequence[PictureReading], scenes: Sequence[Scene], seed: int = 0) -> dict[str, float]:
    """Chance baseline: each reading scored against another picture's scene (a seeded derangement)."""
    if len(readings) != len(scenes):
        raise ValueError(f"need as many readings as scenes; got {len(readings)} and {len(scenes)}")
    return aggregate([score_picture(readings[i], scenes[j]) for i, j in enumerate(derangement(len(readings), seed))],
                     errors=True)
