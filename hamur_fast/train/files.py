"""Files of a run: atomic writes (a reader never sees half of one), and the run directory's lock.

A write goes to ``.<name>.<pid>.tmp`` next to its target, then ``os.replace``; a process killed in between
(kill -9) leaves that temporary file behind, and the next write of the same target removes it once its
process is gone. A run holds an exclusive lock on its directory (``flock`` on the directory itself, released
by the kernel when the process dies, so a killed run never leaves a stale lock).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

from ..data.download import process_alive

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_HELD: dict = {}  # directory -> how many nested holders in this process (a run inside a compare, say)


class RunDirectoryError(OSError):
    """The output directory cannot take this run: not writable, too little free space, or in use."""


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_temporaries(directory, name: str | None = None) -> list:
    """Delete the temporary files (of ``name``, or of every target) in ``directory`` whose writing process
    no longer exists; returns the paths removed."""
    removed = []
    for candidate in Path(directory).glob(f".{name or '*'}.*.tmp"):
        match = _TEMPORARY.match(candidate.name)
        if match and not process_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def check_writable(directory, needed_bytes: int = 0) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, with ``needed_bytes`` free
    (twice that, in fact: an atomic write holds the old and the new file at once)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{os.getpid()}.tmp"
        probe.write_bytes(b"hamur_fast")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(f"cannot write into the output directory {directory}: "
                                f"{err.strerror or err}") from None
    free = shutil.disk_usage(directory).free
    if free < 2 * needed_bytes:
        raise RunDirectoryError(f"not enough free space in {directory}: {_mib(free)} free, a run writes "
                                f"checkpoints of about {_mib(needed_bytes)} (twice that while one is replaced)")
    return directory


@contextlib.contextmanager
def locked_directory(directory):
    """Hold an exclusive lock on ``directory`` (created and checked for writing first): a second run into
    the same directory fails at once with :class:`RunDirectoryError` instead of overwriting this one's files."""
    directory = check_writable(directory)
    key = os.path.realpath(directory)
    if key in _HELD:  # this process holds it already (train_run locks before loading data, fit again)
        _HELD[key][1] += 1
    else:
        handle = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise RunDirectoryError(f"{directory} is in use by another run (it holds the directory's lock); "
                                    "choose another --output or wait for that run to end") from None
        _HELD[key] = [handle, 1]
        remove_stale_temporaries(directory)
    try:
        yield directory
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            os.close(_HELD.pop(key)[0])  # releases the lock


def write_text(path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path, data) -> None:
    """Standard JSON: a NaN or infinite number (an AUC that is not available) is written as null."""
    write_text(path, json.dumps(_finite(data), indent=2, default=_plain, allow_nan=False) + "\n")


def _finite(value):
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a NumPy or torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_csv(path, rows: list) -> None:
    """Rows of dicts; the columns are the union of their keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
