"""Two CPU-side costs of the encoder, each measured against what it replaced, side by side in one run:

1. norms: the encoder's instance norms as torch's group_norm (a group per channel, now) against batch_norm over
   a one-frame batch (before), in float32 and under bf16 autocast, for frames laid out as track() gives them
   (channels-last) and contiguous. Alternated in one process; best of `repeats`, seconds per frame.
2. freed memory: track() on an mp4 with glibc keeping freed memory (now, `utils/procs.reuse_freed_memory`)
   against glibc's default (before), each in its own process, alternated; seconds and page faults per frame,
   peak RSS.

    python benchmarks/bench_encoder_cpu_paths.py --json_out=docs/bench_encoder_cpu_paths.json
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
import torch.nn.functional as F
from common import machine_description, save_results

from pips2.nets import fast
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.golden import load_golden_weights

ROOT = Path(__file__).resolve().parents[1]


def batch_norm_of_one_frame(x: torch.Tensor, eps: float = fast.ENCODER_NORM_EPS) -> torch.Tensor:
    """The norm the encoder ran before: batch statistics of a one-frame batch (its instance statistics)."""
    return F.batch_norm(x, None, None, training=True, eps=eps)


def time_norms(H: int, W: int, frames: int, repeats: int) -> dict:
    """Seconds per frame of model.encode with each norm, per dtype and input layout."""
    now = fast.instance_norm_keep_layout
    u8 = (torch.rand(frames, H, W, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    layouts = {"channels_last": u8.permute(0, 3, 1, 2)[None], "contiguous": u8.permute(0, 3, 1, 2)[None].contiguous()}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_golden_weights(Pips(ExecPlan.auto("cpu", dtype))).eval()
        for layout, x in layouts.items():
            times: dict[str, list[float]] = {"batch_norm": [], "group_norm": []}
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                model.encode(x[:, :1])
                for _ in range(repeats):
                    for name, norm in (("batch_norm", batch_norm_of_one_frame), ("group_norm", now)):
                        fast.instance_norm_keep_layout = norm
                        t0 = time.perf_counter()
                        model.encode(x)
                        times[name].append((time.perf_counter() - t0) / frames)
            fast.instance_norm_keep_layout = now
            key = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}/{layout}"
            row = {name: min(t) for name, t in times.items()}
            row["ratio"] = row["batch_norm"] / row["group_norm"]
            out[key] = row
            print(f"  {key:22s} batch_norm {row['batch_norm']:.3f} s/frame, group_norm {row['group_norm']:.3f}: "
                  f"{row['ratio']:.2f}x", flush=True)
    return out


_CHILD = """
import resource, sys, time
import pips2.tracking as tracking
from pips2.nets.pips2 import Pips
from pips2.utils.golden import load_golden_weights
video, H, W, frames, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if mode == "default":
    tracking.reuse_freed_memory = lambda: False
model = load_golden_weights(Pips()).eval()
queries = tracking.grid_queries((540, 960), grid_size=8)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
tracking.track(model, video, queries, S=128, iters=16, model_hw=(H, W))
dt = time.perf_counter() - t0
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(dt, (f1 - f0) / frames, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def time_memory_reuse(H: int, W: int, frames: int, repeats: int) -> dict:
    """track() on a 960x540 mp4 of `frames` frames at model size HxW, glibc's default against reuse."""
    from pips2.datasets.synthetic import write_synthetic_video

    runs: dict[str, list[tuple[float, float, float]]] = {"default": [], "reuse": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = write_synthetic_video(Path(tmp) / "c.mp4", seed=0, frames=frames, hw=(540, 960))
        for _ in range(repeats):
            for mode in runs:
                res = subprocess.run([sys.executable, "-c", _CHILD, str(video), str(H), str(W), str(frames), mode],
                                     cwd=ROOT, capture_output=True, text=True, check=True)
                dt, faults, rss = (float(v) for v in res.stdout.split()[-3:])
                runs[mode].append((dt, faults, rss))
                print(f"  {mode:8s} {dt:6.1f} s  {dt / frames:.3f} s/frame  {faults:8.0f} page faults/frame  "
                      f"peak RSS {rss / 2**20:.0f} MiB", flush=True)
    out: dict[str, Any] = {mode: {"seconds": [r[0] for r in rs], "s_per_frame": min(r[0] for r in rs) / frames,
                  "faults_per_frame": float(np.median([r[1] for r in rs])), "peak_rss": max(r[2] for r in rs)}
           for mode, rs in runs.items()}
    out["ratio"] = sum(out["default"]["seconds"]) / sum(out["reuse"]["seconds"])
    print(f"  reuse: {out['ratio']:.2f}x (sum of the default's runs over the reuse's)")
    return out


def main(H: int = 512, W: int = 896, frames: int = 6, clip_frames: int = 128, repeats: int = 2,
         json_out: str | None = None) -> None:
    """Both measurements at model size HxW (module docstring)."""
    print(f"encoder norms at {W}x{H}, {frames} frames:")
    norms = time_norms(H, W, frames, repeats)
    print(f"track() on {clip_frames} frames at {W}x{H}:")
    reuse = time_memory_reuse(H, W, clip_frames, repeats)
    if json_out:
        save_results(json_out, {"H": H, "W": W, "machine": machine_description(), "norms": norms,
                                "memory_reuse": reuse})


if __name__ == "__main__":
    fire.Fire(main)
