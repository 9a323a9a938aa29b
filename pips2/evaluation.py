"""The authors' evaluation protocol (docs/EVALUATION.md), shared by test_on_pod.py, test_on_tap.py and test_on_cro.py:
choose points, zero-velocity initialisation from frame 0, windowed tracking at the model size, metrics; the
TAP-Vid benchmark's query modes for PIPs++ and LBM; the checks of the scripts' flags; and the one frame the three
run in (`Evaluation`: the loop, skipped items, partial results on Ctrl-C and SIGTERM, the summary, the JSON
layout and the curves)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pips2.datasets.pointodyssey import SkipItem
from pips2.datasets.tapvid import first_queries, strided_queries
from pips2.hub import HubError, find_file
from pips2.nets.pips2 import MIN_SIZE
from pips2.tracking import MAX_ITERS, ArrayFrames, FrameSource, track, track_windows
from pips2.utils import metrics, plots
from pips2.utils.amp import amp_dtype
from pips2.utils.cli import parse_hw
from pips2.utils.paths import held_folder, output_folder_problem, pinned_folder, printable, write_json
from pips2.utils.procs import STOP_SIGNALS, caught_stop_signals, exit_code, raise_stop
from pips2.utils.video import VideoError, image_truncation

# LBM's evaluation memory per data set (the authors' choice, docs/LBM.md), found by name in the file's name
LBM_MEMORY_SIZES = (("davis", 20), ("kinetics", 36), ("robotap", 60))
LBM_DEFAULT_MEMORY = 48
# LBM's authors resize every TAP-Vid video to this size before their model (which resizes to its input size)
TAPVID_HW = (256, 256)


def select_points(trajs: np.ndarray, visibs: np.ndarray, valids: np.ndarray, src_hw: tuple[int, ...],
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
    Positions are in pixels of the source frames, of size src_hw.
    """
    H, W = src_hw
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
                          model_hw: tuple[int, int], S: int = 128, iters: int = 16, point_batch: int = 256,
                          amp: str | None = None, curves: dict | None = None) -> dict[str, float] | None:
    """The authors' TAP-Vid protocol for one video: every point visible in frame 0, tracked to the end at
    model_hw; points (N,T,2) in pixels, occluded (N,T). None when no point is visible in frame 0."""
    vis = ~occluded.T
    tr, _, val = select_points(points.transpose(1, 0, 2), vis, vis.copy(), video.shape[1:3], None, min_frames=1,
                               max_motion=None, border_px=0)
    if tr.shape[1] == 0:
        return None
    return evaluate_points(model, ArrayFrames(video, model_hw), tr, val, S, iters, point_batch, amp, curves)


def lbm_memory_size(dataset_location: str | os.PathLike) -> int:
    """LBM's memory size for evaluating a data set: DAVIS 20, Kinetics 36, RoboTAP 60, anything else 48."""
    name = Path(dataset_location).name.lower()
    return next((m for key, m in LBM_MEMORY_SIZES if key in name), LBM_DEFAULT_MEMORY)


def resize_tapvid(video: np.ndarray, points: np.ndarray, eval_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A TAP-Vid video (T,H,W,3) and its points (N,T,2, pixels) at eval_hw (h, w): area-averaged frames, points
    scaled as load_tapvid places them (normalised x (w-1, h-1)), so they equal the points of a file stored at
    that size."""
    H, W = video.shape[1:3]
    h, w = eval_hw
    if (H, W) == (h, w):
        return video, points
    interp = cv2.INTER_AREA if h <= H and w <= W else cv2.INTER_LINEAR
    frames = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in video])
    return frames, points * np.array([(w - 1) / max(W - 1, 1), (h - 1) / max(H - 1, 1)], np.float32)


def tapvid_query_mode(model, video: np.ndarray, points: np.ndarray, occluded: np.ndarray, mode: str,
                      eval_hw: tuple[int, int] | None = None, **track_kw) -> dict[str, float]:
    """TAP-Vid metrics of one video in the 'first' or 'strided' query mode; {} when it has no query.

    Points (N,T,2) in pixels, occluded (N,T); `eval_hw` resizes the video first, and the video is then scored at
    that size as its source (LBM's authors: TAPVID_HW).
    Strided mode scores the frames before each query too, so it tracks backward as well. delta^x_avg always;
    AJ and OA when the model predicts visibility (LBM).
    """
    if eval_hw is not None:
        video, points = resize_tapvid(video, points, eval_hw)
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
    return f"{printable(name)}: {figs}; {int(res['points'])} points, {int(res['frames'])} frames"


# ---------------------------------------------------------------------------------------------------------
# The scripts' flags, checked before anything is loaded.

# --image_size bound per side: over 4x the authors' 896; a 128-frame window at 4096x4096 holds ~17 GB of features
MAX_IMAGE_SIDE = 4096
MINIMA = {"S": 2, "N": 1, "iters": 1, "point_batch": 1, "clip_len": 2, "memory_size": 1, "max_scenes": 1,
          "max_videos": 1, "max_clips": 1, "max_iters": 1}


def check_image_size(value, name: str = "image_size") -> tuple[int, int]:
    """An --image_size flag as (H, W), each side within [MIN_SIZE, MAX_IMAGE_SIDE]; ValueError naming it."""
    h, w = parse_hw(value, name)
    if not (MIN_SIZE <= h <= MAX_IMAGE_SIDE and MIN_SIZE <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"--{name} must be between {MIN_SIZE} and {MAX_IMAGE_SIDE} pixels per side, got {h},{w}")
    return h, w


def check_counts(**flags: int | None) -> None:
    """ValueError naming the first count flag below its minimum (MINIMA: S 2, clip_len 2, the others 1) or, for
    iters, above MAX_ITERS; None means not given."""
    for name, value in flags.items():
        if value is not None and value < MINIMA[name]:
            raise ValueError(f"--{name} must be at least {MINIMA[name]}, got {value}")
        if name == "iters" and value is not None and value > MAX_ITERS:
            raise ValueError(f"--iters must be at most {MAX_ITERS}, got {value}")


def check_amp(amp: str) -> str | None:
    """The autocast name of an --amp flag (None for 'none'); ValueError for an unknown one."""
    amp_dtype(amp)
    return None if amp in (None, "none") else str(amp)


# an existing --out_json is replaced only if it is a results file of this program; a file larger than this is
# not one (a results JSON of ~1000 videos is ~1 MB) and is not read to find out
MAX_RESULTS_BYTES = 64 << 20


def read_results(path: str | os.PathLike) -> dict | None:
    """The results JSON of the evaluation frame at path (a JSON object with its benchmark and status keys,
    docs/EVALUATION.md#results-json), or None for anything else: a file larger than MAX_RESULTS_BYTES, or one not
    opening with '{' (a data set or checkpoint), is not read further."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RESULTS_BYTES:
            return None
        with open(path, "rb") as f:
            if not f.read(64).lstrip().startswith(b"{"):
                return None
            f.seek(0)
            js = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None
    return js if isinstance(js, dict) and {"benchmark", "status"} <= set(js) else None


def is_results_file(path: str | os.PathLike) -> bool:
    """True if path is a regular file holding a results JSON of the evaluation frame."""
    return read_results(path) is not None


def _inside(path: Path, inputs: dict[str, Any]) -> str | None:
    """The first input flag (name=value) whose file is path or whose folder holds path; None if none."""
    for name, value in inputs.items():
        if value is None or not Path(str(value)).exists():  # not given, or a hub name
            continue
        where = Path(str(value)).resolve()
        if path == where or (where.is_dir() and where in path.parents):
            return f"--{name}={value}"
    return None


MIN_OUT_FREE_BYTES = 16 << 20  # a results file and its curves PNG: a few MB for the largest benchmark


def check_out_json(out_json: str | None, **inputs: Any) -> None:
    """ValueError unless --out_json and its curves PNG can be written without losing anything: the folder
    exists and is writable (hours of scoring never end on a path that cannot take the results), neither is an
    input (a flag of `inputs`, e.g. dataset_location=, init_dir=: that file or inside that folder), and an
    existing file is replaced only if it is a results file of this program (the curves PNG only beside one)."""
    if not out_json:
        return
    out = Path(out_json)
    folder = out.parent
    if problem := output_folder_problem(out, "--out_json") or output_folder_problem(plots.png_path(out), "--out_json"):
        raise ValueError(problem)
    if folder.is_dir():  # written at the end, hours later: into this very folder (`held_folder`)
        pinned_folder(folder, follow=True)
    if out.is_dir():
        raise ValueError(f"--out_json={out_json} is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"--out_json={out_json}: no such folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out_json={out_json}: folder {folder} is not writable")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < MIN_OUT_FREE_BYTES:  # a full disk said after hours of scoring, not before
        raise ValueError(f"--out_json={out_json}: {free} bytes free in {folder}, fewer than the "
                         f"{MIN_OUT_FREE_BYTES} the results and their curves need")
    png = plots.png_path(out)
    for what, p in (("--out_json", out), ("its curves file", png)):
        owner = _inside(p.resolve(), inputs)
        if owner:
            name = f"--out_json={out_json}" if what == "--out_json" else f"--out_json={out_json}: its curves {p}"
            raise ValueError(f"{name} would overwrite the input {owner}; give another name")
    replacing = out.exists() or out.is_symlink()
    if replacing and not is_results_file(out):
        raise ValueError(f"--out_json={out_json} exists and is not a results file of this program; "
                         "give another name")
    if (png.exists() or png.is_symlink()) and (not replacing or png.is_dir()):
        raise ValueError(f"--out_json={out_json}: its curves file {png} exists and is not one this program "
                         "wrote beside a results file; give another name")


# ---------------------------------------------------------------------------------------------------------
# The evaluation frame: each script hands it (name, score) items; it runs them and reports.


class Skip(Exception):
    """An item (sequence, video, clip) that cannot be scored; str(e) is its one-line reason."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during an evaluation: stop where it is and keep what is scored."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


# data problems of one item: skipped with their reason (anything else is a bug: partial results, then raised)
SKIP_ERRORS = (Skip, SkipItem, VideoError)


def skip_reason(e: BaseException) -> str:
    """A one-line reason; a VideoError's file is named by its file name, not its whole path (countable)."""
    msg = " ".join(str(e).split())
    if isinstance(e, VideoError):
        path, _, what = msg.partition(": ")
        return f"{what or 'unreadable'} ({Path(path).name})"
    return msg or type(e).__name__


def check_frames(paths: list[Path]) -> None:
    """Skip unless every frame opens, ends with its end marker and has the first frame's size (only each
    file's header and end are read: cheap beside tracking)."""
    first = None
    for p in paths:
        try:
            with Image.open(p) as im:
                size = im.size
        except Exception:
            raise Skip(f"unreadable frame ({p.name})") from None
        if image_truncation(p):
            raise Skip(f"truncated frame ({p.name})")
        if first is None:
            first = (p, size)
        elif size != first[1]:
            raise Skip(f"frames of different sizes ({p.name} is {size[0]}x{size[1]}, "
                       f"{first[0].name} is {first[1][0]}x{first[1][1]})")


@dataclass
class Scored:
    """One item's results: its entry in per_item, its printed line, the frames it tracked and its curves
    ({"model": Curves, "zero-velocity": Curves}, or None)."""

    figures: dict[str, Any]
    line: str
    frames: int = 0
    curves: dict | None = None


# the line before the results JSON on stdout when --out_json cannot be written (a full disk at the end)
RESULTS_MARKER = "--- results JSON (--out_json could not be written) ---"


def why_not(e: OSError) -> str:
    """An OSError's reason in a few words ('no space left on device'), without its path."""
    return (e.strerror or str(e) or type(e).__name__).lower()


def _on_signal(signum, _frame) -> None:
    # the first stop signal ends the run: later ones are ignored until its report and exit are done (a SIGINT
    # 50 ms after a SIGTERM made the exit status 130 under a line naming SIGTERM)
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is _on_signal:
            signal.signal(s, signal.SIG_IGN)
    raise_stop(signum, Interrupted(signal.Signals(signum).name))


MAX_PARTIAL_FILES = 1000  # <stem>.partial.<k>.json names tried before a stopped run's results go to stdout


def checkpoint_of(init_dir: str | os.PathLike | None) -> dict | None:
    """The checkpoint file --init_dir names now (a folder's newest), with its size and modification time, for a
    results file's settings: two checkpoints of one folder (a run followed while it trains) are two runs, whose
    partial results one must not replace with the other's. None for a hub name or nothing."""
    if init_dir is None:
        return None
    try:
        p = find_file(init_dir).resolve()
        st = p.stat()
    except (HubError, OSError):
        return None
    return {"file": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def results_path(out_json: str, done: bool, scored: int = 0, settings: dict | None = None) -> str:
    """Where a run's results go: --out_json, unless the run did not finish and --out_json already holds results
    (a finished run's hours of scoring, or a stopped run's): then <stem>.partial<suffix>, unless that holds more
    scored items than this run's `scored`, was scored with other `settings` (a run with --iters=2 is not a rerun
    of one with 16), or is not a results file, then the first <stem>.partial.<k><suffix> (k = 2, 3, ...) that it
    may replace or that is free. A stopped rerun never replaces more results with fewer, nor other runs'."""
    p = Path(out_json)
    if done or not (p.exists() or p.is_symlink()):
        return out_json
    for k in range(1, MAX_PARTIAL_FILES + 1):
        q = p.with_name(f"{p.stem}.partial{'' if k == 1 else f'.{k}'}{p.suffix}")
        if not (q.exists() or q.is_symlink()):
            return str(q)
        held = read_results(q)
        per_item = held.get("per_item") if held is not None else None
        same = held is not None and (settings is None or held.get("settings") == settings)
        if same and isinstance(per_item, dict) and len(per_item) <= scored:
            return str(q)
    raise OSError(errno.EEXIST, f"{MAX_PARTIAL_FILES} partial results files beside it hold more than this run")


def _restore(handlers: dict) -> None:
    for s, h in handlers.items():
        signal.signal(s, h)


@dataclass
class Evaluation:
    """One run of an evaluation script: items scored one by one, their results, the skipped ones and how the
    run ended; the summary, --out_json and its curves PNG written whatever ended it (docs/EVALUATION.md)."""

    benchmark: str  # "PointOdyssey test", "tapvid_davis", "CroHD train": titles and the curves' row
    noun: str  # the items' plural ("sequences", "videos", "clips")
    label: str  # the evaluated model's name in titles and curves ("reference_model", "zero-velocity")
    settings: dict[str, Any]
    out_json: str | None = None
    tapvid_title: str = "TAP-Vid"
    per_item: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)
    status: str = "not started"
    frames: int = 0
    total: int | None = None  # items handed to run(), when known
    processed: int = 0  # of them, scored or skipped
    unwritten: str | None = None  # why --out_json could not be written (its JSON then went to stdout)
    results_path: str | None = None  # where the results went: --out_json, or beside it for a partial run

    def skip(self, name: str, reason: str) -> None:
        """Record an item that cannot be scored, and say so."""
        self.skipped.append({"name": name, "reason": reason})
        tqdm.write(printable(f"{name}: skipped ({reason})"))

    def run(self, items: Iterable[tuple[str, Callable[[], Scored]]], total: int | None = None,
            desc: str = "eval", unit: str = "it") -> None:
        """Score every item; then the summary and --out_json. Ctrl-C, SIGTERM or SIGHUP (a closed terminal):
        the same with what is done, one line on stderr, exit 130 / 143 / 129. A bug: the same, then raised.
        Nothing scored at all: exit 2. --out_json not writable at the end (a full disk): its JSON on stdout after
        RESULTS_MARKER, one line on stderr, exit 1."""
        self.total = total
        main_thread = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, _on_signal) for s in caught_stop_signals()} if main_thread else {}
        bar = tqdm(total=total, desc=desc, unit=unit)
        t0 = time.time()
        try:
            for name, score in items:
                try:
                    res = score()
                except SKIP_ERRORS as e:  # this item's data: skip it and go on
                    self.skip(name, skip_reason(e))
                else:
                    self._add(name, res)
                self.processed += 1
                bar.update(1)
            self.status = "done"
        except KeyboardInterrupt as e:
            signame = e.signame if isinstance(e, Interrupted) else "SIGINT"
            self.status = "interrupted"
            self._stop(bar, old, time.time() - t0, interrupted=True)
            done = f"{len(self.per_item)}" + (f" of {total}" if total is not None else "")
            where = f"; partial results in {self.results_path}" if self.out_json else ""
            if self.unwritten:
                where = "; partial results printed above (--out_json not written)"
            try:
                print(f"stopped by {signame}: {done} {self.noun} scored{where}", file=sys.stderr, flush=True)
                sys.exit(exit_code(signame))
            finally:
                _restore(old)
        except Exception as e:  # a bug, not bad data: keep the scores, then fail loudly
            self.status = f"error: {type(e).__name__}: {' '.join(str(e).split())}"
            self._stop(bar, old, time.time() - t0)
            raise
        self._stop(bar, old, time.time() - t0)
        if not self.per_item:
            print(f"error: no {self.noun} could be scored ({len(self.skipped)} skipped)", file=sys.stderr, flush=True)
            sys.exit(2)
        if self.unwritten:  # the results are on stdout, but the file asked for is not there: not a success
            sys.exit(1)

    def _add(self, name: str, res: Scored) -> None:
        key, i = name, 2
        while key in self.per_item:  # two items of one name (e.g. in two TAP-Vid files): keep both
            key, i = f"{name}#{i}", i + 1
        name = key
        self.per_item[name] = res.figures
        if res.curves:
            self.curves[name] = res.curves
        self.frames += res.frames
        tqdm.write(printable(res.line))  # it names the item: a data file's name

    def _stop(self, bar, old_handlers: dict, seconds: float, interrupted: bool = False) -> None:
        """Close the bar and report; a second signal must not break the report, so the stop signals are ignored
        meanwhile, and after it too when a signal stopped the run (its line and exit come next)."""
        for s in old_handlers:
            signal.signal(s, signal.SIG_IGN)
        try:
            bar.close()
            self.finish(seconds)
        finally:
            if not interrupted:
                _restore(old_handlers)

    def means(self) -> tuple[dict[str, float] | None, dict[str, dict[str, float]]]:
        """The authors' figures averaged over the items that have them (None if none has), and the TAP-Vid
        benchmark's figures per query mode averaged over the items scored in that mode."""
        rows = [r for r in self.per_item.values() if "d_avg" in r]
        mean = metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows) if rows else None
        modes: dict[str, list] = {}
        for r in self.per_item.values():
            for m, d in r.get("tapvid", {}).items():
                modes.setdefault(m, []).append(d)
        return mean, {m: metrics.average(ds) for m, ds in modes.items()}

    def payload(self) -> dict[str, Any]:
        """The --out_json layout, the same for the three scripts (docs/EVALUATION.md#results-json)."""
        mean, tapvid = self.means()
        return {"benchmark": self.benchmark, "status": self.status, "complete": self.status == "done",
                "settings": self.settings, "mean": mean, "tapvid": tapvid, "per_item": self.per_item,
                "skipped": self.skipped, "curves": plots.mean_series(self.curves, self.label)}

    def finish(self, seconds: float) -> None:
        """Tables, summary line and --out_json (with its curves PNG) of what was done, whatever ended the run."""
        # the results file first: whatever the printing below meets (a closed terminal, a reader gone from a pipe),
        # hours of scoring are on disk
        payload, write_error = None, None
        if self.out_json:
            payload = self.payload()
            self.results_path = self.out_json  # named in the error line if no name can be found
            try:
                self.results_path = target = results_path(self.out_json, self.status == "done", len(self.per_item),
                                                          json.loads(json.dumps(payload.get("settings"))))
                write_json(held_folder(Path(target).parent) / Path(target).name, payload)
            except OSError as e:  # a full disk after hours of scoring: the results must still reach the user
                write_error = e
        mean, tapvid = self.means()
        n = len(self.per_item)
        if mean is not None:
            print(metrics.metrics_table({"mean": mean}, title=f"{self.label} on {self.benchmark}: {n} {self.noun}"))
        if tapvid:
            print(metrics.metrics_table(tapvid, title=self.tapvid_title))
        reasons = Counter(s["reason"].split(" (")[0] for s in self.skipped)
        why = f" ({', '.join(f'{printable(r)}: {k}' for r, k in reasons.most_common())})" if reasons else ""
        left = ""
        if self.status != "done":
            rest = "" if self.total is None else f"{self.total - self.processed} "
            left = f", {rest}not done ({self.status})"
        print(f"summary: {n} {self.noun} scored, {len(self.skipped)} skipped{why}{left}; "
              f"{self.frames / max(seconds, 1e-9):.1f} frames/s in {seconds:.1f} s", flush=True)
        if not self.out_json or payload is None:
            return
        if write_error is not None:
            self.unwritten = why_not(write_error)
            print(f"{RESULTS_MARKER}\n{json.dumps(payload, indent=2)}", flush=True)
            print(f"error: cannot write --out_json={self.results_path} ({self.unwritten}); the results are printed "
                  "above", file=sys.stderr, flush=True)
            return
        target = self.results_path or self.out_json
        print(f"results -> {target}" + ("" if self.status == "done" else " (partial)"), flush=True)
        if payload["curves"]:
            png = plots.png_path(target)
            try:
                plots.save_png({self.benchmark: payload["curves"]}, held_folder(png.parent) / png.name,
                               title=f"{self.label} on {self.benchmark}: {n} {self.noun}")
                print(f"curves -> {png}", flush=True)
            except ImportError as e:  # the figures above are the results; the picture is a convenience
                print(f"curves not drawn ({e}); pip install matplotlib", flush=True)
            except OSError as e:
                print(f"warning: curves not drawn: cannot write {png} ({why_not(e)})", file=sys.stderr, flush=True)
