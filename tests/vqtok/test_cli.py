"""The `vqtok` command end to end: train, encode (bad files, resume), decode, eval."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqtok.cli import main
from vqtok.token_store import TokenStore


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "vqtok.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "encode", "decode", "eval"):
        assert command in result.stdout


def test_train_via_cli_and_resume(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--config", "tiny", "--data", image_folder, "--steps", 3, "--out", run,
                           "--set", "train.checkpoint_every=3")
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 3
    code, _, _ = run_cli(capsys, "train", "--config", "tiny", "--data", image_folder, "--steps", 5, "--out", run,
                         "--set", "train.checkpoint_every=3")
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert code == 0 and steps == [1, 2, 3, 4, 5]
    assert (run / "latest").read_text().strip() == "checkpoints/step_00000005"
    code, _, _ = run_cli(capsys, "train", "--config", "tiny", "--data", image_folder, "--steps", 2, "--out", run, "--restart")
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert code == 0 and steps == [1, 2] and (run / "latest").read_text().strip() == "checkpoints/step_00000002"


def test_bad_arguments_exit_2_with_named_field(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", "tiny", "--out", tmp_path, "--set", "train.nope=1")
    assert code == 2 and "train.nope" in err
    code, _, err = run_cli(capsys, "encode", tmp_path, "--ckpt", tmp_path / "missing", "--out", tmp_path / "t")
    assert code == 2 and "missing" in err


def test_encode_decode_round_trip_with_bad_files_and_resume(tmp_path, tiny_run, image_folder, capsys,
                                                            bad_image_files):
    images = tmp_path / "images"
    shutil.copytree(image_folder, images, symlinks=True)
    (images / "bad").mkdir()
    bad = bad_image_files(images / "bad")
    tokens = tmp_path / "tokens"

    code, out, err = run_cli(capsys, "encode", images, "--ckpt", tiny_run, "--out", tokens, "--batch-size", 5, "--quiet")
    summary = json.loads(out.splitlines()[-1])
    assert code == 1  # some files failed
    assert summary["encoded"] == 12 and summary["failed"] == len(bad)
    for path, reason in bad.values():
        assert f"FAILED bad/{path.name}: " in err and reason in err.split(f"bad/{path.name}: ")[1].splitlines()[0]
    store = TokenStore(tokens)
    assert len(store) == 12 and store[0].grid == (16, 16)
    assert {f["source"] for f in store.failures} == {f"bad/{p.name}" for p, _ in bad.values()}

    # Re-running skips everything already encoded; new files are added, nothing duplicated.
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / "a" / "new.png")
    code, out, _ = run_cli(capsys, "encode", images, "--ckpt", tiny_run, "--out", tokens, "--quiet")
    summary = json.loads(out.splitlines()[-1])
    assert summary["encoded"] == 1 and summary["skipped_already_encoded"] == 12
    store = TokenStore(tokens)
    assert len(store) == 13 and len(set(store.sources)) == 13

    # Tokens equal a direct encode of the same preprocessed image.
    from vqtok.checkpoint import load_tokenizer
    from vqtok.images import load_rgb, preprocess, to_tensor

    model, _ = load_tokenizer(tiny_run)
    direct = model.encode(to_tensor(preprocess(load_rgb(images / "a" / "new.png"), 32))[None])[0].numpy()
    assert np.array_equal(store.find("a/new.png").tokens.reshape(16, 16), direct)

    code, out, _ = run_cli(capsys, "decode", tokens, "--ckpt", tiny_run, "--out", tmp_path / "decoded", "--quiet")
    assert code == 0 and json.loads(out)["written"] == 13
    png = Image.open(tmp_path / "decoded" / "b" / "c" / "img06.png")
    assert png.size == (32, 32) and png.mode == "RGB"
    code, out, _ = run_cli(capsys, "decode", tokens, "--ckpt", tiny_run, "--out", tmp_path / "decoded", "--quiet")
    assert json.loads(out)["written"] == 0  # already there


def test_decode_refuses_another_tokenizer(tmp_path, tiny_run, image_folder, capsys):
    tokens = tmp_path / "tokens"
    assert run_cli(capsys, "encode", image_folder, "--ckpt", tiny_run, "--out", tokens, "--quiet")[0] == 0
    other = tmp_path / "other"
    assert run_cli(capsys, "train", "--config", "tiny", "--data", image_folder, "--steps", 1, "--out", other)[0] == 0
    code, _, err = run_cli(capsys, "decode", tokens, "--ckpt", other, "--out", tmp_path / "d")
    assert code == 2 and "was written by tokenizer weights" in err
    code, out, _ = run_cli(capsys, "decode", tokens, "--ckpt", other, "--out", tmp_path / "d", "--allow-other-tokenizer", "--quiet")
    assert code == 0 and json.loads(out)["written"] == 12  # same codebook size: allowed when asked for
    code, _, err = run_cli(capsys, "encode", image_folder, "--ckpt", other, "--out", tokens)
    assert code == 2 and "different tokenizer" in err


def test_eval_reports_metrics_json(tmp_path, tiny_run, image_folder, capsys):
    code, out, _ = run_cli(capsys, "eval", "--ckpt", tiny_run, "--data", image_folder, "--json-out", tmp_path / "m.json")
    result = json.loads(out)
    assert code == 0 and result == json.loads((tmp_path / "m.json").read_text())
    assert result["images"] == 12 and result["tokens"] == 12 * 256
    assert 5 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["code_perplexity"] <= 64
    assert result["lpips"] is None and "no real trunk weights" in result["lpips_note"]


def test_interrupted_encode_loses_only_the_batch_in_flight(tmp_path, tiny_run, image_folder, monkeypatch):
    from vqtok import encode as encode_module
    from vqtok.token_store import ShardWriter

    real_append, calls = ShardWriter.append, []

    def append_then_die(self, sources, codes):
        calls.append(len(sources))
        if len(calls) == 3:  # die after writing this batch's tokens but before its index lines
            self._tokens.write(codes.astype(self.dtype).tobytes())
            self._tokens.flush()
            raise KeyboardInterrupt
        real_append(self, sources, codes)

    monkeypatch.setattr(ShardWriter, "append", append_then_die)
    tokens = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        encode_module.encode_images(image_folder, tiny_run, tokens, batch_size=2, progress=False)
    assert len(TokenStore(tokens)) == 4  # two complete batches survive, the third is lost
    monkeypatch.setattr(ShardWriter, "append", real_append)
    summary = encode_module.encode_images(image_folder, tiny_run, tokens, batch_size=2, progress=False)
    assert summary.skipped == 4 and summary.encoded == 8
    store = TokenStore(tokens)
    assert len(store) == 12 and len(set(store.sources)) == 12
    shard = tokens / "shards" / "rank00000-00000.tokens"
    assert shard.stat().st_size == 12 * 256 * 2  # the stray tokens of the lost batch were dropped
