"""Interleaved documents (JSONL) and how one becomes a token sequence with a loss mask.

One JSON object per line:

    {"id": "story-000003", "train_on": "all", "segments": [
        {"text": "Step 1: a red circle at the left."},
        {"image": "images/story-000003-1.png"},                      # a path, relative to the JSONL file
        {"image_ref": {"store": "tokens/", "source": "a/b.png"}},   # or a reference into a vqtok token store
        {"text": "Step 2: ...", "loss": false}]}                     # per-segment override of train_on

`train_on` ("all" | "text" | "image", default from `unified-lm prepare --train-on`) picks which tokens are
training targets: "image" trains text->image data on <boi>, the codes and <eoi> only; "text" trains image->text
data on text pieces and <eos> only. A document becomes <bos> seg1 seg2 ... <eos>, each image as
<boi> code ... code <eoi> in raster order, or, for the continuous encoder-adapter path, as <boi>, one <image>
placeholder per adapter feature, <eoi>. A document may carry other keys (ground truth, provenance): they are kept
out of the tokens, but one that differs from a known key only by case or a typo ("Train_on") is refused, and a
segment or image_ref holds nothing but its known keys ({"text": ..., "Loss": false} is an error: silently
ignoring it would train on text the user excluded). Text must be valid Unicode (no lone surrogates such as
"\ud800"), and every file must be UTF-8: both errors name the file and line.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runkit.files import read_jsonl
from unified_lm.tokens.vocab import Vocabulary

TRAIN_ON = ("all", "text", "image")
DOCUMENT_KEYS = ("id", "kind", "split", "train_on", "segments")
SEGMENT_KEYS = ("text", "image", "image_ref", "loss")
IMAGE_REF_KEYS = ("store", "source")


@dataclass(frozen=True)
class ImageSegment:
    path: Path | None = None  # absolute path of a picture to look up / encode
    store: Path | None = None  # token store holding the codes ...
    source: str | None = None  # ... under this source name


@dataclass
class Document:
    id: str
    segments: list  # str (text) or ImageSegment, each with an optional loss override in `loss_overrides`
    loss_overrides: list  # bool | None per segment
    train_on: str
    where: str  # "file:line" for error messages
    split: str | None = None
    kind: str | None = None  # the record's "kind" (world: text_to_image, image_to_text, qa, story), for filtering

    @property
    def trains_pictures(self) -> bool:
        """Some picture of the document is a training target (and so is drawn from the text before it)."""
        return any(isinstance(segment, ImageSegment)
                   and (self.train_on in ("all", "image") if override is None else override)
                   for segment, override in zip(self.segments, self.loss_overrides))

    def without_text(self) -> Document:
        """The document with every text segment removed: its pictures alone, in order (caption dropout)."""
        kept = [i for i, segment in enumerate(self.segments) if not isinstance(segment, str)]
        return replace(self, segments=[self.segments[i] for i in kept],
                       loss_overrides=[self.loss_overrides[i] for i in kept])


@dataclass
class EncodedDocument:
    tokens: np.ndarray  # (n,) int64 ids: <bos> ... <eos>
    loss: np.ndarray  # (n,) bool: token is a training target
    # continuous pictures only: (n,) int64 picture * placeholders + patch at each <image> placeholder, else -1
    pictures: np.ndarray | None = None


def check_keys(record: dict, known: tuple[str, ...], where: str, extra_allowed: bool = False) -> None:
    """Refuse keys outside `known` (with extra_allowed: only those that look like a misspelt known key)."""
    for key in record:
        if key in known:
            continue
        close = [k for k in known if k.lower() == str(key).lower()] or difflib.get_close_matches(str(key), known, 1, 0.8)
        if close:
            raise ValueError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}?")
        if not extra_allowed:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(known)}")


def unicode_text(text: str, where: str) -> str:
    """`text` if it encodes as UTF-8; a lone surrogate (JSON "\\ud800" without its pair) names its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{where}: text holds {text[err.start]!r} at character {err.start}, a lone surrogate that is "
                         "not Unicode text") from None
    return text


def read_documents(path: str | os.PathLike, default_train_on: str = "all", split: str | None = None) -> Iterator[Document]:
    """Parse and validate a documents JSONL file; every problem names the file and line."""
    base = Path(path).parent.resolve()
    for where, record in read_jsonl(path, "documents"):
        document = _parse(record, where, base, default_train_on)
        if split is None or document.split == split:
            yield document


def _parse(record, where: str, base: Path, default_train_on: str) -> Document:
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list) or not record["segments"]:
        raise ValueError(f"{where}: a document is an object with a non-empty 'segments' list")
    check_keys(record, DOCUMENT_KEYS, where, extra_allowed=True)
    train_on = record.get("train_on", default_train_on)
    if train_on not in TRAIN_ON:
        raise ValueError(f"{where}: train_on must be one of {TRAIN_ON}, got {train_on!r}")
    for key in ("kind", "split"):
        if not isinstance(record.get(key, ""), str):
            raise ValueError(f"{where}: '{key}' must be a string, got {record[key]!r}")
    if not isinstance(record.get("id", ""), (str, int)) or isinstance(record.get("id"), bool):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {record['id']!r}")
    segments, overrides = [], []
    for index, segment in enumerate(record["segments"]):
        at = f"{where} segment {index}"
        if not isinstance(segment, dict):
            raise ValueError(f"{at}: expected an object with 'text', 'image' or 'image_ref'")
        check_keys(segment, SEGMENT_KEYS, at)
        kinds = [key for key in ("text", "image", "image_ref") if key in segment]
        if len(kinds) != 1:
            raise ValueError(f"{at}: needs exactly one of 'text', 'image', 'image_ref' (got {sorted(segment)})")
        loss = segment.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise ValueError(f"{at}: 'loss' must be true or false")
        if "text" in segment:
            if not isinstance(segment["text"], str):
                raise ValueError(f"{at}: 'text' must be a string")
            segments.append(unicode_text(segment["text"], at))
        elif "image" in segment:
            if not isinstance(segment["image"], str) or not segment["image"] or "\0" in segment["image"]:
                raise ValueError(f"{at}: 'image' must be a path")
            segments.append(ImageSegment(path=(base / unicode_text(segment["image"], at)).resolve()))
        else:
            ref = segment["image_ref"]
            if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) and ref[k] and "\0" not in ref[k]
                                                    for k in IMAGE_REF_KEYS):
                raise ValueError(f"{at}: 'image_ref' must be {{\"store\": DIR, \"source\": NAME}}")
            check_keys(ref, IMAGE_REF_KEYS, f"{at} image_ref")
            segments.append(ImageSegment(store=(base / unicode_text(ref["store"], at)).resolve(),
                                         source=unicode_text(ref["source"], at)))
        overrides.append(loss)
    return Document(str(record.get("id", where)), segments, overrides, train_on, where, record.get("split"),
                    record.get("kind"))


def encode_document(document: Document, vocab: Vocabulary, image_codes=None, pictures=None) -> EncodedDocument:
    """Tokens and loss mask of one document. A picture becomes, as discrete codes, <boi> codes <eoi> with
    image_codes(ImageSegment, where) -> (h, w) code array; as continuous features (pictures given: a
    `ContinuousPictures`), <boi> + <image> x placeholders + <eoi>, never a target, with the slot of every
    placeholder in `pictures` (the encoder-adapter's features replace those embeddings)."""
    special = vocab.special
    pieces, targets, slots = [np.array([special.bos])], [np.array([False])], [np.array([-1])]
    for segment, override in zip(document.segments, document.loss_overrides):
        if isinstance(segment, str):
            ids = np.asarray(vocab.encode_text(segment), dtype=np.int64)
            trained = document.train_on in ("all", "text") if override is None else override
            slot = np.full(len(ids), -1)
        elif pictures is not None:
            first = pictures.index(segment, document.where) * pictures.placeholders
            ids = np.array([special.boi] + [special.image] * pictures.placeholders + [special.eoi])
            trained = False  # the picture is input: its features come from the encoder, nothing to predict
            slot = np.concatenate([[-1], first + np.arange(pictures.placeholders), [-1]])
        else:
            ids = vocab.image_ids(image_codes(segment, document.where))
            trained = document.train_on in ("all", "image") if override is None else override
            slot = np.full(len(ids), -1)
        pieces.append(ids)
        targets.append(np.full(len(ids), trained))
        slots.append(slot)
    pieces.append(np.array([special.eos]))
    targets.append(np.array([document.train_on in ("all", "text")]))
    slots.append(np.array([-1]))
    return EncodedDocument(np.concatenate(pieces).astype(np.int64), np.concatenate(targets).astype(bool),
                           np.concatenate(slots).astype(np.int64) if pictures is not None else None)
