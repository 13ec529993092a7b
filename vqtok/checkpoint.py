"""Checkpoints: safetensors + JSON only (nothing is unpickled), written atomically.

Layout of a run directory:

    RUN/latest                          text file naming the newest complete checkpoint directory
    RUN/checkpoints/step_00001500/
        model.safetensors               tokenizer weights and quantizer buffers (all `vqtok decode/encode` needs)
        config.json                     the full VQConfig
        meta.json                       step, tokenizer identity (name, codebook size, weights sha256), metrics
        trainer.safetensors             optimizer moments, discriminator, RNG states, usage window (resume only)
        trainer.json                    optimizer param-group settings and the structure of trainer.safetensors
        files.json                      every file above with its size, written last

A checkpoint is written into `step_X.tmp/` and renamed into place, then `latest` is replaced atomically, so a
crash at any moment leaves the previous checkpoint intact and `latest` never points at a partial one. A checkpoint
damaged afterwards (a file lost or truncated: files.json says so) or a `latest` naming nothing usable is skipped
with a message for the newest complete checkpoint; pruning never keeps a damaged checkpoint over a good one.
The rules that write, choose, check and prune checkpoints are runkit.checkpoints', shared by every trainer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from runkit.checkpoints import (
    WRONG_KIND,
    build_with_weights,
    commit_checkpoint,
    config_kind,
    resolve_checkpoint,
    staging_dir,
)
from runkit.files import file_sha256, read_json

from .config import VQConfig

TOKENIZER_FILES = ("model.safetensors", "config.json", "meta.json")  # what encode/decode/eval read
RESUME_FILES = TOKENIZER_FILES + ("trainer.safetensors", "trainer.json")  # and what `vqtok train` resumes from


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], config: VQConfig,
                    trainer_tensors: dict[str, torch.Tensor], trainer_meta: dict, meta: dict, keep: int = 2) -> Path:
    tmp = staging_dir(run_dir, step)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file(trainer_tensors, tmp / "trainer.safetensors")
    (tmp / "config.json").write_text(config.to_json())
    (tmp / "trainer.json").write_text(json.dumps(trainer_meta))
    identity = {"name": config.name, "codebook_size": config.quantizer.codebook_size,
                "downsample_factor": config.model.downsample_factor, "resolution": config.model.resolution,
                "weights_sha256": file_sha256(tmp / "model.safetensors")}
    (tmp / "meta.json").write_text(json.dumps({"step": step, "tokenizer": identity, **meta}, indent=2))
    # vqtok's `latest` keeps the form it has always had, checkpoints/step_N (runkit.runs.write_latest)
    return commit_checkpoint(tmp, keep, RESUME_FILES, under_checkpoints=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, VQConfig, dict]:
    directory = resolve_checkpoint(path, TOKENIZER_FILES, "vqtok")
    data = read_json(directory / "config.json", what="checkpoint config")
    if config_kind(data) in ("unified_lm", "encoder"):
        raise ValueError(f"{directory} is {WRONG_KIND[config_kind(data)]}, not a vqtok tokenizer; give the image "
                         "tokenizer's run (`vqtok train --out RUN`)")
    try:
        config = VQConfig.from_dict(data).validate()
    except ValueError as err:
        raise ValueError(f"{directory / 'config.json'}: {err}") from None
    meta = read_json(directory / "meta.json", what="checkpoint metadata")
    if not isinstance(meta.get("tokenizer"), dict) or not isinstance(meta["tokenizer"].get("codebook_size"), int):
        raise ValueError(f"{directory / 'meta.json'}: no tokenizer identity (tokenizer.codebook_size)")
    return directory, config, meta


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A trained VQModel in eval mode from a run or checkpoint directory, plus its metadata."""
    from .model import VQModel

    directory, config, meta = read_checkpoint(path)
    model = build_with_weights(lambda: VQModel(config), directory / "model.safetensors")
    return model.to(device).eval(), meta


def untrained_tokenizer(config: VQConfig):
    """The weights `vqtok train` starts from (torch seeded with train.seed, then the model built): the
    before-training baseline of an evaluation, in eval mode on the CPU."""
    from .model import VQModel

    torch.manual_seed(config.train.seed)
    return VQModel(config)
