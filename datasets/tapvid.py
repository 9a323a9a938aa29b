"""TAP-Vid pickles (DAVIS, Kinetics, RGB-Stacking): name -> {video, points, occluded}, as a dict or a list."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np


def _decode_video(video) -> np.ndarray:
    """(T,H,W,3) uint8 from an array or a list of JPEG/PNG bytes (the Kinetics pickles)."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4:
        return video
    frames = []
    for f in video:
        if isinstance(f, (bytes, bytearray, np.bytes_)):
            img = cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR)
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        else:
            frames.append(np.asarray(f, np.uint8))
    return np.stack(frames)


def load_tapvid(path: str | Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (name, video (T,H,W,3) uint8, points (N,T,2) in pixels, occluded (N,T) bool) from a pickle or a
    folder of pickles. Normalised points are scaled by (W-1, H-1)."""
    path = Path(path)
    files = sorted(path.glob("*.pkl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no TAP-Vid pickle")
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = pickle.load(fh)
        except Exception as e:
            raise ValueError(f"{f}: not a readable TAP-Vid pickle ({type(e).__name__})") from None
        items = data.items() if isinstance(data, dict) else ((f"{f.stem}_{i:04d}", v) for i, v in enumerate(data))
        for name, item in items:
            if not {"video", "points", "occluded"} <= set(item):
                raise ValueError(f"{f}: entry {name} lacks video/points/occluded")
            video = _decode_video(item["video"])
            H, W = video.shape[1:3]
            pts = np.asarray(item["points"], np.float32) * np.array([W - 1, H - 1], np.float32)
            yield str(name), video, pts, np.asarray(item["occluded"], bool)


def strided_queries(occluded: np.ndarray, stride: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """TAP-Vid strided mode: (point index, query frame) for every visible frame that is a multiple of stride."""
    N, T = occluded.shape
    pts, frames = [], []
    for t in range(0, T, stride):
        vis = np.nonzero(~occluded[:, t])[0]
        pts.append(vis)
        frames.append(np.full(len(vis), t))
    return np.concatenate(pts), np.concatenate(frames)


def first_queries(occluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TAP-Vid first mode: (point index, first visible frame) of every point visible at least once."""
    vis = ~occluded
    has = vis.any(1)
    return np.nonzero(has)[0], vis.argmax(1)[has]
