"""The joint vocabulary: sentencepiece BPE text pieces + special tokens + one token per image code.

Id layout (one contiguous range per role, recorded in `vocab.json` and copied into every checkpoint):

    [0, text_size)                               sentencepiece pieces (id 0 is sentencepiece's <unk>; bytes fall
                                                 back to <0x..> pieces, so any string encodes)
    [text_size, text_size + 6)                   specials, in this order: <bos> <eos> <pad> <boi> <eoi> <image>
    [image_offset, image_offset + codebook_size) image codes: token = image_offset + code

`<boi>`/`<eoi>` bracket the `grid_h * grid_w` codes of one picture (raster order). `<image>` is the placeholder
where the continuous encoder-adapter path splices in embeddings; it is never a training target.
Image tokens follow the text pieces, so a text-only model can grow a codebook later without renumbering text.

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

FORMAT = "unified-lm-vocab/1"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>", "<image>")
TEXT_MODEL_FILE = "text.model"
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image: int  # continuous-path placeholder


class Vocabulary:
    """Maps text and image codes to model ids and back. Build with `Vocabulary.load(dir)` or `build_vocabulary`."""

    def __init__(self, text_model: bytes, codebook_size: int, tokenizer: dict | None = None):
        if codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self._text_model = text_model
        self.sp = spm.SentencePieceProcessor(model_proto=text_model)
        self.text_size = self.sp.get_piece_size()
        self.codebook_size = int(codebook_size)
        self.tokenizer = dict(tokenizer or {})  # identity of the vqtok tokenizer the codes come from
        base = self.text_size
        self.special = SpecialIds(*(base + i for i in range(len(SPECIAL_TOKENS))))
        self.image_offset = base + len(SPECIAL_TOKENS)
        self.size = self.image_offset + self.codebook_size

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text pieces only; specials and image ids are dropped."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.text_size])

    # -- images -------------------------------------------------------------------------------------------------
    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        """(h, w) or (n,) codes -> flat ids bracketed by <boi> ... <eoi>, int64 of length n + 2."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image code out of range [0, {self.codebook_size}): min {codes.min()}, max {codes.max()}")
        return np.concatenate([[self.special.boi], codes + self.image_offset, [self.special.eoi]]).astype(np.int64)

    def image_codes(self, ids: np.ndarray) -> np.ndarray:
        """Image ids (no brackets) -> codes; raises if any id is not an image id."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not self.is_image(ids).all():
            raise ValueError("image_codes() got ids outside the image range")
        return ids - self.image_offset

    def is_image(self, ids):
        """Works on numpy arrays and torch tensors alike (elementwise bool)."""
        return (ids >= self.image_offset) & (ids < self.size)

    def in_picture(self, ids):
        """Image codes and the <boi>/<eoi> brackets around them: the image side of the per-modality losses."""
        return self.is_image(ids) | (ids == self.special.boi) | (ids == self.special.eoi)

    @property
    def text_range(self) -> range:
        return range(self.text_size)

    @property
    def image_range(self) -> range:
        return range(self.image_offset, self.size)

    # -- identity and persistence -------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"format": FORMAT, "size": self.size, "text_size": self.text_size,
                "special": {name: getattr(self.special, name.strip("<>")) for name in SPECIAL_TOKENS},
                "image_offset": self.image_offset, "codebook_size": self.codebook_size,
                "text_model_sha256": hashlib.sha256(self._text_model).hexdigest(), "tokenizer": self.tokenizer}

    @property
    def fingerprint(self) -> str:
        """Short hash of the layout and the text model: two vocabularies with equal fingerprints agree on every id."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TEXT_MODEL_FILE).write_bytes(self._text_model)
        (directory / VOCAB_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Vocabulary:
        directory = Path(directory)
        info_path, model_path = directory / VOCAB_FILE, directory / TEXT_MODEL_FILE
        for path in (info_path, model_path):
            if not path.is_file():
                raise FileNotFoundError(f"vocabulary {directory}: missing {path.name} (make one with `unified-lm vocab`)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{info_path}: invalid JSON ({err})") from None
        if info.get("format") != FORMAT:
            raise ValueError(f"{info_path}: unsupported vocabulary format {info.get('format')!r}")
        try:
            vocab = cls(model_path.read_bytes(), int(info["codebook_size"]), info.get("tokenizer"))
            consistent = vocab.describe()["text_model_sha256"] == info["text_model_sha256"] and vocab.size == info["size"]
        except KeyError as err:
            raise ValueError(f"{info_path}: missing field {err.args[0]!r}") from None
        except RuntimeError as err:
            raise ValueError(f"{model_path}: not a sentencepiece model ({err})") from None
        if not consistent:
            raise ValueError(f"{directory}: {TEXT_MODEL_FILE} does not match {VOCAB_FILE} (sha256 or size differ)")
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
