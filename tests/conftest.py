"""Shared fixtures: a folder of small real-format images and a briefly trained `tiny` tokenizer."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before any
# @triton.jit function is defined (the kernel modules are imported by the imports below).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="vqtok-test-torch-home-")  # never read a user's hub cache


def make_photo(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A smooth colour gradient plus a few rectangles: structure a tokenizer can learn, different per seed."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(0.3, 1.0, size=3)
    for _ in range(3):
        top, left = rng.integers(0, size - 8, size=2)
        base[top : top + rng.integers(4, 16), left : left + rng.integers(4, 16)] = rng.uniform(0, 1, size=3)
    return (base * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """12 PNG/JPEG images in nested folders (the recursive listing must find them all)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(12):
        folder = root / ("a" if index < 6 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        ext = "png" if index % 3 else "jpg"
        Image.fromarray(make_photo(rng)).save(folder / f"img{index:02d}.{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, image_folder) -> Path:
    """A `tiny` tokenizer trained for 8 steps on `image_folder` (a run directory with a checkpoint)."""
    from vqtok.config import preset
    from vqtok.data import resolve_image_paths
    from vqtok.train import Trainer

    run = tmp_path_factory.mktemp("tiny_run")
    config = preset("tiny").with_overrides({"train.steps": 8, "train.checkpoint_every": 8, "train.sample_every": 8})
    paths = resolve_image_paths(image_folder)
    Trainer(config, run, paths, paths[:4]).train()
    return run


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("vqtok").setLevel(logging.WARNING)
    yield


TEST_TOKENIZER = {"name": "test-random-codes", "codebook_size": 64, "weights_sha256": "0" * 64}


@pytest.fixture(scope="session")
def random_codes_tokenizer() -> dict:
    """The identity of a tokenizer that never existed: token stores of random codes are written under it."""
    return dict(TEST_TOKENIZER)


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A small world corpus, a token store of random 4x4 codes for its pictures, a vocabulary and a packed
    dataset (rows of 65 tokens): everything unified_lm training needs, built in a few seconds."""
    from types import SimpleNamespace

    from unified_lm.data.prepare import PrepareSettings, prepare
    from unified_lm.tokens.vocab import build_vocabulary
    from unified_lm.world.corpus import generate_world, world_texts
    from vqtok.token_store import ShardWriter, write_manifest

    root = tmp_path_factory.mktemp("lm_data")
    world = generate_world(root / "world", num_scenes=60, seed=0, image_size=32).out_dir
    images = world / "images"
    writer = ShardWriter(root / "tokens", TEST_TOKENIZER, 64)
    rng = np.random.default_rng(0)
    sources = sorted(p.name for p in images.iterdir())
    writer.append(sources, rng.integers(0, 64, size=(len(sources), 4, 4)))
    writer.close()
    write_manifest(root / "tokens", 1, {"source_root": str(images)})
    vocab = build_vocabulary(root / "vocab", world_texts(world), 400, 64, TEST_TOKENIZER)
    prepare([str(world / "documents.jsonl")], str(root / "vocab"), str(root / "packed"),
            PrepareSettings(seq_len=64, split="train", rows_per_shard=16), stores=[str(root / "tokens")])
    return SimpleNamespace(root=root, world=world, tokens=root / "tokens", vocab_dir=root / "vocab", vocab=vocab,
                           packed=root / "packed", documents=world / "documents.jsonl")


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, lm_data, tiny_run):
    """A unified_lm run directory (latest -> one checkpoint) of an untrained `tiny` model over a vocabulary built
    for `tiny_run`'s tokenizer (so sampling and eval can encode and decode pictures): written directly, no
    DeepSpeed, in a second. Returns (run directory, vocabulary directory)."""
    from unified_lm.model.checkpoint import write_model_files
    from unified_lm.model.config import preset
    from unified_lm.tokens.vocab import build_vocabulary
    from unified_lm.train.initial import untrained_model
    from vqtok.checkpoint import read_checkpoint

    root = tmp_path_factory.mktemp("lm_run")
    _, _, meta = read_checkpoint(tiny_run)
    vocab = build_vocabulary(root / "vocab", None, 0, 64, meta["tokenizer"], lm_data.vocab_dir / "text.model")
    config = preset("tiny")
    config.model.vocab_size = vocab.size
    write_model_files(root / "run" / "checkpoints" / "step_00000001", untrained_model(config).state_dict(), config,
                      vocab, {"step": 1, "image_grids": {"16x16": 1}})
    (root / "run" / "latest").write_text("step_00000001\n")
    return root / "run", root / "vocab"


REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train_unified.py"
TRAIN_COMMON = ["--model", "tiny", "--set", "train.log_every=1", "--set", "train.lr=3e-3", "--set", "train.warmup_steps=2"]


def _train_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train_unified(data: Path, out: Path, *extra: str, processes: int = 1, check: bool = True):
    from runkit.distributed import free_port

    args = ["--data", str(data), "--out", str(out), *TRAIN_COMMON, *extra]
    if processes == 1:
        command = [sys.executable, str(TRAIN_SCRIPT), *args]
    else:
        launcher = str(Path(sys.executable).with_name("deepspeed"))
        command = [launcher, "--num_gpus", str(processes), "--master_port", str(free_port()), str(TRAIN_SCRIPT), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_train_env(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def train_unified():
    """`train_unified(data, out, *extra, processes=1, check=True)`: `scripts/train_unified.py` on a packed dataset
    (the tiny model, logging every step), one process or `processes` through the deepspeed launcher; returns the
    CompletedProcess and raises with the output's tail when it fails and `check` is set."""
    return _train_unified


def _make_bad_image_files(tmp_path: Path) -> dict[str, tuple[os.PathLike, str]]:
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    data = good.getvalue()
    files = {}
    (tmp_path / "zero.png").write_bytes(b"")
    files["zero"] = (tmp_path / "zero.png", "zero-byte")
    (tmp_path / "text.jpg").write_text("this is not an image at all\n")
    files["not_image"] = (tmp_path / "text.jpg", "not an image")
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp_path / "trunc.jpg", "truncated")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    broken_png = bytearray(png.getvalue())
    middle = len(broken_png) // 2
    broken_png[middle : middle + 64] = bytes(64)  # inside the IDAT stream: header fine, pixels not
    (tmp_path / "corrupt.png").write_bytes(bytes(broken_png))
    files["corrupt"] = (tmp_path / "corrupt.png", "corrupt")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # ~50 KB file, 400 Mpixel
    files["bomb"] = (bomb, "decompression bomb")
    os.symlink(tmp_path / "does-not-exist.png", tmp_path / "dangling.png")
    files["unreadable"] = (tmp_path / "dangling.png", "unreadable")
    return files


@pytest.fixture(scope="session")
def bad_image_files():
    """`bad_image_files(directory)` writes one file of each kind a decoder must refuse (zero bytes, not an image,
    truncated, corrupt pixels, a decompression bomb, a dangling link) and returns {kind: (path, reason the error
    names)}."""
    return _make_bad_image_files
