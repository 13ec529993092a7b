"""The joint vocabulary: text pieces + special tokens + one token per image code.

Native layout (format unified-lm-vocab/1, what `unified-lm vocab` builds; one contiguous range per role):

    [0, text_size)                               sentencepiece pieces (id 0 is sentencepiece's <unk>; bytes fall
                                                 back to <0x..> pieces, so any string encodes)
    [text_size, text_size + 6)                   specials, in this order: <bos> <eos> <pad> <boi> <eoi> <image>
    [image_offset, image_offset + codebook_size) image codes: token = image_offset + code

Converted layout (format unified-lm-vocab/2, written by `unified-lm import-chameleon`): a checkpoint's own ids.
The text model is a Hugging Face `tokenizer.json`; each role's ids are listed explicitly (image code -> id table,
the ids of the six specials, the ranges of text ids), so a Chameleon / Anole checkpoint keeps every id it was
trained with. Nothing below assumes an offset: every caller goes through `is_image`, `is_text`, `image_ids`,
`image_codes` and the masks.

`<boi>`/`<eoi>` bracket the `grid_h * grid_w` codes of one picture (raster order). `<image>` is the placeholder
where the continuous encoder-adapter path splices in embeddings; it is never a training target.

A vocabulary is built for one image tokenizer: `check_tokenizer` refuses a vqtok checkpoint or token store whose
codebook size differs (the ids would silently address the wrong codes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from runkit.files import read_json

FORMAT = "unified-lm-vocab/1"
MAX_CODEBOOK_SIZE = 1 << 20  # image codes; real tokenizers use 8192-262144
MAX_VOCAB_SIZE = 1 << 22  # every id; the id tables below are allocated at this size, so it is checked first
CONVERTED_FORMAT = "unified-lm-vocab/2"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>", "<image>")
TEXT_MODEL_FILE = "text.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image: int  # continuous-path placeholder


class TextModel:
    """The text half of a vocabulary: a sentencepiece model (`text.model`, native) or a Hugging Face
    tokenizers file (`tokenizer.json`, converted checkpoints). `size` counts the ids it knows."""

    def __init__(self, data: bytes, kind: str = "sentencepiece"):
        self.data, self.kind = data, kind
        if kind == "sentencepiece":
            self._sp = spm.SentencePieceProcessor(model_proto=data)
            self.size = self._sp.get_piece_size()
        elif kind == "tokenizers":
            from tokenizers import Tokenizer  # the reference reader of tokenizer.json (pip install tokenizers)

            self._hf = Tokenizer.from_str(data.decode("utf-8"))
            self.size = self._hf.get_vocab_size(with_added_tokens=True)
        else:
            raise ValueError(f"unknown text model kind {kind!r} (sentencepiece or tokenizers)")

    @property
    def file_name(self) -> str:
        return TEXT_MODEL_FILE if self.kind == "sentencepiece" else TOKENIZER_JSON_FILE

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def piece(self, token: int) -> str:
        return self._sp.id_to_piece(token) if self.kind == "sentencepiece" else self._hf.id_to_token(token)

    def piece_ids(self) -> dict[str, int]:
        """Every piece name -> its id (tokenizers: added tokens included)."""
        if self.kind == "sentencepiece":
            return {self._sp.id_to_piece(i): i for i in range(self.size)}
        return self._hf.get_vocab(with_added_tokens=True)


def _ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids -> [[start, end), ...] runs (compact JSON for tens of thousands of ids)."""
    if ids.size == 0:
        return []
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)
    return [[int(run[0]), int(run[-1]) + 1] for run in runs]


class Vocabulary:
    """Maps text and image codes to model ids and back. Build with `Vocabulary.load(dir)`, `build_vocabulary`
    (native layout) or `Vocabulary.converted` (a checkpoint's own ids)."""

    def __init__(self, text_model: bytes, codebook_size: int, tokenizer: dict | None = None,
                 text_kind: str = "sentencepiece", layout: dict | None = None):
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or not 0 < codebook_size <= MAX_CODEBOOK_SIZE:
            raise ValueError(f"codebook_size must be an integer in [1, {MAX_CODEBOOK_SIZE}], got {codebook_size!r}")
        if layout is not None and not (isinstance(layout.get("size"), int) and 0 < layout["size"] <= MAX_VOCAB_SIZE):
            raise ValueError(f"vocabulary layout: size must be an integer in [1, {MAX_VOCAB_SIZE}], "
                             f"got {layout.get('size')!r}")
        self.text = TextModel(text_model, text_kind)
        self.codebook_size = int(codebook_size)
        self.tokenizer = dict(tokenizer or {})  # identity of the vqtok tokenizer the codes come from
        self.layout = layout
        if layout is None:  # native: text pieces, then specials, then image codes
            base = self.text.size
            self.special = SpecialIds(*(base + i for i in range(len(SPECIAL_TOKENS))))
            self.size = base + len(SPECIAL_TOKENS) + self.codebook_size
            if self.size > MAX_VOCAB_SIZE:
                raise ValueError(f"vocabulary of {self.size} ids exceeds {MAX_VOCAB_SIZE}")
            image_token_ids = np.arange(base + len(SPECIAL_TOKENS), self.size, dtype=np.int64)
            text_ids = np.arange(base, dtype=np.int64)
        else:
            self.size = int(layout["size"])
            self.special = SpecialIds(*(int(layout["special"][name]) for name in SPECIAL_TOKENS))
            image_token_ids = np.asarray(layout["image_token_ids"], dtype=np.int64)
            text_ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in layout["text_ranges"]] or
                                      [np.zeros(0, dtype=np.int64)])
            self._check_layout(image_token_ids, text_ids)
        self.text_size = int(text_ids.size)  # number of text ids (native: they are [0, text_size))
        self.image_token_ids = image_token_ids  # (codebook_size,) code -> id
        self._code_of_id = np.full(self.size, -1, dtype=np.int64)
        self._code_of_id[image_token_ids] = np.arange(self.codebook_size)
        self._text = np.zeros(self.size, dtype=bool)
        self._text[text_ids] = True
        lo, hi = int(image_token_ids.min()), int(image_token_ids.max()) + 1
        # the image ids as one block [lo, hi): range tests then work on ints, numpy arrays and tensors alike
        self._image_block = (lo, hi) if hi - lo == self.codebook_size else None
        self._tables: dict = {}

    def _check_layout(self, image_token_ids: np.ndarray, text_ids: np.ndarray) -> None:
        where = "vocabulary layout"
        if image_token_ids.shape != (self.codebook_size,):
            raise ValueError(f"{where}: image_token_ids has {image_token_ids.size} entries for codebook_size "
                             f"{self.codebook_size}")
        every = np.concatenate([image_token_ids, text_ids, np.asarray(list(vars(self.special).values()))])
        if every.size and (every.min() < 0 or every.max() >= self.size):
            raise ValueError(f"{where}: ids must lie in [0, {self.size})")
        if np.unique(every).size != every.size:
            raise ValueError(f"{where}: an id is used by two roles (image code, text, special)")

    @classmethod
    def converted(cls, text_model: bytes, text_kind: str, size: int, special: dict[str, int],
                  image_token_ids: Sequence[int], text_ids: Sequence[int], tokenizer: dict | None = None) -> Vocabulary:
        """A checkpoint's own layout: `special` maps each of SPECIAL_TOKENS to its id, `image_token_ids[code]`
        is the id of image code `code`, `text_ids` the ids the text model may produce."""
        missing = [name for name in SPECIAL_TOKENS if name not in special]
        if missing:
            raise ValueError(f"vocabulary layout: no id for special token(s) {missing}")
        layout = {"size": int(size), "special": {name: int(special[name]) for name in SPECIAL_TOKENS},
                  "image_token_ids": [int(i) for i in image_token_ids],
                  "text_ranges": _ranges(np.unique(np.asarray(list(text_ids), dtype=np.int64)))}
        return cls(text_model, len(layout["image_token_ids"]), tokenizer, text_kind, layout)

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # sentencepiece would fail with an unreadable pybind11 error
            raise ValueError(f"text {text[max(0, err.start - 20) : err.start + 20]!r} holds a lone surrogate at character "
                             f"{err.start}: not Unicode text") from None
        return self.text.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text pieces only; specials and image ids are dropped."""
        return self.text.decode([int(i) for i in ids if 0 <= int(i) < self.size and self._text[int(i)]])

    def is_text(self, token: int) -> bool:
        return 0 <= int(token) < self.size and bool(self._text[int(token)])

    @property
    def text_mask(self) -> np.ndarray:
        """(size,) bool: the ids text sampling may produce."""
        return self._text.copy()

    # -- images -------------------------------------------------------------------------------------------------
    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        """(h, w) or (n,) codes -> flat ids bracketed by <boi> ... <eoi>, int64 of length n + 2."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image code out of range [0, {self.codebook_size}): min {codes.min()}, max {codes.max()}")
        return np.concatenate([[self.special.boi], self.image_token_ids[codes], [self.special.eoi]]).astype(np.int64)

    def image_codes(self, ids: np.ndarray) -> np.ndarray:
        """Image ids (no brackets) -> codes; raises if any id is not an image id."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not self.is_image(ids).all():
            raise ValueError("image_codes() got ids outside the image range")
        return self._code_of_id[ids]

    def is_image(self, ids):
        """Works on ints, numpy arrays and torch tensors alike (elementwise bool)."""
        if self._image_block is not None:
            return (ids >= self._image_block[0]) & (ids < self._image_block[1])
        if isinstance(ids, (int, np.integer)):
            return 0 <= ids < self.size and bool(self._code_of_id[ids] >= 0)
        if isinstance(ids, np.ndarray):
            return self._code_of_id[ids] >= 0
        table = self._tables.get(ids.device)
        if table is None:
            import torch

            table = self._tables[ids.device] = torch.as_tensor(self._code_of_id >= 0, device=ids.device)
        return table[ids]

    def code_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., T) ids -> (..., T) long: each image code's index inside its picture (raster order, 0 for the first
        code after <boi>), -1 for every other token (the model's `image_positions` embeddings). A picture whose
        <boi> is not in the row (a document split across packed rows) gets -1 throughout."""
        import torch

        index = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        none = torch.full_like(index, -1)
        last_boi = torch.where(ids == self.special.boi, index, none).cummax(-1).values
        last_eoi = torch.where(ids == self.special.eoi, index, none).cummax(-1).values
        inside = (last_boi > last_eoi) & self.is_image(ids)
        return torch.where(inside, index - last_boi - 1, none)

    def in_picture(self, ids):
        """Image codes and the <boi>/<eoi> brackets around them: the image side of the per-modality losses."""
        return self.is_image(ids) | (ids == self.special.boi) | (ids == self.special.eoi)

    @property
    def image_mask(self) -> np.ndarray:
        """(size,) bool: the image-code ids."""
        return self._code_of_id >= 0

    @property
    def image_offset(self) -> int:
        """First image id of the native layout, where text and specials are exactly the ids below it (the text
        tower of the contrastive encoder embeds those). Converted layouts have no such boundary."""
        if self.layout is not None:
            raise ValueError("this vocabulary keeps a converted checkpoint's own ids (image ids are not the last "
                             f"{self.codebook_size}); the contrastive encoder's text tower needs a native vocabulary")
        return self.size - self.codebook_size

    # -- identity and persistence -------------------------------------------------------------------------------
    def describe(self) -> dict:
        digest = hashlib.sha256(self.text.data).hexdigest()
        if self.layout is None:  # unchanged since format 1, so existing fingerprints stay valid
            return {"format": FORMAT, "size": self.size, "text_size": self.text_size,
                    "special": {name: getattr(self.special, name.strip("<>")) for name in SPECIAL_TOKENS},
                    "image_offset": self.image_offset, "codebook_size": self.codebook_size,
                    "text_model_sha256": digest, "tokenizer": self.tokenizer}
        return {"format": CONVERTED_FORMAT, "size": self.size, "text_size": self.text_size,
                "codebook_size": self.codebook_size, "text_kind": self.text.kind, "text_model_sha256": digest,
                "tokenizer": self.tokenizer, "layout": self.layout}

    @property
    def fingerprint(self) -> str:
        """Short hash of the layout and the text model: two vocabularies with equal fingerprints agree on every id."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.text.file_name).write_bytes(self.text.data)
        (directory / VOCAB_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Vocabulary:
        directory = Path(directory)
        info_path = directory / VOCAB_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"vocabulary {directory}: missing {VOCAB_FILE} (make one with `unified-lm vocab`)")
        info = read_json(info_path)
        if info.get("format") not in (FORMAT, CONVERTED_FORMAT):
            raise ValueError(f"{info_path}: unsupported vocabulary format {info.get('format')!r}")
        kind = info.get("text_kind", "sentencepiece")
        model_path = directory / (TEXT_MODEL_FILE if kind == "sentencepiece" else TOKENIZER_JSON_FILE)
        if not model_path.is_file():
            raise FileNotFoundError(f"vocabulary {directory}: missing {model_path.name}")
        try:
            layout = info.get("layout") if info["format"] == CONVERTED_FORMAT else None
            if not isinstance(info.get("tokenizer") or {}, dict) or not isinstance(layout or {}, dict):
                raise TypeError("tokenizer and layout must be objects")
            vocab = cls(model_path.read_bytes(), info["codebook_size"], info.get("tokenizer"), kind, layout)
            consistent = vocab.describe()["text_model_sha256"] == info["text_model_sha256"] and vocab.size == info["size"]
        except KeyError as err:
            raise ValueError(f"{info_path}: missing field {err.args[0]!r}") from None
        except (RuntimeError, UnicodeDecodeError) as err:
            raise ValueError(f"{model_path}: not a {kind} text model ({err})") from None
        except ValueError as err:
            raise ValueError(f"{info_path}: {err}") from None
        except (TypeError, IndexError) as err:
            raise ValueError(f"{info_path}: malformed vocabulary ({err})") from None
        except Exception as err:  # tokenizers raises a plain Exception for a malformed tokenizer.json
            if kind != "tokenizers" or isinstance(err, (ValueError, OSError)):
                raise
            raise ValueError(f"{model_path}: not a tokenizers file ({err})") from None
        if not consistent:
            raise ValueError(f"{directory}: {model_path.name} does not match {VOCAB_FILE} (sha256 or size differ)")
        return vocab

    def check_tokenizer(self, tokenizer: dict, where: str) -> None:
        """Refuse image codes from a tokenizer whose codebook does not match this vocabulary.

        tokenizer: a vqtok identity (`meta.json["tokenizer"]` or `TokenStore.tokenizer`) with `codebook_size`.
        """
        size = tokenizer.get("codebook_size")
        if size != self.codebook_size:
            raise ValueError(f"{where}: image tokenizer has codebook_size {size}, but the vocabulary was built for "
                             f"{self.codebook_size} image codes; build a vocabulary for this tokenizer "
                             "(`unified-lm vocab --tokenizer ...`)")
        expected = self.tokenizer.get("weights_sha256")
        if expected and tokenizer.get("weights_sha256") and tokenizer["weights_sha256"] != expected:
            raise ValueError(f"{where}: image tokens come from tokenizer weights {tokenizer['weights_sha256'][:12]}, "
                             f"the vocabulary was built for {expected[:12]}; codes of different tokenizers mean "
                             "different pictures")


def train_text_model(texts: Iterable[str], vocab_size: int, max_chars: int = 20_000_000,
                     user_symbols: Sequence[str] = ()) -> bytes:
    """Train a sentencepiece BPE model on `texts` (one document per item); returns the serialized model.

    byte_fallback keeps every string encodable; sentencepiece's own bos/eos/pad are disabled because the joint
    vocabulary owns those roles. Deterministic for the same input (single thread, no sampling of sentences).
    """
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        written = 0
        with open(corpus, "w") as handle:
            for text in texts:
                line = " ".join(text.split())
                if not line:
                    continue
                handle.write(line + "\n")
                written += len(line)
                if written >= max_chars:
                    break
        if written == 0:
            raise ValueError("the text corpus for the sentencepiece model is empty")
        prefix = Path(tmp) / "text"
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
                user_defined_symbols=list(user_symbols), minloglevel=2)
        except RuntimeError as err:
            raise ValueError(f"sentencepiece could not train a {vocab_size}-piece model: {err}") from None
        return (prefix.with_suffix(".model")).read_bytes()


def build_vocabulary(out: str | os.PathLike, texts: Iterable[str] | None, text_vocab_size: int, codebook_size: int,
                     tokenizer: dict | None = None, text_model_path: str | os.PathLike | None = None) -> Vocabulary:
    """Train (or load from `text_model_path`) the text model, add specials and image codes, save to `out`."""
    if text_model_path is not None:
        path = Path(text_model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        model = path.read_bytes()
        try:
            spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a sentencepiece model ({err})") from None
    else:
        model = train_text_model(texts or [], text_vocab_size)
    vocab = Vocabulary(model, codebook_size, tokenizer)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return vocab
