"""The evaluation report a person opens: OUT/index.html (self-contained) and OUT/report.png (a one-picture summary).

    write_report(eval_dir, run_dir, links={...}, facts={...})

reads EVAL/eval.json and EVAL/pictures/ (from `evaluate.evaluate`) and the training run's log.jsonl, and shows:
the metrics table (trained model beside the model before training, chance, and the tokenizer's ceiling), the
training curves (total/text/image loss, z-loss, mean log Z), held-out reconstructions next to their originals,
and the generated pictures, captions, answers and stories with the checker's verdict on each.
"""
from __future__ import annotations

import base64
import html
import json
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from runkit.files import atomic_write_text
from runkit.runs import LOG, read_log
from unified_lm.eval.evaluate import percent
from unified_lm.train.plot import CURVES, draw_score_bars, draw_series, plot_training_curves, plt, save_figure

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { padding: 0.2rem 0.7rem; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 600; } .note { color: #777; font-size: 0.85rem; }
.grid { display: flex; flex-wrap: wrap; gap: 0.75rem; } figure { margin: 0; width: 11rem; font-size: 0.78rem; }
figure img, .pair img { width: 128px; image-rendering: pixelated; border: 1px solid #ccc; }
.ok { color: #1a7f37; } .bad { color: #c62828; } .pair { display: inline-block; margin: 0 0.5rem 0.5rem 0; }
.story { display: flex; gap: 0.75rem; align-items: flex-start; margin-bottom: 1rem; }
.curves img { width: 32rem; margin-right: 1rem; }
"""

# (task, metric, label): the rows of the metrics table, in reading order
TABLE = (
    ("text_to_image", "colour_shape", "text -> picture: colour + shape right (per object)"),
    ("text_to_image", "colour", "text -> picture: colour"),
    ("text_to_image", "shape", "text -> picture: shape"),
    ("text_to_image", "size", "text -> picture: size"),
    ("text_to_image", "position", "text -> picture: an object at each named cell"),
    ("text_to_image", "count", "text -> picture: counts of every (colour, shape) right"),
    ("text_to_image", "exact", "text -> picture: whole scene exact"),
    ("interleaved", "colour_shape", "stories: colour + shape right, every step"),
    ("interleaved", "first_step_colour_shape", "stories: step 1 (from the caption)"),
    ("interleaved", "later_steps_colour_shape", "stories: later steps (from the change + own picture)"),
    ("image_to_text", "colour_shape", "picture -> caption: colour + shape right (per object)"),
    ("image_to_text", "position", "picture -> caption: every object placed"),
    ("image_to_text", "size", "picture -> caption: size"),
    ("image_to_text", "count", "picture -> caption: counts right"),
    ("image_to_text", "exact", "picture -> caption: whole scene exact"),
    ("qa", "accuracy", "questions about pictures: exact answer"),
    ("qa", "accuracy_count", "  how many <colour> <shape>s"),
    ("qa", "accuracy_colour", "  what colour is the shape at ..."),
    ("qa", "accuracy_what", "  what is at ..."),
    ("qa", "accuracy_total", "  how many shapes"),
    ("qa", "accuracy_word", "  what word is written"),
    ("text", "perplexity", "held-out English: perplexity per piece (lower is better)"),
    ("text", "bits_per_character", "held-out English: bits per character (lower is better)"),
    ("tokenizer_photos", "psnr", "tokenizer, held-out photos: PSNR dB"),
    ("tokenizer_photos", "ssim", "tokenizer, held-out photos: SSIM"),
    ("tokenizer_photos", "codebook_usage", "tokenizer, held-out photos: codebook usage"),
    ("tokenizer_photos", "stability_noise", "tokenizer, held-out photos: codes unchanged by +-1/255 noise"),
    ("tokenizer_world", "psnr", "tokenizer, held-out world pictures: PSNR dB"),
    ("tokenizer_world", "stability_noise", "tokenizer, world pictures: codes unchanged by +-1/255 noise"),
    ("tokenizer_world", "stability_reencode", "tokenizer, world pictures: codes unchanged when its reconstruction is re-encoded"),
    ("tokenizer_world", "content.code_given_label", "tokenizer, world pictures: H(code | cell content), nats (0 = a function of content)"),
    ("tokenizer_world", "content.label_given_code", "tokenizer, world pictures: H(cell content | code), nats (0 = one meaning per code)"),
)
# the summary picture's bars: (task, metric, label)
SUMMARY = (
    ("text_to_image", "colour_shape", "text -> picture\ncolour + shape"),
    ("interleaved", "later_steps_colour_shape", "stories, later steps\ncolour + shape"),
    ("image_to_text", "colour_shape", "picture -> caption\ncolour + shape"),
    ("qa", "accuracy", "questions\nexact answer"),
)
COLUMNS = ("trained", "before_training", "chance", "ceiling")


def _value(results: dict, task: str, metric: str, column: str, suffix: str = ""):
    """A metric of one column (suffix "_se": its standard error); "a.b" reads nested metrics; None if absent."""
    if column == "ceiling":  # what the checker reads from the tokenizer's reconstructions of the true pictures
        if task in ("text_to_image", "interleaved") and "tokenizer_world" in results:
            checker = results["tokenizer_world"].get("trained", {}).get("checker", {})
            key = "colour_shape" if metric.endswith("colour_shape") else metric
            return checker.get(key + suffix)
        return None
    found = results.get(task, {}).get(column, {})
    *parents, name = metric.split(".")
    for parent in parents:
        found = found.get(parent, {})
    return found.get(name + suffix)


NATS = ("content.code_given_label", "content.label_given_code")


def _format(value, metric: str, error=None) -> str:
    """A table cell: percentages with their standard error when one is known (e.g. "81.2% ± 2.1")."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if metric == "ssim":
        return f"{value:.3f}"
    if metric in ("psnr", "perplexity", "bits_per_character") or metric in NATS:
        return f"{value:.2f}" if metric != "perplexity" else f"{value:,.1f}"
    return percent(value, error)


def metrics_table(results: dict) -> str:
    rows = []
    for task, metric, label in TABLE:
        values = [_value(results, task, metric, column) for column in COLUMNS]
        if values[0] is None:
            continue
        errors = [_value(results, task, metric, column, "_se") for column in COLUMNS]
        cells = "".join(f'<td class="num{" best" if column == "trained" else ""}">{_format(v, metric, e)}</td>'
                        for column, v, e in zip(COLUMNS, values, errors))
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in COLUMNS)
    return f"<table><tr><th>measure</th>{head}</tr>{''.join(rows)}</table>"


def _image(path: Path, alt: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _verdict(scores: dict, key: str = "colour_shape") -> str:
    value = scores.get(key, scores.get("correct"))
    ok = value is not None and value >= 1.0
    return f'<span class="{"ok" if ok else "bad"}">{key.replace("_", " ")} {_format(value, key) if key != "correct" else ("right" if ok else "wrong")}</span>'


def _examples_html(eval_dir: Path, examples: dict) -> str:
    parts = []
    if examples.get("text_to_image"):
        figures = "".join(
            f"<figure>{_image(eval_dir / e['picture'])}<figcaption><b>asked:</b> {html.escape(e['prompt'])}<br>"
            f"<b>read:</b> {html.escape(e['reading'])}<br>{_verdict(e['scores'])}</figcaption></figure>"
            for e in examples["text_to_image"])
        parts.append(f"<h2>Text -> picture (held-out captions)</h2><div class='grid'>{figures}</div>")
    if examples.get("interleaved"):
        stories = "".join(
            "<div class='story'>" + "".join(
                f"<figure>{_image(eval_dir / step['picture'])}<figcaption>{html.escape(step['text'])}<br>"
                f"{_verdict(step['scores'])}</figcaption></figure>" for step in story["steps"]) + "</div>"
            for story in examples["interleaved"])
        parts.append(f"<h2>Stories: each picture drawn after the text before it</h2>{stories}")
    for task, title in (("image_to_text", "Picture -> caption"), ("qa", "Questions about pictures")):
        if not examples.get(task):
            continue
        rows = []
        for e in examples[task]:
            picture = Path(e["picture_path"])
            shown = _image(picture) if picture.is_file() else ""
            prompt = f"{html.escape(e['prompt'])}<br>" if "prompt" in e else ""
            key = "colour_shape" if task == "image_to_text" else "correct"
            rows.append(f"<tr><td>{shown}</td><td>{prompt}<b>model:</b> {html.escape(e['output'])}<br>"
                        f"<b>truth:</b> {html.escape(e['truth'])}<br>{_verdict(e['scores'], key)}</td></tr>")
        parts.append(f"<h2>{title} (held-out pictures)</h2><table>{''.join(rows)}</table>")
    return "".join(parts)


def _pairs_html(eval_dir: Path, pairs: list[dict]) -> str:
    return "".join(f"<span class='pair'>{_image(eval_dir / p['original'], 'original')}"
                   f"{_image(eval_dir / p['reconstruction'], 'reconstruction')}</span>" for p in pairs)


def write_report(eval_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, title: str = "Evaluation report",
                 links: dict[str, str] | None = None, facts: dict[str, str] | None = None,
                 understanding: str | os.PathLike | None = None) -> Path:
    """EVAL/index.html and EVAL/report.png from EVAL/eval.json (+ RUN/log.jsonl for the curves); returns the HTML.
    `understanding`: an understanding.json (`unified-lm understand`) whose comparison joins the report."""
    eval_dir = Path(eval_dir)
    report = json.loads((eval_dir / "eval.json").read_text())
    results, examples = report["results"], report["examples"]
    log = read_log(Path(run_dir) / LOG) if run_dir else []
    curves = plot_training_curves(log, eval_dir / "curves") if run_dir else {}
    facts = {"checkpoint": report["checkpoint"], "picture grid": "x".join(map(str, report["grid"])),
             "evaluation seconds": f"{sum(report['seconds'].values()):.0f}", **(facts or {})}
    body = [f"<h1>{html.escape(title)}</h1><table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
            + "</table>"]
    body.append("<h2>What the model learned</h2>" + metrics_table(results) +
                "<p class='note'>± is one standard error of the mean over the held-out items. "
                "before training: the same model at its initial weights (and the untrained tokenizer). "
                "chance: the trained model's outputs scored against another prompt's ground truth (for text: uniform "
                "over the text pieces). ceiling: the checker on the tokenizer's reconstructions of the true pictures. "
                "Pictures are read by a deterministic checker built from the world's renderer.</p>")
    if curves:
        body.append("<h2>Training curves</h2><div class='curves'>" + "".join(_image(p, n) for n, p in curves.items()) + "</div>")
    if examples.get("photo_pairs"):
        body.append("<h2>Tokenizer: held-out photos (original | reconstruction)</h2>" + _pairs_html(eval_dir, examples["photo_pairs"]))
    if examples.get("world_pairs"):
        body.append("<h2>Tokenizer: held-out world pictures (original | reconstruction)</h2>" + _pairs_html(eval_dir, examples["world_pairs"]))
    if understanding and Path(understanding).is_file():
        body.append(understanding_html(json.loads(Path(understanding).read_text())))
    body.append(_examples_html(eval_dir, examples))
    if links:
        body.append("<h2>More sampled documents</h2><ul>" + "".join(
            f"<li><a href='{html.escape(os.path.relpath(target, eval_dir))}'>{html.escape(name)}</a></li>"
            for name, target in links.items()) + "</ul>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    out = eval_dir / "index.html"
    atomic_write_text(out, page)
    summary_picture(eval_dir, report, log)
    return out


def understanding_html(report: dict) -> str:
    """The discrete-vs-continuous comparison (unified_lm.eval.understanding) as an HTML table with a few answers."""
    from unified_lm.eval.understanding import ROWS

    models = report["models"]
    names = list(models)
    head = "".join(f"<th>{html.escape(n)} ({html.escape(models[n]['path'])}, step {models[n].get('step')})</th>"
                   for n in names)
    rows = []
    for task, metric, label in ROWS:
        values = [models[n].get(task, {}).get(metric) for n in names]
        if all(v is None for v in values):
            continue
        chance = models[names[0]].get("chance", {}).get(task, {}).get(metric)
        errors = [models[n].get(task, {}).get(f"{metric}_se") for n in names]
        cells = [("-" if v is None else f"{v:.1f}" if task == "text" else _format(v, metric, e))
                 for v, e in zip(values, errors)]
        chance_cell = "-" if chance is None or task == "text" else f"{100 * chance:.1f}%"
        rows.append(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td>{chance_cell}</td></tr>")
    answers = []
    for name in names:
        for item in models[name].get("examples", {}).get("qa", [])[:3]:
            answers.append(f"<li><b>{html.escape(name)}</b>: {html.escape(item['prompt'])} -> "
                           f"{html.escape(item['output'])} (truth: {html.escape(item['truth'])})</li>")
    return ("<h2>Picture understanding: discrete codes vs continuous features</h2>"
            f"<table><tr><th>held-out world</th>{head}<th>chance</th></tr>{''.join(rows)}</table>"
            "<p class='note'>Each model answers the same held-out questions and captions its pictures; the discrete "
            "path gives pictures as vqtok codes, the continuous path as pixels through the image encoder and MLP "
            "adapter. Both understanding models start from the same language model and train stage 2 on the same "
            "documents for the same steps; the continuous one first trains its adapter alone (stage 1).</p>"
            f"<ul>{''.join(answers)}</ul>")


def summary_picture(eval_dir: Path, report: dict, records: list[dict]) -> Path:
    """report.png, the README's one-picture summary: the key scores beside their baselines (standard-error bars),
    the training loss, and a row of held-out text -> picture samples framed green where the checker reads every
    asked-for object right in colour and shape."""
    results = report["results"]
    rows = [(label, {column: (value, _value(results, task, metric, column, "_se"))
                     for column in COLUMNS if (value := _value(results, task, metric, column)) is not None})
            for task, metric, label in SUMMARY if _value(results, task, metric, "trained") is not None]
    examples = report["examples"].get("text_to_image", [])[:8]
    figure = plt.figure(figsize=(12, 7.2))
    grid = figure.add_gridspec(2, max(2, len(examples)), height_ratios=(3, 1.3))
    top = grid[0, :].subgridspec(1, 2, width_ratios=(1.7, 1), wspace=0.25)  # room for the loss axis' label
    scores = figure.add_subplot(top[0])
    draw_score_bars(scores, rows, "% right on held-out world documents (±1 standard error)")
    scores.set_title("what the model learned")
    ylabel, series = CURVES["loss"]
    draw_series(figure.add_subplot(top[1]), records, series, ylabel, "training loss", legend_size="small")
    for number, example in enumerate(examples):
        axes = figure.add_subplot(grid[1, number])
        axes.imshow(np.asarray(Image.open(eval_dir / example["picture"]).convert("RGB")), interpolation="nearest")
        right = example["scores"].get("colour_shape", 0) >= 1.0
        for spine in axes.spines.values():
            spine.set_edgecolor("#1a7f37" if right else "#c62828")
            spine.set_linewidth(3)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel(_short(example["prompt"]), fontsize=6.5)
    figure.suptitle("held-out text -> picture samples (green frame: every object right in colour and shape)",
                    y=0.02, fontsize=9)
    return save_figure(figure, eval_dir / "report.png")


def _short(caption: str, width: int = 24) -> str:
    """A caption's placements, wrapped to a few short lines for a picture's label."""
    placements = caption.split(". ", 1)[-1]
    return "\n".join(textwrap.wrap(placements, width)[:4])
