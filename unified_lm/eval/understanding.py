"""`unified-lm understand`: picture understanding through discrete tokens vs continuous features, side by side.

The same held-out world questions and captions are put to each model, its pictures given either as vqtok codes
(the discrete path) or as pixels through the model's image encoder and adapter (the continuous path):
    qa              exact answers, per question type, on the held-out question documents.
    fine_detail     "what word is written in the picture?" asked of EVERY held-out picture that carries a word
                    (the question documents hold only a few): reading 2-3 small letters is the fine detail a VQ
                    code grid loses and continuous features are expected to keep.
    image_to_text   "Caption:" -> caption, scored per attribute (colour + shape, position, exact scene).
    text            held-out English perplexity: whether understanding training cost text ability.
Chance is the same outputs scored against other items of the same kind (a fixed derangement; see evaluate.py).
Writes OUT/understanding.json and OUT/understanding.md (atomically).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from runkit.files import atomic_write_text
from unified_lm.eval.evaluate import EvalSettings, Evaluator, held_out_texts, load_world_tasks, percent
from unified_lm.model.checkpoint import load_model
from unified_lm.world.corpus import read_documents, read_scenes

WORD_QUESTION = "Question: what word is written in the picture? Answer:"


def word_questions(world: str | os.PathLike, split: str = "heldout") -> list[tuple[Path, str, str, str]]:
    """(picture, question, answer, "word") for every distinct picture of the split whose scene has a word."""
    world = Path(world)
    scenes = read_scenes(world)
    questions, seen = [], set()
    for document in read_documents(world, split):
        for segment in document["segments"]:
            image = segment.get("image")
            if image and image not in seen and scenes[image].word is not None:
                seen.add(image)
                questions.append((world / image, WORD_QUESTION, scenes[image].word, "word"))
    return questions

PATHS = ("discrete", "continuous")
# (task, metric, label) rows of the comparison table
ROWS = (("qa", "accuracy", "questions, all"), ("qa", "accuracy_word", "questions: the written word (fine detail)"),
        ("qa", "accuracy_count", "questions: how many of a colour and shape"),
        ("qa", "accuracy_total", "questions: how many shapes"),
        ("qa", "accuracy_colour", "questions: colour at a cell"),
        ("qa", "accuracy_what", "questions: what is at a cell"),
        ("fine_detail", "accuracy", "reading the small written word (every held-out picture with one)"),
        ("image_to_text", "colour_shape", "caption: colour + shape per object"),
        ("image_to_text", "position", "caption: object placed in its cell"),
        ("image_to_text", "exact", "caption: whole scene exact"),
        ("text", "perplexity", "held-out English perplexity (lower is better)"))


def evaluate_understanding(models: list[tuple[str, str, str]], world: str | os.PathLike, out: str | os.PathLike,
                           settings: EvalSettings, tokenizer=None, device: str = "cpu", log=print) -> dict:
    """models: (name, run or checkpoint, "discrete" | "continuous"). A discrete model needs `tokenizer` (the vqtok
    model its vocabulary was built for); a continuous one a picture adapter (trained with train.encoder_run)."""
    tasks = load_world_tasks(world, settings)
    fine_detail = word_questions(world)
    if not fine_detail:
        raise ValueError(f"{world}: no held-out picture carries a written word; generate a larger world")
    texts = held_out_texts(settings.text_corpus, settings.text_documents) if settings.text_documents else []
    results: dict[str, dict] = {}
    for name, run, path in models:
        if path not in PATHS:
            raise ValueError(f"{name}: picture path must be one of {PATHS}, got {path!r}")
        loaded = load_model(run, device)
        adapter = loaded.model.picture_adapter
        if path == "continuous" and adapter is None:
            raise ValueError(f"{name}: {loaded.directory} has no picture encoder; it can only read pictures as codes")
        if path == "discrete" and tokenizer is None:
            raise ValueError(f"{name}: the discrete path needs the vqtok tokenizer (--tokenizer VQRUN)")
        grid = loaded.image_grid
        if path == "discrete" and grid is None:
            raise ValueError(f"{name}: {loaded.directory} records no picture grid; it never read pictures as codes")
        size = adapter.vision_config.image_size if path == "continuous" else None
        log(f"[understand] {name} ({path}): questions ({len(tasks.questions)}), written words ({len(fine_detail)}), "
            f"captions ({len(tasks.pictures)}), text ({len(texts)} documents)")
        start = time.perf_counter()
        evaluator = Evaluator(loaded.model, loaded.vocab, tokenizer, grid, settings, continuous_size=size)
        qa, qa_chance = evaluator.qa(tasks.questions)
        words, words_chance = evaluator.qa(fine_detail)
        captions, captions_chance = evaluator.image_to_text(tasks.pictures)
        entry = {"checkpoint": str(loaded.directory), "path": path, "step": loaded.meta.get("step"),
                 "qa": qa.metrics, "fine_detail": words.metrics | {"questions": len(fine_detail)},
                 "image_to_text": captions.metrics,
                 "chance": {"qa": qa_chance.metrics, "fine_detail": words_chance.metrics,
                            "image_to_text": captions_chance.metrics},
                 "examples": {"qa": qa.items[:6], "fine_detail": words.items[:4], "image_to_text": captions.items[:4]}}
        if texts:
            entry["text"] = evaluator.text_perplexity(texts).metrics
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = entry
    report = {"world": str(Path(world).resolve()), "settings": asdict(settings), "models": results}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "understanding.json", json.dumps(report, indent=1, default=float) + "\n")
    atomic_write_text(out / "understanding.md", comparison_table(report) + "\n")
    return report


def comparison_table(report: dict) -> str:
    """Markdown: one row per metric, one column per model (chance beside the first model's number)."""
    models = report["models"]
    names = list(models)
    header = "| metric | " + " | ".join(f"{n} ({models[n]['path']})" for n in names) + " | chance |"
    lines = [header, "|" + "---|" * (len(names) + 2)]  # ± one standard error over the held-out items
    for task, metric, label in ROWS:
        values = [models[n].get(task, {}).get(metric) for n in names]
        if all(v is None for v in values):
            continue
        chance = models[names[0]].get("chance", {}).get(task, {}).get(metric)
        if task == "text":
            cells = [f"{v:.1f}" if v is not None else "-" for v in values]
            chance_cell = "-"
        else:
            errors = [models[n].get(task, {}).get(f"{metric}_se") for n in names]
            cells = ["-" if v is None else percent(v, e) for v, e in zip(values, errors)]
            chance_cell = f"{100 * chance:.1f}%" if chance is not None else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chance_cell} |")
    return "\n".join(lines)
