"""The token store: what `vqtok encode` writes and training reads.

Layout (one directory):

    store.json                          format, dtype, codebook size, tokenizer identity (fixed at creation)
    shards/rank00000-00000.tokens       raw little-endian code indices (uint16 when the codebook fits, else int32)
    shards/rank00000-00000.index.jsonl  one line per image: source, grid h and w, offset (in tokens) into .tokens
    failures-rank00000.jsonl            files the latest run could not encode, with the reason
    manifest.json                       table of contents over all ranks' shards (+ failures), written last

Appends are ordered tokens-then-index, each flushed and fsynced, so an index line never points past the data.
A writer re-opened on the same directory drops a torn final index line and any tokens after the last indexed
image, then continues: an interrupted run loses at most the batch in flight and nothing is duplicated.
Readers memory-map shards, so stores larger than RAM are fine, and can read a store that is still being written.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runkit.files import atomic_write_text, confined, read_json

FORMAT = "vqtok-tokens/1"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens = 256 MB of uint16 per shard


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype("<u2") if codebook_size <= 1 << 16 else np.dtype("<i4")


@dataclass(frozen=True)
class TokenRecord:
    source: str  # path of the image, relative to the encoded root
    grid: tuple[int, int]  # (h, w) tokens
    tokens: np.ndarray  # (h * w,) read-only view; reshape(grid) for the 2-D layout


def _read_index(path: Path) -> tuple[list[dict], bool]:
    """Complete JSON lines of an index file, and whether a torn final line was found. A complete line that is
    not an index row (source, h, w, offset) is damage, not an interruption: ValueError naming file and line."""
    if not path.exists():
        return [], False
    rows, torn = [], False
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                torn = True
                break
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                torn = True
                break
            if not _is_index_row(row):
                raise ValueError(f"{path}:{number}: not a token store index row (source, h, w, offset)")
            rows.append(row)
    return rows, torn


def _is_index_row(row) -> bool:
    numbers = [row.get(key) for key in ("h", "w", "offset")] if isinstance(row, dict) else [None]
    return (isinstance(row, dict) and isinstance(row.get("source"), str)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers))


def _check_identity(root: Path, expected: dict) -> dict:
    path = root / "store.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(expected, indent=2))
        return expected
    existing = read_json(path, what="token store")
    for key in ("format", "dtype", "codebook_size", "tokenizer"):
        if existing.get(key) != expected.get(key):
            raise ValueError(f"{root} already holds tokens from a different tokenizer or format ({key}: "
                             f"{existing.get(key)} != {expected.get(key)}); use another output directory")
    return existing


class ShardWriter:
    """Appends one rank's encoded images to its own shards; resumable (see module docstring)."""

    def __init__(self, root: str | os.PathLike, tokenizer: dict, codebook_size: int, rank: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(codebook_size)
        self.info = _check_identity(self.root, {"format": FORMAT, "dtype": self.dtype.str, "codebook_size": codebook_size,
                                                "tokenizer": tokenizer})
        self.rank, self.shard_tokens = rank, shard_tokens
        self.shard_index = 0
        self.offset = 0
        for number in range(10**5):  # find this rank's last shard and repair it
            if not self._index_path(number).exists() and not self._tokens_path(number).exists():
                break
            self.shard_index, self.offset = number, self._repair(number)
        self._tokens = open(self._tokens_path(self.shard_index), "ab")
        self._index = open(self._index_path(self.shard_index), "a")

    def _tokens_path(self, number: int) -> Path:
        return self.root / "shards" / f"rank{self.rank:05d}-{number:05d}.tokens"

    def _index_path(self, number: int) -> Path:
        return self.root / "shards" / f"rank{self.rank:05d}-{number:05d}.index.jsonl"

    def _repair(self, number: int) -> int:
        rows, torn = _read_index(self._index_path(number))
        if torn:
            atomic_write_text(self._index_path(number), "".join(json.dumps(r) + "\n" for r in rows))
        end = rows[-1]["offset"] + rows[-1]["h"] * rows[-1]["w"] if rows else 0
        tokens_path = self._tokens_path(number)
        size = tokens_path.stat().st_size if tokens_path.exists() else 0
        if size != end * self.dtype.itemsize:
            with open(tokens_path, "ab") as handle:
                handle.truncate(end * self.dtype.itemsize)
        return end

    def append(self, sources: list[str], codes: np.ndarray) -> None:
        """sources: relative paths; codes: (B, h, w) integer indices of this batch."""
        if self.offset and self.offset + codes.size > self.shard_tokens:
            self._roll()
        batch, height, width = codes.shape
        self._tokens.write(np.ascontiguousarray(codes, dtype=self.dtype).tobytes())
        self._tokens.flush()
        os.fsync(self._tokens.fileno())
        lines = []
        for row, source in enumerate(sources):
            lines.append(json.dumps({"source": source, "h": height, "w": width,
                                     "offset": self.offset + row * height * width}) + "\n")
        self._index.write("".join(lines))
        self._index.flush()
        os.fsync(self._index.fileno())
        self.offset += batch * height * width

    def _roll(self) -> None:
        self.close()
        self.shard_index += 1
        self.offset = 0
        self._tokens = open(self._tokens_path(self.shard_index), "ab")
        self._index = open(self._index_path(self.shard_index), "a")

    def close(self) -> None:
        self._tokens.close()
        self._index.close()


def encoded_sources(root: str | os.PathLike) -> set[str]:
    """Sources already encoded by any rank of any earlier run (complete index lines only)."""
    done = set()
    for index in sorted((Path(root) / "shards").glob("*.index.jsonl")):
        done.update(row["source"] for row in _read_index(index)[0])
    return done


def write_failures(root: str | os.PathLike, rank: int, failures: list[dict]) -> None:
    atomic_write_text(Path(root) / f"failures-rank{rank:05d}.jsonl", "".join(json.dumps(f) + "\n" for f in failures))


def write_manifest(root: str | os.PathLike, world_size: int, extra: dict | None = None) -> dict:
    """Rank 0, after every rank finished: one manifest over all shards and this run's failures."""
    root = Path(root)
    info = read_json(root / "store.json", what="token store")
    shards, num_images, num_tokens = [], 0, 0
    for index in sorted((root / "shards").glob("*.index.jsonl")):
        rows, _ = _read_index(index)
        tokens = rows[-1]["offset"] + rows[-1]["h"] * rows[-1]["w"] if rows else 0
        tokens_file = index.name.replace(".index.jsonl", ".tokens")
        shards.append({"tokens": f"shards/{tokens_file}", "index": f"shards/{index.name}", "images": len(rows),
                       "num_tokens": tokens})
        num_images += len(rows)
        num_tokens += tokens
    failures = []
    for rank_file in sorted(root.glob("failures-rank*.jsonl")):
        if int(rank_file.stem.split("rank")[1]) >= world_size:  # left by an earlier run with more processes
            rank_file.unlink()
            continue
        failures += [json.loads(line) for line in rank_file.read_text().splitlines() if line.strip()]
    manifest = {**info, "num_images": num_images, "num_tokens": num_tokens, "shards": shards,
                "failures": failures, **(extra or {})}
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


class TokenStore:
    """Read-only access to a token store: `store[i]` -> TokenRecord, `store.find(source)`, iteration.

    Reads manifest.json when present; otherwise (a store still being written) every complete index line.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / "store.json").is_file():
            raise FileNotFoundError(f"{self.root} is not a vqtok token store (no store.json)")
        self.info = read_json(self.root / "store.json", what="token store")
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{self.root}: unsupported token store format {self.info.get('format')!r}")
        if self.info.get("dtype") not in ("<u2", "<i4") or not isinstance(self.info.get("codebook_size"), int):
            raise ValueError(f"{self.root / 'store.json'}: dtype must be <u2 or <i4 and codebook_size an integer")
        manifest_path = self.root / "manifest.json"
        self.manifest = read_json(manifest_path, what="token store") if manifest_path.exists() else None
        self.dtype = np.dtype(self.info["dtype"])
        self._shard_files: list[Path] = []
        self._maps: dict[int, np.memmap] = {}
        sources, shard_ids, offsets, heights, widths = [], [], [], [], []
        for shard_id, (tokens_file, index_file, limit) in enumerate(self._shard_list()):
            self._shard_files.append(tokens_file)
            rows, _ = _read_index(index_file)
            for row in rows[:limit]:
                sources.append(row["source"])
                shard_ids.append(shard_id)
                offsets.append(row["offset"])
                heights.append(row["h"])
                widths.append(row["w"])
        self.sources = sources
        self._shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._grids = np.stack([np.asarray(heights, np.int32), np.asarray(widths, np.int32)], 1) if sources else np.zeros((0, 2), np.int32)
        self._by_source = {source: i for i, source in enumerate(sources)}

    def _shard_list(self) -> list[tuple[Path, Path, int | None]]:
        if self.manifest is not None:
            where = f"{self.root / 'manifest.json'}: shard"
            try:
                return [(confined(self.root, s["tokens"], where), confined(self.root, s["index"], where), int(s["images"]))
                        for s in self.manifest["shards"]]
            except (KeyError, TypeError) as err:
                raise ValueError(f"{self.root / 'manifest.json'}: malformed shard table ({err})") from None
        indexes = sorted((self.root / "shards").glob("*.index.jsonl"))
        return [(i.with_name(i.name.replace(".index.jsonl", ".tokens")), i, None) for i in indexes]

    @property
    def codebook_size(self) -> int:
        return int(self.info["codebook_size"])

    @property
    def tokenizer(self) -> dict:
        return self.info["tokenizer"]

    @property
    def failures(self) -> list[dict]:
        return self.manifest["failures"] if self.manifest else []

    def __len__(self) -> int:
        return len(self.sources)

    def _map(self, shard_id: int) -> np.memmap:
        if shard_id not in self._maps:
            self._maps[shard_id] = np.memmap(self._shard_files[shard_id], dtype=self.dtype, mode="r")
        return self._maps[shard_id]

    def __getitem__(self, index: int) -> TokenRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"token store index {index} out of range for {len(self)} images")
        index %= len(self)
        height, width = (int(v) for v in self._grids[index])
        start = int(self._offsets[index])
        tokens = self._map(int(self._shard_ids[index]))[start : start + height * width]
        if len(tokens) != height * width:
            raise ValueError(f"{self._shard_files[int(self._shard_ids[index])]}: image {self.sources[index]!r} reaches "
                             "past the end of its shard (truncated store?)")
        return TokenRecord(self.sources[index], (height, width), tokens)

    def find(self, source: str) -> TokenRecord:
        if source not in self._by_source:
            raise KeyError(f"{source!r} is not in token store {self.root}")
        return self[self._by_source[source]]

    def __iter__(self) -> Iterator[TokenRecord]:
        for index in range(len(self)):
            yield self[index]
