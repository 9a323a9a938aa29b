"""TAP-Vid pickles (DAVIS, Kinetics, RGB-Stacking): name -> {video, points, occluded}, as a dict or a list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pips2.utils.safe_load import UnsafeFileError, load_pickle
from pips2.utils.video import IMREAD_STORED_COLOR, MIN_VIDEO_SIDE, image_pixels_problem, image_wh


class TapVidError(ValueError):
    """A TAP-Vid file that cannot be used; str(e) is one line naming the file and the problem."""


# A video of encoded frames (the Kinetics pickles) is decoded whole: TAP-Vid's are at most ~0.1 GB decoded (250
# frames of 256x256; DAVIS 480p). One 33 KB JPEG referenced 2,000 times by a 670 KB pickle decoded toward 11.6 GB.
MAX_DECODED_VIDEO_BYTES = 2 << 30
NORMALISED_SLACK = 0.5  # a visible point may lie this far (fractions of the frame) outside [0, 1]


def _decode_video(video, where: str) -> np.ndarray:
    """(T,H,W,3) uint8 from an array or a list of JPEG/PNG bytes (the Kinetics pickles)."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4:
        return video
    total = 0
    for t, f in enumerate(video):  # every header first: the decoded size is known before anything is decoded
        if isinstance(f, (bytes, bytearray, np.bytes_)):
            problem = image_pixels_problem(bytes(f))  # from the header: a decoder allocates what it declares
            if problem:
                raise TapVidError(f"{where}: frame {t}: {problem}")
            w, h = image_wh(bytes(f)) or (0, 0)
            total += w * h * 3
        else:
            total += np.asarray(f).nbytes
        if total > MAX_DECODED_VIDEO_BYTES:
            raise TapVidError(f"{where}: its {len(video)} frames decode to more than {MAX_DECODED_VIDEO_BYTES} bytes "
                              f"(frames 0..{t} already do); TAP-Vid's videos take at most ~0.1 GB")
    frames = []
    for t, f in enumerate(video):
        if isinstance(f, (bytes, bytearray, np.bytes_)):
            img = cv2.imdecode(np.frombuffer(f, np.uint8), IMREAD_STORED_COLOR)  # the points are on the stored pixels
            if img is None:
                raise TapVidError(f"{where}: frame {t} is not a decodable image")
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        else:
            frames.append(np.asarray(f, np.uint8))
    if len({fr.shape for fr in frames}) != 1 or frames[0].ndim != 3 or frames[0].shape[2] != 3:
        raise TapVidError(f"{where}: frames are not all H x W x 3 images of one size")
    return np.stack(frames)


def _video_length(video, where: str) -> int:
    """Frame count of a video field, checking its form without decoding it."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
            raise TapVidError(f"{where}: video is {video.dtype} {video.shape}, expected uint8 (T,H,W,3)")
        return video.shape[0]
    if isinstance(video, (list, tuple)) and video:
        if all(isinstance(f, (bytes, bytearray, np.bytes_)) for f in video):
            return len(video)
        if all(isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.shape[-1:] == (3,) for f in video):
            return len(video)
    raise TapVidError(f"{where}: video is {type(video).__name__}, expected a uint8 (T,H,W,3) array or a list of "
                      f"encoded frames")


def _check_entry(item, where: str) -> None:
    """Raise TapVidError unless item is {video, points (N,T,2) float, occluded (N,T) bool} of one length T."""
    if not isinstance(item, dict):
        raise TapVidError(f"{where} is {type(item).__name__}, expected a dict with video/points/occluded")
    if not {"video", "points", "occluded"} <= set(item):
        raise TapVidError(f"{where} lacks video/points/occluded")
    T = _video_length(item["video"], where)
    pts, occ = item["points"], item["occluded"]
    if not isinstance(pts, np.ndarray) or pts.dtype.kind not in "fiu" or pts.ndim != 3 or pts.shape[2] != 2:
        got = f"{pts.dtype} {pts.shape}" if isinstance(pts, np.ndarray) else type(pts).__name__
        raise TapVidError(f"{where}: points is {got}, expected a float (N,T,2) array")
    if pts.shape[1] != T:  # said of the points, before occluded is compared with them (it blamed occluded)
        raise TapVidError(f"{where}: video has {T} frames but points have {pts.shape[1]}")
    if pts.shape[0] == 0:  # it was said as "no point visible in frame 0"
        raise TapVidError(f"{where}: holds no points (points is {pts.shape}): nothing to track")
    if not isinstance(occ, np.ndarray) or occ.dtype.kind not in "biu" or occ.shape != pts.shape[:2]:
        got = f"{occ.dtype} {occ.shape}" if isinstance(occ, np.ndarray) else type(occ).__name__
        raise TapVidError(f"{where}: occluded is {got}, expected a bool {pts.shape[:2]} array")
    if occ.dtype != bool and not np.isin(occ, (0, 1)).all():  # 2 or -1 would read as "occluded"
        raise TapVidError(f"{where}: occluded holds {occ[~np.isin(occ, (0, 1))][0]!r}, only 0 and 1 are allowed")
    # an occluded point's position is never scored, so only a visible one must be a number: the query modes
    # start tracks there
    bad = ~np.isfinite(pts).all(-1) & ~occ.astype(bool)
    if bad.any():
        n, t = np.argwhere(bad)[0]
        raise TapVidError(f"{where}: non-finite point position where it is visible (point {n}, frame {t}; "
                          f"{int(bad.sum())} such entries)")
    # TAP-Vid stores positions as fractions of the frame; an entry converted in pixels passed, then track()
    # refused its queries as far outside the image and the whole run ended there
    seen = pts[~occ.astype(bool)]
    if seen.size and (seen.min() < -NORMALISED_SLACK or seen.max() > 1 + NORMALISED_SLACK):
        raise TapVidError(f"{where}: points are not normalised to [0, 1] where visible (x from {seen[:, 0].min():.4g} "
                          f"to {seen[:, 0].max():.4g}, y from {seen[:, 1].min():.4g} to {seen[:, 1].max():.4g}): "
                          f"TAP-Vid stores them as fractions of the frame's width and height")
    if T < 2:  # scored as a perfect track before (survival 100, median_l2 0) and averaged into the means
        raise TapVidError(f"{where}: video has {T} frame: nothing to score beyond the query frame")
    if isinstance(item["video"], np.ndarray):
        _check_video_size(item["video"].shape[1], item["video"].shape[2], where)


def _check_video_size(H: int, W: int, where: str) -> None:
    """TapVidError for a video smaller than the trackers take (its track() error ended the whole run)."""
    if min(H, W) < MIN_VIDEO_SIDE:
        raise TapVidError(f"{where}: video is {W}x{H}; tracking needs at least {MIN_VIDEO_SIDE}x{MIN_VIDEO_SIDE} "
                          f"pixels")


def _items(data, f: Path) -> list[tuple[str, Any]]:
    """(name, entry) pairs of one unpickled file, unchecked."""
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, (list, tuple)):
        items = [(f"{f.stem}_{i:04d}", v) for i, v in enumerate(data)]
    else:
        raise TapVidError(f"{f}: holds {type(data).__name__}, expected a dict or list of videos")
    if not items:
        raise TapVidError(f"{f}: holds no videos")
    return items


def tapvid_files(path: str | Path) -> list[Path]:
    """The pickles at a TAP-Vid location: the file itself, or a folder's *.pkl sorted; TapVidError if none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.pkl"))
        if not files:
            raise TapVidError(f"{path}: no TAP-Vid pickle")
        return files
    if not path.exists():
        raise TapVidError(f"{path}: no such file or folder")
    return [path]


def read_tapvid_file(f: str | Path) -> list[tuple[str, dict | None, str | None]]:
    """Every entry of one pickle as (name, entry, None) when it is TAP-Vid shaped, else (name, None, problem),
    problem being one line naming the file and the entry. A file that is unsafe, unreadable or holds no dict or
    list of videos raises TapVidError. Frames are not decoded here (decode_entry does)."""
    f = Path(f)
    try:
        data = load_pickle(f)  # restricted: a crafted pickle cannot run code
    except UnsafeFileError as e:
        raise TapVidError(str(e)) from None
    out: list[tuple[str, dict | None, str | None]] = []
    for name, item in _items(data, f):
        try:
            _check_entry(item, f"{f}: entry {name}")
        except TapVidError as e:
            out.append((name, None, str(e)))
        else:
            out.append((name, item, None))
    return out


def decode_entry(f: str | Path, name: str, item: dict) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(name, video (T,H,W,3) uint8, points (N,T,2) in pixels, occluded (N,T) bool) of a checked entry of file
    f; normalised points are scaled by (W-1, H-1). An undecodable frame raises TapVidError naming it."""
    video = _decode_video(item["video"], f"{f}: entry {name}")
    H, W = video.shape[1:3]
    _check_video_size(H, W, f"{f}: entry {name}")
    pts = item["points"].astype(np.float32) * np.array([W - 1, H - 1], np.float32)
    return name, video, pts, item["occluded"].astype(bool)


def load_tapvid(path: str | Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (name, video (T,H,W,3) uint8, points (N,T,2) in pixels, occluded (N,T) bool) from a pickle or a
    folder of pickles. Normalised points are scaled by (W-1, H-1). A file that is unsafe or not TAP-Vid shaped
    raises TapVidError (one line naming it) before any of its videos is yielded."""
    for f in tapvid_files(path):
        entries = read_tapvid_file(f)
        problem = next((p for _, _, p in entries if p is not None), None)
        if problem is not None:
            raise TapVidError(problem)
        for name, item, _ in entries:
            if item is not None:  # always, once no entry has a problem
                yield decode_entry(f, name, item)


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
