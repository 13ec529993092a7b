"""Sampled documents -> files a person can open: PNG pictures, Markdown, self-contained HTML and JSON.

    OUT/index.html             every document on one page, pictures inline (base64 PNG): open it in a browser
    OUT/sample-000.html        one document, self-contained
    OUT/sample-000.md          Markdown, pictures linked from images/
    OUT/sample-000.json        prompt and generated segments (text, picture codes, PNG paths), seed, finish reason
    OUT/images/sample-000-p1.png, sample-000-1.png   prompt pictures (as the model saw them) and generated ones

Pictures are decoded from their codes by the vqtok decoder. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runkit.files import atomic_write_text
from unified_lm.generate.segments import SampledDocument, Segment
from vqtok.images import atomic_save_png, to_uint8

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
article { border: 1px solid #ddd; border-radius: 8px; padding: 1rem 1.25rem; margin-bottom: 1.5rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.05rem; color: #555; margin-top: 0; }
.prompt { background: #f3f3f3; border-left: 4px solid #999; padding: 0.5rem 0.75rem; margin-bottom: 0.75rem; }
.label { font-size: 0.75rem; text-transform: uppercase; color: #888; letter-spacing: 0.05em; }
p { white-space: pre-wrap; line-height: 1.5; }
img { width: 192px; image-rendering: pixelated; border: 1px solid #ccc; margin: 0.25rem 0; display: block; }
.meta { font-size: 0.8rem; color: #888; }
"""


@dataclass
class RenderedDocument:
    document: SampledDocument
    name: str  # "sample-000"
    prompt_pictures: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8, one per prompt picture
    pictures: list[np.ndarray] = field(default_factory=list)  # generated ones


def decode_pictures(codes: list[np.ndarray], tokenizer, batch_size: int = 16) -> list[np.ndarray]:
    """(h, w) code arrays -> (H, W, 3) uint8 pictures through the vqtok decoder (grouped by grid shape)."""
    device = next(tokenizer.parameters()).device
    pictures: list[np.ndarray | None] = [None] * len(codes)
    by_shape: dict[tuple, list[int]] = {}
    for index, array in enumerate(codes):
        by_shape.setdefault(tuple(array.shape), []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.as_tensor(np.stack([codes[i] for i in chunk]), dtype=torch.long, device=device)
            with torch.no_grad():
                images = to_uint8(tokenizer.decode(batch).clamp(-1, 1))
            for i, image in zip(chunk, images):
                pictures[i] = image
    return pictures


def _png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _segments_html(segments: list[Segment], pictures: list[np.ndarray], captions: list[str]) -> str:
    parts, picture = [], 0
    for segment in segments:
        if segment.kind == "text":
            parts.append(f"<p>{html.escape(segment.text)}</p>")
        else:
            data = base64.b64encode(_png_bytes(pictures[picture])).decode()
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(captions[picture])}">')
            picture += 1
    return "\n".join(parts)


def _article(item: RenderedDocument) -> str:
    document = item.document
    names = [f"{item.name} prompt picture {i + 1}" for i in range(len(item.prompt_pictures))]
    prompt = _segments_html(document.prompt, item.prompt_pictures, names)
    names = [f"{item.name} picture {i + 1}" for i in range(len(item.pictures))]
    body = _segments_html(document.segments, item.pictures, names)
    meta = (f"seed {document.seed} · {len(document.tokens)} tokens generated · {len(item.pictures)} picture(s) · "
            f"finished: {document.finish_reason}")
    return (f"<article><h2>{item.name}</h2>\n<div class=\"prompt\"><div class=\"label\">prompt</div>\n{prompt}</div>\n"
            f"<div class=\"label\">generated</div>\n{body}\n<div class=\"meta\">{html.escape(meta)}</div></article>")


def html_page(items: list[RenderedDocument], title: str, header: str = "") -> str:
    articles = "\n".join(_article(item) for item in items)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{header}\n{articles}\n</body></html>\n")


def _markdown(item: RenderedDocument) -> str:
    lines = [f"# {item.name}", "", "## Prompt", ""]
    for part, prefix in ((item.document.prompt, f"{item.name}-p"), (item.document.segments, f"{item.name}-")):
        picture = 0
        for segment in part:
            if segment.kind == "text":
                lines += [segment.text, ""]
            else:
                picture += 1
                lines += [f"![{prefix}{picture}](images/{prefix}{picture}.png)", ""]
        if part is item.document.prompt:
            lines += ["## Generated", ""]
    document = item.document
    lines += [f"_seed {document.seed}, {len(document.tokens)} tokens, finished: {document.finish_reason}_", ""]
    return "\n".join(lines)


def _json(item: RenderedDocument, settings: dict) -> dict:
    def segments(part: list[Segment], prefix: str) -> list[dict]:
        out, picture = [], 0
        for segment in part:
            record = segment.to_json()
            if segment.kind == "image":
                picture += 1
                record["png"] = f"images/{prefix}{picture}.png"
            out.append(record)
        return out

    document = item.document
    return {"name": item.name, "seed": document.seed, "finish_reason": document.finish_reason,
            "prompt_tokens": document.prompt_tokens, "generated_tokens": len(document.tokens),
            "prompt": segments(document.prompt, f"{item.name}-p"), "segments": segments(document.segments, f"{item.name}-"),
            "settings": settings}


def write_documents(out: str | os.PathLike, documents: list[SampledDocument], tokenizer=None,
                    settings: dict | None = None, title: str = "Sampled documents", header: str = "") -> Path:
    """Write every document (see the module docstring); returns OUT/index.html. Pictures need `tokenizer` (a
    vqtok VQModel); without one a document holding pictures is refused."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = [RenderedDocument(d, f"sample-{d.index:03d}") for d in documents]
    # continuous prompt pictures come with their pixels; every other picture is decoded from its codes
    prompt_codes = [[s.codes for s in d.prompt if s.kind == "image" and s.pixels is None] for d in documents]
    codes = [[s.codes for s in d.segments if s.kind == "image"] for d in documents]
    flat = [c for group in prompt_codes + codes for c in group]
    if flat and tokenizer is None:
        raise ValueError("these documents hold pictures; give the vqtok tokenizer (--tokenizer) to decode them")
    pictures = iter(decode_pictures(flat, tokenizer) if flat else [])
    for item in items:  # every prompt picture first: `flat` lists them before the generated ones
        item.prompt_pictures = [s.pixels if s.pixels is not None else next(pictures)
                                for s in item.document.prompt if s.kind == "image"]
    for item, group in zip(items, codes):
        item.pictures = [next(pictures) for _ in group]
        for number, picture in enumerate(item.prompt_pictures, 1):
            atomic_save_png(picture, out / "images" / f"{item.name}-p{number}.png")
        for number, picture in enumerate(item.pictures, 1):
            atomic_save_png(picture, out / "images" / f"{item.name}-{number}.png")
        atomic_write_text(out / f"{item.name}.md", _markdown(item))
        atomic_write_text(out / f"{item.name}.json", json.dumps(_json(item, settings or {}), indent=1) + "\n")
        atomic_write_text(out / f"{item.name}.html", html_page([item], item.name))
    index = out / "index.html"
    atomic_write_text(index, html_page(items, title, header))
    return index
