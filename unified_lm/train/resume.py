"""What `--resume` trusts: the run's own resume state in safetensors + JSON, never a pickle (unless asked).

Every training checkpoint holds, beside the shareable model.safetensors and DeepSpeed's own checkpoint files,
one pair of files per rank:

    RUN/checkpoints/step_N/resume/rank00000.safetensors   the tensors of this rank's state
    RUN/checkpoints/step_N/resume/rank00000.json          the structure around them (runkit.checkpoints.pack_state)

The state of a rank: DeepSpeed's optimizer state dict (under ZeRO this rank's partition: the fp32 master weights,
AdamW's moments and step; without ZeRO torch's AdamW state), the lr schedule, DeepSpeed's step counters, the
step and data order, and the RNG states (torch CPU and CUDA, numpy, Python). Two entries of DeepSpeed's optimizer
state are objects, not data, and are rebuilt rather than stored: the loss scaler (static: fp16 is refused, bf16
and fp32 need no scaling) and the parameter-slice map (a function of the model and the config); the resumed
engine's own are used. Anything else that is not a tensor, number, string, boolean, None, list or dict is refused
when the trainer starts (`check_storable`), before any training is done. Loading builds nothing but tensors and
JSON values, so a crafted checkpoint cannot run code.

Module weights come from model.safetensors (ZeRO 0-2); under ZeRO-3 the optimizer's fp32 partitions restore them.

DeepSpeed's own checkpoint (`mp_rank_00_model_states.pt`, `*_optim_states.pt`) is torch pickles read with
weights_only=False: unpickling runs whatever the file says. It is read only with `--resume-trust-deepspeed`, and
then only when every file belongs to the user running the command and no one else can write it
(`check_written_by_you`).
"""
from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from runkit.checkpoints import pack_state, unpack_state
from runkit.files import atomic_write_text, load_tensors, read_json

FORMAT = "unified-lm-resume/1"
RESUME_DIR = "resume"
# Entries of DeepSpeed's optimizer state dict that are live objects derived from the config and the model.
REBUILT = ("loss_scaler", "param_slice_mappings")


def rank_files(directory: Path, rank: int) -> tuple[Path, Path]:
    stem = directory / RESUME_DIR / f"rank{rank:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def optimizer_state(engine) -> dict:
    """DeepSpeed's optimizer state dict without the entries the resumed engine rebuilds."""
    state = engine.optimizer.state_dict()
    return {key: value for key, value in state.items() if key not in REBUILT}


def check_storable(engine) -> None:
    """Refuse, before training starts, an optimizer state that the safe format could not store."""
    try:
        pack_state(optimizer_state(engine), "optimizer", copy=False)
    except TypeError as err:
        raise ValueError(f"DeepSpeed's optimizer state cannot be saved without pickling ({err}); this DeepSpeed "
                         "version or configuration is not supported by the resume state") from None


def _rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_resume_state(engine, directory: Path, rank: int, world_size: int, zero_stage: int, progress: dict) -> None:
    """Write this rank's resume state into `directory`/resume/ (progress: step and data order)."""
    state = {"format": FORMAT, "rank": rank, "world_size": world_size, "zero_stage": zero_stage, **progress,
             "optimizer": optimizer_state(engine),
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                        "skipped_steps": engine.skipped_steps},
             "rng": _rng_state()}
    tensors, description = pack_state(state, "state")
    tensor_file, json_file = rank_files(directory, rank)
    tensor_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tensor_file)
    atomic_write_text(json_file, json.dumps(description))


def load_resume_state(engine, directory: Path, rank: int, world_size: int, zero_stage: int) -> dict:
    """Restore weights, optimizer, lr schedule, counters and RNG from `directory` (nothing unpickled); returns
    the state's progress entries (step, data_order). Every file is read and checked before the engine changes."""
    tensor_file, json_file = rank_files(directory, rank)
    state = unpack_state(read_json(json_file, what="resume state"), load_tensors(tensor_file), str(json_file))
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{json_file}: not a {FORMAT} resume state")
    saved = (state.get("rank"), state.get("world_size"), state.get("zero_stage"))
    if saved != (rank, world_size, zero_stage):
        raise ValueError(f"{json_file}: written by rank {saved[0]} of {saved[1]} under ZeRO stage {saved[2]}; this is "
                         f"rank {rank} of {world_size} under ZeRO stage {zero_stage}: resume with the same launch")
    if zero_stage < 3:  # ZeRO-3's fp32 partitions carry the weights; below it the module holds them whole
        from runkit.checkpoints import load_weights

        load_weights(engine.module, directory / "model.safetensors")
    merged = {**engine.optimizer.state_dict(), **state["optimizer"]}  # the rebuilt entries: the engine's own
    if engine.zero_optimization():
        lists = [merged if r == rank else None for r in range(world_size)]  # the rigid load reads its own rank's
        engine.optimizer.load_state_dict(state_dict_list=lists, load_optimizer_states=True, load_from_fp32_weights=True)
    elif engine.bfloat16_enabled():
        engine.optimizer.load_state_dict(merged, load_optimizer_states=True)
    else:
        engine.optimizer.load_state_dict(merged)
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, value in state["engine"].items():
        setattr(engine, name, value)
    _set_rng_state(state["rng"])
    return {key: state[key] for key in ("step", "data_order")}


def check_written_by_you(directory: Path) -> None:
    """DeepSpeed's pickles may be unpickled only when this user wrote them and no one else can have changed
    them: every *.pt file and the directory must belong to the current user and not be group/world-writable."""
    uid = os.getuid()
    for path in [directory, *sorted(directory.glob("*.pt"))]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise ValueError(f"--resume-trust-deepspeed: {path} is a symbolic link; refusing to unpickle through it")
        if info.st_uid != uid:
            raise ValueError(f"--resume-trust-deepspeed: {path} belongs to user id {info.st_uid}, not to you ({uid}); "
                             "DeepSpeed's state is a pickle that can run code, so only your own runs are trusted")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(f"--resume-trust-deepspeed: {path} is writable by other users; refusing to unpickle it")
