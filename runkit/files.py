"""Files every layer reads and writes: atomic writes, names confined to their folder, and loaders whose errors
name the file. The lowest layer of the project (vqtok and unified_lm both use these; nothing here imports them).

- `atomic_write_text`: write beside, fsync, rename: a crash leaves the old file or the new one, never half.
- `confined(root, name)`: a name read from a file (a token store's source, a dataset's shard, a checkpoint's
  `latest`) joined onto its folder, refused when it would leave it (absolute, `..`, a symlink out).
- `read_jsonl`: ("file:line", record) for every line of a JSONL file, errors naming the file and line.
- `read_json`, `tensor_shapes`, `load_tensors`: JSON and safetensors readers that turn every failure (missing,
  truncated, not UTF-8, not JSON, not safetensors, the wrong top-level type) into FileNotFoundError/ValueError
  naming the file. `tensor_shapes` reads only the safetensors header, so shapes are checked before any weight
  is read or any model allocated.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath


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


def confined(root: str | os.PathLike, name, what: str = "name") -> Path:
    """root / name, or ValueError naming `what` when name would leave root: not a non-empty string, absolute,
    a `..` part, a NUL byte, or (once resolved) a symlink pointing out of root."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{what} {name!r} is not a relative path inside {root}")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{what} {name!r} leaves {root} (absolute paths and '..' are refused)")
    path = Path(root) / relative
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"{what} {name!r} leaves {root} through a symbolic link")
    return path


def read_json(path: str | os.PathLike, expect: type | tuple = dict, what: str = ""):
    """The JSON value in `path` (of type `expect`); every failure names the file."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{label} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{label} is a directory, not a JSON file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except OSError as err:
        raise ValueError(f"{label}: unreadable ({err.strerror or err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: invalid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{label}: JSON nested too deeply") from None
    if not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise ValueError(f"{label}: expected a JSON {'object' if expect is dict else names}, got {type(value).__name__}")
    return value


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[str, object]]:
    """("file:line", record) for every non-blank line; a missing file or bad JSON names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply") from None


def _safetensors_error(path: Path, err: Exception) -> Exception:
    if isinstance(err, FileNotFoundError):
        return FileNotFoundError(f"{path} not found")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ValueError(f"{path}: not a readable safetensors file ({reason.strip()})")


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's header, without reading the data. safetensors checks that the
    header's offsets cover exactly the file, so a truncated file fails here, naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise _safetensors_error(path, err) from None


def load_tensors(path: str | os.PathLike) -> dict:
    """Every tensor of a safetensors file (on the CPU); failures name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _safetensors_error(path, err) from None
