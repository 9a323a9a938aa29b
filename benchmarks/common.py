"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.datasets.training import Sample
from pips2.utils.paths import output_folder_problem, write_json

ROOT = Path(__file__).resolve().parents[1]


def save_results(json_out: str | os.PathLike, results: dict) -> None:
    """Write a benchmark's results to --json_out whole (a private temp file, then a rename), never through another
    user's link or into another user's folder (docs/BAD_INPUTS.md); SystemExit with one line otherwise."""
    if problem := output_folder_problem(json_out, "--json_out"):
        raise SystemExit(f"error: {problem}; the results are printed above")
    write_json(json_out, results)


def name_list(value) -> list[str]:
    """A comma-separated flag as a list: fire gives "a,b" as a tuple, "a" as a string."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


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
        save_results(json_out, res)


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds of every call of each run; the runs take turns, `per_round` calls each per round, in reversed
    order every other round, so that a drift in the machine's speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = runs[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def machine_description() -> dict:
    """CPU model and flags that matter for bf16, logical cores, torch version and its intra-op threads."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the platform string will do
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "bf16_isa": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def synthetic_batch(B: int, S: int, N: int, H: int, W: int, seed: int = 0) -> Sample:
    """A training batch of random frames and random-walk tracks (every point visible and valid)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(B, 1, N, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    return Sample(rgbs=torch.rand(B, S, 3, H, W, generator=g) * 255,
                  trajs=start + torch.cumsum(torch.randn(B, S, N, 2, generator=g), 1),
                  visibs=torch.ones(B, S, N), valids=torch.ones(B, S, N), corrupt_ids=torch.zeros(B, 0))


@contextmanager
def scratch_export(S: int, N: int, crop_hw: tuple[int, int], scenes: int = 3) -> Iterator[tuple[Path, str]]:
    """(export folder, version) of augmented mp4 clips exported from fresh synthetic scenes; removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        H, W = crop_hw
        generate_dataset(work / "pod", {"train": scenes}, cfg=SceneConfig(W=W + 64, H=H + 64, T=S + 24, n_points=800),
                         progress=False)
        subprocess.run([sys.executable, "export_mp4_dataset.py", f"--dataset_location={work / 'pod'}", f"--S={S}",
                        f"--N={N}", f"--crop_size={H},{W}", f"--out_dir={work / 'exp'}", "--workers=2",
                        "--quiet=True"], cwd=ROOT, check=True, capture_output=True)
        (version,) = [p.name for p in (work / "exp").iterdir() if p.is_dir()]
        yield work / "exp", version
    finally:
        shutil.rmtree(work, ignore_errors=True)
