"""Data parallel over torch.distributed with 2 CPU processes (gloo): training stays in sync, encode splits work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runkit.distributed import free_port

REPO = Path(__file__).resolve().parents[2]

from vqtok.token_store import TokenStore

pytestmark = pytest.mark.slow


def torchrun(*argv, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vqtok.cli", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return result


@pytest.mark.slow
def test_ddp_training_two_processes(tmp_path, image_folder):
    run = tmp_path / "run"
    result = torchrun("train", "--config", "tiny", "--data", image_folder, "--steps", 6, "--batch-size", 2,
                      "--out", run, "--set", "train.checkpoint_every=3", "--set", "quantizer.kmeans_init=true", "--set", "train.usage_window=8192")
    assert result.returncode == 0, result.stderr[-3000:]
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas == {**replicas, "step": 6, "world_size": 2, "in_sync": True}
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # one log, written by rank 0 only
    assert rows[-1]["usage_window_tokens"] == 6 * 2 * 2 * 256  # indices gathered from both ranks


@pytest.mark.slow
def test_encode_two_processes_one_manifest(tmp_path, tiny_run, image_folder):
    tokens = tmp_path / "tokens"
    result = torchrun("encode", image_folder, "--ckpt", tiny_run, "--out", tokens, "--batch-size", 4, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["encoded"] == 12  # rank 0 reports for both ranks
    store = TokenStore(tokens)
    assert len(store) == 12 and len(set(store.sources)) == 12
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert {s["tokens"].split("-")[0] for s in manifest["shards"]} == {"shards/rank00000", "shards/rank00001"}
    assert sum(s["images"] for s in manifest["shards"]) == 12
    # Same tokens as a single-process encode.
    single = tmp_path / "single"
    from vqtok.encode import encode_images

    encode_images(image_folder, tiny_run, single, progress=False)
    reference = TokenStore(single)
    for record in reference:
        assert (store.find(record.source).tokens == record.tokens).all()
