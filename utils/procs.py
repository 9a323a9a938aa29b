"""Processes and file systems: is a writer still alive, did a write fail for lack of space."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs; a zombie (killed, parent gone, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def is_space_error(exc: BaseException) -> bool:
    """Whether ENOSPC/EDQUOT (or ffmpeg's 'No space left') appears anywhere in the exception's chain."""
    e: BaseException | None = exc
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
