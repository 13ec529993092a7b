"""Run directories: the layout every trainer writes into, `latest`, the JSONL log, --resume / --restart.

    RUN/latest                  names the newest complete checkpoint: `step_00000300` (see `write_latest`)
    RUN/log.jsonl               one JSON object per line, each with the "step" it was written after
    RUN/checkpoints/step_N/     the checkpoints (written, checked, chosen and pruned by runkit.checkpoints)

One implementation for vqtok's, unified_lm's and the image encoder's trainers; each adds files of its own (samples,
plots, zero-shot results), which it names to `RunDirectory.restart`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from runkit.files import atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
LOG = "log.jsonl"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved after `step` optimizer steps: step_00000300."""
    return f"step_{step:08d}"


# -- latest -------------------------------------------------------------------------------------------------------
# Two formats exist. unified_lm and the encoder write the bare name (`step_00000300`); vqtok has always written
# the path under the run (`checkpoints/step_00000300`), and its tests and users read that file as it is, so its
# trainer keeps asking for that form (`under_checkpoints=True`). `read_latest` reads both, so runs of any age load.
def write_latest(run_dir: str | os.PathLike, name: str, under_checkpoints: bool = False) -> None:
    """Point RUN/latest at checkpoint `name` (step_N), atomically: a reader sees the old name or the new one."""
    if not re.fullmatch(r"step_\d+", name):
        raise ValueError(f"{name!r} is not a checkpoint name (step_N)")
    atomic_write_text(Path(run_dir) / LATEST, f"{CHECKPOINT_DIR}/{name}\n" if under_checkpoints else name + "\n")


def read_latest(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint RUN/latest names (`step_00000300`, also when written as `checkpoints/step_00000300`), None
    without the file; ValueError for anything else (a path leading out of RUN/checkpoints included)."""
    latest = Path(run_dir) / LATEST
    if not latest.is_file():
        return None
    text = latest.read_text(errors="replace").strip()
    name = text.removeprefix(CHECKPOINT_DIR + "/")
    if not re.fullmatch(r"step_\d+", name):
        raise ValueError(f"{latest} holds {text[:80]!r}, not a checkpoint name (step_N)")
    return name


def latest_text(run_dir: str | os.PathLike) -> str | None:
    """RUN/latest as written (stripped, not checked), None without the file: for messages only."""
    latest = Path(run_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


# -- the log ------------------------------------------------------------------------------------------------------
def append_log(path: str | os.PathLike, record: dict) -> None:
    """One JSON line at the end of the log (a crash mid-write leaves at most the last line torn)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each row of the log: a complete line (ending in a newline) holding a JSON object with a
    numeric "step". What is not a row is skipped (see `truncate_log`)."""
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            rows.append((line, record))
    return rows


def read_log(path: str | os.PathLike) -> list[dict]:
    """The log's rows, in order ([] without the file); a torn last line of a run that was interrupted is left
    out, as `truncate_log` leaves it out."""
    path = Path(path)
    return [record for _, record in _log_rows(path)] if path.exists() else []


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Keep the rows of the log written up to `step` (the checkpoint a run resumes from), so that no step is
    logged twice once the resumed run logs the steps after it. Rewritten atomically; a missing log is left so.

    The rule for what is not a row: rows are only appended, so a crash while writing leaves a torn last line
    (no newline at its end). That line is dropped: the interrupted run wrote it after its last checkpoint, and the
    resumed run logs that step again. A complete line that is not a JSON object with a "step" is dropped too; the
    rows kept are copied byte for byte."""
    path = Path(path)
    if not path.exists():
        return
    atomic_write_text(path, "".join(line for line, record in _log_rows(path) if record["step"] <= step))


# -- the directory ------------------------------------------------------------------------------------------------
class RunDirectory:
    """A trainer's run directory: where its checkpoints, `latest` and log are, and --resume / --restart."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.root)!r})"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def latest(self) -> Path:
        return self.root / LATEST

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def has_checkpoint(self) -> bool:
        """Whether the run has saved a checkpoint (RUN/latest exists)."""
        return self.latest.is_file()

    def refuse_to_overwrite(self, resume: bool, restart: bool, what: str = "a checkpoint") -> None:
        """A run that already holds a checkpoint is only continued (--resume) or started over (--restart) when
        asked: ValueError otherwise."""
        if self.has_checkpoint() and not (resume or restart):
            raise ValueError(f"{self.root} already holds {what}; pass --resume to continue or --restart to start "
                             "over")

    def restart(self, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> None:
        """--restart: delete the checkpoints, `latest` and the log, and the trainer's own `files` and `folders`."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        for folder in folders:
            shutil.rmtree(self.root / folder, ignore_errors=True)
        for name in (LATEST, LOG, *files):
            (self.root / name).unlink(missing_ok=True)

    def append_log(self, record: dict) -> None:
        append_log(self.log, record)

    def truncate_log(self, step: int) -> None:
        truncate_log(self.log, step)
