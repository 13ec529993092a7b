"""Checkpoints of every trainer: safetensors + JSON only (nothing is unpickled), written atomically.

Layout of a run directory (each trainer adds its own files to a checkpoint: see vqtok/checkpoint.py,
unified_lm/train/trainer.py, unified_lm/train/encoder.py):

    RUN/latest                  text file naming the newest complete checkpoint (runs.py: both formats read)
    RUN/checkpoints/step_00001500/
        model.safetensors, config.json, meta.json, ...   the trainer's files
        files.json                                       every file above with its size, written last

A checkpoint is written into `step_X.tmp/` (`staging_dir`) and renamed into place, then `latest` is replaced
atomically (`commit_checkpoint`), so a crash at any moment leaves the previous checkpoint intact and `latest`
never points at a partial one. A checkpoint damaged afterwards (a file lost or truncated: files.json says so) or
a `latest` naming nothing usable is skipped with a message for the newest complete checkpoint
(`choose_checkpoint`); pruning never keeps a damaged checkpoint over a good one.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from runkit.files import atomic_write_text, confined, load_tensors, read_json, tensor_shapes
from runkit.runs import CHECKPOINT_DIR, checkpoint_name, read_latest, write_latest

log = logging.getLogger(__name__)

MANIFEST = "files.json"
# what a model checkpoint holds at least (the default of `resolve_checkpoint`)
WEIGHT_FILES = ("model.safetensors", "config.json", "meta.json")


# -- state without pickles ----------------------------------------------------------------------------------------
def pack_state(state, prefix: str, copy: bool = True) -> tuple[dict[str, torch.Tensor], object]:
    """A nested state (dicts with str/int keys, lists, tuples, tensors, numbers, strings, booleans, None) ->
    ({name: tensor} for safetensors, a JSON-able description); `unpack_state` rebuilds it exactly (int keys and
    tuples included). Any other object would need pickling: TypeError naming where it sits. copy=False only
    checks the structure (tensors are neither moved to the CPU nor copied)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # safetensors refuses two tensors over one storage: copy the second

    def pack(value, where: str):
        if torch.is_tensor(value) and not copy:
            tensors[f"{prefix}.{len(tensors)}"] = value
            return {"tensor": f"{prefix}.{len(tensors) - 1}"}
        if torch.is_tensor(value):
            tensor = value.detach().to("cpu")
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages or not tensor.numel() or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            storages.add(tensor.untyped_storage().data_ptr())
            name = f"{prefix}.{len(tensors)}"
            tensors[name] = tensor
            return {"tensor": name}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):  # IntEnum and friends become plain ints
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, list):
            return [pack(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [pack(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(f"{where}: key {key!r} is not a string or an integer")
                items.append([key if isinstance(key, str) else int(key), pack(item, f"{where}.{key}")])
            return {"dict": items}
        raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored without "
                        "pickling")

    return tensors, pack(state, prefix)


def unpack_state(description, tensors: dict[str, torch.Tensor], where: str = "state"):
    """Inverse of `pack_state`; a malformed description raises ValueError naming `where`."""
    def unpack(value):
        if isinstance(value, list):
            return [unpack(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            raise ValueError(f"{where}: malformed state entry {sorted(value)}")
        (tag, body), = value.items()
        if tag == "tensor":
            if body not in tensors:
                raise ValueError(f"{where}: names tensor {body!r}, which is not stored")
            return tensors[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(unpack(item) for item in body)
        if tag == "dict" and isinstance(body, list):
            if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) for p in body):
                raise ValueError(f"{where}: malformed dict entry")
            return {key: unpack(item) for key, item in body}
        raise ValueError(f"{where}: unknown state entry {tag!r}")

    return unpack(description)


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> flat {name: tensor} for safetensors + a JSON-able description to rebuild it."""
    tensors, description = pack_state(optimizer.state_dict(), prefix)
    return tensors, {"state": description}


def restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], description: dict) -> None:
    if "state" in description:
        optimizer.load_state_dict(unpack_state(description["state"], tensors, prefix))
        return
    # checkpoints written before pack_state: tensors named PREFIX.PARAM_ID.KEY, scalars in the description
    per_param: dict[int, dict] = {}
    for source in (tensors, description["scalars"]):
        for name, value in source.items():
            if name.startswith(prefix + "."):
                param_id, key = name[len(prefix) + 1 :].split(".", 1)
                per_param.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": description["param_groups"]})


# -- which checkpoint: complete ones, `latest`, fallback, pruning (shared by every trainer and loader) ----------
def write_manifest(directory: str | os.PathLike) -> None:
    """files.json: every file of a finished checkpoint with its size, written last (see `checkpoint_problem`)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(directory: Path, required: Sequence[str]) -> str | None:
    """Why `directory` cannot serve as a checkpoint, or None. `required`: glob patterns that must each match a
    file. With files.json (written last, so its presence means the save finished) each matching file must still
    have the size it was written with; checkpoints from before files.json need the files present and non-empty."""
    if not directory.is_dir():
        return f"{directory.name} does not exist"
    manifest = directory / MANIFEST
    if manifest.exists():
        try:
            files = read_json(manifest)["files"]
            sizes = {str(name): int(size) for name, size in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError) as err:
            return f"{manifest.name} is unreadable ({err})"
        for pattern in required:
            matched = [name for name in sizes if fnmatch.fnmatch(name, pattern)]
            if not matched:
                return f"it holds no {pattern}"
            for name in matched:
                try:
                    path = confined(directory, name, f"{manifest.name} entry")
                except ValueError as err:
                    return str(err)
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != sizes[name]:
                    return f"{name} is truncated or altered ({path.stat().st_size} bytes, {sizes[name]} written)"
        return None
    for pattern in required:
        matched = [p for p in directory.glob(pattern) if p.is_file()]
        if not matched:
            return f"it holds no {pattern}"
        empty = [p.name for p in matched if p.stat().st_size == 0]
        if empty:
            return f"{empty[0]} is empty"
    return None


def checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """The step_N directories of a run's checkpoints folder, oldest first (unfinished *.tmp ones excluded)."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def choose_checkpoint(run_dir: str | os.PathLike, required: Sequence[str]) -> tuple[Path | None, str | None]:
    """The checkpoint of a run to load: the one RUN/latest names when it is complete (note None), else the newest
    complete one, with a note saying what was wrong; (None, note) when none is complete, (None, None) when the
    run has no checkpoint at all."""
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    candidates = checkpoint_dirs(folder)
    try:
        named = read_latest(run_dir)
    except ValueError as err:
        named, note = None, str(err)
    else:
        if named is None:
            if not candidates:
                return None, None
            note = f"{run_dir / 'latest'} is missing"
        else:
            problem = checkpoint_problem(folder / named, required)
            if problem is None:
                return folder / named, None
            note = f"{run_dir / 'latest'} names {named}, which cannot be used: {problem}"
    for candidate in reversed(candidates):
        if candidate.name != named and checkpoint_problem(candidate, required) is None:
            return candidate, f"{note}; using {candidate.name}, the newest complete checkpoint"
    return None, f"{note}; no other complete checkpoint in {folder}"


def prune_checkpoints(checkpoints: Path, keep: int, *requirements: Sequence[str]) -> None:
    """Keep the newest `keep` complete checkpoints (complete: meeting any of `requirements`, each a `required`
    list of `checkpoint_problem`); delete older complete ones and every incomplete one, so a damaged checkpoint
    never outlives the good one before it."""
    folders = checkpoint_dirs(checkpoints)
    complete = [p for p in folders if any(checkpoint_problem(p, required) is None for required in requirements)]
    for old in [p for p in folders if p not in complete] + complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """An empty RUN/checkpoints/step_N.tmp/ to write the checkpoint of `step` into, then `commit_checkpoint` it:
    until the rename a crash leaves the previous checkpoints (and `latest`) as they were."""
    tmp = Path(run_dir) / CHECKPOINT_DIR / f"{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(directory: str | os.PathLike, keep: int, *requirements: Sequence[str],
                      under_checkpoints: bool = False) -> Path:
    """Finish a checkpoint whose files are all written: files.json (its completeness), a staged step_N.tmp
    renamed into place (replacing a step_N saved before a resume), RUN/latest pointed at it, then the run's
    checkpoints pruned to the newest `keep` meeting any of `requirements` (`prune_checkpoints`). A directory
    written in place (DeepSpeed's, by every rank) gets the same steps but the rename. Returns the checkpoint.
    `under_checkpoints`: the form of `latest` (runkit.runs.write_latest)."""
    directory = Path(directory)
    write_manifest(directory)
    final = directory.with_name(directory.name.removesuffix(".tmp"))
    if final != directory:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(directory, final)
    write_latest(final.parent.parent, final.name, under_checkpoints)
    prune_checkpoints(final.parent, keep, *requirements)
    return final


def resume_checkpoint(run_dir: str | os.PathLike, required: Sequence[str], warn: Callable[[str], None],
                      refusal: Callable[[str], str] | None = None) -> Path | None:
    """The checkpoint --resume continues from (`choose_checkpoint`; a fallback's note goes to `warn`), None when
    the run has none. A run whose checkpoints are all incomplete raises FileNotFoundError: `refusal(note)`, by
    default "cannot resume RUN: NOTE (pass --restart to start over)"."""
    directory, note = choose_checkpoint(run_dir, required)
    if directory is None:
        if note is None:
            return None
        raise FileNotFoundError(refusal(note) if refusal else
                                f"cannot resume {run_dir}: {note} (pass --restart to start over)")
    if note:
        warn(note)
    return directory


def resolve_checkpoint(path: str | os.PathLike, required: Sequence[str] = WEIGHT_FILES, kind: str = "vqtok") -> Path:
    """A checkpoint directory, or a run directory -> its checkpoint (`choose_checkpoint`; a fallback is logged).
    `kind` ('vqtok', 'unified_lm' or 'encoder') is what the caller expects: another program's run is named as such."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "latest").is_file() or (path / CHECKPOINT_DIR).is_dir():
        directory, note = choose_checkpoint(path, required)
        if directory is None:
            found = {_kind_of(d) for d in checkpoint_dirs(path / CHECKPOINT_DIR)} - {kind, "unknown"}
            if found:
                raise ValueError(f"{path} is a {KIND_NAMES[found.pop()]} run, not a {KIND_NAMES[kind]} run")
            raise FileNotFoundError(note or f"{path}: no checkpoint in {path / CHECKPOINT_DIR}")
        if note:
            log.warning(note)
        return directory
    if not path.exists():
        raise FileNotFoundError(f"{KIND_NAMES[kind]} checkpoint not found: {path}")
    article = "an" if kind == "encoder" else "a"
    raise FileNotFoundError(f"{path} is neither {article} {kind} run directory (no 'latest' file) nor a checkpoint "
                            "directory (no model.safetensors)")


def config_kind(config: dict) -> str:
    """Which program wrote a checkpoint's config.json: 'vqtok', 'unified_lm', 'encoder' or 'unknown'."""
    if "quantizer" in config:
        return "vqtok"
    if isinstance(config.get("model"), dict) and "n_layers" in config["model"]:
        return "unified_lm"
    return "encoder" if "vision" in config else "unknown"


def _kind_of(directory: Path) -> str:
    try:
        return config_kind(read_json(directory / "config.json"))
    except (ValueError, FileNotFoundError):
        return "unknown"


KIND_NAMES = {"vqtok": "vqtok tokenizer", "unified_lm": "unified_lm model", "encoder": "image-encoder"}
WRONG_KIND = {"unified_lm": "a unified_lm model checkpoint", "encoder": "an image-encoder checkpoint "
              "(`unified-lm encoder train`)", "vqtok": "a vqtok tokenizer checkpoint"}


def check_weight_shapes(expected: dict[str, torch.Tensor], file: Path, what: str = "") -> None:
    """Names and shapes of `file`'s tensors (read from its header only) against a model's state dict."""
    shapes = tensor_shapes(file)
    label = f"{what} {file}" if what else str(file)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{label}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise ValueError(f"{label}: tensor {name} has shape {shape}, config expects {tuple(expected[name].shape)}")


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load `file` into `model`; names and shapes are checked from the header before any weight is read."""
    check_weight_shapes(model.state_dict(), file)
    model.load_state_dict(load_tensors(file))


def build_with_weights(build: Callable[[], torch.nn.Module], file: Path) -> torch.nn.Module:
    """`build()` first on the meta device (no memory), its names and shapes checked against `file`'s header,
    then built for real and loaded: a config that does not describe its weights (say, 10^6 layers beside a
    2-layer file) fails naming the file before anything is allocated. Configs bound their structure (layer
    counts) in `validate`, so the meta build itself stays small."""
    with torch.device("meta"):
        check_weight_shapes(build().state_dict(), file)
    model = build()
    load_weights(model, file)
    return model
