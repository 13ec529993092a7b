"""Bad input, one table per entry point: each row crafts an input, runs the command in this process, and expects
its exit status and a phrase naming the file or field, with no traceback. Add a row when a new input is handled.

Entry points: vqtok train / encode / decode / eval; unified-lm vocab / prepare / train (scripts/train_unified.py,
up to the point DeepSpeed starts) / sample / eval / import-chameleon / export-chameleon. Rows that need a running
DeepSpeed engine (resume from a damaged checkpoint, a damaged dataset row) are in tests/unified_lm/train/test_trainer.py.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from unified_lm.cli import main as lm_main
from vqtok.cli import main as vqtok_main


@dataclass
class Row:
    name: str
    argv: Callable[[SimpleNamespace], list]  # builds the crafted input under c.tmp and returns the arguments
    phrase: str  # must appear in stderr (names the file or the field)
    code: int = 2


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, change: Callable[[dict], object]) -> Path:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))
    return path


def copied_with(source: Path, target: Path, name: str, change: Callable[[dict], object]) -> Path:
    """A copy of the directory `source` at `target` whose JSON file `name` went through `change`."""
    edit_json(copy(source, target) / name, change)
    return target


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def docs(c, *lines) -> Path:
    return write(c.tmp / "docs.jsonl", b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))


def tok_checkpoint(c) -> Path:
    return copy(c.tiny_run / "checkpoints" / "step_00000008", c.tmp / "tok")


def lm_checkpoint(c) -> Path:
    return copy(c.lm_run / "checkpoints" / "step_00000001", c.tmp / "lm")


def exportable_checkpoint(c) -> Path:
    """lm_checkpoint without the picture position table, which Chameleon's format has no place for: the export
    rows then reach the problem each of them is about."""
    from safetensors.torch import load_file, save_file

    directory = lm_checkpoint(c)
    edit_json(directory / "config.json", lambda d: d["model"].update(image_positions=0))
    state = load_file(directory / "model.safetensors")
    state.pop("code_position_embed.weight")
    save_file(state, directory / "model.safetensors")
    return directory


def store(c) -> Path:
    """A token store of the image folder, encoded by tiny_run (encoded once per session, copied per row)."""
    return copy(c.tokens, c.tmp / "store")


def corrupt_header(path: Path) -> Path:
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    return path


def run_rows(main, rows_argv: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in rows_argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_run, image_folder):
    tokens = tmp_path_factory.mktemp("bad_input") / "tokens"
    assert vqtok_main(["encode", str(image_folder), "--ckpt", str(tiny_run), "--out", str(tokens), "--quiet"]) == 0
    return tokens


@pytest.fixture
def c(tmp_path, tiny_run, image_folder, lm_data, lm_run, encoded, caplog):
    return SimpleNamespace(tmp=tmp_path, tiny_run=tiny_run, images=image_folder, data=lm_data, lm_run=lm_run[0],
                           lm_vocab=lm_run[1], tokens=encoded, log=caplog)


def check(main, row: Row, c, capsys) -> None:
    code, err = run_rows(main, row.argv(c), capsys)
    err += c.log.text  # warnings go through logging (stderr on the command line, captured here)
    assert code == row.code, f"{row.name}: exit {code}, expected {row.code}\n{err}"
    assert row.phrase in err, f"{row.name}: {row.phrase!r} not in\n{err}"
    assert "Traceback" not in err, err


def ids(rows):
    return [row.name for row in rows]


# -- vqtok ----------------------------------------------------------------------------------------------------------
VQTOK_TRAIN = [
    Row("unknown override", lambda c: ["--set", "train.nope=1"], "unknown config field 'train.nope'"),
    Row("config not JSON", lambda c: ["--config", write(c.tmp / "c.json", "{")], "c.json: invalid JSON"),
    Row("config a list", lambda c: ["--config", write(c.tmp / "c.json", "[1]")], "expected an object, got list"),
    Row("config preset not a name", lambda c: ["--config", write(c.tmp / "c.json", '{"preset": [1]}')], "unknown preset [1]"),
    Row("nine levels", lambda c: ["--set", "model.channel_multipliers=[1,1,1,1,1,1,1,1,1]"], "model.channel_multipliers must hold 1 to 8"),
    Row("huge codebook", lambda c: ["--set", "quantizer.codebook_size=1000000000"], "quantizer.codebook_size=1000000000 is outside"),
    Row("lr NaN", lambda c: ["--set", "train.lr=NaN"], "train.lr: expected a finite number"),
    Row("an integer as a string", lambda c: ["--set", 'train.log_every="ten"'], "train.log_every: expected a number"),
    Row("tuple of strings", lambda c: ["--set", 'train.betas=["a", "b"]'], "train.betas[0]: expected a number"),
    Row("no such data", lambda c: ["--data", c.tmp / "none"], "no such file or folder"),
    Row("out is a file", lambda c: ["--out", write(c.tmp / "file", "x")], "file"),
]


@pytest.mark.parametrize("row", VQTOK_TRAIN, ids=ids(VQTOK_TRAIN))
def test_vqtok_train(row, c, capsys):
    base = {"--config": "tiny", "--out": c.tmp / "run", "--data": c.images, "--steps": "1"}
    extra = row.argv(c)
    argv = ["train", *[x for k, v in base.items() if k not in extra for x in (k, v)], *extra]
    check(vqtok_main, Row(row.name, lambda _: argv, row.phrase, row.code), c, capsys)


VQTOK_ENCODE = [
    Row("no checkpoint", lambda c: [c.images, "--ckpt", c.tmp / "none"], "checkpoint not found"),
    Row("a unified_lm run", lambda c: [c.images, "--ckpt", c.lm_run], "is a unified_lm model checkpoint, not a vqtok tokenizer"),
    Row("config not JSON", lambda c: [c.images, "--ckpt", write(tok_checkpoint(c) / "config.json", "{").parent],
        "config.json: invalid JSON"),
    Row("config asks for 10^6 res blocks", lambda c: [c.images, "--ckpt", edit_json(tok_checkpoint(c) / "config.json",
        lambda d: d["model"].update(num_res_blocks=10**6)).parent], "model.num_res_blocks=1000000 is outside"),
    Row("config disagrees with weights", lambda c: [c.images, "--ckpt", edit_json(tok_checkpoint(c) / "config.json",
        lambda d: d["model"].update(num_res_blocks=2)).parent], "model.safetensors: weights do not match the config"),
    Row("meta.json missing", lambda c: [c.images, "--ckpt", _unlink(tok_checkpoint(c) / "meta.json").parent], "meta.json not found"),
    Row("weights header damaged", lambda c: [c.images, "--ckpt", corrupt_header(tok_checkpoint(c) / "model.safetensors").parent],
        "model.safetensors: not a readable safetensors file"),
    Row("resolution too large", lambda c: [c.images, "--ckpt", c.tiny_run, "--resolution", "100000"], "--resolution 100000 must be in"),
    Row("no such images", lambda c: [c.tmp / "none", "--ckpt", c.tiny_run], "image path does not exist"),
    Row("out is a file", lambda c: [c.images, "--ckpt", c.tiny_run, "--out", write(c.tmp / "file", "x")], "Not a directory"),
    Row("store of another tokenizer", lambda c: [c.images, "--ckpt", c.tiny_run, "--out", edit_json(
        store(c) / "store.json", lambda d: d.update(codebook_size=128)).parent], "different tokenizer or format"),
]


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


@pytest.mark.parametrize("row", VQTOK_ENCODE, ids=ids(VQTOK_ENCODE))
def test_vqtok_encode(row, c, capsys):
    argv = row.argv(c)
    check(vqtok_main, Row(row.name, lambda _: ["encode", *argv, *(() if "--out" in argv else ("--out", c.tmp / "t")),
                                               "--quiet"], row.phrase, row.code), c, capsys)


def _index_rows(c, change: Callable[[list], None]) -> Path:
    root = store(c)
    index = next((root / "shards").glob("*.index.jsonl"))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    change(rows)
    index.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (root / "manifest.json").unlink()
    return root


def _store_tokens(c, value: int) -> Path:
    root = store(c)
    shard = next((root / "shards").glob("*.tokens"))
    data = np.fromfile(shard, dtype="<u2")
    data[:] = value
    data.tofile(shard)
    return root


VQTOK_DECODE = [
    Row("source leaves --out", lambda c: [_index_rows(c, lambda r: r[0].update(source="../../evil.png"))], "'../../evil.png' leaves"),
    Row("absolute source", lambda c: [_index_rows(c, lambda r: r[0].update(source="/tmp/evil.png"))], "'/tmp/evil.png' leaves"),
    Row("index row not a row", lambda c: [_index_rows(c, lambda r: r.insert(1, {"x": 1}))], "index.jsonl:2: not a token store index row"),
    Row("manifest shard leaves", lambda c: [edit_json(store(c) / "manifest.json", lambda d: d["shards"][0].update(
        tokens="../../../etc/passwd")).parent], "manifest.json: shard '../../../etc/passwd' leaves"),
    Row("store.json not JSON", lambda c: [write(store(c) / "store.json", "{").parent], "store.json: invalid JSON"),
    Row("store.json not UTF-8", lambda c: [write(store(c) / "store.json", b"\xff\xfe").parent], "store.json: not UTF-8"),
    Row("truncated shard", lambda c: [_truncate(next((store(c) / "shards").glob("*.tokens")), 100).parent.parent],
        "reaches past the end of its shard"),
    Row("codes outside the codebook", lambda c: [_store_tokens(c, 65535)], "outside the tokenizer's 64 codes"),
    Row("not a store", lambda c: [c.tmp], "is not a vqtok token store"),
]


def _truncate(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


@pytest.mark.parametrize("row", VQTOK_DECODE, ids=ids(VQTOK_DECODE))
def test_vqtok_decode(row, c, capsys):
    argv = row.argv(c)
    out = c.tmp / "work" / "out"
    check(vqtok_main, Row(row.name, lambda _: ["decode", *argv, "--ckpt", c.tiny_run, "--out", out, "--quiet"],
                          row.phrase, row.code), c, capsys)
    assert not [p for p in c.tmp.rglob("*.png") if not p.is_relative_to(c.images)], "a refused decode wrote pictures"


VQTOK_EVAL = [
    Row("weights header damaged", lambda c: ["--ckpt", corrupt_header(tok_checkpoint(c) / "model.safetensors").parent,
                                             "--data", c.images], "model.safetensors: not a readable safetensors file"),
    Row("no such data", lambda c: ["--ckpt", c.tiny_run, "--data", c.tmp / "none"], "none"),
    Row("json-out in a missing folder", lambda c: ["--ckpt", c.tiny_run, "--data", c.images, "--json-out",
                                                   c.tmp / "no" / "m.json"], "No such file or directory"),
    Row("a unified_lm checkpoint", lambda c: ["--ckpt", c.lm_run / "checkpoints" / "step_00000001"], "is a unified_lm model checkpoint"),
]


@pytest.mark.parametrize("row", VQTOK_EVAL, ids=ids(VQTOK_EVAL))
def test_vqtok_eval(row, c, capsys):
    argv = row.argv(c)
    check(vqtok_main, Row(row.name, lambda _: ["eval", *argv], row.phrase, row.code), c, capsys)


# -- unified-lm -----------------------------------------------------------------------------------------------------
LM_VOCAB = [
    Row("no tokenizer", lambda c: ["--tokenizer", c.tmp / "none"], "checkpoint not found"),
    Row("text corpus missing", lambda c: ["--codebook-size", "64", "--text", c.tmp / "none.txt"], "text corpus not found"),
    Row("spm model garbage", lambda c: ["--codebook-size", "64", "--spm-model", write(c.tmp / "m.model", "garbage")],
        "is not a sentencepiece model"),
    Row("codebook too large", lambda c: ["--codebook-size", "1000000000", "--spm-model", c.data.vocab_dir / "text.model"],
        "codebook_size must be an integer in [1, 1048576]"),
    Row("no codebook", lambda c: ["--text", c.tmp], "give --tokenizer VQRUN"),
    Row("tokenizer is a unified_lm run", lambda c: ["--tokenizer", c.lm_run], "is a unified_lm model checkpoint"),
]


@pytest.mark.parametrize("row", LM_VOCAB, ids=ids(LM_VOCAB))
def test_unified_lm_vocab(row, c, capsys):
    argv = row.argv(c)
    check(lm_main, Row(row.name, lambda _: ["vocab", *argv, "--out", c.tmp / "vocab-out"], row.phrase, row.code), c, capsys)


def _image_ref(c, source: str) -> dict:
    return {"segments": [{"image_ref": {"store": str(c.data.tokens), "source": source}}]}


LM_PREPARE = [
    Row("documents missing", lambda c: [c.tmp / "none.jsonl"], "documents file not found"),
    Row("vocabulary missing", lambda c: [docs(c, {"segments": [{"text": "a"}]}), "--vocab", c.tmp], "missing vocab.json"),
    Row("vocabulary codebook 10^12", lambda c: [docs(c, {"segments": [{"text": "a"}]}), "--vocab",
                                                copied_with(c.data.vocab_dir, c.tmp / "vocab", "vocab.json", lambda d: d.update(codebook_size=10**12))],
        "vocab.json: codebook_size must be an integer"),
    Row("vocab.json a list", lambda c: [docs(c, {"segments": [{"text": "a"}]}), "--vocab",
                                        write(copy(c.data.vocab_dir, c.tmp / "v") / "vocab.json", "[]").parent],
        "vocab.json: expected a JSON object, got list"),
    Row("unknown segment key", lambda c: [docs(c, {"segments": [{"text": "a", "Loss": False}]})], "docs.jsonl:1 segment 0: unknown key 'Loss'"),
    Row("lone surrogate", lambda c: [docs(c, b'{"segments": [{"text": "\\udfff"}]}')], "docs.jsonl:1 segment 0: text holds"),
    Row("not UTF-8", lambda c: [docs(c, b'{"segments": [{"text": "\xff"}]}')], "docs.jsonl:1: not UTF-8 text"),
    Row("not JSON", lambda c: [docs(c, b"{")], "docs.jsonl:1: invalid JSON"),
    Row("nested too deeply", lambda c: [docs(c, b"[" * 100000)], "docs.jsonl:1"),
    Row("segments not a list", lambda c: [docs(c, {"segments": "text"})], "docs.jsonl:1: a document is an object"),
    Row("split not a string", lambda c: [docs(c, {"split": ["train"], "segments": [{"text": "a"}]})], "'split' must be a string"),
    Row("image_ref to a missing source", lambda c: [docs(c, _image_ref(c, "missing.png"))], "'missing.png' is not in token store"),
    Row("image_ref with a NUL", lambda c: [docs(c, _image_ref(c, "a\0b"))], "'image_ref' must be"),
    Row("store.json not JSON", lambda c: [docs(c, {"segments": [{"text": "a"}]}), "--tokens", write(store(c) / "store.json", "{").parent],
        "store.json: invalid JSON"),
    Row("encoder missing", lambda c: [docs(c, {"segments": [{"text": "a"}]}), "--encoder", c.tmp / "none"], "encoder checkpoint not found"),
]


@pytest.mark.parametrize("row", LM_PREPARE, ids=ids(LM_PREPARE))
def test_unified_lm_prepare(row, c, capsys):
    argv = row.argv(c)
    vocab = () if "--vocab" in argv else ("--vocab", c.data.vocab_dir)
    check(lm_main, Row(row.name, lambda _: ["prepare", *argv, *vocab, "--out", c.tmp / "out", "--seq-len", "64"],
                       row.phrase, row.code), c, capsys)
    assert not (c.tmp / "out" / "dataset.json").exists()


LM_TRAIN = [
    Row("no dataset", lambda c: ["--data", c.tmp / "none"], "is not a packed dataset"),
    Row("dataset.json not JSON", lambda c: ["--data", write(copy(c.data.packed, c.tmp / "p") / "dataset.json", "{").parent],
        "dataset.json: invalid JSON"),
    Row("shards not a list", lambda c: ["--data", copied_with(c.data.packed, c.tmp / "packed", "dataset.json", lambda d: d.update(shards=3))], "shards must be a list"),
    Row("shard name leaves", lambda c: ["--data", copied_with(c.data.packed, c.tmp / "packed", "dataset.json", lambda d: d["shards"][0].update(name="../../x"))], "leaves"),
    Row("shard truncated", lambda c: ["--data", _truncate(next((copy(c.data.packed, c.tmp / "p") / "shards").glob("*.loss")), 10)
                                      .parent.parent], "missing or truncated"),
    Row("10^4 layers", lambda c: ["--set", "model.n_layers=10000"], "model.n_layers=10000 is outside"),
    Row("lr NaN", lambda c: ["--set", "train.lr=NaN"], "train.lr: expected a finite number"),
    Row("model file with unknown key", lambda c: ["--model", write(c.tmp / "m.json", '{"preset": "tiny", "modle": {}}')],
        "m.json: unknown config field 'modle'"),
    Row("DeepSpeed config a list", lambda c: ["--deepspeed_config", write(c.tmp / "ds.json", "[1, 2]")], "ds.json: expected a JSON object"),
    Row("DeepSpeed stage 7", lambda c: ["--deepspeed_config", write(c.tmp / "ds.json", '{"zero_optimization": {"stage": 7}}')],
        "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    Row("DeepSpeed config missing", lambda c: ["--deepspeed_config", c.tmp / "none.json"], "DeepSpeed config not found"),
    Row("run holds a checkpoint", lambda c: ["--out", c.lm_run], "already holds a checkpoint; pass --resume"),
]


@pytest.fixture
def train_main(monkeypatch):
    """scripts/train_unified.py's main in this process, with a launcher's environment (restored afterwards) so
    nothing in os.environ outlives the test; every row fails before DeepSpeed starts a process group."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("train_unified_script", REPO / "scripts" / "train_unified.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("row", LM_TRAIN, ids=ids(LM_TRAIN))
def test_unified_lm_train(row, c, capsys, train_main):
    extra = row.argv(c)
    base = {"--data": c.data.packed, "--out": c.tmp / "run", "--model": "tiny"}
    argv = [*[x for k, v in base.items() if k not in extra for x in (k, v)], *extra]
    check(train_main, Row(row.name, lambda _: argv, row.phrase, row.code), c, capsys)


LM_SAMPLE = [
    Row("cfg scale NaN", lambda c: ["--cfg", "2way", "--cfg-scale=nan"], "guidance.scale: expected a finite number"),
    Row("top-p NaN", lambda c: ["--text-top-p=nan"], "text.top_p: expected a finite number"),
    Row("10^6 layers", lambda c: ["--ckpt", copied_with(c.lm_run / "checkpoints" / "step_00000001", c.tmp / "lm", "config.json", lambda d: d["model"].update(n_layers=10**6))],
        "config.json: invalid unified_lm config: model.n_layers=1000000 is outside"),
    Row("2^21 positions", lambda c: ["--ckpt", copied_with(c.lm_run / "checkpoints" / "step_00000001", c.tmp / "lm", "config.json", lambda d: d["model"].update(max_seq_len=1 << 21))],
        "model.max_seq_len=2097152 is outside"),
    Row("config disagrees with weights", lambda c: ["--ckpt", copied_with(c.lm_run / "checkpoints" / "step_00000001", c.tmp / "lm", "config.json", lambda d: d["model"].update(dim=128))],
        "model.safetensors: tensor code_position_embed.weight has shape (256, 64), config expects (256, 128)"),
    Row("weights header damaged", lambda c: ["--ckpt", corrupt_header(lm_checkpoint(c) / "model.safetensors").parent],
        "model.safetensors: not a readable safetensors file"),
    Row("vocab.json not JSON", lambda c: ["--ckpt", write(lm_checkpoint(c) / "vocab" / "vocab.json", "{").parent.parent],
        "vocab.json: invalid JSON"),
    Row("tokenizer_path leaves", lambda c: ["--ckpt", copied_with(c.lm_run / "checkpoints" / "step_00000001", c.tmp / "lm", "meta.json", lambda d: d.update(tokenizer_path="../../tok"))],
        "tokenizer_path '../../tok' leaves"),
    Row("latest names elsewhere: falls back", lambda c: ["--ckpt", _latest(c, "../../../etc")],
        "holds '../../../etc', not a checkpoint name (step_N); using step_00000001", code=0),
    Row("prompts: unknown key", lambda c: ["--prompts", write(c.tmp / "p.jsonl", '{"text": "a", "sed": 3}\n')],
        "p.jsonl:1: unknown key 'sed'; did you mean 'seed'?"),
    Row("prompts: lone surrogate", lambda c: ["--prompts", write(c.tmp / "p.jsonl", '{"text": "\\ud800"}\n')], "p.jsonl:1: text holds"),
    Row("bad image grid", lambda c: ["--image-grid", "axb"], "--image-grid: a picture grid is HxW"),
    Row("a tokenizer as the model", lambda c: ["--ckpt", c.tiny_run], "is a vqtok tokenizer run, not a unified_lm model run"),
]


def _latest(c, name: str) -> Path:
    run = copy(c.lm_run, c.tmp / "run")
    (run / "latest").write_text(name + "\n")
    return run


@pytest.mark.parametrize("row", LM_SAMPLE, ids=ids(LM_SAMPLE))
def test_unified_lm_sample(row, c, capsys):
    extra = row.argv(c)
    base = {"--ckpt": c.lm_run, "--prompt": "a", "--mode": "text", "--out": c.tmp / "out", "--max-new-tokens": "2"}
    if "--prompts" in extra:
        base.pop("--prompt")
    argv = ["sample", *[x for k, v in base.items() if k not in extra for x in (k, v)], *extra]
    check(lm_main, Row(row.name, lambda _: argv, row.phrase, row.code), c, capsys)


LM_EVAL = [
    Row("count -1", lambda c: ["--count", "-1"], "--count, --stories and --baseline-count must be 0 (all held-out"),
    Row("one story", lambda c: ["--stories", "1"], "or at least 2 (chance scores each output against another"),
    Row("weights header damaged", lambda c: ["--ckpt", corrupt_header(lm_checkpoint(c) / "model.safetensors").parent],
        "model.safetensors: not a readable safetensors file"),
    Row("tokenizer of another codebook", lambda c: ["--tokenizer", edit_json(tok_checkpoint(c) / "meta.json", lambda d:
        d["tokenizer"].update(codebook_size=128)).parent], "codebook_size 128"),
    Row("no world", lambda c: ["--world", c.tmp / "none", "--no-baselines", "--photos", "none"], "none"),
]


@pytest.mark.parametrize("row", LM_EVAL, ids=ids(LM_EVAL))
def test_unified_lm_eval(row, c, capsys):
    extra = row.argv(c)
    base = {"--ckpt": c.lm_run, "--tokenizer": c.tiny_run, "--world": c.data.world, "--out": c.tmp / "eval"}
    argv = ["eval", *[x for k, v in base.items() if k not in extra for x in (k, v)], *extra]
    check(lm_main, Row(row.name, lambda _: argv, row.phrase, row.code), c, capsys)


def _hf(c, config) -> Path:
    return write(c.tmp / "hf" / "config.json", config if isinstance(config, str) else json.dumps(config)).parent


HF_CONFIG = {"model_type": "chameleon", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "vq_config": {"embed_dim": 16, "num_embeddings": 64}}
LM_IMPORT = [
    Row("no config.json", lambda c: [c.tmp], "missing config.json"),
    Row("config.json not JSON", lambda c: [_hf(c, "{")], "config.json: invalid JSON"),
    Row("config.json a list", lambda c: [_hf(c, "[]")], "config.json: expected a JSON object"),
    Row("not a Chameleon", lambda c: [_hf(c, {**HF_CONFIG, "model_type": "llama"})], "model_type is 'llama', not 'chameleon'"),
    Row("10^6 layers", lambda c: [_hf(c, {**HF_CONFIG, "num_hidden_layers": 10**6})], "model.n_layers=1000000 is outside"),
    Row("field missing", lambda c: [_hf(c, {k: v for k, v in HF_CONFIG.items() if k != "hidden_size"})], "missing field 'hidden_size'"),
]


@pytest.mark.parametrize("row", LM_IMPORT, ids=ids(LM_IMPORT))
def test_unified_lm_import_chameleon(row, c, capsys):
    argv = row.argv(c)
    check(lm_main, Row(row.name, lambda _: ["import-chameleon", *argv, c.tmp / "out"], row.phrase, row.code), c, capsys)
    assert not (c.tmp / "out").exists()


LM_EXPORT = [
    Row("no checkpoint", lambda c: [c.tmp / "none"], "checkpoint not found"),
    Row("a tokenizer run", lambda c: [c.tiny_run], "is a vqtok tokenizer run, not a unified_lm model run"),
    Row("picture position table", lambda c: [c.lm_run], "model.image_positions is 256 (Chameleon has no image position"),
    Row("weights header damaged", lambda c: [corrupt_header(exportable_checkpoint(c) / "model.safetensors").parent],
        "model.safetensors: not a readable safetensors file"),
    Row("config disagrees with weights", lambda c: [edit_json(exportable_checkpoint(c) / "config.json",
        lambda d: d["model"].update(n_layers=3)).parent], "weights do not match the config"),
    Row("tokenizer of another codebook", lambda c: [exportable_checkpoint(c), "--tokenizer", edit_json(
        tok_checkpoint(c) / "meta.json", lambda d: d["tokenizer"].update(codebook_size=128)).parent], "codebook_size 128"),
]


@pytest.mark.parametrize("row", LM_EXPORT, ids=ids(LM_EXPORT))
def test_unified_lm_export_chameleon(row, c, capsys):
    argv = row.argv(c)
    check(lm_main, Row(row.name, lambda _: ["export-chameleon", *argv[:1], c.tmp / "out", *argv[1:]], row.phrase,
                       row.code), c, capsys)
    assert not (c.tmp / "out").exists()
