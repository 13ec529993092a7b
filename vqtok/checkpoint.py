"""Checkpoints: safetensors + JSON only (nothing is unpickled), written atomically.

Layout of a run directory:

    RUN/latest                          text file naming the newest complete checkpoint directory
    RUN/checkpoints/step_00001500/
        model.safetensors               tokenizer weights and quantizer buffers (all `vqtok decode/encode` needs)
        config.json                     the full VQConfig
        meta.json                       step, tokenizer identity (name, codebook size, weights sha256), metrics
        trainer.safetensors             optimizer moments, discriminator, RNG states, usage window (resume only)
        trainer.json                    optimizer param-group settings and the structure of trainer.safetensors

A checkpoint is written into `step_X.tmp/` and renamed into place, then `latest` is replaced atomically, so a
crash at any moment leaves the previous checkpoint intact and `latest` never points at a partial one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import VQConfig

CHECKPOINT_DIR = "checkpoints"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> flat {name: tensor} for safetensors + a JSON-able description to rebuild it."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            name = f"{prefix}.{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], description: dict) -> None:
    per_param: dict[int, dict] = {}
    for source in (tensors, description["scalars"]):
        for name, value in source.items():
            if name.startswith(prefix + "."):
                param_id, key = name[len(prefix) + 1 :].split(".", 1)
                per_param.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": description["param_groups"]})


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], config: VQConfig,
                    trainer_tensors: dict[str, torch.Tensor], trainer_meta: dict, meta: dict, keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file(trainer_tensors, tmp / "trainer.safetensors")
    (tmp / "config.json").write_text(config.to_json())
    (tmp / "trainer.json").write_text(json.dumps(trainer_meta))
    identity = {"name": config.name, "codebook_size": config.quantizer.codebook_size,
                "downsample_factor": config.model.downsample_factor, "resolution": config.model.resolution,
                "weights_sha256": file_sha256(tmp / "model.safetensors")}
    (tmp / "meta.json").write_text(json.dumps({"step": step, "tokenizer": identity, **meta}, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run_dir / "latest", f"{CHECKPOINT_DIR}/{final.name}\n")
    _prune(run_dir / CHECKPOINT_DIR, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    done = sorted(p for p in directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (follows `latest`) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "model.safetensors").is_file():
            return target
        raise FileNotFoundError(f"{latest} points at {target}, which holds no model.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(f"{path} is neither a vqtok run directory (no 'latest' file) nor a checkpoint directory "
                            "(no model.safetensors)")


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, VQConfig, dict]:
    directory = resolve_checkpoint(path)
    try:
        config = VQConfig.from_dict(json.loads((directory / "config.json").read_text())).validate()
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {Path(err.filename).name}") from None
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"checkpoint {directory}: bad config/meta JSON ({err})") from None
    return directory, config, meta


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A trained VQModel in eval mode from a run or checkpoint directory, plus its metadata."""
    from .model import VQModel

    directory, config, meta = read_checkpoint(path)
    model = VQModel(config)
    load_weights(model, directory / "model.safetensors")
    return model.to(device).eval(), meta


def untrained_tokenizer(config: VQConfig):
    """The weights `vqtok train` starts from (torch seeded with train.seed, then the model built): the
    before-training baseline of an evaluation, in eval mode on the CPU."""
    from .model import VQModel

    torch.manual_seed(config.train.seed)
    return VQModel(config)


def load_weights(model: torch.nn.Module, file: Path) -> None:
    state = load_file(file)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state)
