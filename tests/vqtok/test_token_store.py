"""Token store: round trip, crash repair without loss or duplication, identity checks, shard roll-over."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vqtok.token_store import ShardWriter, TokenStore, encoded_sources, token_dtype, write_manifest

IDENTITY = {"name": "t", "codebook_size": 300, "weights_sha256": "ab" * 32}


def _codes(seed, batch=2, h=3, w=4, high=300):
    return np.random.default_rng(seed).integers(0, high, (batch, h, w))


def test_round_trip_and_manifest(tmp_path):
    writer = ShardWriter(tmp_path, IDENTITY, 300)
    a, b = _codes(0), _codes(1, batch=1, h=2, w=2)
    writer.append(["x/a0.png", "x/a1.png"], a)
    writer.append(["b.png"], b)
    writer.close()
    manifest = write_manifest(tmp_path, world_size=1)
    assert manifest["num_images"] == 3 and manifest["num_tokens"] == 2 * 12 + 4
    store = TokenStore(tmp_path)
    assert len(store) == 3 and store.codebook_size == 300 and store.tokenizer == IDENTITY
    assert store[0].grid == (3, 4) and np.array_equal(store[0].tokens.reshape(3, 4), a[0])
    assert np.array_equal(store.find("x/a1.png").tokens.reshape(3, 4), a[1])
    assert np.array_equal(store[-1].tokens.reshape(2, 2), b[0])
    assert store[0].tokens.dtype == np.uint16
    with pytest.raises(KeyError, match="nope.png"):
        store.find("nope.png")
    with pytest.raises(IndexError):
        store[3]


def test_large_codebooks_use_int32():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_crash_mid_batch_is_repaired_without_duplicates(tmp_path):
    writer = ShardWriter(tmp_path, IDENTITY, 300)
    writer.append(["a.png", "b.png"], _codes(0))
    writer.close()
    shard = tmp_path / "shards" / "rank00000-00000.tokens"
    index = tmp_path / "shards" / "rank00000-00000.index.jsonl"
    # A crash after the tokens of the next batch hit the disk but mid-way through its index lines:
    with open(shard, "ab") as handle:
        handle.write(_codes(1).astype("<u2").tobytes())
    with open(index, "a") as handle:
        handle.write(json.dumps({"source": "c.png", "h": 3, "w": 4, "offset": 24}) + "\n" + '{"source": "d.p')
    # A reader during/after the crash sees only complete lines.
    assert {r.source for r in TokenStore(tmp_path)} == {"a.png", "b.png", "c.png"}
    writer = ShardWriter(tmp_path, IDENTITY, 300)  # re-open = resume
    assert writer.offset == 36
    assert shard.stat().st_size == 36 * 2  # d.png's stray tokens dropped
    writer.append(["d.png"], _codes(2, batch=1))
    writer.close()
    write_manifest(tmp_path, 1)
    store = TokenStore(tmp_path)
    assert [r.source for r in store] == ["a.png", "b.png", "c.png", "d.png"]
    assert np.array_equal(store.find("d.png").tokens.reshape(3, 4), _codes(2, batch=1)[0])
    assert encoded_sources(tmp_path) == {"a.png", "b.png", "c.png", "d.png"}


def test_other_tokenizer_is_refused(tmp_path):
    ShardWriter(tmp_path, IDENTITY, 300).close()
    with pytest.raises(ValueError, match="different tokenizer"):
        ShardWriter(tmp_path, {**IDENTITY, "weights_sha256": "cd" * 32}, 300)
    with pytest.raises(ValueError, match="codebook_size"):
        ShardWriter(tmp_path, IDENTITY, 301)


def test_shards_roll_over_and_ranks_merge(tmp_path):
    writer = ShardWriter(tmp_path, IDENTITY, 300, rank=0, shard_tokens=30)
    for step in range(3):
        writer.append([f"r0-{step}-{i}.png" for i in range(2)], _codes(step))
    writer.close()
    other = ShardWriter(tmp_path, IDENTITY, 300, rank=1, shard_tokens=30)
    other.append(["r1.png"], _codes(9, batch=1))
    other.close()
    manifest = write_manifest(tmp_path, world_size=2)
    assert [s["tokens"] for s in manifest["shards"]] == [
        "shards/rank00000-00000.tokens", "shards/rank00000-00001.tokens", "shards/rank00000-00002.tokens",
        "shards/rank00001-00000.tokens"]
    store = TokenStore(tmp_path)
    assert len(store) == 7 and len(set(store.sources)) == 7
    assert np.array_equal(store.find("r0-2-1.png").tokens.reshape(3, 4), _codes(2)[1])


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vqtok token store"):
        TokenStore(tmp_path)
