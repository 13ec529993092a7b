"""Joint vocabulary, interleaved documents, packing and `unified-lm prepare`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from unified_lm.cli import main as unified_lm
from unified_lm.data.packing import PackedDataset, batch_indices, pack_documents
from unified_lm.data.prepare import PrepareSettings, prepare
from unified_lm.tokens.documents import Document, EncodedDocument, ImageSegment, encode_document, read_documents
from unified_lm.tokens.vocab import SPECIAL_TOKENS, Vocabulary
from vqtok.token_store import ShardWriter, write_manifest


def test_vocabulary_layout_and_round_trip(lm_data):
    vocab = Vocabulary.load(lm_data.vocab_dir)
    assert vocab.text_size == 400 and vocab.codebook_size == 64
    assert vocab.special.bos == 400 and vocab.special.image == 405 and vocab.image_offset == 406
    assert vocab.size == 400 + len(SPECIAL_TOKENS) + 64
    text = "two red circles and a small blue cross. the word GO is written at the top."
    ids = vocab.encode_text(text)
    assert max(ids) < vocab.text_size and vocab.decode_text(ids) == text
    assert vocab.decode_text(vocab.encode_text("naïve ünïcode ✓")) == "naïve ünïcode ✓"  # byte fallback
    codes = np.arange(16).reshape(4, 4)
    image = vocab.image_ids(codes)
    assert image[0] == vocab.special.boi and image[-1] == vocab.special.eoi
    assert np.array_equal(vocab.image_codes(image[1:-1]), codes.reshape(-1))
    assert vocab.is_image(image[1:-1]).all() and not vocab.is_image(image[[0, -1]]).any()
    with pytest.raises(ValueError, match="image code out of range"):
        vocab.image_ids(np.array([64]))
    info = json.loads((lm_data.vocab_dir / "vocab.json").read_text())
    assert info["image_offset"] == 406 and info["special"]["<eoi>"] == 404


def test_mismatched_codebook_is_refused(lm_data, tmp_path, random_codes_tokenizer):
    vocab = Vocabulary.load(lm_data.vocab_dir)
    with pytest.raises(ValueError, match="codebook_size 128, but the vocabulary was built for 64"):
        vocab.check_tokenizer({"codebook_size": 128}, "tokenizer X")
    with pytest.raises(ValueError, match="different tokenizers mean different pictures"):
        vocab.check_tokenizer({**random_codes_tokenizer, "weights_sha256": "1" * 64}, "tokenizer Y")
    # a token store from a 128-code tokenizer cannot feed this vocabulary
    store = tmp_path / "store128"
    ShardWriter(store, {"name": "other", "codebook_size": 128}, 128).close()
    write_manifest(store, 1, {"source_root": str(lm_data.world / "images")})
    code = unified_lm(["prepare", str(lm_data.documents), "--vocab", str(lm_data.vocab_dir), "--out",
                       str(tmp_path / "packed"), "--tokens", str(store)])
    assert code == 2


def test_vocab_loads_an_existing_sentencepiece_model(lm_data, tmp_path, capsys):
    argv = ["vocab", "--spm-model", str(lm_data.vocab_dir / "text.model"), "--codebook-size", "64", "--out",
            str(tmp_path / "vocab")]
    assert unified_lm(argv) == 0
    loaded = Vocabulary.load(tmp_path / "vocab")
    assert loaded.text_size == 400 and loaded.size == lm_data.vocab.size
    (tmp_path / "not-a-model").write_bytes(b"garbage")
    argv = ["vocab", "--spm-model", str(tmp_path / "not-a-model"), "--codebook-size", "64", "--out", str(tmp_path / "v2")]
    assert unified_lm(argv) == 2 and "is not a sentencepiece model" in capsys.readouterr().err
    assert unified_lm(["vocab", "--text", "default", "--out", str(tmp_path / "v3")]) == 2  # no codebook size


def _document(tokens, loss):
    return EncodedDocument(np.asarray(tokens), np.asarray(loss, bool))


def test_packing_round_trips_documents():
    rng = np.random.default_rng(0)
    documents = [_document(rng.integers(10, 50, size=n), rng.random(n) > 0.5) for n in rng.integers(1, 30, size=40)]
    documents.append(_document(rng.integers(10, 50, size=70), np.ones(70)))  # longer than a row: split
    rows = list(pack_documents(documents, row_length=32, pad_id=3))
    assert all(len(r.tokens) == 32 for r in rows)
    # read documents back: consecutive runs of the same number within a row, continued across rows when split
    recovered, current = [], None
    for row in rows:
        for number in np.unique(row.documents[row.documents > 0]):
            where = row.documents == number
            piece = (row.tokens[where], row.loss[where])
            starts_row = where[0]
            if current is not None and starts_row and len(current[0]) < len(documents[len(recovered)].tokens):
                current = (np.concatenate([current[0], piece[0]]), np.concatenate([current[1], piece[1]]))
            else:
                if current is not None:
                    recovered.append(current)
                current = piece
        assert (row.tokens[row.documents == 0] == 3).all() and not row.loss[row.documents == 0].any()
    recovered.append(current)
    assert len(recovered) == len(documents)
    for original, (tokens, loss) in zip(documents, recovered):
        assert np.array_equal(original.tokens, tokens) and np.array_equal(original.loss, loss)
    # a document that fits in a row is never split
    lengths = {len(d.tokens) for d in documents if len(d.tokens) <= 32}
    for row in rows:
        for number in np.unique(row.documents[row.documents > 0]):
            run = int((row.documents == number).sum())
            assert run in lengths or run <= 32


def test_packed_dataset_reads_back_what_prepare_wrote(lm_data, tmp_path):
    dataset = PackedDataset(lm_data.packed)
    vocab = dataset.vocab
    rows = [dataset[i] for i in range(len(dataset))]
    assert len(rows) == dataset.info["rows"] == 61 and dataset.seq_len == 64  # 63 without caption dropout
    # every train-split document appears, bracketed by <bos> ... <eos>, in packing order
    documents = list(read_documents(lm_data.documents, split="train"))
    bos = sum(int((r.tokens == vocab.special.bos).sum()) for r in rows)
    eos = sum(int((r.tokens == vocab.special.eos).sum()) for r in rows)
    assert bos == eos == len(documents) == dataset.info["documents"]
    # train_on: text_to_image documents train on images only, image_to_text on text only
    batch = dataset.batch(list(range(len(dataset))))
    targets, mask = batch.targets, batch.loss_mask
    assert mask.any() and (batch.image_targets & mask).any() and (~batch.image_targets & mask).any()
    crossing = batch.document_ids[:, 1:] != batch.document_ids[:, :-1]
    assert not (mask[:, :-1] & crossing).any()  # never a target in another document
    assert not (targets[mask] == vocab.special.pad).any()


def test_loss_masks_follow_train_on(lm_data):
    vocab = Vocabulary.load(lm_data.vocab_dir)
    codes = np.zeros((2, 2), np.int64)

    def encode(train_on, overrides=(None, None)):
        document = Document("d", ["a red circle.", ImageSegment(path=lm_data.root)], list(overrides), train_on, "x")
        return encode_document(document, vocab, lambda segment, where: codes)

    text_ids = len(vocab.encode_text("a red circle."))
    image = encode("image")
    assert not image.loss[: 1 + text_ids].any() and image.loss[1 + text_ids :-1].all() and not image.loss[-1]
    text = encode("text")
    assert text.loss[1 : 1 + text_ids].all() and not text.loss[1 + text_ids : -1].any() and text.loss[-1]
    assert encode("all").loss[1:].all() and not encode("all").loss[0]
    assert not encode("all", (False, None)).loss[1 : 1 + text_ids].any()  # per-segment override


def test_prepare_is_deterministic(lm_data, tmp_path):
    settings = PrepareSettings(seq_len=64, split="train", rows_per_shard=16)
    prepare([str(lm_data.documents)], str(lm_data.vocab_dir), str(tmp_path / "again"), settings,
            stores=[str(lm_data.tokens)])
    for shard in sorted((lm_data.packed / "shards").iterdir()):
        assert (tmp_path / "again" / "shards" / shard.name).read_bytes() == shard.read_bytes()
    other = PrepareSettings(seq_len=64, split="train", rows_per_shard=16, seed=1)
    prepare([str(lm_data.documents)], str(lm_data.vocab_dir), str(tmp_path / "seed1"), other, stores=[str(lm_data.tokens)])
    first = lambda root: (root / "shards" / "rows-00000.tokens").read_bytes()
    assert first(tmp_path / "seed1") != first(lm_data.packed)


def test_image_refs_and_text_mixing(lm_data, tmp_path):
    source = sorted((lm_data.world / "images").iterdir())[0].name
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"segments": [{"text": "look:"}, {"image_ref": {"store": str(lm_data.tokens),
                                                                                "source": source}}]}) + "\n")
    info = prepare([str(docs)], str(lm_data.vocab_dir), str(tmp_path / "out"), PrepareSettings(seq_len=64))
    assert info["documents"] == 1 and info["image_target_tokens"] == 16 + 2  # codes and <boi>/<eoi>
    texts = tmp_path / "texts.txt"
    texts.write_text("first plain document.\nsecond plain document.\n")
    info = prepare([str(docs)], str(lm_data.vocab_dir), str(tmp_path / "mixed"),
                   PrepareSettings(seq_len=64, text_corpus=str(texts), text_documents=5))
    assert info["documents"] == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "docs.jsonl:2: invalid JSON"),
    ('{"segments": []}', "docs.jsonl:2: a document is an object with a non-empty 'segments' list"),
    ('{"segments": [{"text": "a", "image": "b.png"}]}', "docs.jsonl:2 segment 0: needs exactly one of"),
    ('{"train_on": "pixels", "segments": [{"text": "a"}]}', "docs.jsonl:2: train_on must be one of"),
    ('{"segments": [{"image": "missing.png"}]}', "docs.jsonl:2: image "),
    ('{"segments": [{"image_ref": {"store": "nowhere", "source": "x.png"}}]}', "is not a vqtok token store"),
])
def test_bad_documents_name_file_and_line(lm_data, tmp_path, capsys, line, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"segments": [{"text": "fine"}]}\n' + line + "\n")
    code = unified_lm(["prepare", str(docs), "--vocab", str(lm_data.vocab_dir), "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_prepare_encodes_pictures_with_a_tokenizer(tiny_run, tmp_path, image_folder):
    """--tokenizer: pictures no store holds are encoded once into OUT/image_tokens and reused."""
    from vqtok.checkpoint import read_checkpoint

    _, _, meta = read_checkpoint(tiny_run)
    code = unified_lm(["vocab", "--tokenizer", str(tiny_run), "--text", str(_write_texts(tmp_path)),
                       "--text-vocab-size", "300", "--out", str(tmp_path / "vocab")])
    assert code == 0
    picture = sorted(image_folder.rglob("*.png"))[0]
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"segments": [{"image": str(picture)}, {"text": "a picture."}]}) + "\n")
    argv = ["prepare", str(docs), "--vocab", str(tmp_path / "vocab"), "--out", str(tmp_path / "packed"),
            "--tokenizer", str(tiny_run), "--seq-len", "128"]
    assert unified_lm(argv) == 0
    dataset = PackedDataset(tmp_path / "packed")
    grid = meta["tokenizer"]["resolution"] // meta["tokenizer"]["downsample_factor"]
    rows = [dataset[i] for i in range(len(dataset))]
    assert sum(int(dataset.vocab.is_image(r.tokens).sum()) for r in rows) == grid * grid
    assert unified_lm(argv) == 0  # second run reuses the cached codes (no second copy)
    cache = tmp_path / "packed" / "image_tokens_native" / "shards"
    assert len(list(cache.glob("*.index.jsonl"))) == 1
    index = cache / "rank00000-00000.index.jsonl"
    assert len(index.read_text().splitlines()) == 1


def _write_texts(tmp_path):
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "picture", "a", "the", "of", "and", "small", "large"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)) + "\n")
    return path


def test_batches_are_a_pure_function_of_the_step():
    a = batch_indices(7, 1, 1, 2, 4, 2, 50, seed=3)
    assert a == batch_indices(7, 1, 1, 2, 4, 2, 50, seed=3)
    seen = [i for step in range(25) for micro in range(2) for rank in range(2)
            for i in batch_indices(step, micro, rank, 2, 4, 2, 50, seed=3)]
    assert sorted(seen[:50]) == list(range(50))  # the first epoch visits every row once
    assert seen[:50] != list(range(50))


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "unified_lm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare" in out.stdout


def test_caption_dropout_is_deterministic_and_keeps_the_pictures(lm_data):
    from unified_lm.data.prepare import drop_captions

    documents = list(read_documents(lm_data.documents, split="train"))
    kept, dropped = drop_captions(documents, 0.5, seed=0)
    again, _ = drop_captions(documents, 0.5, seed=0)
    other, _ = drop_captions(documents, 0.5, seed=1)
    lost = [i for i, (a, b) in enumerate(zip(documents, kept)) if len(a.segments) != len(b.segments)]
    assert lost == [i for i, (a, b) in enumerate(zip(documents, again)) if len(a.segments) != len(b.segments)]
    assert lost != [i for i, (a, b) in enumerate(zip(documents, other)) if len(a.segments) != len(b.segments)]
    eligible = [i for i, d in enumerate(documents) if d.trains_pictures and any(isinstance(s, str) for s in d.segments)]
    assert dropped == len(lost) and set(lost) <= set(eligible)
    assert 0.2 * len(eligible) < len(lost) < 0.8 * len(eligible)
    assert {documents[i].kind for i in eligible} == {"text_to_image", "story"}  # image_to_text / qa train on text
    for i in lost:  # the pictures stay, in order; no text is left
        assert kept[i].segments == [s for s in documents[i].segments if not isinstance(s, str)]
    # a text -> picture document without its caption is exactly the unconditional context of 2-way CFG
    vocab = Vocabulary.load(lm_data.vocab_dir)
    t2i = next(i for i in lost if documents[i].kind == "text_to_image")
    encoded = encode_document(kept[t2i], vocab, lambda segment, where: np.zeros((2, 2), np.int64))
    special = vocab.special
    assert encoded.tokens[:2].tolist() == [special.bos, special.boi] and encoded.tokens[-2:].tolist() == [special.eoi, special.eos]
    assert encoded.loss[1:-1].all()  # <boi>, the codes and <eoi> are targets
    assert drop_captions(documents, 0.0, seed=0) == (documents, 0)
    with pytest.raises(ValueError, match="caption dropout"):
        drop_captions(documents, 1.0, seed=0)


def test_code_positions_count_codes_inside_each_picture(lm_data):
    import torch

    vocab = Vocabulary.load(lm_data.vocab_dir)
    special, code = vocab.special, int(vocab.image_ids(np.array([5]))[1])
    text = vocab.encode_text("a red circle.")[0]
    row = [special.bos, text, special.boi, code, code, code, special.eoi, text, special.boi, code, code]
    expected = [-1, -1, -1, 0, 1, 2, -1, -1, -1, 0, 1]
    assert vocab.code_positions(torch.tensor([row])).tolist() == [expected]
    # a row that starts inside a picture (its <boi> in the previous row) gives those codes no place
    assert vocab.code_positions(torch.tensor([[code, code, special.eoi, text]])).tolist() == [[-1, -1, -1, -1]]
    # <image> placeholders of the continuous path are not codes
    assert vocab.code_positions(torch.tensor([[special.boi, special.image, special.image, special.eoi]])).tolist() == [[-1] * 4]
    batch = PackedDataset(lm_data.packed).batch([0, 1])
    assert torch.equal(batch.code_positions, vocab.code_positions(batch.inputs))
    assert (batch.code_positions.max() == 15) and ((batch.code_positions >= 0) == vocab.is_image(batch.inputs)).all()
