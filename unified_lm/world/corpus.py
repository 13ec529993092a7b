"""A procedural captioned world: coloured shapes on a 3x3 grid, the embedded default corpus of unified_lm.

Why it exists: photographs with human captions say nothing exact about what a model learned. Every picture
here is drawn from a `Scene` we keep, so a generated picture can be checked against the caption that asked
for it (text -> image) and a generated caption can be parsed back into facts and compared with the scene
(image -> text). It is small enough to train a unified text+image model on a CPU in minutes.

The world
    A scene is 1-4 objects on a plain light background. Each object has a shape (circle, square, triangle,
    cross), a colour (red, green, blue, yellow, purple, orange), a size (small, large) and a cell of a 3x3
    grid (top left, top, top right, left, center, right, bottom left, bottom, bottom right); one object per
    cell, so a position names one object. Some scenes also carry a word (HI, OK, GO, UP, NO, YES) written in
    black with PIL's embedded default font in a cell without an object.

Caption grammar (`describe`; all lowercase except the written word, so it cannot be mistaken for English)
    caption    := inventory ". " placements "." [" the word " WORD " is written " cell_phrase "."]
    inventory  := join(count colour shape[s])   one group per (colour, shape), in reading order of its first
                                                object; count is "a"/"an" for one, else "two".."four"
    placements := join("a " size " " colour " " shape " " cell_phrase)   one per object, in reading order
    join(x, y, z) = "x, y and z"
    cell_phrase: "at the top left", "at the top", "at the top right", "on the left", "in the center",
                 "on the right", "at the bottom left", "at the bottom", "at the bottom right"
    e.g. "two red circles and an orange cross. a large red circle at the top left, a small red circle in the
    center and a small orange cross at the bottom. the word GO is written on the right."
    `parse_caption` inverts it exactly (parse_caption(describe(s)).to_scene() == s); `caption_facts` reads
    only the counted (colour, shape) groups, which is what image -> text counting accuracy is scored on.

Document kinds (each a list of segments, {"text": ...} or {"image": relative path})
    text_to_image  [caption, image]                 train_on "image"
    image_to_text  [image, "Caption: " caption]     train_on "text"
    qa             [image, "Question: ... Answer: ..."]   train_on "text"
    story          ["Step 1: " caption, image, "Step 2: " change, image, ...] 2-4 frames in which one
                   object moves, changes colour or appears between frames; train_on "all"

File layout written by `generate_world(out_dir, ...)`
    out_dir/images/scene-000000.png, story-000003-1.png ...   RGB PNGs, image_size x image_size
    out_dir/documents.jsonl   {"id", "kind", "train_on", "split", "segments"}; image paths relative to out_dir
    out_dir/scenes.jsonl      ground truth per image: {"image", "objects", "word", "word_cell", "caption"}
    out_dir/labels.jsonl      what each cell of each image shows, {"image", "cells": 3x3 of "empty" |
                              "word GO" | "small red circle"}: `vqtok eval --labels` measures from it whether the
                              tokenizer's codes are a function of the content
    out_dir/world.json        settings, counts and vocabulary; written last, so its presence means complete
The "heldout" split holds scenes (and story frames) that appear nowhere in the "train" split.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMAT = "unified-lm-world/3"  # 2: image_to_text texts start with CAPTION_PREFIX; 3: labels.jsonl

# A diamond is a rotated square and blurs into a circle at 10 pixels; a plus-shaped cross stays distinct.
SHAPES = ("circle", "square", "triangle", "cross")
# Saturated and far apart in RGB (closest pair, orange/yellow, is ~100 apart) so colour is never ambiguous.
COLOUR_RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (245, 215, 0), "purple": (140, 40, 180), "orange": (255, 120, 0),
}
COLOURS = tuple(COLOUR_RGB)
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
WORDS = ("HI", "OK", "GO", "UP", "NO", "YES")
# scenes hold at most four objects; a generated picture may hold up to nine (one per cell)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# After a picture, a caption and a question would otherwise both be likely continuations: the prefix says which
# one is asked for (`unified-lm eval` prompts with the picture and "Caption:").
CAPTION_PREFIX = "Caption: "
KINDS = ("text_to_image", "image_to_text", "qa", "story")
TRAIN_ON = {"text_to_image": "image", "image_to_text": "text", "qa": "text", "story": "all"}
DEFAULT_KINDS_MIX = {"text_to_image": 0.3, "image_to_text": 0.3, "qa": 0.25, "story": 0.15}

BACKGROUND_RGB = (238, 238, 232)
WORD_RGB = (0, 0, 0)
SUPERSAMPLE = 4  # draw at 4x and average 4x4 blocks: anti-aliased edges, deterministic, no ringing
SIZE_RADIUS = {"small": 0.25, "large": 0.42}  # half-width of an object, as a fraction of the cell side
WORD_HEIGHT = 0.5  # font size of a written word, as a fraction of the cell side


# -----------------------------------------------------------------------------
# Ground truth

@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cell: str

    def __post_init__(self):
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                      ("size", self.size, SIZES), ("cell", self.cell, CELLS)):
            if value not in allowed:
                raise ValueError(f"WorldObject {field} {value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    """Objects are kept in reading order of their cells, so two equal scenes are the same picture."""
    objects: tuple[WorldObject, ...]
    word: str | None = None
    word_cell: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda obj: CELLS.index(obj.cell))))
        cells = [obj.cell for obj in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        if (self.word is None) != (self.word_cell is None):
            raise ValueError("word and word_cell are given together or not at all")
        if self.word is not None and (self.word not in WORDS or self.word_cell not in CELLS
                                      or self.word_cell in cells):
            raise ValueError(f"word {self.word!r} at {self.word_cell!r}: unknown word, unknown or occupied cell")

    def free_cells(self) -> list[str]:
        """Cells holding neither an object nor the word."""
        taken = {obj.cell for obj in self.objects} | {self.word_cell}
        return [cell for cell in CELLS if cell not in taken]

    def to_json(self) -> dict:
        return {"objects": [asdict(obj) for obj in self.objects], "word": self.word, "word_cell": self.word_cell}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return cls(tuple(WorldObject(**obj) for obj in data["objects"]), data.get("word"), data.get("word_cell"))


def sample_scene(rng: np.random.Generator, max_objects: int = 4, word_probability: float = 0.3,
                 repeat_probability: float = 0.3) -> Scene:
    """A random scene of 1..max_objects objects. With `repeat_probability` an object copies the (colour, shape)
    of an earlier one: independent draws would repeat too rarely to teach counting ("two red circles")."""
    count = int(rng.integers(1, max_objects + 1))
    cells = [CELLS[i] for i in rng.choice(len(CELLS), size=count, replace=False)]
    objects = []
    for cell in cells:
        if objects and rng.random() < repeat_probability:
            model = objects[int(rng.integers(len(objects)))]
            shape, colour = model.shape, model.colour
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
        objects.append(WorldObject(shape, colour, SIZES[rng.integers(len(SIZES))], cell))
    scene = Scene(tuple(objects))
    if rng.random() < word_probability:
        free = scene.free_cells()
        scene = Scene(scene.objects, WORDS[rng.integers(len(WORDS))], free[rng.integers(len(free))])
    return scene


def cell_labels(scene: Scene) -> list[list[str]]:
    """What each cell shows, as a 3x3 grid of strings in CELLS order: "empty", "word GO", "small red circle".
    When the picture side is a multiple of 3 (e.g. 48 px) every cell starts on a whole pixel and renders the same
    wherever it is, so equal labels mean equal pixels."""
    labels = {obj.cell: f"{obj.size} {obj.colour} {obj.shape}" for obj in scene.objects}
    if scene.word is not None:
        labels[scene.word_cell] = f"word {scene.word}"
    flat = [labels.get(cell, "empty") for cell in CELLS]
    return [flat[row * 3:row * 3 + 3] for row in range(3)]


def scene_facts(scene: Scene) -> Counter:
    """Counter of (colour, shape) -> number of objects: what `caption_facts` reads back from a caption."""
    return Counter((obj.colour, obj.shape) for obj in scene.objects)


# -----------------------------------------------------------------------------
# Rendering

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, radius: float, rgb: tuple) -> None:
    """One filled shape centred at (x, y) inside a square of half-width `radius` (canvas pixels)."""
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=rgb)
    elif shape == "square":
        half = radius * 0.886  # sqrt(pi)/2: the same area as the circle, so size reads the same for both
        draw.rectangle((x - half, y - half, x + half, y + half), fill=rgb)
    elif shape == "triangle":
        half = radius * 1.1  # a triangle fills half its box; a little larger so it does not read as small
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=rgb)
    elif shape == "cross":
        arm = radius * 0.36
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=rgb)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=64)
def _word_mask(word: str, cell_px: int) -> Image.Image:
    """The word as an 'L' mask at canvas scale, at most 85% of a cell wide."""
    try:  # Pillow >= 10.1 with FreeType: the embedded default font is scalable; no file or network needed
        font = ImageFont.load_default(size=round(cell_px * WORD_HEIGHT))
        scale = 1
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the bitmap font, enlarged
        font, scale = ImageFont.load_default(), SUPERSAMPLE
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    shrink = min(1.0, 0.85 * cell_px / (mask.width * scale))
    target = (max(1, round(mask.width * scale * shrink)), max(1, round(mask.height * scale * shrink)))
    return mask if target == mask.size else mask.resize(target, Image.Resampling.LANCZOS)


def _render_image(scene: Scene, image_size: int) -> Image.Image:
    canvas_px = image_size * SUPERSAMPLE
    cell_px = canvas_px / 3
    image = Image.new("RGB", (canvas_px, canvas_px), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)

    def centre(cell: str) -> tuple[float, float]:
        row, column = divmod(CELLS.index(cell), 3)
        return (column + 0.5) * cell_px, (row + 0.5) * cell_px

    for obj in scene.objects:
        _draw_shape(draw, obj.shape, *centre(obj.cell), SIZE_RADIUS[obj.size] * cell_px, COLOUR_RGB[obj.colour])
    if scene.word is not None:
        mask = _word_mask(scene.word, round(cell_px))
        x, y = centre(scene.word_cell)
        image.paste(WORD_RGB, (round(x - mask.width / 2), round(y - mask.height / 2)), mask)
    return image.reduce(SUPERSAMPLE)


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """The scene's picture: (image_size, image_size, 3) uint8 RGB."""
    return np.asarray(_render_image(scene, image_size))


# -----------------------------------------------------------------------------
# Captions

def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _count_phrase(count: int, colour: str, shape: str) -> str:
    """'a red circle', 'an orange cross', 'two red circles'."""
    if count == 1:
        return f"{_article(colour)} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {colour} {_plural(shape)}"


def _object_phrase(obj: WorldObject) -> str:
    """'a large red circle' (no position)."""
    return f"{_article(obj.size)} {obj.size} {obj.colour} {obj.shape}"


def describe(scene: Scene) -> str:
    """The canonical caption (grammar in the module docstring)."""
    groups = Counter((obj.colour, obj.shape) for obj in scene.objects)  # insertion order = reading order
    inventory = _join([_count_phrase(count, colour, shape) for (colour, shape), count in groups.items()])
    placements = _join([f"{_object_phrase(obj)} {CELL_PHRASES[obj.cell]}" for obj in scene.objects])
    caption = f"{inventory}. {placements}."
    if scene.word is not None:
        caption += f" the word {scene.word} is written {CELL_PHRASES[scene.word_cell]}."
    return caption


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_CELL_PHRASE = "|".join(sorted(CELL_PHRASES.values(), key=len, reverse=True))  # longest first: "top left" > "top"
_CELL_OF_PHRASE = {phrase: cell for cell, phrase in CELL_PHRASES.items()}
_COUNT_OF_WORD = {"a": 1, "an": 1, **{word: n for n, word in enumerate(NUMBER_WORDS)}}
_INVENTORY_RE = re.compile(rf"\b(an?|{'|'.join(NUMBER_WORDS[1:])}) ({_COLOUR}) ({_SHAPE})(?:es|s)?\b")
_PLACEMENT_RE = re.compile(rf"\b(?:an?|one) ({'|'.join(SIZES)}) ({_COLOUR}) ({_SHAPE}) ({_CELL_PHRASE})\b")
_WORD_RE = re.compile(rf"\bthe word ([A-Z]+) is written ({_CELL_PHRASE})\b")


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states. Unrecognised text is ignored, so a half-right generated caption still scores."""
    counts: Counter            # (colour, shape) -> count, from the inventory sentence
    objects: tuple[WorldObject, ...]  # from the placement sentence, in order of mention
    word: str | None
    word_cell: str | None

    def to_scene(self) -> Scene:
        """The scene the caption describes; ValueError if it is not a valid scene."""
        return Scene(self.objects, self.word, self.word_cell)


def parse_caption(text: str) -> ParsedCaption:
    """Inverse of `describe`: parse_caption(describe(scene)).to_scene() == scene."""
    counts = Counter()
    for count_word, colour, shape in _INVENTORY_RE.findall(text):
        counts[(colour, shape)] += _COUNT_OF_WORD[count_word]
    objects = tuple(WorldObject(shape, colour, size, _CELL_OF_PHRASE[phrase])
                    for size, colour, shape, phrase in _PLACEMENT_RE.findall(text))
    written = _WORD_RE.search(text)
    if written is None:
        return ParsedCaption(counts, objects, None, None)
    return ParsedCaption(counts, objects, written.group(1), _CELL_OF_PHRASE[written.group(2)])


def caption_facts(text: str) -> Counter:
    """Counter of (colour, shape) -> count stated by a caption; compare with `scene_facts(scene)`."""
    return parse_caption(text).counts


# -----------------------------------------------------------------------------
# Documents: questions and stories

def _question(scene: Scene, rng: np.random.Generator) -> str:
    """One 'Question: ... Answer: ...' about the scene, from a template that applies to it."""
    templates = ["count", "colour", "what", "total"] + (["word"] if scene.word is not None else [])
    template = templates[rng.integers(len(templates))]
    if template == "count":  # mostly about a present group; otherwise any group, so "zero" is learned too
        if rng.random() < 0.6:
            model = scene.objects[rng.integers(len(scene.objects))]
            colour, shape = model.colour, model.shape
        else:
            colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        answer = NUMBER_WORDS[scene_facts(scene)[(colour, shape)]]
        return f"Question: how many {colour} {_plural(shape)} are there? Answer: {answer}."
    if template == "colour":
        obj = scene.objects[rng.integers(len(scene.objects))]
        return f"Question: what colour is the shape {CELL_PHRASES[obj.cell]}? Answer: {obj.colour}."
    if template == "what":  # any cell: an object, the word, or nothing
        cell = CELLS[rng.integers(len(CELLS))]
        by_cell = {obj.cell: obj for obj in scene.objects}
        if cell in by_cell:
            answer = _object_phrase(by_cell[cell])
        elif cell == scene.word_cell:
            answer = f"the word {scene.word}"
        else:
            answer = "nothing"
        return f"Question: what is {CELL_PHRASES[cell]}? Answer: {answer}."
    if template == "total":
        return f"Question: how many shapes are there? Answer: {NUMBER_WORDS[len(scene.objects)]}."
    return f"Question: what word is written in the picture? Answer: {scene.word}."


def _story_step(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """The next frame of a story and the sentence saying what changed: one object moves, changes colour, or
    a new one appears. Objects are named with their cell, so 'the red circle' is never ambiguous."""
    free = scene.free_cells()
    changes = ["move", "recolour"] + (["appear"] if len(scene.objects) < 4 else [])
    change = changes[rng.integers(len(changes))]
    if change == "appear":
        new = WorldObject(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                          SIZES[rng.integers(len(SIZES))], free[rng.integers(len(free))])
        return (Scene(scene.objects + (new,), scene.word, scene.word_cell),
                f"{_object_phrase(new)} appears {CELL_PHRASES[new.cell]}.")
    index = int(rng.integers(len(scene.objects)))
    old = scene.objects[index]
    if change == "move":
        new = WorldObject(old.shape, old.colour, old.size, free[rng.integers(len(free))])
        sentence = f"moves to the {new.cell}."
    else:
        colours = [c for c in COLOURS if c != old.colour]
        new = WorldObject(old.shape, colours[rng.integers(len(colours))], old.size, old.cell)
        sentence = f"turns {new.colour}."
    objects = scene.objects[:index] + (new,) + scene.objects[index + 1:]
    return (Scene(objects, scene.word, scene.word_cell),
            f"the {old.size} {old.colour} {old.shape} {CELL_PHRASES[old.cell]} {sentence}")


def _sample_unit(kind: str, rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
    """The scenes (frames) of one document and its texts: for a story, one text per frame."""
    if kind != "story":
        scene = sample_scene(rng)
        if kind == "qa":
            text = _question(scene, rng)
        else:
            text = (CAPTION_PREFIX if kind == "image_to_text" else "") + describe(scene)
        return [scene], [text]
    frames = [sample_scene(rng, max_objects=3)]  # room for an object to appear
    texts = [f"Step 1: {describe(frames[0])}"]
    for step in range(2, int(rng.integers(2, 5)) + 1):
        frame, change = _story_step(frames[-1], rng)
        frames.append(frame)
        texts.append(f"Step {step}: {change}")
    return frames, texts


# -----------------------------------------------------------------------------
# The world on disk

@dataclass(frozen=True)
class WorldSummary:
    out_dir: Path
    num_documents: int
    num_images: int
    kind_counts: dict[str, int]      # documents per kind
    split_counts: dict[str, int]     # documents per split ("train", "heldout")

    @property
    def documents_path(self) -> Path:
        return self.out_dir / "documents.jsonl"

    @classmethod
    def from_world_json(cls, out_dir: Path, world: dict) -> WorldSummary:
        return cls(out_dir, world["num_documents"], world["num_images"], world["kind_counts"], world["split_counts"])


def _normalised_mix(kinds_mix: dict[str, float]) -> dict[str, float]:
    unknown = set(kinds_mix) - set(KINDS)
    if unknown or any(share < 0 for share in kinds_mix.values()) or sum(kinds_mix.values()) <= 0:
        raise ValueError(f"kinds_mix {kinds_mix} needs non-negative shares of {KINDS} with a positive sum")
    total = sum(kinds_mix.values())
    return {kind: kinds_mix.get(kind, 0.0) / total for kind in KINDS}


def _kind_counts(mix: dict[str, float], num_scenes: int) -> dict[str, int]:
    """Documents per kind by largest remainder, so they sum to num_scenes exactly."""
    exact = {kind: share * num_scenes for kind, share in mix.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    by_remainder = sorted(KINDS, key=lambda kind: counts[kind] - exact[kind])  # stable: ties keep KINDS order
    for kind in by_remainder[:num_scenes - sum(counts.values())]:
        counts[kind] += 1
    return counts


def _plan(settings: dict) -> list[tuple[str, str, list[Scene], list[str]]]:
    """(kind, split, frames, texts) per document, a pure function of the settings.

    Each kind is shuffled in, and the last `heldout_fraction` of each kind is held out. Training documents are
    sampled first; held-out ones are then resampled until none of their frames occurs in training, so held-out
    evaluation measures generalisation to unseen scenes, not recall."""
    rng = np.random.default_rng(settings["seed"])
    counts = _kind_counts(settings["kinds_mix"], settings["num_scenes"])
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    heldout = set()
    for kind in KINDS:
        indices = [i for i, k in enumerate(kinds) if k == kind]
        heldout.update(indices[len(indices) - round(settings["heldout_fraction"] * len(indices)):])
    units: list = [None] * len(kinds)
    seen: set[Scene] = set()
    for index, kind in enumerate(kinds):
        if index not in heldout:
            units[index] = (kind, "train", *_sample_unit(kind, rng))
            seen.update(units[index][2])
    for index in sorted(heldout):
        for _attempt in range(1000):
            frames, texts = _sample_unit(kinds[index], rng)
            if seen.isdisjoint(frames):
                break
        else:
            raise RuntimeError("could not sample a held-out scene unlike every training scene")
        units[index] = (kinds[index], "heldout", frames, texts)
    return units


def _write_world(directory: Path, settings: dict) -> dict:
    """Writes images, documents.jsonl, scenes.jsonl and (last) world.json into `directory`; returns world.json."""
    (directory / "images").mkdir(parents=True)
    image_size = settings["image_size"]
    kind_counts = dict.fromkeys(KINDS, 0)
    split_counts = {"train": 0, "heldout": 0}
    num_images = 0
    with (open(directory / "documents.jsonl", "w") as documents, open(directory / "scenes.jsonl", "w") as scenes,
          open(directory / "labels.jsonl", "w") as labels):
        for index, (kind, split, frames, texts) in enumerate(_plan(settings)):
            doc_id = f"{'story' if kind == 'story' else 'scene'}-{index:06d}"
            segments = []
            for step, (frame, text) in enumerate(zip(frames, texts), start=1):
                image = f"images/{doc_id}-{step}.png" if kind == "story" else f"images/{doc_id}.png"
                _render_image(frame, image_size).save(directory / image, format="PNG", compress_level=6)
                scenes.write(json.dumps({"image": image, **frame.to_json(), "caption": describe(frame)}) + "\n")
                labels.write(json.dumps({"image": image, "cells": cell_labels(frame)}) + "\n")
                num_images += 1
                if kind == "image_to_text" or kind == "qa":
                    segments += [{"image": image}, {"text": text}]
                else:
                    segments += [{"text": text}, {"image": image}]
            record = {"id": doc_id, "kind": kind, "train_on": TRAIN_ON[kind], "split": split, "segments": segments}
            documents.write(json.dumps(record) + "\n")
            kind_counts[kind] += 1
            split_counts[split] += 1
    world = {
        **settings, "num_documents": sum(kind_counts.values()), "num_images": num_images,
        "kind_counts": kind_counts, "split_counts": split_counts,
        "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                       "cells": list(CELLS), "words": list(WORDS)},
    }
    (directory / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    return world


def generate_world(out_dir: str | os.PathLike, num_scenes: int = 2000, seed: int = 0, image_size: int = 64,
                   kinds_mix: dict[str, float] | None = None, heldout_fraction: float = 0.1,
                   force: bool = False) -> WorldSummary:
    """Writes a world of `num_scenes` documents (one scene, or one story of 2-4 frames, each) into out_dir.

    Same arguments -> byte-identical files. The world is built in a sibling temporary directory and renamed
    into place, so out_dir is either absent or complete. If out_dir already holds a world with the same
    settings it is reused as is; different settings raise ValueError unless force=True."""
    out_dir = Path(out_dir)
    if num_scenes < 1 or image_size < 3 or not 0 <= heldout_fraction < 1:
        raise ValueError(f"need num_scenes >= 1, image_size >= 3, 0 <= heldout_fraction < 1; got "
                         f"{num_scenes}, {image_size}, {heldout_fraction}")
    settings = {"format": FORMAT, "seed": seed, "num_scenes": num_scenes, "image_size": image_size,
                "kinds_mix": _normalised_mix(kinds_mix or DEFAULT_KINDS_MIX), "heldout_fraction": heldout_fraction}
    if out_dir.exists() and not force:
        world_json = out_dir / "world.json"
        if not world_json.is_file():
            if any(out_dir.iterdir()):
                raise ValueError(f"{out_dir} exists and holds no world.json; refusing to overwrite it (force=True)")
        else:
            world = json.loads(world_json.read_text())
            for field, value in settings.items():
                if world.get(field) != value:
                    raise ValueError(f"{out_dir} holds a world with {field}={world.get(field)!r}, not {value!r}; "
                                     "use another directory or force=True")
            return WorldSummary.from_world_json(out_dir, world)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        world = _write_world(building, settings)
        if out_dir.exists():  # force=True or an empty directory: move it aside, then swap in the new world
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "world")
            os.replace(building, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(building, out_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return WorldSummary.from_world_json(out_dir, world)


def read_documents(out_dir: str | os.PathLike, split: str = "all") -> Iterator[dict]:
    """The documents of documents.jsonl, all or one split ("train", "heldout")."""
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use all, train or heldout")
    with open(Path(out_dir) / "documents.jsonl") as handle:
        for line in handle:
            document = json.loads(line)
            if split == "all" or document["split"] == split:
                yield document


def world_texts(out_dir: str | os.PathLike, split: str = "all") -> Iterator[str]:
    """Every text segment of the world's documents (for training the sentencepiece text tokenizer)."""
    for document in read_documents(out_dir, split):
        for segment in document["segments"]:
            if "text" in segment:
                yield segment["text"]


def read_scenes(out_dir: str | os.PathLike) -> dict[str, Scene]:
    """Ground truth: image path (relative, as in documents.jsonl) -> Scene."""
    with open(Path(out_dir) / "scenes.jsonl") as handle:
        return {record["image"]: Scene.from_json(record) for record in map(json.loads, handle)}
