"""File-system faults in one line: a write that failed (a full disk, a read-only or vanished mount, no permission),
and paths that cannot be what a run needs them to be (a directory whose parent is a file, a file where a directory
belongs).

What it knows: how the writers vopd calls report a fault (``OSError`` with its errno; safetensors'
``SafetensorError``, which holds the OS error only in its text), and how to tell whether a path is, or can become, a
directory or a file. What it does NOT know: what is being written or what the run directory holds (its callers
name the paths and their roles: ``vopd.rundir``, ``vopd.checkpoint_sharded``, ``vopd.train``), or what is left to
clean up after a fault (the writer's own business: each removes its partial files itself).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping

from vopd.errors import UserError

#: What a path of a run directory must be: a directory or a file.
DIRECTORY, FILE = "directory", "file"


def is_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a file-system fault rather than a bug: an ``OSError``, or a safetensors error wrapping one
    (its type is matched by name: safetensors need not be imported to ask)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and ("os error" in text or "I/O error" in text)


def describe(exc: BaseException) -> str:
    """``exc`` in one line: its type and the first line of its message (an ``OSError`` names its file)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def one_line(what: str, advice: Callable[[], str]) -> Iterator[None]:
    """Turn a file-system fault inside the block into one ``UserError``: ``what`` (what could not be done), the fault,
    and ``advice()`` (computed only then: it may look at the checkpoints). Other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or not is_fault(exc):
            raise
        raise UserError(f"{what} ({describe(exc)}); {advice()}") from None


def space_note(path: Path, needed: int) -> str:
    """``"; the disk is full: ..."`` when less than ``needed`` bytes (0: 1 MiB) are free where ``path`` is, else
    ``""``: some writers report a full disk only as their own error (``torch.save``'s zip writer, which DCP uses:
    "unexpected pos ..."), so the free space says what the error does not."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    if free >= (needed or 1 << 20):
        return ""
    wanted = f", {needed / 2**20:.1f} MiB needed" if needed else ""
    return f"; the disk is full ({free / 2**20:.1f} MiB free{wanted})"


def check_can_be_directory(path: Path, what: str) -> None:
    """``path`` is a directory, or can be created as one: refused, naming the path in the way, when it or one of its
    parents exists and is not a directory."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory: choose another {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path} cannot be created: {parent} is a file, not a directory: choose "
                                f"another {what}")
            return


def check_kinds(root: Path, expected: Mapping[str, tuple[str, str]], what: str) -> None:
    """Each entry of ``expected`` (a name under ``root`` -> its kind, ``DIRECTORY`` or ``FILE``, and what the run
    keeps there) that exists is of its kind: refused otherwise, in one line naming the path. Absent ones are fine."""
    for name, (kind, role) in expected.items():
        path = root / name
        if not path.exists() and not path.is_symlink():
            continue
        if kind == DIRECTORY and not path.is_dir():
            found = "a dangling link" if not path.exists() else "a file"
        elif kind == FILE and not path.is_file():
            found = "a dangling link" if not path.exists() else "a directory"
        else:
            continue
        raise UserError(f"{what} {root}: {path} is {found}, where the run keeps {role} (a {kind}): move it away, or "
                        f"choose another {what}")

