"""Model speed and peak memory: our default path against the plain reference semantics, side by side.

Each configuration runs in its own subprocess so that peak memory is its own (CPU: peak RSS above the
process's size before the forward, with the kernel's high-water mark reset there; CUDA:
torch.cuda.max_memory_allocated). All runs of one size use the same weights and inputs, and the outputs
are compared in the same run.

    python benchmarks/bench_model.py                       # sizes a and b on the CPU
    python benchmarks/bench_model.py --device=cuda --sizes=a,b,c
    python benchmarks/bench_model.py --authors_repo=$HOME/src/pips2 # also the authors' own code (aharley/pips2)

With `--authors_repo` (a checkout of aharley/pips2) the authors' Pips, imported unmodified from it as
benchmarks/diff_authors.py does, runs first with the same weights and inputs in float32 under `no_grad`, and
every ratio is also given against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
from common import reset_peak_rss, save_results, status_bytes

from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.golden import load_golden_weights
from pips2.utils.procs import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

SIZES = {  # name: (S, N, H, W, iters)
    "a": (36, 128, 256, 384, 6),
    "b": (32, 256, 512, 896, 2),
    "c": (128, 256, 512, 896, 16),
    "t": (4, 8, 128, 128, 1),  # tiny: the tests' (nothing to time)
}
CONFIGS = {  # name: (plan: "reference" or "auto" for the device and dtype, autocast dtype or None, inference_mode)
    "baseline_fp32": ("reference", None, False),
    "ours_fp32": ("auto", None, True),
    "ours_bf16": ("auto", torch.bfloat16, True),
}


AUTHORS = "authors_fp32"  # the authors' own model, with --authors_repo


def _model(config: str, device: str, authors_repo: str | None) -> tuple[torch.nn.Module, torch.dtype | None, bool]:
    """The model of a configuration with the golden weights (the same in every one), its autocast dtype and
    whether it runs under inference_mode."""
    torch.manual_seed(0)
    if config == AUTHORS:
        from diff_authors import import_authors_pips, load_golden_weights_into

        model = import_authors_pips(str(authors_repo))(stride=8)
        load_golden_weights_into(model)
        return model.to(device).eval(), None, False
    plan_name, amp, inference = CONFIGS[config]
    plan = ExecPlan.reference() if plan_name == "reference" else ExecPlan.auto(device, amp or torch.float32)
    return load_golden_weights(Pips(plan)).to(device).eval(), amp, inference


def _worker(size: str, config: str, device: str, B: int, repeats: int, out_path: str,
            authors_repo: str | None = None) -> None:

    S, N, H, W, iters = SIZES[size]
    if config.startswith("ours"):
        reuse_freed_memory()  # as track() has the process do (glibc keeps freed maps for the next ones)
    model, amp, inference = _model(config, device, authors_repo)
    g = torch.Generator().manual_seed(1)
    rgbs = (torch.rand(B, S, 3, H, W, generator=g) * 255).to(device)
    trajs = (torch.rand(B, 1, N, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])).repeat(1, S, 1, 1).to(device)
    grad_ctx = torch.inference_mode if inference else torch.no_grad

    def run():
        with grad_ctx(), torch.autocast(device_type=device, dtype=amp or torch.float32, enabled=amp is not None):
            if config == AUTHORS and device != "cuda":
                from diff_authors import cuda_is_cpu

                with cuda_is_cpu():  # their forward's first line puts an unused zero on CUDA
                    return model(trajs, rgbs, iters=iters)[0][-1]
            return model(trajs, rgbs, iters=iters)[0][-1]

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        run()  # warm-up (kernels, allocator); on the CPU its RSS would hide the measured peak
        sync()
        torch.cuda.reset_peak_memory_stats()
    rss0 = status_bytes("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status_bytes("VmHWM") - rss0
    torch.save({"out": out.float().cpu(), "times": times, "peak": peak}, out_path)


def main(sizes: str = "a,b", device: str = "cpu", B: int = 1, repeats: int = 2, threads: int | None = None,
         json_out: str | None = None, authors_repo: str | None = None) -> None:
    """Print time, peak memory and output differences of each configuration at each size (module docstring)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    results = {}
    names = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    for size in names:
        S, N, H, W, iters = SIZES[size]
        print(f"\nsize {size}: B={B} S={S} N={N} {H}x{W} iters={iters} on {device}", flush=True)
        outs = {}
        for config in ([AUTHORS] if authors_repo else []) + list(CONFIGS):
            with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
                path = f.name
            cmd = [sys.executable, __file__, "_worker", size, config, device, str(B), str(repeats), path,
                   *([str(Path(authors_repo).resolve())] if authors_repo else [])]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            res = torch.load(path, weights_only=True)
            os.unlink(path)
            outs[config] = res
            print(f"  {config:14s} time {min(res['times']):7.2f} s   peak {res['peak'] / 2**20:8.0f} MiB", flush=True)
        base, fp32, bf16 = (outs[c] for c in CONFIGS)
        row = {
            "speedup_fp32": min(base["times"]) / min(fp32["times"]),
            "speedup_bf16": min(base["times"]) / min(bf16["times"]),
            "memory_ratio_fp32": base["peak"] / max(fp32["peak"], 1),
            "max_diff_fp32_px": (fp32["out"] - base["out"]).abs().max().item(),
            "mean_diff_bf16_px": (bf16["out"] - fp32["out"]).abs().mean().item(),
            "median_diff_bf16_px": (bf16["out"] - fp32["out"]).norm(dim=-1).median().item(),
            "max_diff_bf16_px": (bf16["out"] - fp32["out"]).abs().max().item(),
            "times_s": {c: min(o["times"]) for c, o in outs.items()},
            "peak_mib": {c: o["peak"] / 2**20 for c, o in outs.items()},
        }
        if authors_repo:
            theirs = outs[AUTHORS]
            row.update({
                "vs_authors_speedup_fp32": min(theirs["times"]) / min(fp32["times"]),
                "vs_authors_speedup_bf16": min(theirs["times"]) / min(bf16["times"]),
                "vs_authors_memory_ratio_fp32": theirs["peak"] / max(fp32["peak"], 1),
                "vs_authors_memory_ratio_bf16": theirs["peak"] / max(bf16["peak"], 1),
                "max_diff_fp32_vs_authors_px": (fp32["out"] - theirs["out"]).abs().max().item(),
            })
            print(f"  ours vs the authors' code: {row['vs_authors_speedup_fp32']:.2f}x faster fp32, "
                  f"{row['vs_authors_speedup_bf16']:.2f}x bf16; {row['vs_authors_memory_ratio_fp32']:.2f}x less peak "
                  f"memory fp32, {row['vs_authors_memory_ratio_bf16']:.2f}x bf16; fp32 max |ours - theirs| "
                  f"{row['max_diff_fp32_vs_authors_px']:.2e} px")
        results[size] = row
        print(f"  ours vs baseline: {row['speedup_fp32']:.2f}x faster fp32, {row['speedup_bf16']:.2f}x bf16, "
              f"{row['memory_ratio_fp32']:.2f}x less peak memory (fp32)")
        print(f"  outputs: fp32 max |ours - baseline| {row['max_diff_fp32_px']:.2e} px; bf16 vs fp32 "
              f"mean {row['mean_diff_bf16_px']:.3f} px, median L2 {row['median_diff_bf16_px']:.3f} px, "
              f"max {row['max_diff_bf16_px']:.2f} px")
    if json_out:
        save_results(json_out, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7],
                sys.argv[8] if len(sys.argv) > 8 else None)
    else:
        fire.Fire(main)
