"""`unified-lm prepare`: interleaved documents (JSONL) -> packed, sharded, memory-mapped training rows.

Images are found, in order: in the token stores given with `--tokens` (looked up by absolute path through each
store's recorded source root), by `image_ref` into a named store, or encoded by prepare itself with
`--tokenizer` into OUT/image_tokens_<resolution> (a vqtok token store, resumable, reused by later runs).
Documents are parsed into memory (text and image references, not pixels or codes); the packed output is
written shard by shard and read back memory-mapped. Every image's
tokenizer must match the vocabulary (codebook size, and weights when the vocabulary recorded them).
The same inputs and seed give byte-identical shards. A run into a directory that already holds a dataset writes
beside it and replaces it only once every document has been encoded (packing.DatasetStaging): bad input or an
interruption leaves the old dataset intact.

Caption dropout (`caption_dropout`, default 0.1 as in LlamaGen): a document that trains on its pictures loses all
its text with that probability (decided per document from the seed, before shuffling), leaving
<bos> pictures <eos>. That is exactly the context classifier-free guidance contrasts with: [<bos>, <boi>] for
2-way CFG, the document without its text for Chameleon's 3-way CFG. Without it those contexts are never trained
and guidance mixes in an untrained model's guesses.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unified_lm.data.packing import DatasetStaging, pack_documents, write_dataset
from unified_lm.data.pictures import ContinuousPictures
from unified_lm.tokens.documents import Document, ImageSegment, encode_document, read_documents
from unified_lm.tokens.text_corpus import read_texts
from unified_lm.tokens.vocab import Vocabulary
from vqtok.token_store import ShardWriter, TokenStore

log = logging.getLogger(__name__)


@dataclass
class PrepareSettings:
    seq_len: int = 512
    default_train_on: str = "all"
    split: str | None = None  # keep only documents whose "split" field equals this
    seed: int = 0
    rows_per_shard: int = 8192
    text_corpus: str | None = None  # "default" (Wikipedia summaries) or a file: text-only documents mixed in
    text_documents: int = 0  # how many of them
    image_resolution: int | None = None  # encode size for --tokenizer (default: the tokenizer's)
    kinds: tuple[str, ...] = ()  # keep only documents whose "kind" is one of these (empty: all)
    # the continuous encoder-adapter path: pictures stored as pixels of this size with `placeholders` <image>
    # tokens each (from the image encoder and adapter pooling), instead of vqtok codes
    picture_size: int | None = None
    placeholders: int = 0
    caption_dropout: float = 0.1  # probability that a document training on its pictures loses its text


class ImageCodes:
    """Resolves image segments to (h, w) code arrays from token stores, or by encoding them once."""

    def __init__(self, vocab: Vocabulary, stores: list[str], tokenizer: str | None, cache: Path,
                 resolution: int | None, device: str = "cpu"):
        self.vocab, self.tokenizer_path, self.cache, self.resolution = vocab, tokenizer, cache, resolution
        self.device = device
        self.grids: dict[str, int] = {}  # "HxW" -> pictures of that grid, filled as documents are encoded
        self.by_path: dict[Path, tuple[TokenStore, int]] = {}
        self.stores: dict[Path, TokenStore] = {}
        for root in stores:
            self._index(self._open(Path(root).resolve()))
        if (cache / "store.json").exists():
            self._index(self._open(cache.resolve()))

    def _open(self, root: Path) -> TokenStore:
        if root not in self.stores:
            store = TokenStore(root)
            self.vocab.check_tokenizer(store.tokenizer, f"token store {root}")
            self.stores[root] = store
        return self.stores[root]

    def _index(self, store: TokenStore) -> None:
        source_root = (store.manifest or {}).get("source_root")
        if source_root is None:
            log.warning("token store %s has no manifest with a source root; only image_ref can use it", store.root)
            return
        for index, source in enumerate(store.sources):
            self.by_path.setdefault((Path(source_root) / source).resolve(), (store, index))

    def missing(self, documents: list[Document]) -> dict[Path, str]:
        """Pictures no store holds -> where the first document naming them is ("file:line")."""
        found: dict[Path, str] = {}
        for document in documents:
            for segment in document.segments:
                if isinstance(segment, ImageSegment) and segment.path is not None and segment.path not in self.by_path:
                    found.setdefault(segment.path, document.where)
        return dict(sorted(found.items()))

    def encode_missing(self, missing: dict[Path, str], batch_size: int = 32) -> None:
        """Encode pictures no store holds into the cache store (resumable: a re-run skips what is there)."""
        from vqtok.checkpoint import load_tokenizer
        from vqtok.images import BadImageError, load_rgb, preprocess, to_tensor
        from vqtok.token_store import write_manifest

        model, meta = load_tokenizer(self.tokenizer_path, self.device)
        self.vocab.check_tokenizer(meta["tokenizer"], f"tokenizer {self.tokenizer_path}")
        resolution = self.resolution or model.config.model.resolution
        writer = ShardWriter(self.cache, meta["tokenizer"], model.codebook_size)
        paths = list(missing)
        try:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                try:
                    pixels = torch.stack([to_tensor(preprocess(load_rgb(p), resolution, model.config.model.resample))
                                          for p in chunk])
                except BadImageError as err:
                    raise ValueError(f"{missing[Path(err.path)]}: cannot encode image {err.path}: {err.reason}") from None
                with torch.no_grad():
                    codes = model.encode(pixels.to(self.device)).cpu().numpy()
                writer.append([os.fspath(p) for p in chunk], codes)
        finally:
            writer.close()
        write_manifest(self.cache, 1, {"source_root": "/", "resolution": resolution})
        self.stores.pop(self.cache.resolve(), None)
        self._index(self._open(self.cache.resolve()))

    def __call__(self, segment: ImageSegment, where: str) -> np.ndarray:
        if segment.path is not None:
            if segment.path not in self.by_path:
                hint = "" if self.tokenizer_path else " (pass --tokens STORE holding it, or --tokenizer RUN to encode it)"
                raise FileNotFoundError(f"{where}: image {segment.path} is in no token store{hint}")
            store, index = self.by_path[segment.path]
            record = store[index]
        else:
            if not (segment.store / "store.json").is_file():
                raise FileNotFoundError(f"{where}: image_ref store {segment.store} is not a vqtok token store")
            try:
                record = self._open(segment.store).find(segment.source)
            except KeyError:
                raise KeyError(f"{where}: {segment.source!r} is not in token store {segment.store}") from None
        grid = f"{record.grid[0]}x{record.grid[1]}"
        self.grids[grid] = self.grids.get(grid, 0) + 1
        return np.asarray(record.tokens).reshape(record.grid)


def drop_captions(documents: list[Document], probability: float, seed: int) -> tuple[list[Document], int]:
    """Caption dropout (module docstring): each document that trains on a picture and holds text loses its text
    with `probability`; one draw per document in order, from `seed`. Returns the documents and how many lost text."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"caption dropout must be in [0, 1), got {probability}")
    draws = np.random.default_rng([seed, 0xCAFD]).random(len(documents))
    kept, dropped = [], 0
    for document, draw in zip(documents, draws):
        if draw < probability and document.trains_pictures and any(isinstance(s, str) for s in document.segments):
            document, dropped = document.without_text(), dropped + 1
        kept.append(document)
    return kept, dropped


def prepare(documents_files: list[str], vocab_dir: str, out: str, settings: PrepareSettings,
            stores: list[str] = (), tokenizer: str | None = None, device: str = "cpu") -> dict:
    """Build a packed dataset in `out`; returns the dataset.json content."""
    vocab = Vocabulary.load(vocab_dir)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    documents: list[Document] = []
    for path in documents_files:
        documents += [d for d in read_documents(path, settings.default_train_on, settings.split)
                      if not settings.kinds or d.kind in settings.kinds]
    if settings.text_corpus and settings.text_documents:
        for number, text in enumerate(read_texts(settings.text_corpus)):
            if number >= settings.text_documents:
                break
            documents.append(Document(f"text-{number}", [text], [None], "all", f"{settings.text_corpus} #{number}"))
    if not documents:
        kinds = f" of kind {list(settings.kinds)}" if settings.kinds else ""
        raise ValueError(f"no documents{kinds} in {documents_files}"
                         + (f" with split {settings.split!r}" if settings.split else ""))
    documents, dropped = drop_captions(documents, settings.caption_dropout, settings.seed)
    extra = {"documents": len(documents), "seed": settings.seed,
             "caption_dropout": settings.caption_dropout, "captions_dropped": dropped,
             "sources": [os.fspath(Path(p).resolve()) for p in documents_files], "split": settings.split,
             "kinds": list(settings.kinds), "text_documents": settings.text_documents}
    kinds: dict[str, int] = {}
    for document in documents:
        kinds[document.train_on] = kinds.get(document.train_on, 0) + 1
    extra["documents_by_train_on"] = kinds
    order = np.random.default_rng(settings.seed).permutation(len(documents))
    if settings.picture_size:  # continuous path: pixels beside the rows, placeholders in them
        if settings.placeholders <= 0:
            raise ValueError("placeholders must be positive for the continuous path (the adapter's features per picture)")
        pictures = ContinuousPictures(documents, settings.picture_size, settings.placeholders)
        staging = DatasetStaging(out_path)
        extra["pictures"] = pictures.write(staging.path("pictures"))
        extra["image_grids"] = {}
        encoded = (encode_document(documents[i], vocab, pictures=pictures) for i in order)
        rows = pack_documents(encoded, settings.seq_len + 1, vocab.special.pad, with_pictures=True)
        return write_dataset(out_path, rows, vocab, settings.seq_len + 1, settings.rows_per_shard, extra, staging)
    # one cache per encode size: codes of the same picture at another resolution are another grid
    cache = out_path / f"image_tokens_{settings.image_resolution or 'native'}"
    images = ImageCodes(vocab, list(stores), tokenizer, cache, settings.image_resolution, device)
    missing = images.missing(documents)
    if missing:
        if tokenizer is None:
            path, where = next(iter(missing.items()))
            raise FileNotFoundError(f"{where}: image {path} is in no token store ({len(missing)} such image(s)); pass "
                                    "--tokens STORE (from `vqtok encode`) or --tokenizer RUN to encode them")
        log.info("encoding %d image(s) with %s", len(missing), tokenizer)
        images.encode_missing(missing)
    encoded = (encode_document(documents[i], vocab, images) for i in order)
    rows = pack_documents(encoded, settings.seq_len + 1, vocab.special.pad)
    # image_grids is filled while the rows are written (dataset.json is written after them): the sampler takes
    # the picture size to generate from here
    extra["image_grids"] = images.grids
    return write_dataset(out_path, rows, vocab, settings.seq_len + 1, settings.rows_per_shard, extra)
