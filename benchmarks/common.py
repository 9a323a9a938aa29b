"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


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
