"""What every command line of the project shares at its boundary: a failure becomes one line."""
from __future__ import annotations

import sys
import traceback


def error_line(err: BaseException) -> str:
    """One line for a failure at the command boundary. Bad input is refused by checks that name the file or
    field (ValueError, FileNotFoundError); MemoryError and RuntimeError (torch's allocator failures among them)
    should no longer come from input, since sizes are checked before allocating, but still end in one line."""
    if isinstance(err, MemoryError):
        return f"out of memory ({err or 'MemoryError'}): the configuration or input asks for more than this machine has"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, (ValueError, OSError, KeyError)):
        return text
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"


def failed(err: BaseException, verbose: bool = False, label: str = "") -> int:
    """The command's answer to bad input: `LABELerror: <one line>` on stderr (and the traceback when verbose);
    returns exit status 2."""
    print(f"{label}error: {error_line(err)}", file=sys.stderr, flush=True)
    if verbose:
        traceback.print_exc()
    return 2
