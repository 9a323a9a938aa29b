"""The authors' evaluation protocol (docs/EVALUATION.md), shared by test_on_pod.py, test_on_tap.py and test_on_cro.py:
choose points, zero-velocity initialisation from frame 0, windowed tracking at the model size, metrics; and the
TAP-Vid benchmark's query modes for PIPs++ and LBM."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from pips2.datasets.tapvid import first_queries, strided_queries
from pips2.tracking import ArrayFrames, FrameSource, track, track_windows
from pips2.utils import metrics, plots

# LBM's evaluation memory per data set (the authors' choice, SPEC section 1), found by name in the file's name
LBM_MEMORY_SIZES = (("davis", 20), ("kinetics", 36), ("robotap", 60))
LBM_DEFAULT_MEMORY = 48
# LBM's authors resize every TAP-Vid video to this size before their model (which resizes to its input size)
TAPVID_SIZE = (256, 256)


def select_points(trajs: np.ndarray, visibs: np.ndarray, valids: np.ndarray, hw: tuple[int, int],
                  N: int | None = 256, min_frames: int = 8, max_motion: float | None = 512.0, clamp_px: float = 32.0,
                  border_px: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points the authors' PointOdyssey evaluation scores (docs/EVALUATION.md): trajs (T,n,2), visibs, valids.

    In this order, as the authors' code does it:
    1. non-finite coordinates become 0 and those entries invalid and invisible;
    2. entries within `border_px` of the image border (x < 1 or x > W-2, likewise y) become invisible and invalid;
    3. a point must be valid and visible in frame 0 and in at least `min_frames` frames;
    4. its largest step between consecutive frames, over all frames and measured AFTER step 1 (so a NaN frame
       counts as a jump to (0, 0)), must be < max_motion (None skips this rule);
    5. positions are clamped to [-clamp_px, W + clamp_px] x [-clamp_px, H + clamp_px];
    6. of the n survivors, the points linspace(0, n-1, min(n, N)) cast to integers are kept: when n <= N every
       point is kept once, never repeated. N=None keeps every point.
    """
    H, W = hw
    trajs = np.array(trajs, np.float64)
    visibs, valids = np.asarray(visibs, bool), np.asarray(valids, bool)
    finite = np.isfinite(trajs).all(-1)
    trajs[~np.isfinite(trajs)] = 0.0
    valids, visibs = valids & finite, visibs & finite
    if border_px > 0:
        x, y = trajs[..., 0], trajs[..., 1]
        inside = (x >= border_px) & (x <= W - 1 - border_px) & (y >= border_px) & (y <= H - 1 - border_px)
        valids, visibs = valids & inside, visibs & inside
    vv = valids & visibs
    ok = vv[0] & (vv.sum(0) >= min_frames)
    if max_motion is not None and trajs.shape[0] > 1:
        ok &= np.linalg.norm(np.diff(trajs, axis=0), axis=-1).max(0) < max_motion
    idx = np.nonzero(ok)[0]
    if N is not None and len(idx) > 0:
        idx = idx[np.linspace(0, len(idx) - 1, min(len(idx), N)).astype(np.int32)]
    tr = trajs[:, idx]
    tr[..., 0] = np.clip(tr[..., 0], -clamp_px, W + clamp_px)
    tr[..., 1] = np.clip(tr[..., 1], -clamp_px, H + clamp_px)
    return tr.astype(np.float32), visibs[:, idx], valids[:, idx]


def evaluate_points(model, frames: FrameSource, trajs: np.ndarray, valids: np.ndarray, S: int = 128,
                    iters: int = 16, point_batch: int = 256, amp: str | None = None,
                    curves: dict | None = None) -> dict[str, float]:
    """Track chosen points (T,n,2 in source pixels) from frame 0 and score them at the model size.

    The ground truth is scaled by the plain resize ratio, as the authors do; model=None scores the
    zero-velocity baseline. A `curves` dict receives the plotted curves (utils/plots.py) of the model
    ("model") and of zero-velocity.
    """
    (H, W), (h, w) = frames.src_hw, frames.model_hw
    gt = torch.from_numpy(trajs * np.array([w / W, h / H], np.float32))
    init = gt[0:1].repeat(gt.shape[0], 1, 1)
    est = init if model is None else track_windows(model, frames, init, S=S, iters=iters, point_batch=point_batch,
                                                   amp=amp)
    out = metrics.track_metrics(est, gt, valids, (h, w))
    out["points"] = float(trajs.shape[1])
    out["frames"] = float(gt.shape[0])
    if curves is not None:
        curves[plots.ZERO_VEL] = plots.curves_of(init, gt, valids, (h, w))
        if model is not None:
            curves["model"] = plots.curves_of(est, gt, valids, (h, w))
    return out


def evaluate_tapvid_video(model, video: np.ndarray, points: np.ndarray, occluded: np.ndarray,
                          image_size: tuple[int, int], S: int = 128, iters: int = 16, point_batch: int = 256,
                          amp: str | None = None, curves: dict | None = None) -> dict[str, float] | None:
    """The authors' TAP-Vid protocol for one video: every point visible in frame 0, tracked to the end at
    image_size; points (N,T,2) in pixels, occluded (N,T). None when no point is visible in frame 0."""
    vis = ~occluded.T
    tr, _, val = select_points(points.transpose(1, 0, 2), vis, vis.copy(), video.shape[1:3], None, min_frames=1,
                               max_motion=None, border_px=0)
    if tr.shape[1] == 0:
        return None
    return evaluate_points(model, ArrayFrames(video, image_size), tr, val, S, iters, point_batch, amp, curves)


def lbm_memory_size(dataset_location: str | os.PathLike) -> int:
    """LBM's memory size for evaluating a data set: DAVIS 20, Kinetics 36, RoboTAP 60, anything else 48."""
    name = Path(dataset_location).name.lower()
    return next((m for key, m in LBM_MEMORY_SIZES if key in name), LBM_DEFAULT_MEMORY)


def resize_tapvid(video: np.ndarray, points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A TAP-Vid video (T,H,W,3) and its points (N,T,2, pixels) at size (h, w): area-averaged frames, points
    scaled as load_tapvid places them (normalised x (w-1, h-1)), so they equal the points of a file stored at
    that size."""
    H, W = video.shape[1:3]
    h, w = size
    if (H, W) == (h, w):
        return video, points
    interp = cv2.INTER_AREA if h <= H and w <= W else cv2.INTER_LINEAR
    frames = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in video])
    return frames, points * np.array([(w - 1) / max(W - 1, 1), (h - 1) / max(H - 1, 1)], np.float32)


def tapvid_query_mode(model, video: np.ndarray, points: np.ndarray, occluded: np.ndarray, mode: str,
                      size: tuple[int, int] | None = None, **track_kw) -> dict[str, float]:
    """TAP-Vid metrics of one video in the 'first' or 'strided' query mode; {} when it has no query.

    Points (N,T,2) in pixels, occluded (N,T); `size` resizes the video first (LBM's authors: TAPVID_SIZE).
    Strided mode scores the frames before each query too, so it tracks backward as well. delta^x_avg always;
    AJ and OA when the model predicts visibility (LBM).
    """
    if size is not None:
        video, points = resize_tapvid(video, points, size)
    idx, qf = first_queries(occluded) if mode == "first" else strided_queries(occluded)
    if len(idx) == 0:
        return {}
    queries = np.concatenate([qf[:, None], points[idx, qf]], 1).astype(np.float32)
    res = track(model, video, queries, backward=(mode == "strided"), **track_kw)
    pred_occ = None if res["visibility"] is None else ~res["visibility"].T
    return metrics.tapvid_metrics(res["tracks"].transpose(1, 0, 2), points[idx], occluded[idx], qf,
                                  video.shape[1:3], pred_occluded=pred_occ, evaluate_before_query=(mode == "strided"))


def format_tapvid(mode: str, res: dict[str, float]) -> str:
    """The TAP-Vid figures of one mode appended to a video's line."""
    line = f"; delta_avg ({mode}) {res['delta_avg']:.1f}"
    if "average_jaccard" in res:
        line += f", AJ ({mode}) {res['average_jaccard']:.1f}, OA ({mode}) {res['occlusion_accuracy']:.1f}"
    return line


def format_row(name: str, res: dict[str, float]) -> str:
    """The one line printed per video."""
    figs = "; ".join(f"{k} {res[k]:.1f}" for k in metrics.METRIC_NAMES)
    return f"{name}: {figs}; {int(res['points'])} points, {int(res['frames'])} frames"
