"""Issue 17, item by item: bad input never loses data, never escapes its folder, never runs code, and always gets an
error that names it. Each test drives the public entry points (the CLIs, the loaders), so the same tests run
against the code before the fixes and fail there (docs/reliability.md has the probe table)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from unified_lm.cli import main as lm_main
from vqtok.cli import main as vqtok_main


def run(main, capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def train_main():
    """scripts/train_unified.py's main, in this process (only for failures before DeepSpeed starts)."""
    spec = importlib.util.spec_from_file_location("train_unified_script", REPO / "scripts" / "train_unified.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def launch_env(monkeypatch):
    """A launcher's environment, so the training script leaves os.environ alone (restored after the test)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def write_docs(path, *records) -> str:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return str(path)


# -- 1: a failed prepare never destroys the dataset already there ------------------------------------------------
def test_1_failed_prepare_keeps_the_dataset_already_there(lm_data, tmp_path, capsys):
    from unified_lm.data.packing import PackedDataset

    source = sorted((lm_data.world / "images").iterdir())[0].name
    out = tmp_path / "packed"
    good = write_docs(tmp_path / "good.jsonl", {"segments": [{"text": "a picture:"}, {"image_ref": {
        "store": str(lm_data.tokens), "source": source}}]})
    assert run(lm_main, capsys, "prepare", good, "--vocab", lm_data.vocab_dir, "--out", out, "--seq-len", 64)[0] == 0
    before = PackedDataset(out)
    rows = [before[i].tokens.copy() for i in range(len(before))]
    bad = write_docs(tmp_path / "bad.jsonl", {"segments": [{"text": "fine"}]}, {"segments": [{"image_ref": {
        "store": str(lm_data.tokens), "source": "missing.png"}}]})
    code, err = run(lm_main, capsys, "prepare", bad, "--vocab", lm_data.vocab_dir, "--out", out, "--seq-len", 64)
    assert code == 2 and "bad.jsonl:2" in err and "missing.png" in err
    after = PackedDataset(out)  # the good dataset is still there, unchanged, and nothing half-built is left
    assert [after[i].tokens.tolist() for i in range(len(after))] == [r.tolist() for r in rows]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("image_tokens")) == ["dataset.json", "shards", "vocab"]
    # a good re-prepare replaces it (beside the old one, then one rename), and the old generation is removed
    more = write_docs(tmp_path / "more.jsonl", {"segments": [{"text": "another document, longer than before."}]})
    assert run(lm_main, capsys, "prepare", more, "--vocab", lm_data.vocab_dir, "--out", out, "--seq-len", 64)[0] == 0
    assert PackedDataset(out).info["documents"] == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("image_tokens")) == ["dataset.json", "shards-b", "vocab"]


# -- 2: decode never writes outside --out -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escaped/evil.png", "/ABSOLUTE/evil.png", "a/../../evil.png"])
def test_2_decode_refuses_source_names_that_leave_out(tmp_path, tiny_run, image_folder, capsys, name):
    tokens = tmp_path / "tokens"
    assert run(vqtok_main, capsys, "encode", image_folder, "--ckpt", tiny_run, "--out", tokens, "--quiet")[0] == 0
    index = next((tokens / "shards").glob("*.index.jsonl"))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    rows[3]["source"] = name.replace("/ABSOLUTE", str(tmp_path / "absolute"))
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tokens / "manifest.json").unlink()
    code, err = run(vqtok_main, capsys, "decode", tokens, "--ckpt", tiny_run, "--out", tmp_path / "work" / "out", "--quiet")
    assert code == 2 and "leaves" in err and str(tokens) in err
    assert not list(tmp_path.rglob("*.png")), "decode wrote a picture although the store was refused"


def test_2_confined_names_stay_inside_their_folder(tmp_path):
    from runkit.files import confined

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert confined(tmp_path / "root", "a/b.png") == tmp_path / "root" / "a" / "b.png"
    for name in ["../x", "/etc/passwd", "a/../../x", "link/x", "", "a\0b", None, 3]:
        with pytest.raises(ValueError, match="name"):
            confined(tmp_path / "root", name)


# -- 3: crafted sizes fail before anything is allocated ---------------------------------------------------------
def test_3_crafted_checkpoint_sizes_are_refused_before_building(lm_run, capsys):
    run_dir, _ = lm_run
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    config = json.loads((checkpoint / "config.json").read_text())
    crafted = checkpoint.parent.parent.parent / "crafted"
    for n_layers, phrase in ((10**6, "model.n_layers=1000000 is outside"), (3, "weights do not match")):
        shutil.rmtree(crafted, ignore_errors=True)
        shutil.copytree(checkpoint, crafted)
        (crafted / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "n_layers": n_layers}}))
        code, err = run(lm_main, capsys, "sample", "--ckpt", crafted, "--prompt", "a", "--mode", "text",
                        "--out", crafted / "out")
        assert code == 2 and phrase in err and str(crafted) in err, err


def test_3_crafted_vocabulary_sizes_are_refused_before_allocating(lm_data, tmp_path):
    from unified_lm.tokens.vocab import Vocabulary

    for field, value in (("codebook_size", 10**12), ("codebook_size", [64]), ("codebook_size", True)):
        vocab = tmp_path / f"vocab-{field}-{value}"
        shutil.copytree(lm_data.vocab_dir, vocab)
        info = json.loads((vocab / "vocab.json").read_text())
        (vocab / "vocab.json").write_text(json.dumps({**info, field: value}))
        with pytest.raises(ValueError, match="vocab.json: codebook_size must be an integer"):
            Vocabulary.load(vocab)


def test_3_memory_errors_end_in_one_line(monkeypatch, capsys, tmp_path):
    import unified_lm.cli
    import vqtok.cli

    def boom(args):
        raise MemoryError()

    monkeypatch.setattr(vqtok.cli, "cmd_eval", boom)
    code, err = run(vqtok_main, capsys, "eval", "--ckpt", tmp_path)
    assert code == 2 and "out of memory" in err and "Traceback" not in err
    monkeypatch.setattr(unified_lm.cli, "cmd_world", lambda args: (_ for _ in ()).throw(RuntimeError("alloc failed\nmore")))
    code, err = run(lm_main, capsys, "world", "--out", tmp_path)
    assert code == 2 and "RuntimeError: alloc failed" in err and "more" not in err


# -- 4: a corrupt weights file is named ---------------------------------------------------------------------------
def test_4_corrupt_safetensors_names_the_file(tmp_path, tiny_run, image_folder, lm_run, capsys):
    tokenizer = tmp_path / "tok"
    shutil.copytree(tiny_run, tokenizer)
    weights = next(tokenizer.rglob("model.safetensors"))
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # same size: only the header is damaged
    code, err = run(vqtok_main, capsys, "encode", image_folder, "--ckpt", tokenizer, "--out", tmp_path / "t")
    assert code == 2 and str(weights) in err and "not a readable safetensors file" in err
    model = tmp_path / "lm"
    shutil.copytree(lm_run[0] / "checkpoints" / "step_00000001", model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, err = run(lm_main, capsys, "sample", "--ckpt", model, "--prompt", "a", "--mode", "text", "--out", tmp_path / "s")
    assert code == 2 and str(model / "model.safetensors") in err


# -- 5: resume falls back to the newest complete checkpoint; pruning keeps the good ones ---------------------------
def _tokenizer_run(tmp_path, image_folder, steps: int = 4):
    from vqtok.config import preset
    from vqtok.data import resolve_image_paths
    from vqtok.train import Trainer

    config = preset("tiny").with_overrides({"train.steps": steps, "train.checkpoint_every": 2, "train.sample_every": 100,
                                            "train.keep_checkpoints": 3})
    paths = resolve_image_paths(image_folder)
    return config, paths, lambda run: Trainer(config, run, paths, [])


@pytest.mark.slow
def test_5_vqtok_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, image_folder, caplog):
    _, _, trainer = _tokenizer_run(tmp_path, image_folder)
    run_dir = tmp_path / "run"
    trainer(run_dir).train()
    step4 = run_dir / "checkpoints" / "step_00000004"
    state = step4 / "trainer.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    again = trainer(run_dir)
    assert again.resume() and again.step == 2
    assert "step_00000004, which cannot be used: trainer.safetensors is truncated" in caplog.text
    assert "using step_00000002" in caplog.text
    (run_dir / "latest").write_text("checkpoints/step_00000099\n")  # names a missing directory
    shutil.rmtree(step4)
    assert trainer(run_dir).resume()
    (run_dir / "latest").write_text("../../elsewhere\n")  # never followed out of the run
    assert trainer(run_dir).resume() and "not a checkpoint name" in caplog.text
    for directory in (run_dir / "checkpoints").iterdir():
        (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no other complete checkpoint"):
        trainer(run_dir).resume()


@pytest.mark.slow
def test_5_pruning_deletes_damaged_checkpoints_not_the_good_one(tmp_path, image_folder):
    config, paths, _ = _tokenizer_run(tmp_path, image_folder)
    from vqtok.train import Trainer

    run_dir = tmp_path / "run"
    trainer = Trainer(config.with_overrides({"train.keep_checkpoints": 2}), run_dir, paths, [])
    trainer.train(steps=4)
    (run_dir / "checkpoints" / "step_00000004" / "model.safetensors").unlink()  # damaged after the fact
    trainer.train(steps=6)  # saves step 6: keep 2 complete (2 and 6), drop the damaged 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000006"]


def test_5_training_pruning_keeps_what_either_resume_path_can_use(tmp_path):
    from runkit.checkpoints import prune_checkpoints, write_manifest
    from unified_lm.train.trainer import DEEPSPEED_FILES, RESUME_FILES

    folder = tmp_path / "checkpoints"
    layouts = {1: ["model.safetensors", "config.json", "resume/rank00000.json", "resume/rank00000.safetensors"],
               2: ["model.safetensors", "mp_rank_00_model_states.pt"],  # from before the resume state: DeepSpeed's only
               3: ["config.json", "resume/rank00000.json", "resume/rank00000.safetensors"],  # lost model.safetensors
               4: ["model.safetensors", "config.json", "resume/rank00000.json", "resume/rank00000.safetensors"]}
    for step, names in layouts.items():
        for name in names:
            (folder / f"step_{step:08d}" / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / f"step_{step:08d}" / name).write_bytes(b"x" * 8)
        write_manifest(folder / f"step_{step:08d}")
    prune_checkpoints(folder, 2, RESUME_FILES, DEEPSPEED_FILES)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004"]


# -- 7: unknown keys are refused, not ignored ---------------------------------------------------------------------
@pytest.mark.parametrize("record, phrase", [
    ({"segments": [{"text": "secret", "Loss": False}]}, "unknown key 'Loss'; did you mean 'loss'?"),
    ({"segments": [{"text": "x", "los": False}]}, "unknown key 'los'; did you mean 'loss'?"),
    ({"segments": [{"text": "x", "caption": "y"}]}, "unknown key 'caption'"),
    ({"segments": [{"image_ref": {"store": "s", "source": "a.png", "grid": 4}}]}, "image_ref: unknown key 'grid'"),
    ({"Train_on": "text", "segments": [{"text": "x"}]}, "unknown key 'Train_on'; did you mean 'train_on'?"),
])
def test_7_unknown_keys_are_refused(lm_data, tmp_path, capsys, record, phrase):
    docs = write_docs(tmp_path / "docs.jsonl", {"segments": [{"text": "fine"}], "scene": {"kept": "as metadata"}}, record)
    code, err = run(lm_main, capsys, "prepare", docs, "--vocab", lm_data.vocab_dir, "--out", tmp_path / "out")
    assert code == 2 and "docs.jsonl:2" in err and phrase in err, err


def test_7_unknown_keys_in_encoder_pairs_are_refused(tmp_path):
    from unified_lm.train.encoder import read_pairs_file

    pairs = write_docs(tmp_path / "pairs.jsonl", {"image": "a.png", "text": "a red circle."},
                       {"image": "b.png", "text": "a blue square.", "weight": 2})
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: unknown key 'weight'"):
        read_pairs_file(pairs)


# -- 8: text that is not Unicode, files that are not UTF-8 --------------------------------------------------------
@pytest.mark.parametrize("line, phrase", [
    (b'{"segments": [{"text": "a \\ud800 b"}]}', "docs.jsonl:2 segment 0: text holds '\\ud800' at character 2, a lone surrogate"),
    (b'{"segments": [{"text": "caf\xe9"}]}', "docs.jsonl:2: not UTF-8 text (byte 0xe9 at column 28)"),
])
def test_8_bad_text_names_file_and_line(lm_data, tmp_path, capsys, line, phrase):
    docs = write_docs(tmp_path / "docs.jsonl", {"segments": [{"text": "fine"}]}, line)
    code, err = run(lm_main, capsys, "prepare", docs, "--vocab", lm_data.vocab_dir, "--out", tmp_path / "out")
    assert code == 2 and phrase in err, err


# -- 9: guidance scales must be numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--cfg-scale=nan", "--cfg-scale=inf", "--cfg-image-scale=-inf"])
def test_9_non_finite_guidance_is_refused(lm_run, tmp_path, capsys, flag):
    code, err = run(lm_main, capsys, "sample", "--ckpt", lm_run[0], "--prompt", "a", "--mode", "image", "--cfg", "3way",
                    flag, "--out", tmp_path / "out")
    assert code == 2 and "guidance" in err and "finite" in err, err
    assert not (tmp_path / "out").exists()


# -- 10: the small ones -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, phrase", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"zero_optimization": 2}', "zero_optimization must be an object"),
    ('{"zero_optimization": {"stage": "two"}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 'two'"),
    ('{"zero_optimization": {"stage": true}}', "got True"),
])
def test_10_bad_deepspeed_configs_name_the_field(lm_data, tmp_path, capsys, launch_env, content, phrase):
    (tmp_path / "ds.json").write_text(content)
    code = train_main()(["--data", str(lm_data.packed), "--out", str(tmp_path / "run"), "--model", "tiny",
                         "--deepspeed_config", str(tmp_path / "ds.json")])
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and "ds.json" in err, err


def test_10_zero_stage_given_as_a_string_is_accepted():
    from unified_lm.model.config import preset
    from unified_lm.train.trainer import resolve_deepspeed_config

    path = REPO / "configs" / "deepspeed" / "zero2.json"
    text = path.read_text().replace('"stage": 2', '"stage": "2"')
    assert '"2"' in text
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        handle.write(text)
        handle.flush()
        assert resolve_deepspeed_config(handle.name, preset("tiny"), 1, on_cuda=False)["zero_optimization"]["stage"] == 2


def test_10_out_of_range_ids_in_a_same_size_shard_are_named(lm_data, tmp_path):
    from unified_lm.data.packing import PackedDataset

    packed = tmp_path / "packed"
    shutil.copytree(lm_data.packed, packed)
    shard = next((packed / "shards").glob("*.tokens"))
    data = np.fromfile(shard, dtype="<u2")
    data[5] = 65535
    data.tofile(shard)
    dataset = PackedDataset(packed)
    with pytest.raises(ValueError, match=r"rows-00000.tokens: row 0 holds token id 65535, outside the vocabulary"):
        dataset.batch([0, 1])


def test_10_vqtok_pointed_at_a_unified_lm_run_says_so(lm_run, image_folder, tmp_path, capsys):
    code, err = run(vqtok_main, capsys, "encode", image_folder, "--ckpt", lm_run[0], "--out", tmp_path / "t")
    assert code == 2 and "is a unified_lm model checkpoint, not a vqtok tokenizer" in err
    code, err = run(vqtok_main, capsys, "eval", "--ckpt", lm_run[0] / "checkpoints" / "step_00000001")
    assert code == 2 and "is a unified_lm model checkpoint" in err


def test_10_unified_lm_pointed_at_a_tokenizer_says_so(tiny_run, tmp_path, capsys):
    code, err = run(lm_main, capsys, "sample", "--ckpt", tiny_run, "--prompt", "a", "--mode", "text", "--out", tmp_path)
    assert code == 2 and "is a vqtok tokenizer run, not a unified_lm model run" in err
    checkpoint = tiny_run / "checkpoints" / "step_00000008"
    code, err = run(lm_main, capsys, "sample", "--ckpt", checkpoint, "--prompt", "a", "--mode", "text", "--out", tmp_path)
    assert code == 2 and "is a vqtok tokenizer checkpoint, not a unified_lm model" in err

