"""World picture checker: exact on renders, near chance on mismatched scenes, robust to mild degradation."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from unified_lm.world import corpus as world
from unified_lm.world.check import (
    ATTRIBUTES,
    CellReading,
    PictureReading,
    aggregate,
    read_picture,
    score_picture,
    shuffled_scores,
)
from unified_lm.world.corpus import BACKGROUND_RGB, CELLS, Scene, WorldObject

SCENES = [world.sample_scene(np.random.default_rng(seed)) for seed in range(200)]


def degrade(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a VQ decoder does to a picture, mildly: blur (sigma 0.8 px), a global tint of +-15 per channel,
    noise (std 8) and a 1 px translation."""
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
    tinted = blurred + rng.choice([-15.0, 15.0], size=3) + rng.normal(0.0, 8.0, size=blurred.shape)
    dy, dx = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1)][rng.integers(6)]
    size = len(pixels)
    moved = np.pad(tinted, ((1, 1), (1, 1), (0, 0)), mode="edge")[1 - dy:1 - dy + size, 1 - dx:1 - dx + size]
    return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def readings_64():
    return [read_picture(world.render_scene(scene, 64)) for scene in SCENES]


@pytest.mark.parametrize("size", [48, 64, 72])
def test_reads_rendered_ground_truth_exactly(size, readings_64):
    assert sum(scene.word is not None for scene in SCENES) > 30  # words are exercised
    readings = readings_64 if size == 64 else [read_picture(world.render_scene(s, size)) for s in SCENES]
    for reading, scene in zip(readings, SCENES):
        assert len(reading.cells) == len(CELLS)
        assert reading.to_scene() == scene, (size, scene, reading)
    means = aggregate([score_picture(r, s) for r, s in zip(readings, SCENES)])
    assert set(means) == set(ATTRIBUTES)
    assert means.pop("extra_objects") == 0.0
    assert all(value == 1.0 for value in means.values()), means


def test_shuffled_scenes_score_near_chance(readings_64):
    chance = shuffled_scores(readings_64, SCENES, seed=0)
    assert chance == shuffled_scores(readings_64, SCENES, seed=0)  # seeded
    # An object sits at a given cell of another scene with p ~ 2.5/9; given one, its colour is right ~1/6.
    assert 0.15 < chance["position"] < 0.45
    assert 0.05 < chance["colour"] / chance["position"] < 0.35
    assert chance["colour"] < 0.15 and chance["colour_shape"] < 0.05
    assert chance["exact"] < 0.02 and chance["count"] < 0.05 and chance["word"] < 0.1
    assert chance["extra_objects"] > 1.0
    # A derangement: with two pictures each reading meets the other's scene, never its own.
    pair = shuffled_scores(readings_64[:2], SCENES[:2], seed=1)
    assert pair == aggregate([score_picture(readings_64[0], SCENES[1]), score_picture(readings_64[1], SCENES[0])],
                             errors=True)
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_scores(readings_64[:1], SCENES[:1])


@pytest.mark.parametrize("size", [48, 64])
def test_reads_degraded_pictures(size):
    rng = np.random.default_rng(size)
    scenes = SCENES[:150]
    readings = [read_picture(degrade(world.render_scene(scene, size), rng)) for scene in scenes]
    means = aggregate([score_picture(r, s) for r, s in zip(readings, scenes)])
    # Measured: every attribute 1.0 and no extra objects at 48, 64 and 72 px; the bands leave a little room.
    assert means["colour_shape"] >= 0.95 and means["size"] >= 0.95 and means["position"] >= 0.98, means
    assert means["word"] >= 0.9 and means["exact"] >= 0.9 and means["extra_objects"] <= 0.05, means


def test_empty_and_noise_pictures():
    empty = np.full((64, 64, 3), BACKGROUND_RGB, dtype=np.uint8)
    assert read_picture(empty).cells == (CellReading("empty"),) * 9
    assert read_picture(empty).to_scene() == Scene(())
    tinted = (empty.astype(int) + [20, -20, 10]).astype(np.uint8)  # a decoder's tint is not ink
    assert all(cell.kind == "empty" for cell in read_picture(tinted).cells)
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    reading = read_picture(noise)
    assert len(reading.cells) == 9 and isinstance(reading.to_scene(), Scene)
    assert set(score_picture(reading, SCENES[0])) <= set(ATTRIBUTES)


def test_score_picture_counts_each_attribute():
    scene = Scene((WorldObject("circle", "red", "small", "top left"), WorldObject("square", "blue", "large", "center")),
                  "GO", "bottom")
    cells = [CellReading("empty")] * 9
    cells[CELLS.index("top left")] = CellReading("object", "circle", "red", "large")   # size wrong
    cells[CELLS.index("center")] = CellReading("object", "square", "green", "large")   # colour wrong
    cells[CELLS.index("bottom")] = CellReading("object", "cross", "red", "small")      # an object, not the word
    cells[CELLS.index("right")] = CellReading("word", word="GO")                        # the word, misplaced
    reading = PictureReading(tuple(cells))
    assert score_picture(reading, scene) == {
        "position": 1.0, "colour": 0.5, "shape": 1.0, "size": 0.5, "colour_shape": 0.5,
        "count": 0.0, "exact": 0.0, "word": 0.0, "extra_objects": 1.0}
    assert reading.to_scene().word_cell == "right" and len(reading.objects) == 3
    cells[CELLS.index("left")] = CellReading("word", word="HI")  # two words: to_scene keeps neither
    assert PictureReading(tuple(cells)).to_scene().word is None
    right = PictureReading(tuple(read_picture(world.render_scene(scene)).cells))
    assert score_picture(right, scene)["word"] == 1.0 and score_picture(right, scene)["exact"] == 1.0
    assert aggregate([{"colour": 1.0, "word": 1.0}, {"colour": 0.0}]) == {"colour": 0.5, "word": 1.0}
    # standard errors: sample standard deviation / sqrt(n); one value has none
    with_errors = aggregate([{"colour": 1.0, "word": 1.0}, {"colour": 0.0}, {"colour": 1.0}], errors=True)
    assert with_errors["colour_se"] == pytest.approx(np.std([1.0, 0.0, 1.0], ddof=1) / np.sqrt(3))
    assert np.isnan(with_errors["word_se"])


@pytest.mark.parametrize("pixels, problem", [
    (np.zeros((64, 48, 3), np.uint8), "square"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64, 4), np.uint8), "channels"),
    (np.zeros((64, 64), np.uint8), "channels"),
    (np.zeros((12, 12, 3), np.uint8), "at least 24"),
    ([[[0, 0, 0]]], "numpy array"),
])
def test_rejects_bad_pictures(pixels, problem):
    with pytest.raises(ValueError, match=problem):
        read_picture(pixels)
