"""Atomic writes and safe removal: the one place that replaces or deletes paths on disk.

Rule for the whole project: a step deletes only what the pipeline itself created.

* Every directory the pipeline creates carries the marker file :data:`MARKER`, written before anything
  else goes into it. An existing directory is removed or replaced only when it carries the marker (or is
  empty); otherwise :class:`UnsafePathError` names the path and the step stops.
* Outputs are built under a temporary sibling name (``.<name>.tmp-<pid>-<hex>``) and renamed into place
  only when complete, so a killed job never leaves an output that a later step would trust.
* Temporaries left by a killed writer are removed by the next writer of the same output
  (:func:`remove_stale_temporaries`): directories only when they carry the marker, files only when their
  name has the temporary pattern.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cldf.errors import CldfError

MARKER = ".cldf-owned"
"""Marker file of every directory the pipeline creates."""
_TEMP = re.compile(r"\.(tmp|buffers)-(\d+)-[0-9a-f]{8}$")


class UnsafePathError(CldfError, RuntimeError):
    """The pipeline was asked to remove or replace a path it did not create."""


def temporary_sibling(path: str | os.PathLike, purpose: str = "tmp") -> Path:
    """A fresh hidden sibling name of ``path``: ``.<name>.<purpose>-<pid>-<8 hex digits>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def make_owned_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (and its parents) with the ownership marker inside."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def is_owned(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory created by the pipeline (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def check_removable(path: str | os.PathLike, reason: str = "replace") -> None:
    """Raise :class:`UnsafePathError` unless :func:`remove_owned` may remove ``path``.

    Removable: a missing path, a plain file (files are outputs that Snakemake itself removes before
    re-running their job), an empty directory, or a directory carrying the marker.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or is_owned(path) or not any(path.iterdir()):
        return
    raise UnsafePathError(
        f"refusing to {reason} {path}: it is a non-empty directory that cldf did not create (no {MARKER} "
        "marker inside); point the config at a new directory, or move it away yourself"
    )


def remove_owned(path: str | os.PathLike, reason: str = "replace") -> None:
    """Remove ``path`` after :func:`check_removable`; a missing path is fine."""
    path = Path(path)
    check_removable(path, reason)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by killed writers; returns what was removed.

    One writer per output at a time (Snakemake guarantees it), so every temporary sibling of ``path`` that
    this process did not make is stale.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for stale in path.parent.glob(f".{path.name}.*-*-*"):
        match = _TEMP.search(stale.name)
        if match is None or int(match.group(2)) == os.getpid():
            continue
        if stale.is_dir() and is_owned(stale):
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.is_file():
            stale.unlink(missing_ok=True)
        else:
            continue
        removed.append(stale)
    return removed


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build directory ``path`` atomically.

    Yields a fresh marked temporary directory; on a clean exit it replaces ``path`` (which must be
    removable by :func:`remove_owned`), on an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    check_removable(path)  # before any work is done
    tmp = make_owned_dir(temporary_sibling(path))
    try:
        yield tmp
        remove_owned(path)
        os.replace(tmp, path)
    finally:
        _discard(tmp)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write file ``path`` atomically: yields a temporary sibling path to write; renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
