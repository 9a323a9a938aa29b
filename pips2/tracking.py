"""Tracking long videos with PIPs++ or LBM: windows, any-frame queries, backward tracking, grids, streaming.

Windowed tracking (docs/EVALUATION.md): zero-velocity initialisation; windows of S frames; the next window starts
at the previous one's last frame (one frame of overlap); the last window is shifted back to end at the
video's last frame; after each window every later frame is initialised with the window's last
estimate; the model's `feats` are carried to the next window as `feat_init`. One `WindowSchedule` drives
offline tracking and the streaming `PipsStreamTracker`. Queries on several frames make one pass each (forward
from their frame, and backward to frame 0 on request); all passes of a call run in one sweep through the
video sharing a `FeatureCache`, so each frame is encoded at most once per direction, and memory is bounded
by S frames of feature maps and the batch size.

LBM (nets/lbm.py) tracks online instead: `track` hands an LBM to `track_lbm`, which steps `LBMStreamTracker` (the
LBM `StreamTracker`, as `PipsStreamTracker` is PIPs++'s) one frame at a time; memory is one frame plus a fixed-size
memory per query, whatever the video's length.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypedDict, TypeGuard, runtime_checkable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pips2.nets.lbm import LBM, LBMOnlineState
from pips2.nets.pips2 import MIN_SIZE
from pips2.utils.amp import autocast
from pips2.utils.cli import parse_hw
from pips2.utils.procs import (
    is_space_error,
    owned_tempdir,
    release_freed_memory,
    remove_owned,
    remove_stale_tempdirs,
    reuse_freed_memory,
)
from pips2.utils.video import MIN_VIDEO_SIDE, VideoError, declared_frames, image_file_wh, iter_frames, read_rgb

# Bounds on what one tracking request may ask for (docs/BAD_INPUTS.md). Every point costs model time in every
# frame and a row per frame in tracks.csv, so the count is bounded (a 100x100 grid) rather than left to grow
# with a typo such as --grid_size=3000 (9 million points); library callers such as the evaluations pass
# max_points=None to check_queries.
MAX_POINTS = 10_000
MAX_IMAGE_SIDE = 4096  # --image_size: memory for S frames of feature maps grows with the area
# each refinement step is one more pass of the update network over every window: the authors evaluate with 16,
# and 100000 was accepted with an ETA of hours for 4 points
MAX_ITERS = 64
FAR_OUTSIDE = 4  # a query further outside the image than this many image widths (heights) is a mistake

# ---------------------------------------------------------------------------------------------------------
# Frame sources: random access to (start, end) windows of uint8 frames at the model's size.


class FrameSource:
    """Windows of frames at the model's input size; subclasses implement `_read(start, end)`."""

    def __init__(self, num_frames: int, src_hw: tuple[int, int], model_hw: tuple[int, int]):
        self.num_frames, self.src_hw, self.model_hw = num_frames, parse_hw(src_hw), parse_hw(model_hw)

    def __len__(self) -> int:
        return self.num_frames

    def get(self, start: int, end: int) -> np.ndarray:
        """Frames [start, end) as (n, H, W, 3) uint8 at the model size."""
        return self._read(start, end)

    def _read(self, start: int, end: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the source holds on disk (a decoded video's temp file); nothing for the others."""

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        h, w = self.model_hw
        if frames.shape[1:3] == (h, w):
            return frames
        return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in frames])


class ArrayFrames(FrameSource):
    """A (T,H,W,3) uint8 array in memory, resized window by window."""

    def __init__(self, video: np.ndarray, model_hw: tuple[int, int]):
        super().__init__(len(video), video.shape[1:3], model_hw)
        self.video = video

    def _read(self, start: int, end: int) -> np.ndarray:
        return self._resize(self.video[start:end])


class FileFrames(FrameSource):
    """Image files (e.g. a PointOdyssey scene's rgbs/), read and resized lazily per window."""

    def __init__(self, paths: list[Path], model_hw: tuple[int, int]):
        w, h = image_file_wh(paths[0])
        super().__init__(len(paths), (h, w), model_hw)
        self.paths = list(paths)

    def _read(self, start: int, end: int) -> np.ndarray:
        paths = self.paths[start:end]
        # every header of the window before any frame of it is decoded: a window of large frames behind a small
        # first one would be decoded whole (S frames of 8K: 3.6 GB at S=36) before its size was compared
        for p in paths:
            w, h = image_file_wh(p)
            if (h, w) != self.src_hw:  # the annotations' pixel coordinates would no longer fit
                raise VideoError(f"{p}: frame of {w}x{h}, the first frame is {self.src_hw[1]}x{self.src_hw[0]}")
        frames = np.empty((len(paths), *self.src_hw, 3), np.uint8)
        for i, p in enumerate(paths):
            f = read_rgb(p)
            if f.shape[:2] != self.src_hw:  # its header said otherwise
                raise VideoError(f"{p}: decodes to {f.shape[1]}x{f.shape[0]}, its header says "
                                 f"{self.src_hw[1]}x{self.src_hw[0]}")
            frames[i] = f
        return self._resize(frames)


FRAMES_PREFIX = "pips2_frames"  # temp folders of decoded videos: <prefix>.<host>.<pid>.<ns>.<random> in TMPDIR


def remove_stale_frame_dirs(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove the decoded-frame temp folders that processes of this host left when they were killed (SIGKILL, out
    of memory), which no handler can clean; returns them. A folder of a live process stays."""
    return remove_stale_tempdirs(FRAMES_PREFIX, tmp)


def _reserve(f, nbytes: int, video, folder: Path) -> None:
    """Give the frame file f nbytes of disk now, so that a full disk is one error here rather than SIGBUS when
    a mapped page is written."""
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if is_space_error(e):
            raise VideoError(f"{video}: no space in {folder.parent} for its decoded frames ({nbytes / 2**30:.2f} GB "
                             f"at the model's size so far); set TMPDIR to a folder on a larger disk") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(f.fileno(), nbytes)  # a file system without fallocate: the file grows sparse


# The decoded frames of a video may not fill the temp folder's disk: this much of it stays free for other programs
# (a training saving a checkpoint), a tenth of a disk smaller than 10 GiB
FREE_MARGIN = 2**30


def frames_room(folder: str | os.PathLike) -> tuple[int, int]:
    """(bytes the decoded frames may take in folder: its free space less the margin, that free space)."""
    du = shutil.disk_usage(folder)
    return max(0, du.free - min(FREE_MARGIN, du.total // 10)), du.free


def _no_room(video, need: int, folder, free: int, what: str) -> ValueError:
    return ValueError(f"{video}: {what} needs {need / 2**30:.2f} GB at the model's size, {folder} has "
                      f"{free / 2**30:.2f} GB free (less {FREE_MARGIN / 2**30:.0f} GB or a tenth of its disk kept for "
                      f"other programs); set TMPDIR or cut the video")


def check_frames_space(video, n_frames: int, model_hw: tuple[int, int], tmp: str | os.PathLike | None = None
                       ) -> None:
    """ValueError, before anything is decoded, when a video's n_frames at the model's size would not fit in the
    temp folder (TMPDIR) that VideoFileFrames decodes it into, its free space less a margin (`frames_room`)."""
    folder = Path(tmp or tempfile.gettempdir())
    need = n_frames * model_hw[0] * model_hw[1] * 3
    room, free = frames_room(folder)
    if need > room:
        raise _no_room(video, need, folder, free, f"decoding its {n_frames} frames")


class VideoFileFrames(FrameSource):
    """A video file decoded once, at the model size, into a memory-mapped temp file (bounded RAM).

    The file lives in a folder of TMPDIR named after this host and process; `close()` (which `track` calls for
    the sources it makes, on every way out, signals included) removes it, as does garbage collection and the
    end of the interpreter; folders of killed processes are removed by the next one (`remove_stale_frame_dirs`).
    Disk is reserved as the file grows: a full disk is one VideoError line. The frames must fit in TMPDIR's free
    space less a margin (`check_frames_space`): checked before decoding when the frame count is given or an mp4
    header declares it, and again each time the file grows (ValueError), so it never takes the disk's last GB.
    """

    def __init__(self, path: str | os.PathLike, model_hw: tuple[int, int] | None = None,
                 n_frames: int | None = None):
        n_frames = n_frames or declared_frames(path)
        frames = iter_frames(path)
        first = next(frames, None)
        if first is None:
            raise VideoError(f"{path}: no decodable frames")
        src_hw = first.shape[:2]
        try:
            model_hw = model_hw or default_model_hw(src_hw, str(path))
        except ValueError:
            frames.close()
            raise
        super().__init__(0, src_hw, model_hw)
        remove_stale_frame_dirs()
        if n_frames:
            try:
                check_frames_space(path, n_frames, model_hw)
            except ValueError:
                frames.close()
                raise
        self.store = None
        self.dir = owned_tempdir(FRAMES_PREFIX)
        self._cleanup = weakref.finalize(self, remove_owned, str(self.dir))
        try:
            self._decode(path, _chain(first, frames), n_frames or 0)
        except BaseException:  # an error or a signal mid-way: no temp file left behind
            frames.close()
            self.close()
            raise

    def _decode(self, path, frames, expected: int) -> None:
        h, w = self.model_hw
        frame_bytes = h * w * 3
        file = self.dir / "frames.u8"
        n, cap = 0, 0
        with open(file, "w+b") as f:
            for frame in frames:
                if n == cap:  # grow the file geometrically, in place (nothing copied), within the room left
                    want = expected if cap == 0 and expected else max(64, cap * 2)
                    room, free = frames_room(self.dir)  # the file's own reservation is no longer free
                    cap = min(want, cap + room // frame_bytes)
                    if cap == n:
                        raise _no_room(path, (n + 1) * frame_bytes, self.dir.parent, free + n * frame_bytes,
                                       f"decoding more than {n} frames")
                    self.store = None
                    _reserve(f, cap * frame_bytes, path, self.dir)
                    self.store = np.memmap(f, np.uint8, "r+", shape=(cap, h, w, 3))
                assert self.store is not None  # mapped above when n reached cap (n == cap == 0 at first)
                self.store[n] = self._resize(frame[None])[0]
                n += 1
            self.store = None
            f.truncate(n * frame_bytes)
        self.store = np.memmap(file, np.uint8, "r", shape=(n, h, w, 3))
        self.num_frames = n

    def _read(self, start: int, end: int) -> np.ndarray:
        if self.store is None:
            raise ValueError("frames read from a closed frame source (its decoded frames are removed)")
        return np.array(self.store[start:end])  # a copy: the mapping is read-only, and the file may go (close)

    def close(self) -> None:
        """Remove the temp file of decoded frames; the source cannot be read afterwards."""
        self.store = None
        self._cleanup()


def _chain(first, rest):
    yield first
    yield from rest


def default_model_hw(src_hw: tuple[int, int], source: str = "video") -> tuple[int, int]:
    """The video's size rounded to multiples of 8 and at least 128 (the smallest the model accepts); ValueError
    for a side beyond MAX_IMAGE_SIDE (S frames of feature maps at that size would not fit in memory), naming
    model_hw (the scripts' --image_size) as the way to track it."""
    h, w = (max(MIN_SIZE, int(round(v / 8)) * 8) for v in src_hw)
    model_hw = (h, w)
    if max(model_hw) > MAX_IMAGE_SIDE:
        raise ValueError(f"{source}: the video is {src_hw[1]}x{src_hw[0]}, beyond the {MAX_IMAGE_SIDE} pixels a side "
                         f"that it is tracked at by default; give a size to track it at (model_hw, the scripts' "
                         f"--image_size=H,W) of at most {MAX_IMAGE_SIDE} a side")
    return model_hw


def as_frame_source(video, model_hw: tuple[int, int] | None = None) -> FrameSource:
    """A FrameSource from an array (T,H,W,3) uint8, a video path, or a FrameSource."""
    if isinstance(video, FrameSource):
        return video
    if isinstance(video, (str, os.PathLike)):
        return VideoFileFrames(video, model_hw)
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be a (T,H,W,3) uint8 array, got {video.dtype} {video.shape}")
    return ArrayFrames(video, model_hw or default_model_hw(video.shape[1:3]))


# ---------------------------------------------------------------------------------------------------------
# Windowed tracking: one window schedule, one feature cache, every pass of a call run in one sweep.

ENCODE_CHUNK = 16  # frames per encoder call when a window is filled: bounds the transient copy of new maps


class WindowSchedule:
    """Windows of S frames: each starts on the previous one's last frame (one frame of overlap) and the last
    is shifted back to end at the video's last frame. Offline tracking and the streaming tracker both follow it."""

    def __init__(self, S: int):
        if S < 2:
            raise ValueError(f"S must be at least 2 (windows overlap by one frame), got {S}")
        self.S = S

    def next_start(self, start: int) -> int:
        """Start of the window after the full window starting at `start`."""
        return start + self.S - 1

    def last(self, T: int) -> tuple[int, int]:
        """The last window of a T-frame video (the whole video when T <= S)."""
        return max(0, T - self.S), T

    def windows(self, T: int) -> list[tuple[int, int]]:
        """(start, end) of every window of a T-frame video, in order."""
        out, start = [], 0
        while start + self.S < T:
            out.append((start, start + self.S))
            start = self.next_start(start)
        return out + [self.last(T)]


def window_starts(T: int, S: int) -> list[tuple[int, int]]:
    """(start, end) of each window: S frames, one frame of overlap, the last shifted back to end at T."""
    return WindowSchedule(S).windows(T)


def _to_input(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float().unsqueeze(0)


def _pieces(frames: list[int], chunk: int) -> list[list[int]]:
    """Sorted frame numbers as runs of consecutive frames cut into pieces of at most `chunk` (>= 3) frames;
    a run of two or more frames is never cut so as to leave a piece of one."""
    runs: list[list[int]] = []
    for f in frames:
        if runs and runs[-1][-1] + 1 == f:
            runs[-1].append(f)
        else:
            runs.append([f])
    out = []
    for run in runs:
        k = 0
        while k < len(run):
            n = min(chunk, len(run) - k)
            if len(run) - k - n == 1:
                n -= 1  # two frames for the last piece, not one
            out.append(run[k:k + n])
            k += n
    return out


class FeatureCache:
    """Feature maps of single frames for one tracking call: a frame is encoded the first time a window asks
    for it (or earlier, when told to prefetch it) and kept only while a later window still needs it.

    The encoder works frame by frame (instance norm per frame), so a frame's maps do not depend on the window
    or on the direction of time it is seen in; a reversed window is the same maps in reverse order. To the
    bit, though, a call with a single frame differs (by ~1e-5) from the same frame in a call of several: the
    reshaped one-frame input has strides that make the convolutions pick another kernel. Frames are
    therefore encoded two or more at a time; callers prefetch to avoid lone frames, and a lone frame that
    remains is encoded beside a copy of itself.
    """

    def __init__(self, model, read, amp: str | None = None, on_encode: Callable[[int], None] | None = None):
        self.model, self.read, self.amp, self.on_encode = model, read, amp, on_encode
        self.device = next(model.parameters()).device
        self.maps: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def _encode(self, piece: list[int]) -> torch.Tensor:
        """Maps (n,H/8,W/8,C) of consecutive frames."""
        rgbs = self.read(piece[0], piece[-1] + 1)
        if len(rgbs) == 1:
            rgbs = np.concatenate([rgbs, rgbs])
        with autocast(self.device.type, self.amp):
            maps = self.model.encode_nhwc(_to_input(rgbs, self.device))[0, :len(piece)]
        if self.on_encode is not None:
            self.on_encode(len(piece))
        return maps

    @torch.inference_mode()
    def window(self, frames: list[int], keep, prefetch: Iterable[int] = ()) -> torch.Tensor:
        """Maps (1,n,H/8,W/8,C) of the frames numbered `frames` (any order); keep(f) says whether frame f's maps
        are still needed after this window; `prefetch` frames, outside the window, are encoded now and kept."""
        pos = {f: i for i, f in enumerate(frames)}
        todo = sorted({f for f in frames if f not in self.maps} | set(prefetch))
        out, placed = None, set()
        for piece in _pieces(todo, ENCODE_CHUNK):
            enc = self._encode(piece)
            if out is None:
                out = enc.new_empty((1, len(frames), *enc.shape[1:]))
            for j, f in enumerate(piece):
                if f in pos:
                    out[0, pos[f]] = enc[j]
                    placed.add(f)
                if f not in pos or keep(f):
                    self.maps[f] = enc[j].clone()  # a copy: the piece's other maps can be freed
        for f in frames:
            if f not in placed:
                m = self.maps[f] if keep(f) else self.maps.pop(f)
                if out is None:
                    out = m.new_empty((1, len(frames), *m.shape))
                out[0, pos[f]] = m
        assert out is not None, "a window of no frames"
        return out


# ---------------------------------------------------------------------------------------------------------
# Progress: one bar per pass, over work counted before the pass starts.

ProgressArg = bool | Callable[[str, int, int], None]


def iteration_module(model) -> torch.nn.Module | None:
    """The layer a PIPs++ runs once per iteration of its forward pass (the delta block's last, called in every
    execution form of nets/fast.py), or None for a model without one: hooked to show iterations as they end."""
    layer = getattr(getattr(model, "delta_block", None), "dense", None)
    return layer if isinstance(layer, torch.nn.Module) else None


class PassProgress:
    """The progress of one tracking pass, named by `label` ("forward" or "backward"), over `total` steps
    counted before it starts: a tqdm bar on stderr for progress=True, calls progress(label, done, total) for a
    callable (e.g. a web page's bar), nothing for False.

    A step is one frame encoded or one iteration of one batch of points over one window for PIPs++ (a window
    of one frame, which the model does not run, is one step), one frame for LBM. `close()` after the pass has
    run fills what is left, so a bar always ends at its total; a pass stopped by an error or a signal keeps
    the count it reached."""

    def __init__(self, label: str, total: int, progress: ProgressArg = False, unit: str = "step"):
        self.label, self.total, self.done = label, max(0, int(total)), 0
        self.callback = progress if callable(progress) else None
        self.bar = (tqdm(total=self.total, desc=label, unit=unit, leave=True, dynamic_ncols=True)
                    if progress and self.callback is None else None)

    @property
    def active(self) -> bool:
        """Whether anything shows the progress (work done only to report it can be skipped otherwise)."""
        return self.bar is not None or self.callback is not None

    def advance(self, n: int = 1) -> None:
        """n more steps done (never beyond the total)."""
        n = min(int(n), self.total - self.done)
        if n <= 0:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.label, self.done, self.total)

    def note(self, text: str) -> None:
        """What the pass is doing now, shown after the bar (e.g. "window 2/3: iteration 5/16")."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    @contextmanager
    def model_call(self, model, iters: int, where: str) -> Iterator[None]:
        """Around one PIPs++ call of `iters` iterations: a step as each iteration ends (a forward hook on
        `iteration_module`, for calls of this thread only: a model may be shared), and the call's remaining
        steps once it returns, whatever the hook saw."""
        layer = iteration_module(model) if self.active else None
        seen, me = 0, threading.get_ident()

        def hook(*_) -> None:
            nonlocal seen
            if threading.get_ident() == me and seen < iters:
                seen += 1
                self.note(f"{where}: iteration {seen}/{iters}")
                self.advance(1)

        handle = layer.register_forward_hook(hook) if layer is not None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
        self.advance(iters - seen)

    def close(self, finished: bool = True) -> None:
        """End the bar: at its total if the pass finished, where it stopped otherwise."""
        if finished:
            self.advance(self.total - self.done)
        if self.bar is not None:
            self.bar.close()


@contextmanager
def pass_progress(label: str, total: int, progress: ProgressArg, unit: str = "step") -> Iterator[PassProgress]:
    """A PassProgress closed on the way out: at its total when the pass ran to its end."""
    p = PassProgress(label, total, progress, unit)
    try:
        yield p
    except BaseException:
        p.close(finished=False)
        raise
    p.close()


@torch.inference_mode()
def _run_points(model, fmaps: torch.Tensor, init: torch.Tensor, feats: list | None, iters: int, point_batch: int,
                amp: str | None, progress: PassProgress | None = None, where: str = "") -> tuple[torch.Tensor, list]:
    """The model over one window's maps, points in batches of `point_batch`, each with its own carried feats;
    `progress` advances by one step per iteration of each batch (`where` names the window in its note)."""
    N = init.shape[1]
    out = init.detach().float().cpu().clone()
    batches = (N + point_batch - 1) // point_batch
    feats = list(feats) if feats is not None else [None] * batches
    with autocast(fmaps.device.type, amp):
        for b, p0 in enumerate(range(0, N, point_batch)):
            seq = out[:, p0:p0 + point_batch].to(fmaps.device).unsqueeze(0)
            if progress is None:
                preds, _, feats[b], _ = model(seq, None, iters=iters, feat_init=feats[b], fmaps=fmaps)
            else:
                at = f"{where}, points {p0 + 1}-{min(N, p0 + point_batch)} of {N}" if batches > 1 else where
                with progress.model_call(model, iters, at):
                    preds, _, feats[b], _ = model(seq, None, iters=iters, feat_init=feats[b], fmaps=fmaps)
            out[:, p0:p0 + point_batch] = preds[-1][0].float().cpu()
    return out, feats


@torch.inference_mode()
def run_window(model, frames: np.ndarray, init: torch.Tensor, feats: list | None, iters: int = 16,
               point_batch: int = 256, amp: str | None = None) -> tuple[torch.Tensor, list]:
    """One window: frames (n,H,W,3) uint8 at model size, init (n,N,2) -> estimates (n,N,2) and feats per batch.

    The window is encoded once; points go through the model in batches of `point_batch`, each with its own
    carried feat_init. A one-frame window is its initialisation: the model is not called (it needs motion
    between at least two frames), and the carried feats pass through unchanged.
    """
    if feats is None:
        feats = [None] * ((init.shape[1] + point_batch - 1) // point_batch)
    if len(frames) < 2:
        return init.detach().float().cpu().clone(), list(feats)
    cache = FeatureCache(model, lambda a, b: frames[a:b], amp)
    fmaps = cache.window(list(range(len(frames))), keep=lambda f: False)
    return _run_points(model, fmaps, init, feats, iters, point_batch, amp)


class _Pass:
    """One group of points tracked through `frames` (video frame numbers in this pass's order of time)."""

    def __init__(self, frames: list[int], trajs_init: torch.Tensor, S: int):
        self.frames, self.windows = frames, window_starts(len(frames), S)
        self.trajs = trajs_init.detach().float().cpu().clone()
        self.feats: list | None = None  # per batch of points, carried from window to window (_run_points)


def _prefetch_plan(passes: list[_Pass], order: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Frames to encode early, by position in `order`: a window that would encode a single new frame gets it
    encoded by the last window before it that encodes new frames (see FeatureCache: no lone frames)."""
    plan: dict[int, list[int]] = {}
    seen: set[int] = set()
    last = None
    for j, (i, k) in enumerate(order):
        p = passes[i]
        s, e = p.windows[k]
        if e - s < 2:
            continue
        new = [f for f in p.frames[s:e] if f not in seen]
        if len(new) == 1 and last is not None:
            plan.setdefault(last, []).extend(new)
        elif new:
            last = j
        seen.update(new)
    return plan


def sweep_steps(passes: list[_Pass], iters: int, point_batch: int) -> int:
    """The steps of a sweep's progress (`PassProgress`): each frame a window of two or more frames needs, encoded
    once; iters per batch of points per such window; one per window of one frame."""
    frames: set[int] = set()
    steps = 0
    for p in passes:
        batches = (p.trajs.shape[1] + point_batch - 1) // point_batch
        for s, e in p.windows:
            if e - s >= 2:
                frames.update(p.frames[s:e])
                steps += iters * batches
            else:
                steps += 1
    return len(frames) + steps


def _sweep(model, read, passes: list[_Pass], iters: int, point_batch: int, amp: str | None,
           progress: ProgressArg = False, backward: bool = False) -> None:
    """Run the windows of every pass in one sweep through time, all passes going the same way.

    Windows run in the order of the video frame they start on, so each pass's windows run in its own order,
    every frame is encoded once, and the cache holds the maps of fewer than S frames (those that a window
    already run shares with one still to run) plus any prefetched ones. The sweep's progress is one bar named
    after its direction, over `sweep_steps`.
    """
    reuse_freed_memory()  # frame after frame the encoder frees and allocates the same large maps
    sign = -1 if backward else 1
    order = [(i, k) for _, i, k in sorted((sign * p.frames[s], i, k) for i, p in enumerate(passes)
                                          for k, (s, _) in enumerate(p.windows))]
    need = Counter()  # windows still to run that use each frame
    for p in passes:
        for s, e in p.windows:
            if e - s >= 2:  # a one-frame window does not call the model
                need.update(p.frames[s:e])
    if not passes:
        return
    plan = _prefetch_plan(passes, order)
    with pass_progress("backward" if backward else "forward", sweep_steps(passes, iters, point_batch),
                       progress) as bar:
        cache = FeatureCache(model, read, amp, on_encode=bar.advance)
        for j, (i, k) in enumerate(order):
            p = passes[i]
            s, e = p.windows[k]
            where = f"window {j + 1}/{len(order)}"
            if e - s >= 2:
                frames = p.frames[s:e]
                need.subtract(frames)
                bar.note(f"{where}: encoding frames")
                fmaps = cache.window(frames, keep=lambda f: need[f] > 0, prefetch=plan.get(j, []))
                est, p.feats = _run_points(model, fmaps, p.trajs[s:e], p.feats, iters, point_batch, amp, bar, where)
                del fmaps
            else:  # a one-frame window is its initialisation; the carried feats pass through unchanged
                est = p.trajs[s:e].clone()
                bar.advance(1)
            p.trajs[s:e] = est
            p.trajs[e:] = est[-1]  # zero-velocity future from the window's last estimate


def track_windows(model, frames: FrameSource, trajs_init: torch.Tensor, S: int = 128, iters: int = 16,
                  point_batch: int = 256, amp: str | None = None, progress: ProgressArg = False) -> torch.Tensor:
    """Track (T,N,2) model-pixel initial estimates (frame 0 = queries) through the whole source; progress as
    `track`'s."""
    T = trajs_init.shape[0]
    if len(frames) != T:
        raise ValueError(f"{len(frames)} frames but trajs_init covers {T}")
    p = _Pass(list(range(T)), trajs_init, S)
    try:
        _sweep(model, frames.get, [p], iters, point_batch, amp, progress)
    finally:
        release_freed_memory()
    return p.trajs


# ---------------------------------------------------------------------------------------------------------
# The user-facing API.


def scale_xy(xy: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Map pixel coordinates between image sizes with pixel-centre alignment (as cv2.resize)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    s = torch.tensor([sx, sy], dtype=xy.dtype)
    return (xy + 0.5) * s - 0.5


def grid_queries(src_hw: tuple[int, int], grid_size: int = 16, t: int = 0, mask: np.ndarray | None = None,
                 margin: float = 0.05) -> np.ndarray:
    """(N,3) queries (t, x, y) on a grid_size x grid_size grid, kept where `mask` (H,W) is nonzero; grid_size is
    1 to sqrt(MAX_POINTS) (`check_grid_size`)."""
    grid_size = check_grid_size(grid_size)
    H, W = src_hw
    xs = np.linspace(margin * (W - 1), (1 - margin) * (W - 1), grid_size)
    ys = np.linspace(margin * (H - 1), (1 - margin) * (H - 1), grid_size)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    if mask is not None:
        if mask.shape[:2] != (H, W):
            raise ValueError(f"mask is {mask.shape[:2]}, video is {H}x{W}")
        keep = mask[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)] > 0
        pts = pts[keep]
    return np.concatenate([np.full((len(pts), 1), t, np.float64), pts], 1).astype(np.float32)


def check_grid_size(grid_size, flag: str = "") -> int:
    """grid_size as an int from 1 to sqrt(MAX_POINTS); ValueError naming it (with `flag`, e.g. "--") otherwise,
    before a grid of millions of points is built."""
    side = int(MAX_POINTS ** 0.5)
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or not 1 <= grid_size <= side:
        raise ValueError(f"{flag}grid_size must be a whole number from 1 to {side} (at most {MAX_POINTS} points are "
                         f"tracked at once), got {grid_size!r}")
    return int(grid_size)


def check_track_args(S: int = 128, iters: int = 16, point_batch: int = 256, model_hw=None, flag: str = "",
                     lbm: bool = False) -> tuple[int, int, int, tuple[int, int] | None]:
    """(S, iters, point_batch, model_hw) checked: S >= 2 (windows overlap by one frame), 1 <= iters <= MAX_ITERS (0
    would return every query as its track), point_batch >= 1, model_hw None or H,W each from MIN_SIZE (PIPs++'s
    smallest input; for an LBM, which resizes frames to its own size, MIN_VIDEO_SIDE) to MAX_IMAGE_SIDE.
    ValueError naming the parameter otherwise; with `flag` (e.g. "--"), the script's flag, whose name for
    model_hw is image_size."""
    def whole(name, v, low):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{flag}{name} must be a whole number, got {v!r}")
        if v < low:
            why = {"S": " (windows overlap by one frame)", "iters": " (0 would return every query as its track)"}
            raise ValueError(f"{flag}{name} must be at least {low}{why.get(name, '')}, got {v}")
        return int(v)

    S, iters, point_batch = whole("S", S, 2), whole("iters", iters, 1), whole("point_batch", point_batch, 1)
    if iters > MAX_ITERS:
        raise ValueError(f"{flag}iters must be at most {MAX_ITERS} (each step is one more pass of the update "
                         f"network; the authors evaluate with 16), got {iters}")
    if model_hw is not None:
        name = f"{flag}image_size" if flag else "model_hw"
        parts = model_hw.split(",") if isinstance(model_hw, str) else model_hw
        try:
            h, w = (int(v) for v in parts)
            if any(float(v) != int(v) for v in parts):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be H,W (two whole numbers), got {model_hw!r}") from None
        low, why = (MIN_VIDEO_SIDE, "") if lbm else (MIN_SIZE, " (the smallest PIPs++ accepts)")
        if not (low <= h <= MAX_IMAGE_SIDE and low <= w <= MAX_IMAGE_SIDE):
            raise ValueError(f"{name} must be H,W each from {low}{why} to {MAX_IMAGE_SIDE}, got {h},{w}")
        model_hw = (h, w)
    return S, iters, point_batch, model_hw


def check_video_size(src_hw: tuple[int, int], source: str = "video") -> None:
    """ValueError unless both sides of a video are at least MIN_VIDEO_SIDE pixels."""
    H, W = src_hw
    if H < MIN_VIDEO_SIDE or W < MIN_VIDEO_SIDE:
        raise ValueError(f"{source}: the video is {W}x{H}; tracking needs at least {MIN_VIDEO_SIDE}x{MIN_VIDEO_SIDE} "
                         f"pixels")


def check_queries(queries, T: int, src_hw: tuple[int, int], source: str = "queries", rows: list[int] | None = None,
                  warn: Callable[[str], None] | None = None, max_points: int | None = MAX_POINTS) -> np.ndarray:
    """Queries as (N,3) float32 rows of (t, x, y); ValueError naming the first bad row (or the count, beyond
    max_points), a warning for points outside the image (they are tracked, but the model sees nothing there);
    points more than FAR_OUTSIDE image widths (heights) outside it are refused.

    source, rows: how messages name the queries and each row (demo.py: the CSV file and its line numbers);
    warn: where the off-image warning goes (default: warnings.warn)."""
    q = np.asarray(queries, np.float32)
    if q.ndim == 1 and q.size == 3:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"{source}: expected (N,3) rows of (t, x, y), got shape {tuple(q.shape)}")
    if len(q) == 0:
        raise ValueError(f"{source}: no queries")
    if max_points is not None and len(q) > max_points:
        raise ValueError(f"{source}: {len(q)} points; at most {max_points} are tracked at once (split them into "
                         f"several runs)")
    where = lambda i: f"{source}: row {rows[i] if rows is not None else i}"  # noqa: E731
    # float32 overflow (1e39) is non-finite too: it is what the model would see
    bad = np.nonzero(~np.isfinite(q[:, 0]))[0]
    if len(bad):
        raise ValueError(f"{where(bad[0])}: non-finite query frame ({_given_row(queries, bad[0])[0]})")
    bad = np.nonzero(~np.isfinite(q[:, 1:]).all(1))[0]
    if len(bad):
        raise ValueError(f"{where(bad[0])}: non-finite point {_given_row(queries, bad[0])[1:]}")
    t = q[:, 0]
    bad = np.nonzero(t != np.round(t))[0]
    if len(bad):
        raise ValueError(f"{where(bad[0])}: query frame {t[bad[0]]:g} is not a whole frame number")
    bad = np.nonzero((t < 0) | (t > T - 1))[0]
    if len(bad):
        raise ValueError(f"{where(bad[0])}: query frame {t[bad[0]]:g} is outside the video's frames 0..{T - 1}")
    H, W = src_hw
    far = np.nonzero((np.abs(q[:, 1] - (W - 1) / 2) > (FAR_OUTSIDE + 0.5) * W)
                     | (np.abs(q[:, 2] - (H - 1) / 2) > (FAR_OUTSIDE + 0.5) * H))[0]
    if len(far):
        i = far[0]
        raise ValueError(f"{where(i)}: point x={q[i, 1]:g}, y={q[i, 2]:g} lies more than {FAR_OUTSIDE} image "
                         f"{'widths' if abs(q[i, 1] - (W - 1) / 2) > (FAR_OUTSIDE + 0.5) * W else 'heights'} outside "
                         f"the {W}x{H} image")
    out = np.nonzero((q[:, 1] < 0) | (q[:, 1] > W - 1) | (q[:, 2] < 0) | (q[:, 2] > H - 1))[0]
    if len(out):
        i = out[0]
        msg = (f"{where(i)}: {len(out)} of {len(q)} points lie outside the {W}x{H} image (first: x={q[i, 1]:g}, "
               f"y={q[i, 2]:g}); tracking them anyway")
        (warn or _warn_caller)(msg)
    return q


def _warn_caller(msg: str) -> None:
    """warnings.warn attributed to the first caller outside this module, whichever way led here."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, stacklevel=level)


def _given_row(queries, i: int) -> list[float]:
    """Row i of the queries as given (before float32), for messages."""
    return [float(v) for v in np.asarray(queries, np.float64)[i]]


class TrackResult(TypedDict):
    """What `track` returns (arrays over T frames and N points, in video pixels)."""

    tracks: np.ndarray  # (T,N,2) float32
    estimated: np.ndarray  # (T,N) bool: the frames that were estimated
    visibility: np.ndarray | None  # (T,N) bool from a model that predicts it (LBM), else None


def resolve_model_hw(model, src_hw: tuple[int, int], model_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The model_hw `track` runs the model at for a video file of src_hw: PIPs++ at model_hw if given, else the
    video's size rounded to multiples of 8 (`default_model_hw`); an LBM at its input_hw, to which it resizes
    every frame whatever it is given. The size the time per frame grows with."""
    if is_lbm(model):
        return parse_hw(model.input_hw)
    return parse_hw(model_hw) if model_hw is not None else default_model_hw(parse_hw(src_hw))


def track(model, video, queries, S: int = 128, iters: int = 16, backward: bool = False,
          model_hw: tuple[int, int] | None = None, point_batch: int = 256, amp: str | None = None,
          progress: ProgressArg = False) -> TrackResult:
    """Track queries (N,3) rows of (t, x, y) in video pixels through a video (array or path).

    Tracks forward from each query's frame (and backward to frame 0 with backward=True); the queries of one
    frame form a group, and all groups share one encoding of each frame per direction. Returns
    {"tracks": (T,N,2) float32 in video pixels, "estimated": (T,N) bool of the frames that were estimated,
    "visibility": (T,N) bool for a model that predicts it (LBM, see `track_lbm`; S, iters and point_batch
    are PIPs++'s and do not apply), else None}.

    The parameters are checked before any frame is decoded (`check_track_args`), the video's size and the
    queries before the model runs; a video file is decoded into a temp file that is removed on every way out.
    Estimates that are not finite (a model with damaged weights) raise ValueError rather than being returned.

    progress: True shows a bar on stderr for each pass ("forward", then "backward"), False nothing, and a
    callable is called as progress(pass, done, total) as the work advances. Its total is counted before the pass
    starts (`PassProgress`: frames encoded and iterations per batch of points per window for PIPs++, frames
    for LBM), so it moves within a window and ends at the total.
    """
    S, iters, point_batch, model_hw = check_track_args(S, iters, point_batch, model_hw, lbm=is_lbm(model))
    if is_lbm(model):
        if amp is not None:
            raise ValueError(f"amp={amp!r}: LBM tracking runs in the model's own precision")
        return track_lbm(model, video, queries, backward=backward, model_hw=model_hw, progress=progress)
    try:
        with _frame_source(video, model_hw) as src:
            res = _track_pips(model, src, queries, S, iters, backward, point_batch, amp, progress)
    finally:
        release_freed_memory()
    return _finite(res)


class _frame_source:
    """`as_frame_source` as a context: a source made here from a path is closed (its temp file removed) on the
    way out, whatever the way; a FrameSource given by the caller stays the caller's."""

    def __init__(self, video, model_hw: tuple[int, int] | None):
        self.video, self.model_hw, self.src = video, model_hw, None

    def __enter__(self) -> FrameSource:
        self.src = as_frame_source(self.video, self.model_hw)
        check_video_size(self.src.src_hw, str(self.video) if isinstance(self.video, (str, os.PathLike)) else "video")
        return self.src

    def __exit__(self, *exc) -> None:
        if self.src is not None and self.src is not self.video:
            self.src.close()


def _finite(res: TrackResult) -> TrackResult:
    """res unless some estimated track is not finite (NaN or inf: the model's weights are damaged)."""
    bad = ~np.isfinite(res["tracks"]).all(-1) & res["estimated"]
    if bad.any():
        n = int(bad.any(0).sum())
        raise ValueError(f"the model's estimates are not finite (NaN or inf) for {n} of {bad.shape[1]} points: its "
                         f"weights are probably damaged")
    return res


def _track_pips(model, src: FrameSource, queries, S: int, iters: int, backward: bool, point_batch: int,
                amp: str | None, progress: ProgressArg) -> TrackResult:
    """`track` for PIPs++ on an open frame source."""
    T = len(src)
    q = check_queries(queries, T, src.src_hw, max_points=None)
    qt = q[:, 0].round().astype(int)
    model_xy = scale_xy(torch.from_numpy(q[:, 1:]), src.src_hw, src.model_hw)
    tracks = torch.zeros(T, len(q), 2)
    estimated = np.zeros((T, len(q)), bool)
    groups = [(t0, torch.from_numpy(np.nonzero(qt == t0)[0])) for t0 in np.unique(qt).tolist()]
    # all forward passes in one sweep, then all backward ones: each frame is encoded at most once per direction
    for back in (False, True) if backward else (False,):
        runs = []
        for t0, sel in groups:
            if back and t0 == 0:
                continue
            frames = list(range(t0, -1, -1)) if back else list(range(t0, T))
            runs.append((sel, _Pass(frames, model_xy[sel].unsqueeze(0).repeat(len(frames), 1, 1), S)))
        _sweep(model, src.get, [p for _, p in runs], iters, point_batch, amp, progress, backward=back)
        for sel, p in runs:
            times = torch.tensor(p.frames)
            tracks[times[:, None], sel[None, :]] = p.trajs
            estimated[times.numpy()[:, None], sel.numpy()[None, :]] = True
    tracks = scale_xy(tracks, src.model_hw, src.src_hw)
    return {"tracks": tracks.numpy().astype(np.float32), "estimated": estimated, "visibility": None}


# ---------------------------------------------------------------------------------------------------------
# Streaming: a stream tracker takes a video one frame at a time, PIPs++'s in windows, LBM's frame by frame.


@runtime_checkable
class StreamTracker(Protocol):
    """A tracker fed a video one frame at a time, for either model: `PipsStreamTracker` (PIPs++, estimates come
    back as each S-frame window fills) and `LBMStreamTracker` (LBM, each frame's estimate at once, with
    visibility; its `push` also takes queries to add and to drop)."""

    def push(self, frame: np.ndarray) -> list[tuple]:
        """Add the next frame (H,W,3) uint8; returns the estimates now final, [(t, (N,2) source px, ...)]."""
        ...

    def finish(self) -> list[tuple]:
        """End of stream: the estimates still open, in push's form (they replace earlier ones)."""
        ...


class PipsStreamTracker:
    """PIPs++'s `StreamTracker`: push frames one at a time; estimates come back as each S-frame window fills
    (lag < S frames).

    Holds at most S frames however long the stream. Windows follow the offline `WindowSchedule`: a full
    window is tracked as soon as its last frame arrives, and `finish()` runs the last window shifted back
    to end at the final frame, returning the estimates it (re)makes; applying them over the pushed ones
    gives exactly the offline result for queries at frame 0. Only the overlap frame's features are kept
    between full windows; the last window is encoded whole, re-encoding the frames it reaches back to,
    because keeping their maps (128 channels at 1/8 size, ~2.7x a uint8 frame) would hold S frames of maps
    all stream long.
    """

    def __init__(self, model, queries_xy: np.ndarray, src_hw: tuple[int, int], S: int = 128, iters: int = 16,
                 model_hw: tuple[int, int] | None = None, point_batch: int = 256, amp: str | None = None):
        S, iters, point_batch, model_hw = check_track_args(S, iters, point_batch, model_hw)
        self.schedule = WindowSchedule(S)
        self.model, self.S, self.iters, self.point_batch, self.amp = model, S, iters, point_batch, amp
        self.src_hw = parse_hw(src_hw)
        self.model_hw = parse_hw(model_hw or default_model_hw(src_hw))
        xy = torch.as_tensor(np.asarray(queries_xy, np.float32).reshape(-1, 2))
        self.last = scale_xy(xy, self.src_hw, self.model_hw)  # estimate at the open window's first frame
        self.frames: deque[np.ndarray] = deque(maxlen=S)
        self.est: deque[torch.Tensor | None] = deque(maxlen=S)
        self.count = 0
        self.win_start = 0
        self.feats = None
        self.cache = FeatureCache(model, self._read, amp)

    def _read(self, start: int, end: int) -> np.ndarray:
        """Frames [start, end) of the stream, from the ones held."""
        first = self.count - len(self.frames)
        return np.stack([self.frames[t - first] for t in range(start, end)])

    def _run(self, start: int, end: int, init: torch.Tensor, feats: list | None, keep_from: int):
        """Window [start, end) of the stream from `init`; maps of frames >= keep_from stay cached."""
        if end - start < 2:
            return init.clone(), feats
        fmaps = self.cache.window(list(range(start, end)), keep=lambda t: t >= keep_from)
        return _run_points(self.model, fmaps, init, feats, self.iters, self.point_batch, self.amp)

    def _out(self, xy: torch.Tensor) -> np.ndarray:
        return scale_xy(xy, self.model_hw, self.src_hw).numpy()

    def push(self, frame: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add the next frame (H,W,3) uint8; returns [(t, (N,2) estimate in source pixels), ...] now final."""
        h, w = self.model_hw
        if frame.shape[:2] != (h, w):
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
        self.frames.append(frame)
        self.est.append(None)
        self.count += 1
        if self.count - self.win_start < self.S:
            return []
        nxt = self.schedule.next_start(self.win_start)
        init = self.last.unsqueeze(0).repeat(self.S, 1, 1)
        est, self.feats = self._run(self.win_start, self.count, init, self.feats, keep_from=nxt)
        for i in range(self.S):
            self.est[i] = est[i]
        first = 1 if self.win_start > 0 else 0  # the overlap frame was returned by the previous window
        out = [(self.win_start + i, self._out(est[i])) for i in range(first, self.S)]
        self.last = est[-1]
        self.win_start = nxt
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """End of stream: track what is still open; returns the estimates made now (they replace earlier ones)."""
        if self.count == 0 or (self.win_start > 0 and self.count - self.win_start == 1):
            return []  # the last window of the schedule ended on the last frame and has run
        start, end = self.schedule.last(self.count)
        init = torch.stack([e if e is not None else self.last for e in self.est])
        self.cache.maps.clear()  # the window is encoded whole: its new frames could be a lone one (FeatureCache)
        est, _ = self._run(start, end, init, self.feats if self.win_start > 0 else None, keep_from=end)
        return [(start + i, self._out(est[i])) for i in range(end - start)]


# ---------------------------------------------------------------------------------------------------------
# LBM: online tracking frame by frame (nets/lbm.py), behind the same API as PIPs++.


def is_lbm(model) -> TypeGuard[LBM]:
    """Whether `model` is an LBM (tracked online, with visibility) rather than a PIPs++."""
    return isinstance(model, LBM)


class LBMStreamTracker:
    """LBM's `StreamTracker`: push frames one at a time, queries added and dropped between frames; every
    estimate is final at once (no lag), so `finish()` has nothing left to return.

    A thin layer over the model's `LBMOnlineState` (which holds, per query, a vector and a fixed-size memory:
    nothing grows with the stream's length) that takes numpy frames and source pixels. Frames are resized to
    `model_hw` when given (else handed over as they are: the model resizes them to its input_hw itself); points
    move between source and model pixels by the plain size ratio, LBM's convention.
    """

    def __init__(self, model: LBM, queries_xy: np.ndarray | None, src_hw: tuple[int, int],
                 model_hw: tuple[int, int] | None = None):
        self.model, self.src_hw = model, parse_hw(src_hw)
        self.model_hw = parse_hw(model_hw or src_hw)
        self.state = LBMOnlineState(model)
        self.param = next(model.parameters())
        self.pending = None if queries_xy is None else np.asarray(queries_xy, np.float32).reshape(-1, 2)
        self.count = 0

    @property
    def num_queries(self) -> int:
        """Number of queries currently tracked."""
        return self.state.num_queries

    def _scale(self, xy: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
        return xy * np.array([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]])

    def push(self, frame: np.ndarray, add: np.ndarray | None = None,
             remove: np.ndarray | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Frame (H,W,3) uint8; first drop the queries where `remove` (N,) is True, then start `add` (M,2) source
        px here (after the kept ones). Returns [(t, (N,2) source px, (N,) visibility bool)] for this frame."""
        if remove is not None and np.shape(remove) != (self.num_queries,):
            raise ValueError(f"remove: expected {self.num_queries} flags (one per query), got shape {np.shape(remove)}")
        t, self.count = self.count, self.count + 1
        if self.pending is not None:  # the constructor's queries start on the first frame
            add = self.pending if add is None else np.concatenate([self.pending, np.asarray(add).reshape(-1, 2)])
            self.pending = None
        add = None if add is None or len(add) == 0 else np.asarray(add, np.float64).reshape(-1, 2)
        if remove is not None and np.asarray(remove, bool).all() and add is None:
            self.state = LBMOnlineState(self.model)  # every query dropped: the state needs one to step
        elif add is not None or self.num_queries:
            h, w = self.model_hw
            if frame.shape[:2] != (h, w):
                frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
            x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None]
            x = x.to(self.param.device, self.param.dtype)
            new = None if add is None else torch.from_numpy(self._scale(add, self.src_hw, self.model_hw))
            drop = None if remove is None else torch.as_tensor(np.asarray(remove, bool), device=x.device)
            if self.num_queries == 0:
                drop = None
            res = self.state.track(x, add=new, remove=drop)
            xy = self._scale(res["points"].double().cpu().numpy(), self.model_hw, self.src_hw)
            return [(t, xy.astype(np.float32), res["visibility"].cpu().numpy())]
        return [(t, np.zeros((0, 2), np.float32), np.zeros(0, bool))]

    def finish(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """End of stream: every frame's estimate was returned by its push."""
        return []


def _lbm_pass(model: LBM, src: FrameSource, frames: list[int], idx: np.ndarray, q: np.ndarray, out: dict,
              before_query: bool, progress: ProgressArg) -> None:
    """One online pass through `frames` (in this order) of the queries q[idx], each started on its own frame;
    writes their estimates into out's tracks, visibility and estimated (with before_query: only the frames
    that come before a query's own frame, i.e. those the forward pass did not estimate). Its progress, over
    the frames it steps through, is named "backward" with before_query, else "forward"."""
    tracker = LBMStreamTracker(model, None, src.src_hw, src.model_hw)
    qt = q[:, 0].round().astype(int)
    starts: dict[int, list[int]] = {}
    for i in idx.tolist():
        starts.setdefault(int(qt[i]), []).append(i)
    pos = {t: k for k, t in enumerate(frames)}
    ids: list[int] = []
    first = min((pos[t] for t in starts), default=len(frames))  # nothing to track before the first query
    if first == len(frames):
        return
    with pass_progress("backward" if before_query else "forward", len(frames) - first, progress, "frame") as bar:
        for t in frames[first:]:
            new = starts.get(t, [])
            ((_, pts, vis),) = tracker.push(src.get(t, t + 1)[0], add=q[new, 1:] if new else None)
            ids += new
            sel = np.array(ids)
            m = t < qt[sel] if before_query else np.ones(len(sel), bool)
            out["tracks"][t, sel[m]] = pts[m]
            out["visibility"][t, sel[m]] = vis[m]
            out["estimated"][t, sel[m]] = True
            bar.advance(1)


def track_lbm(model: LBM, video, queries, backward: bool = False, model_hw: tuple[int, int] | None = None,
              progress: ProgressArg = False) -> TrackResult:
    """`track` for an LBM: each query starts on its own frame and is tracked online to the end (and, with
    backward=True, through the reversed video back to frame 0), reading one frame at a time.

    Frames of an array reach the model at their own size, frames of a video file are decoded at the model's
    input_hw (model_hw overrides both). Where a query is not estimated (before its frame, without
    backward) its track holds the query point and its visibility is False. progress as `track`'s, one step per
    frame.
    """
    if model_hw is None and not isinstance(video, FrameSource):
        if isinstance(video, (str, os.PathLike)):
            model_hw = model.input_hw
        elif np.ndim(video) == 4:
            model_hw = np.shape(video)[1:3]
    with _frame_source(video, model_hw) as src:
        T = len(src)
        q = check_queries(queries, T, src.src_hw, max_points=None)
        qt = q[:, 0].round().astype(int)
        out = {"tracks": np.repeat(q[None, :, 1:], T, 0), "estimated": np.zeros((T, len(q)), bool),
               "visibility": np.zeros((T, len(q)), bool)}
        _lbm_pass(model, src, list(range(T)), np.arange(len(q)), q, out, False, progress)
        if backward:  # queries on frame 0 have nothing before them; the query frame itself comes from the forward one
            _lbm_pass(model, src, list(range(T - 1, -1, -1)), np.nonzero(qt > 0)[0], q, out, True, progress)
    return _finite(TrackResult(tracks=out["tracks"], estimated=out["estimated"], visibility=out["visibility"]))
