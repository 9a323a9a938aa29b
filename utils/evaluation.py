"""The authors' evaluation protocol (SPEC 5), shared by test_on_pod.py, test_on_tap.py and test_on_cro.py:
choose points, zero-velocity initialisation from frame 0, windowed tracking at the model size, metrics."""

from __future__ import annotations

import numpy as np
import torch

from utils import metrics
from utils.tracking import FrameSource, track_windows


def select_points(trajs: np.ndarray, visibs: np.ndarray, valids: np.ndarray, hw: tuple[int, int],
                  N: int | None = 256, min_frames: int = 8, max_motion: float | None = 512.0, clamp_px: float = 32.0,
                  border_px: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of the test protocol (SPEC 5): returns trajs (T,n,2), visibs, valids.

    Entries within `border_px` of the border become invisible and invalid; points must be valid and
    visible in frame 0 and in >= min_frames frames, and their largest step between consecutive frames
    (over all frames; a non-finite step fails) must be < max_motion (None skips this rule). Positions are
    clamped to clamp_px outside the image. With N set, N points are taken as linspace(0, n-1, N) cast to
    integers, as the authors do (so points repeat when fewer than N survive); N=None keeps every point.
    """
    H, W = hw
    x, y = trajs[..., 0], trajs[..., 1]
    if border_px > 0:
        with np.errstate(invalid="ignore"):
            inside = (x >= border_px) & (x <= W - 1 - border_px) & (y >= border_px) & (y <= H - 1 - border_px)
        valids = valids & inside
        visibs = visibs & inside
    valids = valids & np.isfinite(trajs).all(-1)
    vv = valids & visibs
    ok = vv[0] & (vv.sum(0) >= min_frames)
    if max_motion is not None and trajs.shape[0] > 1:
        with np.errstate(invalid="ignore"):
            step = np.nan_to_num(np.linalg.norm(np.diff(trajs, axis=0), axis=-1), nan=np.inf)
        ok &= step.max(0) < max_motion
    idx = np.nonzero(ok)[0]
    if N is not None and len(idx) > 0:
        idx = idx[np.linspace(0, len(idx) - 1, N).astype(np.int64)]
    tr = np.nan_to_num(trajs[:, idx], nan=0.0, posinf=0.0, neginf=0.0)
    tr[..., 0] = np.clip(tr[..., 0], -clamp_px, W - 1 + clamp_px)
    tr[..., 1] = np.clip(tr[..., 1], -clamp_px, H - 1 + clamp_px)
    return tr.astype(np.float32), visibs[:, idx], valids[:, idx]


def evaluate_points(model, frames: FrameSource, trajs: np.ndarray, valids: np.ndarray, S: int = 128,
                    iters: int = 16, point_batch: int = 256, amp: str | None = None) -> dict[str, float]:
    """Track chosen points (T,n,2 in source pixels) from frame 0 and score them at the model size.

    The ground truth is scaled by the plain resize ratio, as the authors do; model=None scores the
    zero-velocity baseline.
    """
    (H, W), (h, w) = frames.src_hw, frames.model_hw
    gt = torch.from_numpy(trajs * np.array([w / W, h / H], np.float32))
    init = gt[0:1].repeat(gt.shape[0], 1, 1)
    est = init if model is None else track_windows(model, frames, init, S=S, iters=iters, point_batch=point_batch,
                                                   amp=amp)
    out = metrics.track_metrics(est, gt, valids, (h, w))
    out["points"] = float(trajs.shape[1])
    out["frames"] = float(gt.shape[0])
    return out


def evaluate_tapvid_video(model, video: np.ndarray, points: np.ndarray, occluded: np.ndarray,
                          image_size: tuple[int, int], S: int = 128, iters: int = 16, point_batch: int = 256,
                          amp: str | None = None) -> dict[str, float] | None:
    """The authors' TAP-Vid protocol for one video: every point visible in frame 0, tracked to the end at
    image_size; points (N,T,2) in pixels, occluded (N,T). None when no point is visible in frame 0."""
    from utils.tracking import ArrayFrames

    vis = ~occluded.T
    tr, _, val = select_points(points.transpose(1, 0, 2), vis, vis.copy(), video.shape[1:3], None, min_frames=1,
                               max_motion=None, border_px=0)
    if tr.shape[1] == 0:
        return None
    return evaluate_points(model, ArrayFrames(video, image_size), tr, val, S, iters, point_batch, amp)


def format_row(name: str, res: dict[str, float]) -> str:
    """The one line printed per video."""
    figs = "; ".join(f"{k} {res[k]:.1f}" for k in metrics.METRIC_NAMES)
    return f"{name}: {figs}; {int(res['points'])} points, {int(res['frames'])} frames"
