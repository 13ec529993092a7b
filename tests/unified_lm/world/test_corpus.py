"""Procedural captioned world: determinism, file schema, ground truth in pixels and captions, reuse, atomicity."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from unified_lm.world import corpus as world
from unified_lm.world.corpus import (
    BACKGROUND_RGB,
    CELL_PHRASES,
    CELLS,
    COLOUR_RGB,
    KINDS,
    Scene,
    WorldObject,
    caption_facts,
    cell_labels,
    describe,
    generate_world,
    parse_caption,
    read_documents,
    read_scenes,
    render_scene,
    sample_scene,
    scene_facts,
    world_texts,
)

SMALL = {"num_scenes": 60, "image_size": 32}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", seed=3, **SMALL)


def _files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    first = _files(generate_world(tmp_path / "a", seed=1, **SMALL).out_dir)
    second = _files(generate_world(tmp_path / "b", seed=1, **SMALL).out_dir)
    other = _files(generate_world(tmp_path / "c", seed=2, **SMALL).out_dir)
    assert first == second
    assert {"documents.jsonl", "scenes.jsonl", "world.json"} <= set(first)
    assert first["documents.jsonl"] != other["documents.jsonl"]
    pictures = {name: data for name, data in first.items() if name.endswith(".png")}
    assert len(pictures) >= 60 and sum(other.get(name) == data for name, data in pictures.items()) < 5


def test_documents_schema(small_world):
    root = small_world.out_dir
    documents = list(read_documents(root))
    assert len(documents) == small_world.num_documents == SMALL["num_scenes"]
    assert {d["kind"] for d in documents} == set(KINDS)
    expected_train_on = {"text_to_image": "image", "image_to_text": "text", "qa": "text", "story": "all"}
    images = []
    for document in documents:
        assert set(document) == {"id", "kind", "train_on", "split", "segments"}
        assert document["train_on"] == expected_train_on[document["kind"]]
        assert document["split"] in ("train", "heldout")
        order = ["image" if "image" in s else "text" for s in document["segments"]]
        if document["kind"] == "text_to_image":
            assert order == ["text", "image"]
        elif document["kind"] in ("image_to_text", "qa"):
            assert order == ["image", "text"]
        else:
            assert order == ["text", "image"] * (len(order) // 2) and 2 <= len(order) // 2 <= 4
        for segment in document["segments"]:
            if "image" in segment:
                assert not segment["image"].startswith("/")
                with Image.open(root / segment["image"]) as image:
                    assert image.size == (32, 32) and image.mode == "RGB"
                images.append(segment["image"])
    assert len(images) == len(set(images)) == small_world.num_images
    assert sorted(read_scenes(root)) == sorted(images)
    heldout = [d for d in documents if d["split"] == "heldout"]
    assert 3 <= len(heldout) <= 9 and small_world.split_counts["heldout"] == len(heldout)
    info = json.loads((root / "world.json").read_text())
    assert info["format"] == "unified-lm-world/3" and info["kind_counts"] == dict(Counter(d["kind"] for d in documents))
    # labels.jsonl: what each cell of each picture shows, one line per picture (vqtok eval --labels reads it)
    labels = [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines()]
    scenes = read_scenes(root)
    assert sorted(record["image"] for record in labels) == sorted(images)
    for record in labels:
        assert record["cells"] == cell_labels(scenes[record["image"]])
        flat = [label for row in record["cells"] for label in row]
        assert len(record["cells"]) == 3 and flat.count("empty") == 9 - len(scenes[record["image"]].objects) - (
            scenes[record["image"]].word is not None)
    assert info["vocabulary"]["cells"] == list(CELLS)
    texts = list(world_texts(root))
    assert len(texts) == sum("text" in s for d in documents for s in d["segments"])
    assert len(list(world_texts(root, "train"))) < len(texts)


def test_heldout_scenes_never_appear_in_training(tmp_path):
    root = generate_world(tmp_path / "w", seed=0, num_scenes=400, image_size=16).out_dir
    scenes = read_scenes(root)

    def frames(split):
        return [scenes[s["image"]] for d in read_documents(root, split) for s in d["segments"] if "image" in s]

    heldout = frames("heldout")
    assert len(heldout) >= 40 and not set(heldout) & set(frames("train"))


def test_render_ground_truth():
    scene = Scene((WorldObject("square", "red", "large", "center"),))
    image = render_scene(scene, image_size=63)  # cells of 21 pixels
    assert image.shape == (63, 63, 3) and image.dtype == np.uint8
    pixels = image.astype(int)
    centre = pixels[21:42, 21:42].reshape(-1, 3)
    red_share = (np.abs(centre - COLOUR_RGB["red"]).max(axis=1) < 10).mean()
    assert red_share > 0.45 and (pixels[26:37, 26:37] == COLOUR_RGB["red"]).all()
    for corner in (pixels[:21, :21], pixels[:21, 42:], pixels[42:, :21], pixels[42:, 42:]):
        assert (corner == BACKGROUND_RGB).all()
    small = render_scene(Scene((WorldObject("square", "red", "small", "center"),)), image_size=63)
    assert (np.abs(small.astype(int) - COLOUR_RGB["red"]).max(axis=2) < 10).sum() < 0.5 * red_share * 21 * 21


def test_render_word_and_shapes_differ():
    with_word = render_scene(Scene((WorldObject("circle", "blue", "small", "bottom"),), "YES", "top left"), 63)
    dark = with_word.max(axis=2) < 100
    assert dark[:21, :21].sum() > 10 and dark[21:].sum() == 0  # the word, black, in its own cell only
    shapes = [render_scene(Scene((WorldObject(shape, "green", "large", "center"),))) for shape in world.SHAPES]
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            assert np.abs(shapes[i].astype(int) - shapes[j]).mean() > 1.0, (world.SHAPES[i], world.SHAPES[j])


def test_caption_round_trip_random_scenes():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(200)]
    assert any(s.word for s in scenes) and any(max(scene_facts(s).values()) > 1 for s in scenes)
    for scene in scenes:
        caption = describe(scene)
        parsed = parse_caption(caption)
        assert parsed.to_scene() == scene, caption
        assert caption_facts(caption) == scene_facts(scene), caption
        assert describe(scene) == caption


def test_counting_phrases():
    scene = Scene((
        WorldObject("circle", "red", "large", "top left"), WorldObject("cross", "orange", "small", "bottom"),
        WorldObject("circle", "red", "small", "center"), WorldObject("cross", "blue", "large", "right"),
    ), "GO", "top")
    caption = describe(scene)
    assert caption == ("two red circles, a blue cross and an orange cross. a large red circle at the top left, "
                       "a small red circle in the center, a large blue cross on the right and a small orange cross "
                       "at the bottom. the word GO is written at the top.")
    assert caption_facts(caption) == Counter({("red", "circle"): 2, ("blue", "cross"): 1, ("orange", "cross"): 1})
    three = Scene(tuple(WorldObject("cross", "purple", "small", cell) for cell in ("top", "left", "right")))
    assert describe(three).startswith("three purple crosses. ")
    assert caption_facts("two red circles and the word NO") == Counter({("red", "circle"): 2})
    assert caption_facts("nothing to see") == Counter()


def test_invalid_scenes_rejected():
    with pytest.raises(ValueError, match="share a cell"):
        Scene((WorldObject("circle", "red", "large", "top"), WorldObject("square", "blue", "small", "top")))
    with pytest.raises(ValueError, match="occupied"):
        Scene((WorldObject("circle", "red", "large", "top"),), "GO", "top")
    with pytest.raises(ValueError, match="colour"):
        WorldObject("circle", "pink", "large", "top")


def test_qa_answers_match_ground_truth(tmp_path):
    root = generate_world(tmp_path / "w", seed=5, num_scenes=200, image_size=16,
                          kinds_mix={"qa": 1.0}).out_dir
    scenes = read_scenes(root)
    templates = Counter()
    for document in read_documents(root):
        scene = scenes[document["segments"][0]["image"]]
        question, answer = re.fullmatch(r"Question: (.+\?) Answer: (.+)\.", document["segments"][1]["text"]).groups()
        by_cell = {CELL_PHRASES[o.cell]: o for o in scene.objects}
        if match := re.fullmatch(rf"how many (\w+) ({'|'.join(world.SHAPES)})(?:es|s) are there\?", question):
            templates["count"] += 1
            assert world.NUMBER_WORDS.index(answer) == scene_facts(scene)[match.groups()]
        elif match := re.fullmatch(r"what colour is the shape (.+)\?", question):
            templates["colour"] += 1
            assert by_cell[match.group(1)].colour == answer
        elif match := re.fullmatch(r"what is (.+)\?", question):
            templates["what"] += 1
            obj = by_cell.get(match.group(1))
            word = f"the word {scene.word}" if scene.word and CELL_PHRASES[scene.word_cell] == match.group(1) else None
            assert answer == (f"a {obj.size} {obj.colour} {obj.shape}" if obj else word or "nothing")
        elif question == "how many shapes are there?":
            templates["total"] += 1
            assert answer == world.NUMBER_WORDS[len(scene.objects)]
        else:
            assert question == "what word is written in the picture?" and answer == scene.word
            templates["word"] += 1
    assert set(templates) == {"count", "colour", "what", "total", "word"}


def test_story_steps_match_frames(tmp_path):
    root = generate_world(tmp_path / "w", seed=6, num_scenes=60, image_size=16, kinds_mix={"story": 1.0}).out_dir
    scenes = read_scenes(root)
    changes = Counter()
    for document in read_documents(root):
        texts = [s["text"] for s in document["segments"] if "text" in s]
        frames = [scenes[s["image"]] for s in document["segments"] if "image" in s]
        assert texts[0] == f"Step 1: {describe(frames[0])}"
        for step, (text, before, after) in enumerate(zip(texts[1:], frames, frames[1:]), start=2):
            assert text.startswith(f"Step {step}: ")
            removed, added = set(before.objects) - set(after.objects), set(after.objects) - set(before.objects)
            assert len(added) == 1 and len(removed) <= 1 and after.word == before.word
            (new,) = added
            if text.endswith(" appears " + CELL_PHRASES[new.cell] + "."):
                changes["appear"] += 1
                assert not removed
                continue
            (old,) = removed
            assert text.startswith(f"Step {step}: the {old.size} {old.colour} {old.shape} {CELL_PHRASES[old.cell]} ")
            if text.endswith(f" moves to the {new.cell}."):
                changes["move"] += 1
                assert (new.shape, new.colour, new.size) == (old.shape, old.colour, old.size)
            else:
                changes["recolour"] += 1
                assert text.endswith(f" turns {new.colour}.") and new.cell == old.cell and new.colour != old.colour
    assert set(changes) == {"appear", "move", "recolour"}


def test_reuse_mismatch_and_force(tmp_path):
    out = tmp_path / "w"
    summary = generate_world(out, seed=1, **SMALL)
    stamp = (out / "world.json").stat().st_mtime_ns, (out / "documents.jsonl").stat().st_ino
    assert generate_world(out, seed=1, **SMALL) == summary
    assert ((out / "world.json").stat().st_mtime_ns, (out / "documents.jsonl").stat().st_ino) == stamp
    with pytest.raises(ValueError, match=r"(?s)w.*seed=1"):
        generate_world(out, seed=2, **SMALL)
    with pytest.raises(ValueError, match="image_size"):
        generate_world(out, seed=1, num_scenes=60, image_size=16)
    before = (out / "documents.jsonl").read_bytes()
    generate_world(out, seed=2, force=True, **SMALL)
    assert json.loads((out / "world.json").read_text())["seed"] == 2
    assert (out / "documents.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # neither the build nor the old world is left


def test_refuses_foreign_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no world.json"):
        generate_world(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"

    def crash(directory, settings):
        (directory / "images").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(world, "_write_world", crash)
    with pytest.raises(OSError, match="disk full"):
        generate_world(tmp_path / "w", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]
