"""Shared fixtures: a folder of small real-format images and a briefly trained `tiny` tokenizer."""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="vqtok-test-torch-home-")  # never read a user's hub cache
REPO = Path(__file__).resolve().parents[1]


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python() -> str:
    return sys.executable


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("vqtok").setLevel(logging.WARNING)
    yield
