"""Progress on stderr that never outlives a failure.

Long work (a PyTorch export, calibration, the accuracy guard, lowering) says what it is doing
in two ways:

- `status(msg)`: what runs now. On a terminal it overwrites itself on one line and is
  cleared when the command ends; elsewhere (logs, CI, a pipe) it is not printed while a
  command runs.
- `note(line)`: a line of the record ("exported X in 12.3 s"). While a command runs
  (`held()`, which the CLI wraps around every command) notes are held and printed only once
  it succeeds (or at `flush()`), so a mistake found late -- out-of-range token ids after a
  two-minute export -- still leaves exactly its one error line on stderr. Outside a command
  (the Python API) a note is printed at once.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

_state = {"held": None, "status": False, "quiet": False}  # held: the notes not printed yet (a list) while held()


def _tty() -> bool:
    return getattr(sys.stderr, "isatty", lambda: False)()


def quiet() -> None:
    """No progress at all until the command ends (its -q)."""
    _state["quiet"] = True


def status(msg: str) -> None:
    """Show `msg` as what runs now: on a terminal it is overwritten by the next and then
    cleared; elsewhere it is a line outside a command and nothing inside one."""
    if _state["quiet"]:
        return
    if _tty():
        sys.stderr.write(f"\r\033[K{msg}")
        sys.stderr.flush()
        _state["status"] = True
    elif _state["held"] is None:
        print(msg, file=sys.stderr, flush=True)


def clear() -> None:
    """Clear the status line, if one is shown."""
    if _state["status"]:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        _state["status"] = False


def note(line: str) -> None:
    """A line of the record: printed now, or once the command succeeds while `held()`."""
    if _state["quiet"]:
        return
    if _state["held"] is not None:
        _state["held"].append(line)
        return
    clear()
    print(line, file=sys.stderr, flush=True)


def flush() -> None:
    """Print the notes held so far (a command does this once its risky part succeeded)."""
    clear()
    lines = _state["held"] or []
    if _state["held"] is not None:
        _state["held"] = []
    for line in lines:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold notes until the block succeeds; on an exception they are dropped (the error is
    then the only line) and the status line is cleared."""
    if _state["held"] is not None:  # nested: the outer block decides
        yield
        return
    _state["held"] = []
    try:
        yield
        flush()
    finally:
        clear()
        _state["held"] = None
        _state["quiet"] = False
