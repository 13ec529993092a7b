"""Packed training sequences: what `unified-lm prepare` writes and training reads.

Layout of a packed dataset directory:

    dataset.json                  format, row length, vocabulary fingerprint, shard table, token counts (written last)
    vocab/                        the vocabulary the ids belong to (vocab.json + text.model)
    shards/rows-00000.tokens      (rows, seq_len + 1) token ids, uint16 when the vocabulary fits, else int32
    shards/rows-00000.documents   (rows, seq_len + 1) uint16 document number inside the row; 0 = padding
    shards/rows-00000.loss        (rows, seq_len + 1) uint8: 1 where the token is a training target
    shards/rows-00000.pictures    continuous path only: (rows, seq_len + 1) int32 placeholder slots, see pictures.py
    pictures.u8                   continuous path only: the pictures' pixels (pictures.py)
    image_tokens_<resolution>/    vqtok token store of pictures encoded by prepare itself (reused on re-runs)

Rows hold seq_len + 1 tokens so inputs = row[:-1] and targets = row[1:]. Packing is greedy and deterministic:
documents (in a seeded shuffled order) fill a row; a document that does not fit in the rest of a row starts a
new one (the rest is padding) unless it is longer than a row, in which case it is split across rows (the
first token of each continuation row has no predecessor in its row, so it is not a target). A target
counts only where its loss flag is set and it belongs to the same document as its input token, so nothing is
learned across a document boundary. Shards are memory-mapped: datasets larger than RAM are fine.

Re-preparing into a directory that holds a dataset never loses it (`DatasetStaging`): the new shards, vocabulary
and pixels go under the names the current dataset.json does not use (`shards/` or `shards-b/`, `vocab/` or
`vocab-b/`, `pictures.u8` or `pictures-b.u8`), and only once every row is written and validated is dataset.json
replaced, atomically; then the old generation is removed. A failure before that removes the new files and
leaves the old dataset exactly as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runkit.batches import walk_rows
from runkit.files import atomic_write_text, confined, read_json
from unified_lm.data.pictures import PIXELS_FILE, open_pixels
from unified_lm.tokens.documents import EncodedDocument
from unified_lm.tokens.vocab import Vocabulary

FORMAT = "unified-lm-packed/1"
SHARD_SUFFIXES = ("tokens", "documents", "loss")


@dataclass
class PackedRow:
    tokens: np.ndarray  # (L,) int64
    documents: np.ndarray  # (L,) document number in the row, 0 = padding
    loss: np.ndarray  # (L,) bool
    pictures: np.ndarray | None = None  # (L,) int64 continuous-path placeholder slots, -1 elsewhere


def pack_documents(documents: Iterable[EncodedDocument], row_length: int, pad_id: int,
                   with_pictures: bool = False) -> Iterator[PackedRow]:
    """Greedy packing of encoded documents into rows of exactly `row_length` tokens (see module docstring).
    with_pictures: the documents carry continuous-path placeholder slots, packed alongside the tokens."""
    def empty_row() -> PackedRow:
        return PackedRow(np.full(row_length, pad_id, np.int64), np.zeros(row_length, np.int64),
                         np.zeros(row_length, bool), np.full(row_length, -1, np.int64) if with_pictures else None)

    row, fill, count = empty_row(), 0, 0
    for document in documents:
        length = len(document.tokens)
        if fill and length > row_length - fill and length <= row_length:
            yield row
            row, fill, count = empty_row(), 0, 0
        start = 0
        while start < length:
            if fill == row_length:
                yield row
                row, fill, count = empty_row(), 0, 0
            take = min(length - start, row_length - fill)
            count += 1
            row.tokens[fill : fill + take] = document.tokens[start : start + take]
            row.documents[fill : fill + take] = count
            row.loss[fill : fill + take] = document.loss[start : start + take]
            if with_pictures:
                row.pictures[fill : fill + take] = document.pictures[start : start + take]
            fill += take
            start += take
    if fill:
        yield row


class ShardedRowWriter:
    """Writes rows into fixed-size shards under `shard_dir`; `close()` returns the shard table."""

    def __init__(self, shard_dir: Path, row_length: int, token_dtype: np.dtype, rows_per_shard: int):
        self.shard_dir, self.row_length, self.dtype = shard_dir, row_length, token_dtype
        self.rows_per_shard = rows_per_shard
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._buffer: list[PackedRow] = []

    def add(self, row: PackedRow) -> None:
        self._buffer.append(row)
        if len(self._buffer) == self.rows_per_shard:
            self._write()

    def _write(self) -> None:
        name = f"rows-{len(self.shards):05d}"
        arrays = {"tokens": np.stack([r.tokens for r in self._buffer]).astype(self.dtype),
                  "documents": np.stack([r.documents for r in self._buffer]).astype("<u2"),
                  "loss": np.stack([r.loss for r in self._buffer]).astype(np.uint8)}
        if self._buffer[0].pictures is not None:
            arrays["pictures"] = np.stack([r.pictures for r in self._buffer]).astype("<i4")
        for suffix, array in arrays.items():
            array.tofile(self.shard_dir / f"{name}.{suffix}")
        self.shards.append({"name": f"{self.shard_dir.name}/{name}", "rows": len(self._buffer)})
        self._buffer = []

    def close(self) -> list[dict]:
        if self._buffer:
            self._write()
        return self.shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def target_mask(loss, documents):
    """(..., L) loss flags and document numbers (numpy or torch) -> (..., L - 1): which targets row[1:] train.

    A target counts where its loss flag is set and it continues its input token's document (never padding):
    nothing is learned across a document boundary."""
    same_document = (documents[..., 1:] == documents[..., :-1]) & (documents[..., 1:] != 0)
    return loss[..., 1:] & same_document


@dataclass
class Batch:
    """Model inputs for one micro-step; every tensor is (B, seq_len) except `pixels` (the trainer's call of the
    model on them: `unified_lm.train.engine.micro_batch_loss`)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    document_ids: torch.Tensor
    image_targets: torch.Tensor
    code_positions: torch.Tensor  # each input image code's index in its picture, -1 elsewhere
    # continuous path: slot of each <image> input (local picture * placeholders + patch, -1 elsewhere) and the
    # (M, 3, S, S) pixels in [-1, 1] of the batch's M distinct pictures
    picture_slots: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(*(None if getattr(self, name) is None else getattr(self, name).to(device, non_blocking=True)
                       for name in self.__dataclass_fields__))


class PackedDataset:
    """Read-only, memory-mapped rows of a packed dataset: `len(ds)`, `ds[i]` -> PackedRow, `ds.batch(indices)`."""

    def __init__(self, root: str | os.PathLike, vocab: Vocabulary | None = None):
        self.root = Path(root)
        info_path = self.root / "dataset.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a packed dataset (no dataset.json; make one with "
                                    "`unified-lm prepare`)")
        self.info = read_json(info_path, what="packed dataset")
        missing = [k for k in ("format", "row_length", "token_dtype", "vocab_fingerprint", "shards") if k not in self.info]
        if missing:
            raise ValueError(f"{info_path}: missing field(s) {missing}")
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{info_path}: unsupported format {self.info.get('format')!r}")
        if self.info["token_dtype"] not in ("<u2", "<i4") or not _count(self.info["row_length"], 2):
            raise ValueError(f"{info_path}: token_dtype must be <u2 or <i4 and row_length an integer >= 2")
        if not isinstance(self.info["shards"], list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and _count(s.get("rows"), 1) for s in self.info["shards"]):
            raise ValueError(f"{info_path}: shards must be a list of {{\"name\": ..., \"rows\": N}}")
        self.vocab = vocab or Vocabulary.load(confined(self.root, self.info.get("vocab", "vocab"), f"{info_path} vocab"))
        if self.vocab.fingerprint != self.info["vocab_fingerprint"]:
            raise ValueError(f"{self.root} was prepared with vocabulary {self.info['vocab_fingerprint']}, not with "
                             f"{self.vocab.fingerprint} (size {self.vocab.size}); re-run `unified-lm prepare`")
        self.row_length = int(self.info["row_length"])
        self.dtype = np.dtype(self.info["token_dtype"])
        self.pictures: dict | None = self.info.get("pictures")  # continuous path: see pictures.py
        self.pixels = open_pixels(self.root, self.pictures) if self.pictures else None
        suffixes = dict(zip(SHARD_SUFFIXES, (self.dtype, np.dtype("<u2"), np.dtype(np.uint8))))
        if self.pictures:
            suffixes["pictures"] = np.dtype("<i4")
        self._shards = []
        for shard in self.info["shards"]:
            arrays = {}
            for suffix, dtype in suffixes.items():
                path = confined(self.root, f"{shard['name']}.{suffix}", f"{info_path} shard")
                expected = shard["rows"] * self.row_length * dtype.itemsize
                if not path.is_file() or path.stat().st_size != expected:
                    raise ValueError(f"{path}: missing or truncated (expected {expected} bytes)")
                arrays[suffix] = np.memmap(path, dtype=dtype, mode="r", shape=(shard["rows"], self.row_length))
            self._shards.append(arrays)
        self._starts = np.cumsum([0] + [s["rows"] for s in self.info["shards"]])

    @property
    def identity(self) -> dict:
        """What fixes the data order: resuming on a dataset with another identity would skip or repeat rows."""
        return {"rows": len(self), "row_length": self.row_length, "vocab_fingerprint": self.info["vocab_fingerprint"],
                "seed": self.info.get("seed"), "documents": self.info.get("documents")}

    @property
    def seq_len(self) -> int:
        return self.row_length - 1

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> PackedRow:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        local = index - int(self._starts[shard])
        arrays = self._shards[shard]
        pictures = arrays["pictures"][local].astype(np.int64) if "pictures" in arrays else None
        return PackedRow(arrays["tokens"][local].astype(np.int64), arrays["documents"][local].astype(np.int64),
                         arrays["loss"][local].astype(bool), pictures)

    def batch(self, indices: list[int]) -> Batch:
        rows = [self[i] for i in indices]
        for index, row in zip(indices, rows):  # a damaged shard must not reach the embedding as an IndexError
            if row.tokens.size and not 0 <= int(row.tokens.min()) <= int(row.tokens.max()) < self.vocab.size:
                raise ValueError(f"{self._shard_path(index, 'tokens')}: row {index} holds token id "
                                 f"{int(row.tokens.max())}, outside the vocabulary's {self.vocab.size} ids; the "
                                 "dataset is damaged: re-run `unified-lm prepare`")
            if row.pictures is not None and int(row.pictures.max()) >= len(self.pixels) * self.pictures["placeholders"]:
                raise ValueError(f"{self._shard_path(index, 'pictures')}: row {index} names a picture beyond the "
                                 f"{len(self.pixels)} stored; the dataset is damaged: re-run `unified-lm prepare`")
        tokens = torch.from_numpy(np.stack([r.tokens for r in rows]))
        documents = torch.from_numpy(np.stack([r.documents for r in rows]))
        loss = torch.from_numpy(np.stack([r.loss for r in rows]))
        targets = tokens[:, 1:]
        inputs = tokens[:, :-1]
        batch = Batch(inputs=inputs, targets=targets, loss_mask=target_mask(loss, documents),
                      document_ids=documents[:, :-1], image_targets=self.vocab.in_picture(targets),
                      code_positions=self.vocab.code_positions(inputs))
        if self.pictures:
            batch.picture_slots, batch.pixels = self._batch_pictures(np.stack([r.pictures[:-1] for r in rows]))
        return batch

    def _shard_path(self, index: int, suffix: str) -> Path:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.root / f"{self.info['shards'][shard]['name']}.{suffix}"

    def _batch_pictures(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Global placeholder slots (B, T) -> slots into the batch's own pictures, and those pictures' pixels."""
        from vqtok.images import to_tensor

        placeholders = self.pictures["placeholders"]
        used = slots >= 0
        numbers, local = np.unique(slots[used] // placeholders, return_inverse=True)
        batch_slots = np.full(slots.shape, -1, np.int64)
        batch_slots[used] = local * placeholders + slots[used] % placeholders
        size = self.pictures["image_size"]
        pixels = (torch.stack([to_tensor(self.pixels[n]) for n in numbers]) if len(numbers)
                  else torch.zeros(0, 3, size, size))
        return torch.from_numpy(batch_slots), pixels

    def count_targets(self, indices: list[int]) -> int:
        """Training targets in these rows (what `batch(indices).loss_mask.sum()` would give), read from the loss
        and document arrays only: cheap enough to count a whole step's rows on every rank."""
        return sum(int(target_mask(row.loss, row.documents).sum()) for row in map(self.__getitem__, indices))


def batch_indices(step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int,
                  grad_accum_steps: int, num_rows: int, seed: int) -> list[int]:
    """Rows of one micro-batch: a pure function of (step, micro_step, rank), so resuming is exact.

    Each epoch is a seeded permutation of all rows; global position p = ((step * accum + micro_step) * world
    + rank) * micro_batch + i walks through the concatenated epochs (runkit.batches.walk_rows).
    """
    first = ((step * grad_accum_steps + micro_step) * world_size + rank) * micro_batch_size
    return walk_rows(first, micro_batch_size, num_rows, seed).tolist()


def _count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class DatasetStaging:
    """A new generation of the packed dataset in `out`, written beside the live one (see the module docstring)."""

    PARTS = {"shards": ("shards", "shards-b"), "vocab": ("vocab", "vocab-b"), "pictures": (PIXELS_FILE, "pictures-b.u8")}

    def __init__(self, out: Path):
        self.out = Path(out)
        self.live = self._live_parts()
        self.staged: list[Path] = []

    def _live_parts(self) -> dict[str, str]:
        """The part names the current dataset.json uses ({} when there is none, or it is unreadable)."""
        try:
            info = read_json(self.out / "dataset.json")
        except (FileNotFoundError, ValueError):
            return {}
        live = {"vocab": info.get("vocab", "vocab")}
        shards = info.get("shards")
        if isinstance(shards, list) and shards and isinstance(shards[0], dict) and isinstance(shards[0].get("name"), str):
            live["shards"] = shards[0]["name"].split("/")[0]
        if isinstance(info.get("pictures"), dict):
            live["pictures"] = info["pictures"].get("file")
        return live

    def path(self, part: str) -> Path:
        """Where the new generation's `part` goes: the one of its two names the live dataset does not use."""
        first, second = self.PARTS[part]
        target = self.out / (second if self.live.get(part) == first else first)
        _remove(target)
        self.staged.append(target)
        return target

    def vocab(self, vocab: Vocabulary) -> str:
        """The vocabulary directory for the new generation: the live one if it is this vocabulary, else a copy."""
        live = self.live.get("vocab")
        if isinstance(live, str):
            try:
                if Vocabulary.load(confined(self.out, live, "vocab")).fingerprint == vocab.fingerprint:
                    return live
            except (ValueError, OSError):
                pass
        return vocab.save(self.path("vocab")).name

    def discard(self) -> None:
        for path in self.staged:
            _remove(path)

    def commit(self, info: dict) -> None:
        """Replace dataset.json (the one atomic step), then remove the parts only the old generation used."""
        atomic_write_text(self.out / "dataset.json", json.dumps(info, indent=2) + "\n")
        used = {info["vocab"], info["shards"][0]["name"].split("/")[0], (info.get("pictures") or {}).get("file")}
        for names in self.PARTS.values():
            for name in names:
                if name not in used:
                    _remove(self.out / name)
        _remove(self.out / "shards.building")  # left by versions before DatasetStaging


def write_dataset(out: Path, rows: Iterable[PackedRow], vocab: Vocabulary, row_length: int, rows_per_shard: int,
                  extra: dict, staging: DatasetStaging | None = None) -> dict:
    """Write all rows as a new generation of the dataset in `out` (`DatasetStaging`: the dataset already there
    stays intact until every row is written), then dataset.json, atomically, last."""
    staging = staging or DatasetStaging(out)
    totals = {"tokens": 0, "target_tokens": 0, "image_target_tokens": 0, "padding_tokens": 0}
    try:
        writer = ShardedRowWriter(staging.path("shards"), row_length, token_dtype(vocab.size), rows_per_shard)
        for row in rows:  # documents are encoded (and their pictures looked up) lazily, here
            writer.add(row)
            totals["tokens"] += row_length
            totals["padding_tokens"] += int((row.documents == 0).sum())
            totals["target_tokens"] += int(row.loss.sum())
            totals["image_target_tokens"] += int((row.loss & vocab.in_picture(row.tokens)).sum())
        shards = writer.close()
        if not shards:
            raise ValueError("no documents to pack")
        vocab_dir = staging.vocab(vocab)
    except BaseException:
        staging.discard()
        raise
    info = {"format": FORMAT, "row_length": row_length, "seq_len": row_length - 1,
            "token_dtype": token_dtype(vocab.size).str, "vocab_fingerprint": vocab.fingerprint, "vocab": vocab_dir,
            "vocab_size": vocab.size, "rows": sum(s["rows"] for s in shards), "shards": shards, **totals, **extra}
    staging.commit(info)
    return info
