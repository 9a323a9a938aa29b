"""Drawing tracks: coloured points with fading trails (demo videos) and summary pictures (TensorBoard)."""

from __future__ import annotations

import csv
import errno
import os
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from pips2.utils.paths import held_folder, unpin, unpinned
from pips2.utils.procs import held_stops, owned_tempdir, remove_dead_owned, remove_owned, remove_stale_tempdirs
from pips2.utils.video import MAX_RATE_DENOMINATOR, frame_rate, iter_frames, write_mp4

DRAW_LIMIT = 1e5  # px: points further out are not drawn (OpenCV shifts coordinates into 32-bit integers)


def track_colors(xy0: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(N,3) uint8 RGB colours that vary smoothly with the query position (hue by x, value by y)."""
    H, W = hw
    xy0 = np.nan_to_num(np.asarray(xy0, np.float64))
    hue = np.clip(xy0[:, 0] / max(W - 1, 1), 0, 1) * 150
    val = 155 + 100 * np.clip(xy0[:, 1] / max(H - 1, 1), 0, 1)
    hsv = np.stack([hue, np.full_like(hue, 255), val], 1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def draw_frame(frame: np.ndarray, history: np.ndarray, colors: np.ndarray, shown: np.ndarray | None = None,
               radius: int = 3, visible: np.ndarray | None = None, labels: list[str] | None = None,
               thickness: int = 1) -> np.ndarray:
    """Draw trails (older segments fainter) and current points; history (L,N,2) ends at this frame.

    visible (N,) marks this frame's points as filled (True) or hollow rings (False, e.g. occluded); labels (N)
    are written beside the points.
    """
    out = frame.copy()
    L, N = history.shape[:2]
    shown = np.ones((L, N), bool) if shown is None else shown
    # a point OpenCV cannot take (NaN, inf, beyond its integer range) is not drawn, nor are its trail segments
    with np.errstate(invalid="ignore"):
        shown = shown & (np.abs(history) <= DRAW_LIMIT).all(-1)
    history = np.where(shown[..., None], history, 0.0)
    for i in range(1, L):
        a = i / L  # fade: the oldest segment is the faintest
        layer = out.copy()
        for n in range(N):
            if shown[i, n] and shown[i - 1, n]:
                p0 = tuple(np.round(history[i - 1, n]).astype(int))
                p1 = tuple(np.round(history[i, n]).astype(int))
                cv2.line(layer, p0, p1, tuple(int(c) for c in colors[n]), thickness, cv2.LINE_AA)
        out = cv2.addWeighted(layer, a, out, 1 - a, 0)
    for n in range(N):
        if not shown[-1, n]:
            continue
        p = tuple(np.round(history[-1, n]).astype(int))
        color = tuple(int(c) for c in colors[n])
        if visible is None or visible[n]:
            cv2.circle(out, p, radius, color, -1, cv2.LINE_AA)
            cv2.circle(out, p, radius, (0, 0, 0), thickness, cv2.LINE_AA)
        else:  # a ring in the point's colour, outlined in black so it reads on any background
            cv2.circle(out, p, radius + thickness, (0, 0, 0), thickness, cv2.LINE_AA)
            cv2.circle(out, p, radius, color, thickness, cv2.LINE_AA)
        if labels is not None:
            draw_label(out, labels[n], (p[0] + radius + 2, p[1] - radius), color)
    return out


def draw_label(img: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, ...]) -> None:
    """Small text at org (its bottom-left corner), in `color` over a black outline, drawn in place."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    cv2.putText(img, text, org, font, scale, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(img, text, org, font, scale, color, 1, cv2.LINE_AA)


def render_tracks(frames: Iterable[np.ndarray], tracks: np.ndarray, estimated: np.ndarray | None = None,
                  trail: int = 12, visibility: np.ndarray | None = None,
                  labels: list[str] | None = None, radius: int = 3, thickness: int = 1) -> Iterator[np.ndarray]:
    """Frames with coloured points and fading trails of `trail` frames; tracks (T,N,2) in frame pixels.

    visibility (T,N) draws the points of frames where it is False as hollow rings; labels (N) names the points;
    radius and thickness (lines, outlines) are in pixels.
    """
    colors = None
    for t, frame in enumerate(frames):
        if colors is None:
            colors = track_colors(tracks[0], frame.shape[:2])
        s = max(0, t - trail + 1)
        shown = None if estimated is None else estimated[s:t + 1]
        yield draw_frame(frame, tracks[s:t + 1], colors, shown, visible=None if visibility is None else visibility[t],
                         labels=labels, radius=radius, thickness=thickness)


def summary_image(frames: np.ndarray, trajs_g: np.ndarray, trajs_e: np.ndarray, max_points: int = 32) -> np.ndarray:
    """(H, 2W, 3) picture: the first frame with true trajectories (left) and estimated ones (right)."""
    frame = frames[0].astype(np.uint8)
    n = min(max_points, trajs_g.shape[1])
    colors = track_colors(trajs_g[0, :n], frame.shape[:2])
    left = draw_frame(frame, trajs_g[:, :n], colors)
    right = draw_frame(frame, trajs_e[:, :n], colors)
    return np.concatenate([left, right], 1)


def output_fps(fps: float | Fraction | None) -> Fraction:
    """The frame rate tracks.mp4 is written at: fps exactly (a float as the fraction it is), within 1..1000
    frames/s, 24 when unknown."""
    if fps is None or not np.isfinite(float(fps)) or fps <= 0:
        return Fraction(24)
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(MAX_RATE_DENOMINATOR)
    return min(Fraction(1000), max(Fraction(1), rate))


OUTPUT_NAMES = ("tracks.npz", "tracks.csv", "tracks.mp4")  # what write_outputs writes, in this order
# write_outputs writes in a private folder .tracks.tmp.<owner tag>.<random> (utils/procs.owned_tempdir); earlier
# versions wrote the files .tracks.tmp.<owner tag>.<npz|csv|mp4> beside the outputs
TEMP_OUTPUT_HEAD, TEMP_OUTPUT_TAIL = ".tracks.tmp", "npz|csv|mp4"


def remove_dead_temps(out_dir: Path) -> list[Path]:
    """Remove the temp outputs of writers killed outright (SIGKILL, the OOM killer) on this host and PID
    namespace, folders and files of earlier versions; returns them. Another host's or namespace's are left: their
    writers cannot be judged from here."""
    return remove_stale_tempdirs(TEMP_OUTPUT_HEAD, out_dir) + remove_dead_owned(out_dir, TEMP_OUTPUT_HEAD,
                                                                              TEMP_OUTPUT_TAIL, dirs=False)


def check_destinations(paths: Iterable[Path]) -> None:
    """OSError naming the first of `paths` that is a folder: an output renamed onto it fails, and the renames before
    it would already have replaced the others."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            raise IsADirectoryError(errno.EISDIR, f"{p} is a folder, not a file this writes", str(p))


def write_outputs(out_dir: Path, video: Path, queries: np.ndarray, tracks: np.ndarray, estimated: np.ndarray,
                  fps: float | Fraction | None, visibility: np.ndarray | None = None, numbers: bool = False,
                  on_frame: Callable[[int], None] | None = None, radius: int = 3, thickness: int = 1,
                  with_them: Iterable[tuple[Path, Path]] = (), on_installed: Callable[[], None] | None = None
                  ) -> list[Path]:
    """tracks.npz, tracks.csv and tracks.mp4 (points with fading trails) in out_dir (demo.py's and the web
    demo's outputs, docs/FORMATS.md).

    tracks.mp4 keeps the frame rate of the video it is drawn on exactly as its container gives it (`frame_rate`:
    30000/1001, not 30 or 29.97); fps is the rate for a video that gives none. With a model's visibility (T,N)
    the npz gets a `visibility` array, the csv a `visibility` column (0/1) and the video draws invisible points
    hollow; numbers=True writes each point's index beside it; on_frame(t) is called as each frame of the video
    is drawn (progress); radius and thickness size the points and trails. Each file is written under a temp name
    and the three are renamed into place only once all are complete, with a stop signal held until the last
    rename (and the (temp, final) renames `with_them`, the demo's synthetic video): an error or a signal mid-way
    leaves no partial file and no mix of new and old ones (and the temps are removed); on_installed() is called
    once all are in place, before a stop that arrived meanwhile is raised. A destination that is a folder is
    refused first (`check_destinations`)."""
    named = [out_dir / name for name in OUTPUT_NAMES]
    # the folder as the caller first found it (utils/paths.pinned_folder; demo.py pins --out_dir before tracking):
    # in a folder others may write to, another user could move it aside and put a link at its name meanwhile
    here = held_folder(out_dir)
    final = [here / name for name in OUTPUT_NAMES]
    check_destinations([*named, *(dest for _, dest in with_them)])
    with_them = [(tmp, here / dest.name if dest.parent == out_dir else dest) for tmp, dest in with_them]
    remove_dead_temps(here)
    # a private folder (mode 0700, a random name): in a folder others may write to, files of predictable names
    # could be links planted to make this program write over another file
    work = owned_tempdir(TEMP_OUTPUT_HEAD, here)
    # ffmpeg, another process, cannot open this process's /proc/self/fd paths: the private folder by its real
    # name (a folder swapped in on the way would lack it, and the writes would fail, not land elsewhere)
    npz, csv_path, mp4 = (Path(os.path.realpath(work)) / name for name in OUTPUT_NAMES)
    extra = {} if visibility is None else {"visibility": visibility}
    try:
        np.savez(npz, tracks=tracks, estimated=estimated, queries=queries, allow_pickle=False, **extra)
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "point", "x", "y", "estimated"] + ([] if visibility is None else ["visibility"]))
            for t in range(tracks.shape[0]):
                for n in range(tracks.shape[1]):
                    row = [t, n, f"{tracks[t, n, 0]:.3f}", f"{tracks[t, n, 1]:.3f}", int(estimated[t, n])]
                    w.writerow(row if visibility is None else row + [int(visibility[t, n])])

        def even(frame):  # yuv420p needs even sizes
            h, w = frame.shape[:2]
            return frame[: h - h % 2, : w - w % 2]

        labels = [str(n) for n in range(tracks.shape[1])] if numbers else None

        def drawn(frames):
            for t, f in enumerate(frames):
                if on_frame is not None:
                    on_frame(t)
                yield even(f)

        frames = drawn(render_tracks(iter_frames(video), tracks, estimated, visibility=visibility, labels=labels,
                                     radius=radius, thickness=thickness))
        write_mp4(mp4, frames, fps=output_fps(frame_rate(video) or fps))
        with held_stops():  # a stop between two renames would leave new and old outputs side by side
            for tmp, dest in [*zip((npz, csv_path, mp4), final, strict=True), *with_them]:
                os.replace(tmp, dest)
            if on_installed is not None:  # before a stop held meanwhile is raised: the outputs are complete
                on_installed()
    except OSError as e:  # named as the caller gave the folder: the descriptor's path goes with unpin below
        for attr in ("filename", "filename2"):
            if isinstance(getattr(e, attr), str):
                setattr(e, attr, str(unpinned(getattr(e, attr))))
        raise
    finally:
        remove_owned(work)
        unpin(out_dir)  # a descriptor per output folder: a server writing many would run out of them
    return named
