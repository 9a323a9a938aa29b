"""Evaluation curves as pictures: accuracy vs threshold (d_1..d_16) and survival over time, per dataset.

Curves of one tracker are `{"accuracy": [d_1, .., d_16], "survival": [fraction alive at frame 0, 1, ..]}`;
a panel row shows one dataset, `{dataset: {label: curves}}`, each label's curve beside the others (e.g. the
model beside zero-velocity). matplotlib is imported only when a figure is drawn, so the rest of the project
(and the curve data below) works without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pips2.utils import metrics
from pips2.utils.paths import temp_beside

Curves = dict[str, list[float]]
FIG_INCHES = (9.0, 3.2)  # per dataset row; at DPI this is a 900x320 px panel pair
DPI = 100
ZERO_VEL = "zero-velocity"


def curves_of(trajs_e, trajs_g, valids, hw: tuple[int, int]) -> Curves:
    """Curves of one video (trajs S,N,2) or the mean of a batch (B,S,N,2), errors in a 256x256 frame."""
    e, g, v = trajs_e, trajs_g, valids  # numpy arrays or torch tensors, as metrics takes them
    if e.ndim == 3:
        e, g, v = e[None], g[None], v[None]
    per_video = [metrics.track_metrics(e[b], g[b], v[b], hw) for b in range(e.shape[0])]
    mean = metrics.average(per_video)
    survival = metrics.survival_curve(e, g, v, hw).mean(axis=0)
    return {"accuracy": [mean[f"d_{t}"] for t in metrics.THRESHOLDS], "survival": survival.tolist()}


def mean_curves(per_video: Iterable[Curves]) -> Curves:
    """One dataset's curves: accuracy averaged over videos, survival averaged frame by frame."""
    rows = list(per_video)
    if not rows:
        return {"accuracy": [], "survival": []}
    return {"accuracy": np.mean([r["accuracy"] for r in rows], axis=0).tolist(),
            "survival": metrics.mean_curve(r["survival"] for r in rows).tolist()}


def mean_series(per_video: dict[str, dict[str, Curves]], label: str) -> dict[str, Curves]:
    """A dataset's series from per-video {"model": curves, "zero-velocity": curves}: the mean curves, the model's
    relabelled `label` (e.g. the checkpoint's name), over the videos that have curves."""
    rows = [c for c in per_video.values() if c]
    keys = [k for k in ("model", ZERO_VEL) if rows and k in rows[0]]
    return {(label if k == "model" else k): mean_curves(c[k] for c in rows) for k in keys}


def png_path(out_json: str | os.PathLike) -> Path:
    """Where the curves of an --out_json go: res.json -> res_curves.png beside it."""
    p = Path(out_json)
    return p.with_name(f"{p.stem}_curves.png")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (no display needed, not an import-time cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(datasets: dict[str, dict[str, Curves]], title: str = ""):
    """A matplotlib Figure: per dataset, accuracy vs threshold (left) and survival vs frame (right)."""
    plt = _pyplot()
    rows = max(1, len(datasets))
    fig, axes = plt.subplots(rows, 2, figsize=(FIG_INCHES[0], FIG_INCHES[1] * rows), dpi=DPI, squeeze=False)
    for (name, series), (acc, surv) in zip(datasets.items(), axes, strict=False):  # no dataset: one empty row
        for label, c in series.items():
            style = dict(color="0.5", linestyle="--") if label == ZERO_VEL else {}
            acc.plot(metrics.THRESHOLDS[:len(c["accuracy"])], c["accuracy"], marker="o", label=label, **style)
            surv.plot(np.arange(len(c["survival"])), 100.0 * np.asarray(c["survival"]), label=label, **style)
        acc.set_xscale("log", base=2)
        acc.set_xticks(metrics.THRESHOLDS, [str(t) for t in metrics.THRESHOLDS])
        acc.set(xlabel="threshold (px in 256x256)", ylabel="points within (%)", ylim=(0, 100),
                title=f"{name}: accuracy (d_1..d_16)")
        surv.set(xlabel="frame", ylabel="tracks not yet failed (%)", ylim=(0, 101),
                 title=f"{name}: survival (error <= 16 px)")
        for ax in (acc, surv):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_png(datasets: dict[str, dict[str, Curves]], path: str | os.PathLike, title: str = "") -> Path:
    """Draw `figure` into a PNG (temp file, then rename: a reader never sees half an image)."""
    plt = _pyplot()
    path = Path(path)
    fig = figure(datasets, title)
    tmp = temp_beside(path)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def add_to_tensorboard(writer, tag: str, datasets: dict[str, dict[str, Curves]], step: int) -> None:
    """Add the curves figure to a tensorboardX SummaryWriter under `tag` (an image in TensorBoard's Images tab)."""
    writer.add_figure(tag, figure(datasets), global_step=step, close=True)
