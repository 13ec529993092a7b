"""`unified-lm eval`: what the unified model learned, measured against the procedural world's ground truth.

Tasks (held-out documents of the world: scenes that never occur in training; see unified_lm/world/corpus.py)
    text_to_image   caption -> picture (the sampler's image mode, with CFG); the decoded picture is read back by
                    `world.check.read_picture` (a deterministic reader built from the world's renderer, never
                    from a learned model) and scored per attribute against the caption's scene.
    image_to_text   picture + "Caption:" -> caption (greedy); the caption is parsed (`world.parse_caption`) and scored per
                    attribute against the picture's scene.
    qa              picture + "Question: ... Answer:" -> answer (greedy); exact match, per question type.
    interleaved     stories: each step's text is given, the model draws the picture after it with its own
                    earlier pictures in context; each picture is scored against that step's scene.
    text            perplexity (per piece, and bits per character) on held-out English text: the last
                    `text_documents` documents of the corpus, which training (the first N) never reaches.
    tokenizer       PSNR / SSIM / codebook usage on held-out photos, and on held-out world pictures, whose
                    reconstructions read by the checker give the ceiling any generated picture can reach.

Every number has its baselines from the same run:
    before_training   the same model at the weights its training started from (`untrained_model`), and the
                      untrained tokenizer for the tokenizer rows;
    chance            the trained model's outputs scored against another prompt's ground truth (a fixed
                      derangement), i.e. an output that ignores its prompt; for text, the uniform distribution.
Writes OUT/eval.json (atomically) and OUT/pictures/*.png; `report.write_report` turns them into OUT/index.html.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from runkit.files import atomic_write_text
from unified_lm.generate.prompts import continuous_pictures, encode_pictures
from unified_lm.generate.render import decode_pictures
from unified_lm.generate.sampler import Sampler
from unified_lm.generate.sampling import SamplingConfig
from unified_lm.generate.segments import ContinuousPicture, Prompt
from unified_lm.tokens.text_corpus import read_texts
from unified_lm.train.initial import untrained_model
from unified_lm.world.check import (
    ATTRIBUTES,
    aggregate,
    derangement,
    mean_and_error,
    read_picture,
    score_objects,
    score_picture,
    shuffled_scores,
)
from unified_lm.world.corpus import (
    CAPTION_PREFIX,
    Scene,
    cell_labels,
    describe,
    parse_caption,
    read_documents,
    read_scenes,
    scene_facts,
)
from vqtok.images import atomic_save_png, load_rgb, preprocess, to_tensor, to_uint8


@dataclass
class EvalSettings:
    count: int = 0  # held-out documents per world task (the first `count` of each kind, in file order; 0: all)
    stories: int = 0  # held-out stories for the interleaved task (0: all)
    text_documents: int = 100  # held-out English documents (the corpus's last N)
    text_corpus: str = "default"
    text_context: int = 256  # tokens per perplexity window
    guidance: str = "2way"  # CFG for pictures: none | 2way | 3way
    guidance_scale: float = 3.0
    image_temperature: float = 1.0
    image_top_k: int = 0
    batch_size: int = 16
    seed: int = 0
    examples: int = 12  # items per task kept with pictures for the report
    baselines: bool = True  # also evaluate the untrained model and tokenizer
    # held-out documents per task for the untrained model (0: as many as the trained model's): its outputs are
    # noise, so a few dozen give its rate to within a few points, and it runs every generation to the token limit
    baseline_count: int = 48


@dataclass
class TaskResult:
    """One task for one model: aggregate metrics, and the first items in full for the report."""
    metrics: dict[str, float]
    items: list[dict] = field(default_factory=list)


# -----------------------------------------------------------------------------
# Ground truth from the world directory

@dataclass
class WorldTasks:
    captions: list[tuple[str, Scene]]  # text_to_image: (caption, scene)
    pictures: list[tuple[Path, str, Scene]]  # image_to_text: (picture, caption, scene)
    questions: list[tuple[Path, str, str, str]]  # qa: (picture, "Question: ... Answer:", answer, question type)
    stories: list[list[tuple[str, Path, Scene]]]  # per story: (step text, picture, scene) per frame


QUESTION_TYPES = (("how many shapes", "total"), ("how many", "count"), ("what colour", "colour"),
                  ("what word", "word"), ("what is", "what"))


def question_type(question: str) -> str:
    return next(kind for prefix, kind in QUESTION_TYPES if question.startswith(f"Question: {prefix}"))


def load_world_tasks(world: str | os.PathLike, settings: EvalSettings, split: str = "heldout") -> WorldTasks:
    world = Path(world)
    if not (world / "world.json").is_file():
        raise FileNotFoundError(f"{world} holds no complete world (world.json missing); run `unified-lm world`")
    scenes = read_scenes(world)
    tasks = WorldTasks([], [], [], [])
    count, stories = settings.count or math.inf, settings.stories or math.inf
    for document in read_documents(world, split):
        segments = document["segments"]
        kind = document["kind"]
        if kind == "text_to_image" and len(tasks.captions) < count:
            tasks.captions.append((segments[0]["text"], scenes[segments[1]["image"]]))
        elif kind == "image_to_text" and len(tasks.pictures) < count:
            image = segments[0]["image"]
            tasks.pictures.append((world / image, segments[1]["text"], scenes[image]))
        elif kind == "qa" and len(tasks.questions) < count:
            question, answer = segments[1]["text"].split(" Answer: ")
            question += " Answer:"
            tasks.questions.append((world / segments[0]["image"], question, answer.rstrip("."), question_type(question)))
        elif kind == "story" and len(tasks.stories) < stories:
            frames = [(segments[i]["text"], world / segments[i + 1]["image"], scenes[segments[i + 1]["image"]])
                      for i in range(0, len(segments), 2)]
            tasks.stories.append(frames)
    if not (tasks.captions and tasks.pictures and tasks.questions and tasks.stories):
        raise ValueError(f"{world}: the {split!r} split lacks some document kinds (text_to_image, image_to_text, qa, "
                         "story); generate a larger world")
    return tasks


def first_of_each(tasks: WorldTasks, count: int) -> WorldTasks:
    """The first `count` items of each task (stories included)."""
    return WorldTasks(tasks.captions[:count], tasks.pictures[:count], tasks.questions[:count], tasks.stories[:count])


def held_out_texts(corpus: str, count: int) -> list[str]:
    """The corpus's last `count` documents (prepare's --text-documents takes from the front)."""
    texts = list(read_texts(corpus))
    if len(texts) < 2 * count:
        raise ValueError(f"text corpus {corpus} has {len(texts)} documents; need at least {2 * count} to hold out {count}")
    return texts[-count:]


# -----------------------------------------------------------------------------
# Scoring text

def score_caption(caption: str, scene: Scene) -> dict[str, float]:
    """A generated caption against the picture's scene: per object, whether the placement sentence names an
    object at its cell (position) with the right colour, shape, size; the inventory counts; the whole scene."""
    parsed = parse_caption(caption)
    by_cell = {}
    for obj in parsed.objects:  # the first mention of a cell counts
        by_cell.setdefault(obj.cell, obj)
    scores = score_objects(by_cell, scene)
    scores["count"] = float(parsed.counts == scene_facts(scene))
    scores["extra_objects"] = float(len({obj.cell for obj in parsed.objects} - {obj.cell for obj in scene.objects}))
    try:
        scores["exact"] = float(parsed.to_scene() == scene)
    except ValueError:  # two objects in one cell, or a word in an occupied cell: not a scene at all
        scores["exact"] = 0.0
    if scene.word is not None:
        scores["word"] = float(parsed.word == scene.word and parsed.word_cell == scene.word_cell)
    return scores


def first_sentence(text: str) -> str:
    """'red. Question...' -> 'red': an answer ends at its full stop."""
    return re.split(r"[.\n]", text.strip(), maxsplit=1)[0].strip()


# -----------------------------------------------------------------------------
# The evaluator

class Evaluator:
    """Runs every world task for one model (trained or untrained) through one `Sampler`."""

    def __init__(self, model, vocab, tokenizer, grid: tuple[int, int] | None, settings: EvalSettings,
                 continuous_size: int | None = None):
        """continuous_size: read prompt pictures through the continuous path (pixels of this size for the model's
        picture adapter) instead of as vqtok codes."""
        self.model, self.vocab, self.tokenizer, self.grid, self.settings = model, vocab, tokenizer, grid, settings
        self.continuous_size = continuous_size
        self.sampler = Sampler(model, vocab, grid)
        self._codes: dict[Path, np.ndarray | ContinuousPicture] = {}

    # -- pictures in and out --------------------------------------------------------------------------------------
    def encode(self, paths: list[Path]) -> list[np.ndarray | ContinuousPicture]:
        """World pictures -> (h, w) codes at the model's grid, or continuous pictures (cached: the same picture
        serves several tasks)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._codes]
        if self.continuous_size:
            self._codes.update(continuous_pictures(todo, self.continuous_size))
        else:
            self._codes.update(encode_pictures(todo, self.tokenizer, self.grid))
        return [self._codes[p] for p in paths]

    def _config(self, mode: str, max_new_tokens: int) -> SamplingConfig:
        s = self.settings
        return SamplingConfig.from_dict({
            "mode": mode, "max_new_tokens": max_new_tokens, "seed": s.seed,
            "text": {"temperature": 0.0}, "image": {"temperature": s.image_temperature, "top_k": s.image_top_k},
            "guidance": {"mode": s.guidance, "scale": s.guidance_scale}})

    def generate(self, prompts: list[Prompt], mode: str, max_new_tokens: int):
        documents = []
        for start in range(0, len(prompts), self.settings.batch_size):
            chunk = prompts[start : start + self.settings.batch_size]
            for number, prompt in enumerate(chunk, start):
                prompt.seed = self.settings.seed + number
            documents += self.sampler.generate(chunk, self._config(mode, max_new_tokens))
        return documents

    def draw(self, prompts: list[Prompt]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Image-mode prompts -> (codes, decoded (H, W, 3) uint8 pictures)."""
        documents = self.generate(prompts, "image", self.grid[0] * self.grid[1] + 1)
        codes = [d.images[0] for d in documents]
        return codes, decode_pictures(codes, self.tokenizer)

    # -- tasks ----------------------------------------------------------------------------------------------------
    def text_to_image(self, captions: list[tuple[str, Scene]]) -> tuple[TaskResult, TaskResult]:
        """Returns (result, chance): chance scores the same pictures against other captions' scenes."""
        _, pictures = self.draw([Prompt([caption]) for caption, _ in captions])
        readings = [read_picture(p) for p in pictures]
        scenes = [scene for _, scene in captions]
        scores = [score_picture(r, s) for r, s in zip(readings, scenes)]
        items = [{"prompt": caption, "picture": picture, "reading": describe_reading(reading), "scores": score}
                 for (caption, _), picture, reading, score in zip(captions, pictures, readings, scores)]
        return (TaskResult(aggregate(scores, errors=True), items[: self.settings.examples]),
                TaskResult(shuffled_scores(readings, scenes, self.settings.seed)))

    def image_to_text(self, pictures: list[tuple[Path, str, Scene]]) -> tuple[TaskResult, TaskResult]:
        codes = self.encode([path for path, _, _ in pictures])
        documents = self.generate([Prompt([c, CAPTION_PREFIX.strip()]) for c in codes], "understanding", 128)
        captions = [self.vocab.decode_text([t for t in d.tokens if self.vocab.is_text(t)]).strip()
                    for d in documents]
        scenes = [scene for _, _, scene in pictures]
        scores = [score_caption(c, s) for c, s in zip(captions, scenes)]
        chance = [score_caption(captions[i], scenes[j]) for i, j in enumerate(derangement(len(scenes), self.settings.seed))]
        items = [{"picture_path": str(path), "truth": truth, "output": caption, "scores": score}
                 for (path, truth, _), caption, score in zip(pictures, captions, scores)]
        return (TaskResult(aggregate(scores, errors=True), items[: self.settings.examples]),
                TaskResult(aggregate(chance, errors=True)))

    def qa(self, questions: list[tuple[Path, str, str, str]]) -> tuple[TaskResult, TaskResult]:
        codes = self.encode([path for path, _, _, _ in questions])
        documents = self.generate([Prompt([c, q]) for c, (_, q, _, _) in zip(codes, questions)], "understanding", 16)
        answers = [first_sentence(self.vocab.decode_text([t for t in d.tokens if self.vocab.is_text(t)]))
                   for d in documents]
        right = [float(a == truth) for a, (_, _, truth, _) in zip(answers, questions)]
        kinds = [kind for _, _, _, kind in questions]
        metrics = with_error("accuracy", right) | by_kind(right, kinds)
        # chance: the answer to another question of the same type (a fixed derangement within each type)
        chance = [0.0] * len(questions)
        for kind in set(kinds):
            members = [i for i, k in enumerate(kinds) if k == kind]
            if len(members) < 2:  # a lone question of its type has no other answer to borrow
                chance[members[0]] = math.nan
                continue
            for i, j in zip(members, [members[k] for k in derangement(len(members), self.settings.seed)]):
                chance[i] = float(answers[j] == questions[i][2])
        items = [{"picture_path": str(path), "prompt": q, "truth": truth, "output": a, "scores": {"correct": r}}
                 for (path, q, truth, _), a, r in zip(questions, answers, right)]
        return (TaskResult(metrics, items[: self.settings.examples]),
                TaskResult(with_error("accuracy", chance) | by_kind(chance, kinds)))

    def interleaved(self, stories: list[list[tuple[str, Path, Scene]]]) -> tuple[TaskResult, TaskResult]:
        """Step k's prompt: every earlier step's text and *generated* picture, then step k's text."""
        contexts: list[list] = [[] for _ in stories]
        drawn: list[list[tuple[np.ndarray, Scene]]] = [[] for _ in stories]
        for step in range(max(len(s) for s in stories)):
            active = [i for i, story in enumerate(stories) if step < len(story)]
            for i in active:
                contexts[i].append(stories[i][step][0])
            codes, pictures = self.draw([Prompt(list(contexts[i])) for i in active])
            for i, code, picture in zip(active, codes, pictures):
                contexts[i].append(code)
                drawn[i].append((picture, stories[i][step][2]))
        flat = [(picture, scene, step) for frames in drawn for step, (picture, scene) in enumerate(frames)]
        readings = [read_picture(picture) for picture, _, _ in flat]
        scores = [score_picture(r, scene) for r, (_, scene, _) in zip(readings, flat)]
        metrics = aggregate(scores, errors=True)
        metrics |= with_error("first_step_colour_shape", [s["colour_shape"] for s, f in zip(scores, flat) if f[2] == 0])
        metrics |= with_error("later_steps_colour_shape", [s["colour_shape"] for s, f in zip(scores, flat) if f[2] > 0])
        per_step = iter(scores)  # flat is story by story, step by step
        items = [{"steps": [{"text": text, "picture": picture, "scores": next(per_step)}
                            for (text, _, _), (picture, _) in zip(story, frames)]}
                 for story, frames in zip(stories, drawn)]
        return (TaskResult(metrics, items[: max(1, self.settings.examples // 3)]),
                TaskResult(shuffled_scores(readings, [scene for _, scene, _ in flat], self.settings.seed)))

    @torch.no_grad()
    def text_perplexity(self, texts: list[str]) -> TaskResult:
        """Per-piece perplexity and bits per character of `texts`, each as [<bos>] pieces [<eos>] in windows of
        settings.text_context tokens (a document's later windows start fresh: no context carried across)."""
        special, window = self.vocab.special, self.settings.text_context
        nats, pieces, characters = 0.0, 0, 0
        for text in texts:
            ids = [special.bos] + self.vocab.encode_text(text) + [special.eos]
            characters += len(text)
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window + 1])[None]
                logits = self.model(chunk[:, :-1]).float()[0]
                nats += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
                pieces += chunk.shape[1] - 1
        return TaskResult({"perplexity": math.exp(nats / pieces), "bits_per_character": nats / math.log(2) / characters,
                           "pieces": pieces, "characters": characters})


def with_error(name: str, values: list[float]) -> dict[str, float]:
    """{name: mean, name_se: its standard error} over the items (NaNs left out)."""
    mean, error = mean_and_error(values)
    return {name: mean, f"{name}_se": error}


def percent(value: float, error: float | None = None) -> str:
    """A share as "81.2% ± 2.1" (± one standard error), or "81.2%" when the error is unknown or not finite."""
    text = f"{100 * value:.1f}%"
    return f"{text} ± {100 * error:.1f}" if error is not None and math.isfinite(error) else text


def by_kind(values: list[float], kinds: list[str]) -> dict[str, float]:
    return {key: value for kind in sorted(set(kinds))
            for key, value in with_error(f"accuracy_{kind}", [v for v, k in zip(values, kinds) if k == kind]).items()}


def describe_reading(reading) -> str:
    """The checker's reading of a picture, as a world caption ('(nothing)' for an empty picture)."""
    scene = reading.to_scene()
    return describe(scene) if scene.objects else "(nothing)"


# -----------------------------------------------------------------------------
# Tokenizer rows

def tokenizer_metrics(tokenizer, photos: list[Path], world_pictures: list[tuple[Path, Scene]], grid: tuple[int, int]) -> dict:
    """Held-out photos at the tokenizer's resolution, and held-out world pictures at the model's grid: PSNR,
    SSIM, usage; for world pictures also the checker's reading of the reconstructions (the ceiling)."""
    from vqtok.data import load_eval_images
    from vqtok.evaluate import reconstruction_metrics

    tokenizer.eval()
    result: dict = {}
    if photos:
        images, _, _ = load_eval_images(photos, tokenizer.config.model.resolution)
        metrics = reconstruction_metrics(tokenizer, images)
        result["photos"] = {k: v for k, v in metrics.items() if k != "reconstructions"}
        result["photo_pairs"] = (to_uint8(images), to_uint8(metrics["reconstructions"]))
    resolution = grid[0] * tokenizer.downsample_factor
    pixels = torch.stack([to_tensor(preprocess(load_rgb(p), resolution)) for p, _ in world_pictures])
    metrics = reconstruction_metrics(tokenizer, pixels, labels=[cell_labels(scene) for _, scene in world_pictures])
    reconstructions = to_uint8(metrics.pop("reconstructions"))
    readings = [read_picture(p) for p in reconstructions]
    result["world"] = metrics | {"checker": aggregate([score_picture(r, s) for r, (_, s) in zip(readings, world_pictures)],
                                                      errors=True)}
    result["world_pairs"] = (to_uint8(pixels), reconstructions)
    return result


# -----------------------------------------------------------------------------
# Everything, with baselines

def evaluate(loaded, tokenizer, world: str | os.PathLike, out: str | os.PathLike, settings: EvalSettings,
             photos: list[Path] | None = None, untrained_tokenizer=None, log=print) -> dict:
    """Run every task for the trained model (and the baselines); write OUT/eval.json and OUT/pictures/.
    `loaded` is a checkpoint.LoadedModel; `tokenizer` the vqtok model its vocabulary was built for."""
    out = Path(out)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    grid = loaded.image_grid
    if grid is None:
        raise ValueError(f"checkpoint {loaded.directory} records no picture grid; it was not trained on pictures")
    tasks = load_world_tasks(world, settings)
    texts = held_out_texts(settings.text_corpus, settings.text_documents) if settings.text_documents else []
    models = {"trained": loaded.model}
    if settings.baselines:
        parameter = next(loaded.model.parameters())
        models["before_training"] = untrained_model(loaded.config).to(parameter.device, parameter.dtype).eval()
    results: dict[str, dict] = {}
    examples: dict[str, list] = {}
    timings: dict[str, float] = {}

    def timed(name: str, function, *args):
        start = time.perf_counter()
        value = function(*args)
        timings[name] = round(time.perf_counter() - start, 2) + timings.get(name, 0.0)
        return value

    for name, model in models.items():
        own = tasks
        if name == "before_training" and settings.baseline_count:
            own = first_of_each(tasks, settings.baseline_count)
        log(f"[eval] {name}: text -> image ({len(own.captions)}), image -> text ({len(own.pictures)}), "
            f"questions ({len(own.questions)}), stories ({len(own.stories)}), text ({len(texts)} documents)")
        evaluator = Evaluator(model, loaded.vocab, tokenizer, grid, settings)
        runs = {"text_to_image": timed("text_to_image", evaluator.text_to_image, own.captions),
                "image_to_text": timed("image_to_text", evaluator.image_to_text, own.pictures),
                "qa": timed("qa", evaluator.qa, own.questions),
                "interleaved": timed("interleaved", evaluator.interleaved, own.stories)}
        for task, (result, chance) in runs.items():
            results.setdefault(task, {})[name] = result.metrics
            if name == "trained":
                results[task]["chance"] = chance.metrics
                examples[task] = result.items
        if texts:
            results.setdefault("text", {})[name] = timed("text", evaluator.text_perplexity, texts).metrics
    if texts:
        results["text"]["chance"] = {"perplexity": float(loaded.vocab.text_size + 1),
                                     "note": "uniform over the text pieces and <eos>"}
    log("[eval] tokenizer: held-out photos and world pictures")
    world_pictures = [(path, scene) for path, _, scene in tasks.pictures]
    tokenizers = {"trained": tokenizer} | ({"before_training": untrained_tokenizer} if untrained_tokenizer else {})
    pairs = {}
    for name, model in tokenizers.items():
        metrics = timed("tokenizer", tokenizer_metrics, model, photos or [], world_pictures, grid)
        if name == "trained":
            pairs = {key: metrics.pop(key) for key in ("photo_pairs", "world_pairs") if key in metrics}
        else:
            metrics.pop("photo_pairs", None), metrics.pop("world_pairs", None)
        for part, values in metrics.items():
            results.setdefault(f"tokenizer_{part}", {})[name] = values
    report = {"checkpoint": str(loaded.directory), "step": loaded.meta.get("step"), "grid": list(grid),
              "settings": asdict(settings), "attributes": list(ATTRIBUTES), "results": results,
              "seconds": timings, "examples": save_examples(out, examples, pairs)}
    atomic_write_text(out / "eval.json", json.dumps(report, indent=1, default=float) + "\n")
    return report


def save_examples(out: Path, examples: dict[str, list], pairs: dict) -> dict:
    """Pictures of the report's examples -> OUT/pictures/*.png; returns the examples with PNG paths (relative)."""
    saved: dict[str, list] = {}
    for task, items in examples.items():
        saved[task] = []
        for number, item in enumerate(items):
            item = dict(item)
            if "picture" in item:
                item["picture"] = save_png(out, f"{task}-{number:03d}.png", item["picture"])
            if "steps" in item:
                item["steps"] = [dict(step, picture=save_png(out, f"{task}-{number:03d}-{k}.png", step["picture"]))
                                 for k, step in enumerate(item["steps"], 1)]
            saved[task].append(item)
    for name, (originals, reconstructions) in pairs.items():
        saved[name] = [{"original": save_png(out, f"{name}-{i:03d}-original.png", a),
                        "reconstruction": save_png(out, f"{name}-{i:03d}-reconstruction.png", b)}
                       for i, (a, b) in enumerate(zip(originals[:12], reconstructions[:12]))]
    return saved


def save_png(out: Path, name: str, picture: np.ndarray) -> str:
    atomic_save_png(picture, out / "pictures" / name)
    return f"pictures/{name}"

