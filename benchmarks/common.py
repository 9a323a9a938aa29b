"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` wall-clock runs of fn, in seconds (the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so that earlier peaks (building weights) do not mask the measured work."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@contextmanager
def scratch_run(prefix: str, json_out: str | None) -> Iterator[tuple[Path, dict]]:
    """A scratch folder (always removed) and a results dict, written to json_out when the run succeeds."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    res: dict = {}
    try:
        yield work, res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
