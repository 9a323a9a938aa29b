"""Track points through any video and write plain files: tracks.npz, tracks.csv and an mp4 with trails.

    ./get_reference_model.sh
    python demo.py --video=clip.mp4 --grid_size=16                     # a grid on frame 0
    python demo.py --video=clip.mp4 --points=points.csv --backward=True # (t, x, y) rows, any frame
    python demo.py                                                      # a synthetic video, made on the spot
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import fire
import numpy as np

from utils.cli import load_pips_or_exit, parse_hw
from utils.tracking import grid_queries, track
from utils.video import VideoError, iter_frames, read_rgb, video_info, write_mp4
from utils.vis import render_tracks


def read_points(path: str | Path, query_frame: int = 0) -> np.ndarray:
    """(N,3) queries (t, x, y) from a CSV (t,x,y or x,y rows; a header is skipped) or JSON (lists or dicts)."""
    path = Path(path)
    rows = []
    try:
        if path.suffix.lower() == ".json":
            for item in json.loads(path.read_text()):
                if isinstance(item, dict):
                    rows.append([item.get("t", query_frame), item["x"], item["y"]])
                else:
                    rows.append([query_frame, *item] if len(item) == 2 else list(item))
        else:
            with open(path, newline="") as f:
                for rec in csv.reader(f):
                    if not rec or rec[0].strip().startswith("#"):
                        continue
                    try:
                        vals = [float(v) for v in rec]
                    except ValueError:
                        continue  # a header line
                    rows.append([query_frame, *vals] if len(vals) == 2 else vals[:3])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read points ({type(e).__name__}: {e})") from None
    if not rows:
        raise ValueError(f"{path}: no points (expected rows of t,x,y or x,y)")
    return np.asarray(rows, np.float32)


def synthetic_video(out_dir: Path, seed: int = 3, frames: int = 48) -> Path:
    """An mp4 of a synthetic scene (moving textured layers), for trying the demo without data."""
    from datasets.synthetic import SceneConfig, generate_scene

    with tempfile.TemporaryDirectory() as tmp:
        scene = generate_scene(Path(tmp) / "scene", seed, SceneConfig(W=384, H=256, T=frames, n_points=16))
        paths = sorted((scene / "rgbs").glob("*.jpg"))
        video = out_dir / "synthetic.mp4"
        write_mp4(video, (read_rgb(p) for p in paths))
    return video


def write_outputs(out_dir: Path, video: Path, queries: np.ndarray, tracks: np.ndarray, estimated: np.ndarray,
                  fps: float) -> list[Path]:
    """tracks.npz, tracks.csv and tracks.mp4 (points with fading trails) in out_dir."""
    npz, csv_path, mp4 = out_dir / "tracks.npz", out_dir / "tracks.csv", out_dir / "tracks.mp4"
    np.savez(npz, tracks=tracks, estimated=estimated, queries=queries)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "point", "x", "y", "estimated"])
        for t in range(tracks.shape[0]):
            for n in range(tracks.shape[1]):
                w.writerow([t, n, f"{tracks[t, n, 0]:.3f}", f"{tracks[t, n, 1]:.3f}", int(estimated[t, n])])

    def even(frame):  # yuv420p needs even sizes
        h, w = frame.shape[:2]
        return frame[: h - h % 2, : w - w % 2]

    frames = (even(f) for f in render_tracks(iter_frames(video), tracks, estimated))
    write_mp4(mp4, frames, fps=max(1, int(round(fps or 24))))
    return [npz, csv_path, mp4]


def main(video: str | None = None, init_dir: str = "./reference_model", points: str | None = None,
         grid_size: int = 16, query_frame: int = 0, mask: str | None = None, backward: bool = False, S: int = 128,
         iters: int = 16, image_size=None, point_batch: int = 256, device: str = "auto", amp: str = "none",
         out_dir: str = "./demo_out/track") -> None:
    """Track points (from --points, or a grid on --query_frame limited by --mask) and write the outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_pips_or_exit(init_dir, device)
    video_path = Path(video) if video else synthetic_video(out)
    try:
        n_frames, H, W, fps = video_info(video_path)
    except VideoError as e:
        sys.exit(f"error: {e}")
    try:
        if points:
            queries = read_points(points, query_frame)
        else:
            m = None
            if mask:
                m = cv2.imread(mask, cv2.IMREAD_GRAYSCALE)
                if m is None:
                    raise ValueError(f"{mask}: unreadable mask image")
                m = cv2.resize(m, (W, H), interpolation=cv2.INTER_NEAREST)
            queries = grid_queries((H, W), grid_size, query_frame, m)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if image_size is not None:
        image_size = parse_hw(image_size, "image_size")
    t0 = time.time()
    print(f"tracking {len(queries)} points through {video_path} ({n_frames} frames, {W}x{H}) with {init_dir}")
    res = track(model, str(video_path), queries, S=S, iters=iters, backward=backward, image_size=image_size,
                point_batch=point_batch, amp=None if amp == "none" else amp, progress=True)
    dt = time.time() - t0
    files = write_outputs(out, video_path, queries, res["tracks"], res["estimated"], fps)
    T = res["tracks"].shape[0]
    print(f"summary: {len(queries)} points x {T} frames in {dt:.1f} s ({T / max(dt, 1e-9):.1f} frames/s); wrote "
          + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    fire.Fire(main)
