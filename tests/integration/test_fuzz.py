"""Property-based fuzzing (hypothesis) of what users write: documents JSONL, config files and overrides, sampling
settings, and the names a token store or a checkpoint hands to a writer. The property everywhere: a clear error
(ValueError / FileNotFoundError / KeyError with a message) or success, never another exception, and never a file
written outside the output folder. Derandomized and bounded, so the suite stays fast and repeatable."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAR = (ValueError, FileNotFoundError, KeyError)

# text with everything JSON can carry, lone surrogates included (hypothesis leaves them out by default), and
# the values that break parsers most often drawn on purpose
TEXT = st.sampled_from(["\ud800", "a\udfffb", "", "\0", "é"]) | st.text(st.characters(exclude_categories=()), max_size=12)
EDGES = st.sampled_from([0, -1, 1, 2, 3, 7, 10**6, 2**31, 2**70, 1e308, -0.5, 0.5, float("nan"), float("inf"), True])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | EDGES
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=12)
DOCUMENT_KEYS = ["segments", "train_on", "id", "kind", "split", "Train_on", "segment", "scene"]
SEGMENT_KEYS = ["text", "image", "image_ref", "loss", "Loss", "store", "source", "caption"]


def keyed(keys: list[str], values):
    return st.dictionaries(st.sampled_from(keys) | TEXT, values, max_size=4)


SEGMENT = keyed(SEGMENT_KEYS, JSON | keyed(["store", "source", "grid"], TEXT | JSON)) | JSON
DOCUMENT = keyed(DOCUMENT_KEYS, st.lists(SEGMENT, max_size=4) | st.sampled_from(["all", "text", "image"]) | JSON) | JSON
# documents one mistake away from valid, so the fuzzing reaches encoding and packing too
NEAR_SEGMENT = st.fixed_dictionaries({"text": TEXT}, optional={"loss": st.booleans() | EDGES, "Loss": st.booleans()}) | \
    st.fixed_dictionaries({"image_ref": st.fixed_dictionaries({"store": st.just("tokens"), "source": TEXT})})
NEAR_DOCUMENT = st.fixed_dictionaries({"segments": st.lists(NEAR_SEGMENT, min_size=1, max_size=3)},
                                      optional={"train_on": st.sampled_from(["all", "text", "image", "pixels"]),
                                                "split": TEXT | EDGES, "id": TEXT | EDGES, "Train_on": TEXT})
DOCUMENT = NEAR_DOCUMENT | DOCUMENT


def clear(error: BaseException) -> bool:
    return isinstance(error, CLEAR) and bool(str(error).strip())


def parse_and_encode(path: Path, vocab) -> None:
    """Read every document and encode it, pictures as a fixed 2x2 grid: a clear error or success."""
    from unified_lm.tokens.documents import encode_document, read_documents

    for document in read_documents(path):
        encode_document(document, vocab, lambda segment, where: np.zeros((2, 2), np.int64))


@pytest.fixture(scope="module")
def vocab(lm_data):
    from unified_lm.tokens.vocab import Vocabulary

    return Vocabulary.load(lm_data.vocab_dir)


@settings(FUZZ, max_examples=200)
@given(records=st.lists(DOCUMENT, min_size=1, max_size=3))
@example(records=[{"segments": [{"text": "a \ud800 b"}]}])  # issue 17's probes, always included
@example(records=[{"segments": [{"text": "secret", "Loss": False}]}])
def test_documents_parser_gives_a_clear_error_or_documents(vocab, records):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        try:
            parse_and_encode(path, vocab)
        except Exception as err:  # noqa: BLE001  (the property under test)
            assert clear(err) and "docs.jsonl" in str(err), repr(err)


@settings(FUZZ, max_examples=200)
@given(lines=st.lists(st.binary(max_size=40) | st.sampled_from([b'{"segments": [{"text": "\\ud800"}]}', b"\xff{}",
                                                                   b'{"segments": [{"text": "a"}]}', b"[" * 3000]),
                      min_size=1, max_size=4))
def test_documents_parser_survives_arbitrary_bytes(vocab, lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
        try:
            parse_and_encode(path, vocab)
        except Exception as err:  # noqa: BLE001
            assert clear(err) and "docs.jsonl" in str(err), repr(err)


def flat_fields(data: dict, prefix: str = "") -> list[str]:
    return [name for key, value in data.items()
            for name in (flat_fields(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"])]


def config_cases():
    from unified_lm.model.config import preset as unified_preset
    from unified_lm.vision.contrastive import encoder_preset
    from vqtok.config import preset as vq_preset

    return {"vqtok": vq_preset("tiny"), "unified_lm": unified_preset("tiny"), "encoder": encoder_preset("tiny")}


CONFIGS = config_cases()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_config_overrides_give_a_clear_error_or_a_valid_config(kind):
    base = CONFIGS[kind]
    fields = flat_fields(base.to_dict())
    values = EDGES | JSON | st.sampled_from(["", [], {}, [0], [1, 2, 3, 4, 5, 6, 7, 8, 9]])

    @FUZZ
    @given(overrides=st.dictionaries(st.sampled_from(fields) | TEXT, values, max_size=4))
    def check(overrides):
        try:
            base.with_overrides(overrides).validate()
        except Exception as err:  # noqa: BLE001
            assert isinstance(err, ValueError) and str(err), repr(err)

    check()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_config_files_give_a_clear_error_or_a_valid_config(kind, tmp_path):
    from runkit.typed_config import load_preset_or_file
    from unified_lm.model.config import PRESETS as UNIFIED
    from unified_lm.model.config import UnifiedConfig
    from unified_lm.vision.contrastive import PRESETS as ENCODER
    from unified_lm.vision.contrastive import EncoderConfig
    from vqtok.config import PRESETS as VQ
    from vqtok.config import VQConfig

    presets, cls = {"vqtok": (VQ, VQConfig), "unified_lm": (UNIFIED, UnifiedConfig), "encoder": (ENCODER, EncoderConfig)}[kind]
    sections = list(CONFIGS[kind].to_dict())

    @FUZZ
    @given(data=keyed(sections + ["preset"], JSON | st.sampled_from(sorted(presets))) | JSON)
    def check(data):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
        try:
            load_preset_or_file(str(path), presets, cls.from_dict, "--config").validate()
        except Exception as err:  # noqa: BLE001
            assert isinstance(err, ValueError) and str(err), repr(err)

    check()


@FUZZ
@given(data=keyed(["mode", "max_new_tokens", "max_images", "seed", "text", "image", "guidance"],
                  JSON | keyed(["temperature", "top_k", "top_p", "repetition_penalty", "mode", "scale", "image_scale"],
                               EDGES | st.floats())))
def test_sampling_settings_give_a_clear_error_or_valid_settings(data):
    from unified_lm.generate.sampling import SamplingConfig

    try:
        config = SamplingConfig.from_dict(data)
    except Exception as err:  # noqa: BLE001
        assert isinstance(err, ValueError) and str(err), repr(err)
        return
    assert all(np.isfinite([config.guidance.scale, config.guidance.image_scale, config.text.temperature]))


@FUZZ
@given(pairs=st.lists(TEXT, max_size=4))
def test_override_strings_give_a_clear_error_or_overrides(pairs):
    from runkit.typed_config import parse_overrides

    try:
        CONFIGS["vqtok"].with_overrides(parse_overrides(pairs)).validate()
    except Exception as err:  # noqa: BLE001
        assert isinstance(err, ValueError) and str(err), repr(err)


# -- never a file outside OUT -----------------------------------------------------------------------------------
NAMES = st.lists(st.sampled_from(["..", ".", "a", "link", "", "b.png", "/", "\0", "~", "..."]) | TEXT,
                 min_size=1, max_size=5).map("/".join)


@FUZZ
@given(name=NAMES)
def test_confined_names_never_leave_their_folder(name):
    from runkit.files import confined

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        (root / "link").symlink_to(tmp)
        try:
            path = confined(root, name)
        except ValueError:
            return
        assert path.resolve().is_relative_to(root.resolve())


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_run):
    """A token store of two random 16x16 pictures from tiny_run's tokenizer."""
    from vqtok.checkpoint import read_checkpoint
    from vqtok.token_store import ShardWriter, write_manifest

    _, _, meta = read_checkpoint(tiny_run)
    root = tmp_path_factory.mktemp("fuzz_store") / "store"
    writer = ShardWriter(root, meta["tokenizer"], 64)
    writer.append(["a.png", "b.png"], np.random.default_rng(0).integers(0, 64, (2, 16, 16)))
    writer.close()
    write_manifest(root, 1, {})
    return root


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(names=st.lists(NAMES, min_size=2, max_size=2))
def test_decode_never_writes_outside_out(small_store, tiny_run, names):
    from vqtok.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        import shutil

        shutil.copytree(small_store, store)
        index = next((store / "shards").glob("*.index.jsonl"))
        rows = [json.loads(line) for line in index.read_text().splitlines()]
        for row, name in zip(rows, names):
            row["source"] = name
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (store / "manifest.json").unlink()
        (work / "out").mkdir()
        (work / "out" / "link").symlink_to(work)
        before = files_under(work)
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            code = main(["decode", str(store), "--ckpt", str(tiny_run), "--out", str(work / "out"), "--quiet"])
        assert code in (0, 2), err.getvalue()
        new = files_under(work) - before
        outside = [p for p in new if not p.resolve().is_relative_to((work / "out").resolve())
                   or (work / "out" / "link") in p.parents]
        assert not outside, (names, outside)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(records=st.lists(DOCUMENT, min_size=1, max_size=3))
def test_prepare_gives_a_clear_error_or_a_dataset_and_writes_only_in_out(lm_data, records):
    from unified_lm.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = work / "docs.jsonl"
        docs.write_text("".join(json.dumps(r) + "\n" for r in records))
        before = files_under(work)
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            code = main(["prepare", str(docs), "--vocab", str(lm_data.vocab_dir), "--out", str(work / "out"),
                         "--tokens", str(lm_data.tokens), "--seq-len", "64"])
        assert code in (0, 2) and "Traceback" not in err.getvalue(), err.getvalue()
        assert all(p.is_relative_to(work / "out") for p in files_under(work) - before)
        assert (code == 0) == (work / "out" / "dataset.json").is_file()
        assert os.path.isdir(work / "out") or code == 2
