"""Files and folders a job writes: JSON written whole or not at all, and output folders taken back when a job
stops before writing anything into them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def make_dirs(path: str | os.PathLike) -> list[Path]:
    """mkdir -p path; returns the folders this call created, outermost first (empty if path existed)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_empty_dirs(made: list[Path]) -> None:
    """Remove the folders of make_dirs that are still empty, innermost first: a job that stopped early leaves
    no empty output folders behind (a folder something was written into stays)."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:  # not empty, or gone: leave it and its parents
            return


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON via a temp file and a rename: a reader never sees half a file (the temp goes on failure)."""
    path = Path(path)
    # a new file of a random name (O_EXCL): a predictable name in a folder others may write to could be a link
    # planted to make this write over another file
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_beside(path: Path) -> Path:
    """A new empty file of a random name (created exclusively) beside `path`, to be written and renamed over it: a
    predictable temp name in a folder others may write to could be a link planted to redirect the write."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether writing `a` would replace the file `b`: the same path once links are resolved, or another hard link
    of it."""
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_writable(folder: str | os.PathLike) -> None:
    """OSError unless a file can be created in `folder` (a read-only file system, permissions, /sys): asked before
    long work whose first write would otherwise fail after it."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
    os.close(fd)
    os.unlink(probe)


def printable(text: str) -> str:
    """`text` (a name from a data file or a folder) as a line on a terminal shows it: control characters and
    undecodable bytes backslash-escaped, so a hostile name cannot move the cursor, clear the screen or retitle the
    terminal (docs/BAD_INPUTS.md)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
