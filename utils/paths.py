"""Folders a job makes for its outputs, and taking them back when it stops before writing anything."""

from __future__ import annotations

import os
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
