"""Tracking time on real clip sizes, as demo.py runs it: decode an mp4, encode every frame, iterate in windows.

For each clip size a synthetic mp4 is made (moving textured layers; the content does not change the time), and
`track()` runs on it under each setting, with the same queries (a grid of `points` on frame 0):

    default   demo.py's defaults in float32: the video's size rounded to multiples of 8, S=128, iters=16
    authors   the authors' own settings in float32: 512x896 whatever the video's size (their demo's default and
              their PointOdyssey evaluation's size), S=128, iters=16 (--image_size=512,896)
    bf16      the same under bf16 autocast (--amp=bf16)
    half      the model at half the video's size (--image_size), float32
    iters8    8 iterations instead of 16 (--iters=8), float32
    fast      bf16 at half size with 8 iterations (the three together)

It prints seconds, seconds per frame (the time grows about linearly with frames: every frame is encoded once,
and each window iterates over its frames) and each setting's tracks against the default's. With the golden
weights (the default) that difference only shows how far a setting moves the arithmetic; with a trained
checkpoint (`--init_dir`) it is what the setting costs in accuracy on that clip.

    python benchmarks/bench_clip.py                          # 854x480, 960x540, 1296x720; 48 frames each
    python benchmarks/bench_clip.py --sizes=540p --frames=372 --settings=default,bf16
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
from common import machine_description, name_list, save_results

from pips2.datasets.synthetic import write_synthetic_video
from pips2.hub import load_model
from pips2.nets.pips2 import Pips
from pips2.tracking import grid_queries, track
from pips2.utils.golden import load_golden_weights

SIZES = {"480p": (480, 854), "540p": (540, 960), "720p": (720, 1296)}  # (H, W) of common real clips
SETTINGS: dict[str, tuple[str | None, int | tuple[int, int], int]] = {  # name: (amp, size divisor or H,W, iters)
    "default": (None, 1, 16),
    "authors": (None, (512, 896), 16),
    "bf16": ("bf16", 1, 16),
    "half": (None, 2, 16),
    "iters8": (None, 1, 8),
    "fast": ("bf16", 2, 8),
}


def half_hw(hw: tuple[int, int], div: int | tuple[int, int]) -> tuple[int, int] | None:
    """The model size for a divisor: None (the video's own, rounded by track()) or hw/div in multiples of 8."""
    if isinstance(div, tuple):  # a fixed size
        return div
    if div == 1:
        return None
    return (max(128, round(hw[0] / div / 8) * 8), max(128, round(hw[1] / div / 8) * 8))


def golden_or(init_dir: str | None) -> torch.nn.Module:
    """The checkpoint at init_dir, or a Pips with the golden weights (the reference model's shapes)."""
    if init_dir:
        return load_model(init_dir, "cpu")
    model = Pips()
    load_golden_weights(model)
    return model.eval()


def main(sizes: str = "480p,540p,720p", frames: int = 48, points: int = 64, settings: str = "default,bf16,half,"
         "iters8,fast", S: int = 128, init_dir: str | None = None, json_out: str | None = None) -> None:
    """Time `track()` on an mp4 of each size under each setting (module docstring)."""
    names, size_names = name_list(settings), name_list(sizes)
    unknown = [s for s in names if s not in SETTINGS] + [z for z in size_names if z not in SIZES]
    if unknown:
        raise SystemExit(f"error: unknown setting or size {unknown}; settings {list(SETTINGS)}, sizes {list(SIZES)}")
    model = golden_or(init_dir)
    grid = max(1, int(round(points ** 0.5)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in size_names:
            hw = SIZES[size]
            video = write_synthetic_video(Path(tmp) / f"{size}.mp4", seed=0, frames=frames, hw=hw)
            queries = grid_queries(hw, grid_size=grid)
            ref = None
            print(f"\n{size}: {hw[1]}x{hw[0]}, {frames} frames, {len(queries)} points, S={S}", flush=True)
            for name in names:
                amp, div, iters = SETTINGS[name]
                t0 = time.perf_counter()
                res = track(model, str(video), queries, S=S, iters=iters, model_hw=half_hw(hw, div), amp=amp)
                dt = time.perf_counter() - t0
                row = {"seconds": dt, "s_per_frame": dt / frames, "model_hw": half_hw(hw, div) or "video"}
                if name == "default":
                    ref = res["tracks"]
                elif ref is not None:
                    d = np.linalg.norm(res["tracks"] - ref, axis=-1)
                    row |= {"vs_default_mean_px": float(d.mean()), "vs_default_median_px": float(np.median(d)),
                            "vs_default_max_px": float(d.max())}
                results[f"{size}/{name}"] = row
                extra = (f"; vs default: mean {row['vs_default_mean_px']:.2f} px, median "
                         f"{row['vs_default_median_px']:.2f} px" if "vs_default_mean_px" in row else "")
                print(f"  {name:8s} {dt:7.1f} s  {dt / frames:5.2f} s/frame  (372 frames: ~{372 * dt / frames:4.0f} s)"
                      f"{extra}", flush=True)
    if json_out:
        save_results(json_out, {"frames": frames, "points": points, "S": S, "weights": init_dir or "golden",
                                "machine": machine_description(), "results": results})


if __name__ == "__main__":
    fire.Fire(main)
