"""Point-tracking metrics (docs/EVALUATION.md), the one definition used by training, test_on_pod, tap and cro.

Errors are measured in a 256x256 frame: x is divided by W/256 and y by H/256 of the input size.
Masked means are sum / (1e-6 + mask sum). Per-video figures are averaged over videos plainly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from numpy.typing import ArrayLike
from prettytable import PrettyTable

THRESHOLDS = (1, 2, 4, 8, 16)
METRIC_NAMES = tuple(f"d_{t}" for t in THRESHOLDS) + ("d_avg", "survival_16", "median_l2")


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    """sum(x * mask) / (1e-6 + sum(mask))."""
    return float((x * mask).sum() / (1e-6 + mask.sum()))


def errors_256(trajs_e, trajs_g, hw: tuple[int, int]) -> np.ndarray:
    """Per-entry L2 errors (...,S,N) after scaling both to a 256x256 frame."""
    H, W = hw
    scale = np.array([256.0 / W, 256.0 / H])
    return np.linalg.norm((_np(trajs_e) - _np(trajs_g)) * scale, axis=-1)


def track_metrics(trajs_e, trajs_g, valids, hw: tuple[int, int]) -> dict[str, float]:
    """d_1..d_16, d_avg, survival_16 and median_l2 of one video: trajs (S,N,2), valids (S,N), hw of the input."""
    err = errors_256(trajs_e, trajs_g, hw)
    valid = _np(valids) > 0
    out = {}
    # frame 0 holds the queries: thresholds are scored from frame 1 on
    for t in THRESHOLDS:
        out[f"d_{t}"] = 100.0 * masked_mean((err[1:] < t).astype(np.float64), valid[1:].astype(np.float64))
    out["d_avg"] = float(np.mean([out[f"d_{t}"] for t in THRESHOLDS]))
    alive = np.cumprod(~((err > 16) & valid), axis=0)
    out["survival_16"] = 100.0 * float(alive.mean())
    medians = [np.median(err[valid[:, n], n]) for n in range(err.shape[1]) if valid[:, n].any()]
    out["median_l2"] = float(np.mean(medians)) if medians else float("nan")
    return out


def average(per_video: Iterable[dict[str, float]]) -> dict[str, float]:
    """Plain mean over videos of each figure."""
    rows = list(per_video)
    if not rows:
        return {k: float("nan") for k in METRIC_NAMES}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def tapvid_metrics(pred_tracks, gt_tracks, gt_occluded, query_frames, hw: tuple[int, int],
                   pred_occluded=None, evaluate_before_query: bool = False) -> dict[str, float]:
    """TAP-Vid metrics of one video in 256x256: delta^x_avg over visible points (and AJ, OA when
    pred_occluded is given). Tracks (N,T,2), occlusion (N,T) bool, query_frames (N,). The query frame is
    never scored; earlier frames are scored only with evaluate_before_query (TAP-Vid's strided mode)."""
    H, W = hw
    scale = np.array([256.0 / W, 256.0 / H])
    pred = _np(pred_tracks) * scale
    gt = _np(gt_tracks) * scale
    occ = np.asarray(gt_occluded, bool)
    N, T = occ.shape
    t, q = np.arange(T)[None, :], np.asarray(query_frames)[:, None]
    evaluate = (t != q) if evaluate_before_query else (t > q)
    visible = ~occ
    dist2 = ((pred - gt) ** 2).sum(-1)
    out, pts_within, jaccs = {}, [], []
    pocc = None if pred_occluded is None else np.asarray(pred_occluded, bool)
    for thr in THRESHOLDS:
        within = dist2 < thr**2
        frac = (within & visible & evaluate).sum() / max(1, (visible & evaluate).sum())
        out[f"pts_within_{thr}"] = 100.0 * float(frac)
        pts_within.append(frac)
        if pocc is not None:
            tp = (within & visible & ~pocc & evaluate).sum()
            gt_pos = (visible & evaluate).sum()
            false_pos = ((~within | occ) & ~pocc & evaluate).sum()
            jaccs.append(tp / max(1, gt_pos + false_pos))
    out["delta_avg"] = 100.0 * float(np.mean(pts_within))
    if pocc is not None:
        out["occlusion_accuracy"] = 100.0 * float(((pocc == occ) & evaluate).sum() / max(1, evaluate.sum()))
        out["average_jaccard"] = 100.0 * float(np.mean(jaccs))
    return out


def metrics_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A prettytable of per-name figures (one row per name, e.g. 'mean')."""
    names = list(next(iter(rows.values())).keys()) if rows else list(METRIC_NAMES)
    table = PrettyTable(["", *names])
    if title:
        table.title = title
    for label, r in rows.items():
        table.add_row([label, *(f"{r[k]:.1f}" for k in names)])
    return str(table)


def survival_curve(trajs_e, trajs_g, valids, hw: tuple[int, int], thr: float = 16.0) -> np.ndarray:
    """Fraction of tracks not yet failed at each frame (...,S) of trajs (...,S,N,2); mean over S = survival_16/100.

    A track fails at the first valid frame whose 256x256 error exceeds `thr` and stays failed after it.
    """
    err = errors_256(trajs_e, trajs_g, hw)
    failed = (err > thr) & (_np(valids) > 0)
    return np.cumprod(~failed, axis=-2).mean(axis=-1)


def mean_curve(curves: Iterable[ArrayLike]) -> np.ndarray:
    """Mean over videos of per-frame curves of different lengths: frame t averages the videos that reach it."""
    curves = [np.asarray(c, np.float64) for c in curves]
    if not curves:
        return np.zeros(0)
    n = max(len(c) for c in curves)
    total, count = np.zeros(n), np.zeros(n)
    for c in curves:
        total[:len(c)] += c
        count[:len(c)] += 1
    return total / count


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties sharing their mean
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
