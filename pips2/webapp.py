"""The web demo behind app.py: a small JSON API over `track()` and one HTML page, served by waitress.

waitress (a pure-Python WSGI server) parses HTTP: it hands a request to one of a few worker threads only once
the whole request has arrived, closes connections that stay silent, and answers malformed requests itself.
Its connection class here (`_Channel`) judges every request from its headers before reading its body
(`Site.admit`: its Host, its Origin, the per-run token, its body's type and size), cuts off a request that
does not arrive by its deadline, and at the connection limit closes connections that have not shown the
token; every value a request carries is checked against a bound before anything is decoded or allocated. Who
can reach the server and what one request and one connection may cost are in docs/WEBAPP.md. Tracking runs
in one background thread, one job at a time, which the page polls and can cancel. Every error reaches the
client as {"error": "<one line>"}; tracebacks of bugs go to the server's console only.

API (JSON answers; every call needs the run's token: an X-Pips2-Token header, or on a GET a `token=` in the
query, which is how the printed address, <img>/<video> sources and download links carry it; no cookie):
  GET  /?token=<token>             the page (its script reads the token from its own address)
  GET  /api/config                 defaults: models, the checkpoints the page may choose (each ready, to be
                                   downloaded, or missing with what to do), clips, bounds
  POST /api/upload?name=<file>[&replaces=<video>]   body: the video file's bytes (application/octet-stream)
                                   -> the video (id, frames, height, width, fps, the size to draw points at);
                                   `replaces` is removed; a file that is no video of 2 frames or more is refused
  POST /api/clip                   {"name": "synthetic-1", "replaces": <video>} -> the video (made on first use)
  GET  /api/frame?video=<id>&t=<k> frame k as a JPEG (at most 640 px on its long side)
  POST /api/track                  {"video", "points": [[t, x, y], ...], "grid_size", "grid_frame", "mask",
                                    "model", "checkpoint", "backward", "S", "iters"} -> {"job": id}; 409 while
                                    another job runs, or when the checkpoint is missing; points in video pixels,
                                    mask (optional): a PNG data URL of the video's size, the grid kept where painted
  POST /api/cancel                 {"job": id} -> the job's status (it stops within one model call)
  GET  /api/job?id=<id>            {"state": running|done|error|cancelled, "stage", "progress", "message", ...}
  GET  /files/<job>/<name>         tracks.mp4, tracks.csv, tracks.npz (demo.py's files; byte ranges for the video)
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs

import cv2
import imageio_ffmpeg
import numpy as np
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import Error as HTTPError
from waitress.utilities import RequestEntityTooLarge
from waitress.wasyncore import close_all

from pips2.datasets.synthetic import write_synthetic_video
from pips2.hub import (
    DEFAULT_PIPS,
    GET_REFERENCE,
    OFFLINE_REFERENCE,
    _cache_folder_problem,
    _copy_problem,
    cache_dir,
    cache_location,
    cached,
    demo_checkpoint,
    find_file,
    load_model,
    offline_hint,
    unusable_now,
)
from pips2.nets.lbm import LBM
from pips2.nets.pips2 import Pips
from pips2.tracking import FrameSource, default_model_hw, grid_queries, is_lbm, resolve_model_hw, track, window_starts
from pips2.utils.checkpoint import CheckpointError, looks_like_torch_file, resolve_device
from pips2.utils.paths import unpinned
from pips2.utils.procs import (
    caught_stop_signals,
    is_space_error,
    owned_tempdir,
    raise_stop,
    remove_owned,
    remove_stale_tempdirs,
)
from pips2.utils.video import (
    CONTAINER_NAMES,
    FFMPEG_INPUT,
    VideoError,
    container_suffix,
    ffmpeg_file,
    ffmpeg_said,
    header_wh,
    iter_frames,
)
from pips2.utils.vis import write_outputs

PAGE = Path(__file__).parent / "webapp.html"
WORK_PREFIX = "pips2_webapp"  # the server's temp folder: <prefix>.<host>.<pid>.<ns>.<random> in TMPDIR
CLIPS = {"synthetic-1": 1, "synthetic-2": 2, "synthetic-3": 3}  # bundled clip name -> generator seed
CLIP_FRAMES, CLIP_HW = 48, (256, 384)  # demo.py's synthetic video
MODELS = ("pips2", "lbm")
OUTPUTS = {"tracks.mp4": "video/mp4", "tracks.csv": "text/csv; charset=utf-8", "tracks.npz": "application/zip"}
MIN_FRAMES = 2  # a track needs two frames: a still image (one frame) is refused when it is opened
POINT_BATCH = 256  # track()'s default

# Bounds: what one request may cost (docs/WEBAPP.md explains each).
MAX_UPLOAD_BYTES = 200 * 2**20  # a video file's size
MAX_JSON_BYTES = 2 * 2**20  # a JSON request; the painted mask (a PNG data URL) is its largest part
MAX_DECODED_MB = 256  # frames x H x W x 3 of a video at the size it is tracked at (app.py --max_decoded_mb)
# a frame's pixels: the encoder's memory grows with the pixels of the frames it encodes at once (Full HD here)
MAX_FRAME_PIXELS = 1920 * 1080
MAX_PREVIEW_BYTES = 64 * 2**20  # the page's frames of one video: shrunk below PREVIEW_SIDE until they fit
PREVIEW_SIDE = 640  # the page's frames: enough to click on, small enough to send at every slider step
MAX_GRID = 64  # grid size: at most 64 x 64 grid points
MAX_CLICKS = 1024  # clicked points in one request
MAX_TRACK_VALUES = 2_000_000  # points x frames: the tracks' size (tracks.csv is about 35 bytes a value)
S_RANGE, ITERS_RANGE = (2, 128), (1, 32)  # window length and refinement steps (app.py --S / --iters too)
KEEP = 4  # opened videos and finished jobs kept; older ones are deleted, or a long-running server fills its disk
PROBE_SECONDS = 60  # reading a video's header (ffmpeg, without decoding) may take at most this long
# waitress: worker threads, silent connections closed after CHANNEL_TIMEOUT s (checked every CLEANUP s)
THREADS, CHANNEL_TIMEOUT, CLEANUP, CONNECTION_LIMIT, MAX_HEADER_BYTES = 4, 30, 5, 100, 64 * 1024
# What connections may hold (docs/WEBAPP.md). A request is judged from its headers, before its body is read. A
# request must arrive in time: its headers within HEADER_SECONDS of its first byte, then its body within
# BODY_GRACE s + its length at MIN_BODY_RATE bytes/s (200 MB: 13.5 min), or it is answered 408 and closed.
HEADER_SECONDS, BODY_GRACE, MIN_BODY_RATE = 10, 10, 256 * 2**10
UPLOAD_SLOTS = 2  # uploads received at once: waitress spools each to a temporary file (others get 503)
# after a refusal, what the client still sends is read and dropped for a moment (not stored), so that it reads
# the answer rather than a reset
LINGER_SECONDS, LINGER_BYTES = 2, 4 * 2**20
# at the connection limit, a new connection closes one that has not shown the token within this long (seconds)
EVICT_AFTER = 1
TOKEN_HEADER = "X-Pips2-Token"
JSON_CALLS = ("/api/clip", "/api/track", "/api/cancel")  # the POST calls whose body is JSON


class WebError(Exception):
    """A request answered with one line for the page, and an HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised inside a job when its cancel was asked for."""


def one_line(e: BaseException) -> str:
    """An exception as the one line the page shows."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def count(n: int, word: str) -> str:
    """n and a noun, plural unless n is 1: "1 point", "2 points"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def mark_size(hw: tuple[int, int]) -> tuple[int, int]:
    """(radius, line width) in pixels of the points and trails drawn on a frame of hw, on the page and in the
    result video: proportional to the frame (a frame is shown shrunk to the page's width, so a fixed 3 px dot
    vanishes on 1280x720), never under 3 px."""
    radius = max(3, int(min(hw) / 120 + 0.5))
    return radius, max(1, int(radius / 3 + 0.5))


def shown(value, limit: int = 40) -> str:
    """A request's value quoted in an error line, cut short (a request must not fill the reply)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def whole(value, name: str, lo: int, hi: int) -> int:
    """A JSON number that is a whole number in lo..hi (2.0 is, 2.5, "2", true, 1e400 and NaN are not)."""
    ok = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise WebError(f"{name} must be a whole number in {lo}..{hi}, got {shown(value)}")
    if not lo <= value <= hi:
        raise WebError(f"{name} must be in {lo}..{hi}, got {shown(value)}")
    return int(value)


def finite(value, name: str) -> float:
    """A JSON number that is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WebError(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


@dataclass
class Video:
    """An opened video: its file, the page's frames, its size, and its frames decoded for tracking."""

    id: str
    name: str
    path: Path
    preview: DecodedFrames
    frames: int
    src_hw: tuple[int, int]  # the video's decoded size
    fps: float
    warning: str = ""

    def as_json(self) -> dict:
        """What the page needs to show and click on it."""
        radius, line = mark_size(self.src_hw)
        return {"video": self.id, "name": self.name, "frames": self.frames, "height": self.src_hw[0],
                "width": self.src_hw[1], "fps": self.fps, "warning": self.warning,
                "mark": {"radius": radius, "line": line}}


@dataclass
class Job:
    """One tracking run; the worker thread updates it, the status endpoint reads it."""

    id: str
    video: Video
    out_dir: Path
    points: int
    state: str = "running"
    stage: str = "starting"
    done: int = 0
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise Cancelled once the job's cancel was asked for (called at every frame and model call)."""
        if self.cancel.is_set():
            raise Cancelled

    def as_json(self) -> dict:
        """The job's status for the page's progress bar, and its files once done."""
        files = {name.split(".")[1]: f"/files/{self.id}/{name}" for name in OUTPUTS} if self.state == "done" else {}
        return {"job": self.id, "video": self.video.id, "state": self.state, "stage": self.stage, "done": self.done,
                "total": self.total,
                "progress": self.done / self.total if self.total else 0.0, "message": self.message,
                "elapsed": round(time.time() - self.started, 1), "points": self.points, "frames": self.video.frames,
                "files": files}


class DecodedFrames(FrameSource):
    """A video decoded once, at the size `resize_to(src_hw)` gives for its decoded frames' size, into a raw file in
    `folder`, read back memory-mapped. Decoding stops with a VideoError past `max_bytes` of frames, so what one
    video writes is bounded whatever its header declared; `check()` runs before each frame (it raises to stop)."""

    def __init__(self, path: Path, resize_to: Callable[[tuple[int, int]], tuple[int, int]], folder: Path,
                 max_bytes: int, what: str, check: Callable[[], None] | None = None):
        super().__init__(0, (0, 0), (0, 0))
        folder.mkdir(mode=0o700, exist_ok=True)  # in the server's own folder (App.own_folder), never remade by name
        self.file = folder / f"{uuid.uuid4().hex[:12]}.frames"
        self.store = None
        frames = iter_frames(path)
        n = limit = 0
        try:
            with open(self.file, "wb") as f:
                for frame in frames:
                    if check is not None:
                        check()
                    if n == 0:  # the decoded size, which a rotation in the header may swap
                        self.src_hw = frame.shape[:2]
                        self.model_hw = h, w = tuple(resize_to(self.src_hw))
                        limit = max_bytes // (h * w * 3)
                    if n == limit:
                        raise VideoError(f"{what}: decodes to more than {count(limit, 'frame')} of {w}x{h} (its header "
                                         f"declared fewer; the bound is {max_bytes / 2**20:.0f} MB)")
                    f.write(self._resize(frame[None])[0].tobytes())
                    n += 1
        except BaseException:
            self.file.unlink(missing_ok=True)
            raise
        finally:
            frames.close()  # stops ffmpeg at once when decoding ended early
        if n == 0:
            self.file.unlink(missing_ok=True)
            raise VideoError(f"{what}: no decodable frames")
        self.num_frames = n
        self.store = np.memmap(self.file, np.uint8, "r", shape=(n, *self.model_hw, 3))

    def _read(self, start: int, end: int) -> np.ndarray:
        if self.store is None:
            raise ValueError("frames read from closed DecodedFrames (its decoded frames are removed)")
        return np.array(self.store[start:end])  # a writable copy: torch refuses to wrap a read-only map

    def close(self) -> None:
        """Delete the decoded frames."""
        self.store = None
        self.file.unlink(missing_ok=True)


class CountingFrames(FrameSource):
    """A FrameSource that reports how many frames were read: PIPs++ encodes each frame once per direction and
    LBM reads one frame per step, so frames read is the tracker's progress without hooking into it. `check()`
    runs before each read (it raises to cancel)."""

    def __init__(self, src: FrameSource, on_read, check: Callable[[], None] | None = None):
        super().__init__(len(src), src.src_hw, src.model_hw)
        self.src, self.on_read, self.check = src, on_read, check

    def _read(self, start: int, end: int) -> np.ndarray:
        if self.check is not None:
            self.check()
        out = self.src.get(start, end)
        self.on_read(end - start)
        return out


def frames_to_read(qt: np.ndarray, T: int, backward: bool) -> int:
    """Frames the tracker reads for queries on frames qt: forward from the first query frame, and backward
    from the last query frame after 0 down to frame 0."""
    n = T - int(qt.min())
    later = qt[qt > 0]
    return n + (int(later.max()) + 1 if backward and len(later) else 0)


def tracking_steps(qt: np.ndarray, T: int, S: int, backward: bool, lbm: bool) -> int:
    """The progress bar's steps for a track() call: each frame read, plus for PIPs++ each model call (one per
    window of two or more frames and batch of POINT_BATCH points, per query frame's pass), which is where the
    time goes once a window's frames are encoded."""
    steps = frames_to_read(qt, T, backward)
    if lbm:
        return steps  # LBM computes each frame as it reads it
    starts, counts = np.unique(qt, return_counts=True)
    for back in (False, True) if backward else (False,):
        for t0, n in zip(starts.tolist(), counts.tolist(), strict=True):
            if back and t0 == 0:
                continue
            windows = sum(e - s >= 2 for s, e in window_starts(t0 + 1 if back else T - t0, S))
            steps += windows * -(-n // POINT_BATCH)
    return steps


def preview_hw(src_hw: tuple[int, int], frames: int = 1) -> tuple[int, int]:
    """The page's frame size: the video's, shrunk to at most PREVIEW_SIDE on the long side, and further until
    `frames` of them fit in MAX_PREVIEW_BYTES."""
    H, W = src_hw
    s = min(1.0, PREVIEW_SIDE / max(H, W), math.sqrt(MAX_PREVIEW_BYTES / (max(1, frames) * H * W * 3)))
    return max(1, math.floor(H * s)), max(1, math.floor(W * s))


def video_header(path: Path) -> tuple[int, int, int, float, float]:
    """(frames, height, width, fps, duration in s) from a video's header and packets, without decoding a frame:
    ffmpeg copies the video stream's packets to nowhere and counts those it finds (a file cut short has fewer
    than its duration says). VideoError (naming `path`) if it is no video."""
    try:
        reader = imageio_ffmpeg.read_frames(ffmpeg_file(path), pix_fmt="rgb24", input_params=FFMPEG_INPUT)
        try:
            meta = next(reader)  # parsed from ffmpeg's description of the input, before any frame is read
        finally:
            reader.close()
        w, h = (int(v) for v in meta["size"])
        run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *FFMPEG_INPUT, "-i",
                              ffmpeg_file(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"],
                             capture_output=True, text=True, errors="replace", timeout=PROBE_SECONDS,
                             start_new_session=True)  # a Ctrl-C of the server is the server's to handle
    except subprocess.TimeoutExpired:
        raise VideoError(f"{path}: its header took over {PROBE_SECONDS} s to read") from None
    except Exception as e:  # imageio-ffmpeg raises a plain error with ffmpeg's output for a file it cannot open
        msg = ffmpeg_said(str(e).strip().splitlines()[-1], path) if str(e).strip() else type(e).__name__
        raise VideoError(f"{path}: cannot read video ({msg})") from None
    counts = re.findall(r"frame=\s*(\d+)", run.stderr)
    if not counts:  # ffmpeg also fails at the end of a file cut short, after counting the packets it holds
        raise VideoError(f"{path}: cannot read video (no video stream ffmpeg can read)")
    duration = meta.get("duration")
    return int(counts[-1]), h, w, float(meta.get("fps") or 24.0), float(duration) if duration else 0.0


def decode_mask(data_url: str, src_hw: tuple[int, int]) -> np.ndarray:
    """The page's painted mask (a PNG data URL at the video's size) as (H,W), nonzero where painted (its alpha).
    Its size is read from its header and must be the video's before anything is decoded."""
    try:
        raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (IndexError, ValueError, binascii.Error):
        raise WebError("mask: not a PNG data URL") from None
    wh = header_wh(raw)
    if wh is None:
        raise WebError("mask: unreadable image (a PNG or JPEG is needed)")
    if wh != (src_hw[1], src_hw[0]):  # a stretched mask would select the wrong points (as demo.py's --mask)
        raise WebError(f"mask: {wh[0]}x{wh[1]} but the video is {src_hw[1]}x{src_hw[0]}")
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape[:2] != tuple(src_hw):
        raise WebError("mask: unreadable image")
    return img[..., 3] if img.ndim == 3 and img.shape[2] == 4 else (img if img.ndim == 2 else img.max(2))


def too_few_frames(name: str, frames: int) -> str:
    """The page's line for a file that is not a video of at least MIN_FRAMES frames."""
    return (f"{name}: {'only ' if frames else ''}{count(frames, 'frame')}, so nothing to track: open a video of at "
            f"least {MIN_FRAMES} frames (a still image is one frame)")


def load_failure(choice: Choice, e: BaseException) -> str:
    """A checkpoint that failed to load, as the page says it: what failed, without the parenthesised detail
    (it may quote the file's bytes) or the loader's advice (command-line wording), and what to do on the page;
    the console keeps the whole line."""
    line = one_line(e)
    what = re.split(r"\s\(|; ", line, maxsplit=1)[0]
    if "--" in what:  # a loader's line about its flags
        what = f"{choice.name}: cannot be loaded"
    todo = "choose another checkpoint in the list" + ("" if choice.hub else
                                                       ", or restart the server with --init_dir=<a checkpoint>")
    return f"{what}; {todo}" + ("" if what == line else " (the server's console has the details)")


@dataclass(frozen=True)
class Choice:
    """A checkpoint the page may choose, and whether a job could use it now."""

    model: str
    name: str  # what the page sends: the --init_dir path, demo.py's default folder, or a hub name
    state: str  # "ready", "download" (a hub name not cached yet: the first Track fetches it), or "missing"
    label: str  # the page's option
    note: str  # the page's line beside Track: what Track will do, or what to do ("" when ready)
    console: str  # the console's line at start: ready, or how to get it

    @property
    def hub(self) -> bool:
        """Whether it is a hub name (fetched into the cache) rather than a path."""
        return self.name == self.model

    def as_json(self) -> dict:
        """What the page shows of it."""
        return {"name": self.name, "state": self.state, "label": self.label, "note": self.note}


def local_checkpoint(path: str) -> Path | None:
    """The file a job would load for a checkpoint path (pips2.hub's rules: a file, a folder's newest model-*.pth
    or its one *.pt/*.pth), or None; nothing is read."""
    try:
        return unpinned(find_file(path))  # named as the page shows it, not as the descriptor read through
    except (CheckpointError, OSError):
        return None


def hub_choice(model: str) -> Choice:
    """A hub name: ready once in the cache, else downloaded by the first Track that uses it."""
    if refused := unusable_now(model):  # a copy the loader refuses, or none and no download allowed
        return Choice(model, model, "missing", f"{model} (cannot be used now)", refused,
                      f"{model}: {model} (hub name): {refused.removeprefix(f'{model}: ')}")
    found = cached(model)
    if found is not None:
        return Choice(model, model, "ready", f"{model} (downloaded)", "",
                      f"{model}: {model} (hub name): ready, in {found}")
    return Choice(model, model, "download", f"{model} (downloads once, needs the internet)",
                  f"{model}: the first Track downloads the authors' weights into the server's cache (needs the "
                  f"internet)",
                  f"{model}: {model} (hub name): not downloaded yet; the first Track with it downloads it into "
                  f"{cache_location(model)} (needs the internet; offline, start the server with "
                  f"{offline_hint(model)})")


def path_choice(model: str, name: str, given: bool) -> Choice:
    """A checkpoint path: --init_dir (`given`) or demo.py's default folder; ready when it holds a checkpoint."""
    found = local_checkpoint(name)
    if found is not None and not looks_like_torch_file(found):  # /etc/passwd was offered as ready
        how = "restart with --init_dir=<a checkpoint folder or file>"
        return Choice(model, name, "missing", f"{name} (not a checkpoint)",
                      f"{name} (named when the server started) is not a checkpoint: choose another checkpoint in the "
                      f"list, or restart the server with --init_dir=<a checkpoint folder or file>",
                      f"{model}: {name}: {found} is not a checkpoint (not a file torch.save "
                      f"writes); {how}")
    if found is not None:
        return Choice(model, name, "ready", name, "", f"{model}: {name}: ready ({found})")
    demo = demo_checkpoint()
    trained = (f"`make demo` trained a small one in {demo}/" if demo else
               "`make demo` trains a small one into demo_out/checkpoints/")
    if model == "lbm":
        how = "restart with --init_dir=<an LBM checkpoint file> (or choose the hub name lbm on the page)"
    elif given:
        how = f"restart with --init_dir=<a checkpoint folder or file> ({GET_REFERENCE}; {trained})"
    else:
        how = f"{GET_REFERENCE}; or restart with --init_dir=<a checkpoint folder> ({trained})"
    what = "--init_dir" if given else f"demo.py's default, in {Path.cwd()}"
    console = f"{model}: {name} ({what}): no checkpoint there; {how}"
    if given:
        note = (f"{name} (named when the server started) holds no checkpoint: choose another checkpoint in the "
                f"list, or restart the server with --init_dir=<a checkpoint folder or file>")
    else:
        note = (f"{name} is missing: fetch the authors' model with ./get_reference_model.sh in the server's folder "
                f"(offline: {OFFLINE_REFERENCE}), then reload this page; or choose another checkpoint in the list")
        if demo:
            note += f"; or restart the server with --init_dir={demo}/ (the small model `make demo` trained)"
    return Choice(model, name, "missing", f"{name} (missing)", note, console)


class App:
    """The demo's state: opened videos, jobs, the loaded model; shared by the request threads."""

    def __init__(self, init_dir: str | None = None, model: str = "pips2", device: str = "cpu", S: int = 128,
                 iters: int = 16, clip_dir: str | os.PathLike | None = None, max_decoded_mb: int = MAX_DECODED_MB):
        if model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
        for name, value, (lo, hi) in (("S", S, S_RANGE), ("iters", iters, ITERS_RANGE),
                                      ("max_decoded_mb", max_decoded_mb, (1, 1 << 20))):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"--{name} must be a whole number in {lo}..{hi}, got {value!r}")
        resolve_device(device)  # a --device that is not here: one line now, not a failure inside the first job
        self.init_dir, self.model, self.device, self.S, self.iters = init_dir, model, device, S, iters
        self.max_decoded = max_decoded_mb * 2**20
        self.clip_dir = Path(clip_dir) if clip_dir else cache_dir() / "demo_clips"
        remove_stale_tempdirs(WORK_PREFIX)  # those of servers killed (SIGKILL) before they could clean up
        self.work = owned_tempdir(WORK_PREFIX)  # uploads and results; removed by close()
        self.videos: dict[str, Video] = {}
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()  # guards the dicts
        self.clip_lock = threading.Lock()
        self.open_lock = threading.Lock()  # one video decoded at a time: bounds the disk and CPU of uploads
        self.closed = threading.Event()
        self.net_key: tuple[str, str] | None = None
        self.net: Pips | LBM | None = None

    def close(self) -> None:
        """Stop the running job and remove the uploads and results."""
        self.closed.set()
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(30)  # a job stops within one model call
        remove_owned(self.work)

    def checkpoints(self, model: str) -> list[str]:
        """The checkpoints the page may choose for a model, the default first: the --init_dir given for it (else
        demo.py's default folder for pips2), then the hub's name for it. Nothing else: a page must not make the
        server open, or tell apart, other files of the user's."""
        own = [str(self.init_dir)] if model == self.model and self.init_dir else []
        if not own and model == "pips2":
            own = [DEFAULT_PIPS]
        return list(dict.fromkeys([*own, model]))  # --init_dir=pips2 is the hub name, offered once

    def choice(self, model: str, name: str) -> Choice:
        """One of checkpoints(model), and whether a job could use it now (files and the cache as they are now:
        the user may fetch a checkpoint while the server runs)."""
        if name == model:
            return hub_choice(model)
        return path_choice(model, name, given=model == self.model and name == str(self.init_dir))

    def choices(self, model: str) -> list[Choice]:
        """checkpoints(model), each with its state."""
        return [self.choice(model, name) for name in self.checkpoints(model)]

    def default_checkpoint(self, model: str) -> str:
        """The checkpoint the page preselects, and a request without one uses: the first that is ready, else the
        first (a download is the user's choice to make: it needs the internet)."""
        choices = self.choices(model)
        return next((c.name for c in choices if c.state == "ready"), choices[0].name)

    def notice(self) -> str:
        """The page's line up front when no checkpoint is on this machine, else ''."""
        if any(c.state == "ready" for m in MODELS for c in self.choices(m)):
            return ""
        return (f"No checkpoint is on this machine yet: fetch the authors' PIPs++ model with ./get_reference_model.sh "
                f"in the server's folder (offline: {OFFLINE_REFERENCE}) and reload this page, or choose a hub name "
                f"in the Checkpoint list ({', '.join(MODELS)}: downloaded on the first Track; needs the internet).")

    def checkpoint_report(self) -> list[str]:
        """The console's lines at start: each checkpoint the page offers, ready or how to get it."""
        choices = [c for m in MODELS for c in self.choices(m)]
        lines = ["checkpoints the page offers:", *(f"  {c.console}" for c in choices)]
        if not any(c.state == "ready" for c in choices):
            lines.append("no checkpoint is on this machine yet: the page says so and the server runs anyway; get one "
                         "as above, then reload the page")
        return lines

    def config(self) -> dict:
        """Defaults for the page."""
        return {"model": self.model, "models": list(MODELS), "clips": list(CLIPS),
                "checkpoints": {m: self.checkpoints(m) for m in MODELS},
                "choices": {m: [c.as_json() for c in self.choices(m)] for m in MODELS},
                "default_checkpoint": {m: self.default_checkpoint(m) for m in MODELS}, "notice": self.notice(),
                "max_upload_mb": MAX_UPLOAD_BYTES // 2**20, "max_decoded_mb": self.max_decoded // 2**20,
                "max_grid": MAX_GRID, "max_clicks": MAX_CLICKS}

    def check_size(self, name: str, frames: int, hw: tuple[int, int], what: str = "") -> None:
        """WebError (413) if `frames` of hw are over the decoded-bytes bound."""
        limit = self.max_decoded // (hw[0] * hw[1] * 3)
        if frames > limit:
            raise WebError(f"{name}: {count(frames, 'frame')} of {hw[1]}x{hw[0]}{what} decode to "
                           f"{frames * hw[0] * hw[1] * 3 / 2**20:.0f} MB, over the bound of "
                           f"{self.max_decoded // 2**20} MB ({count(limit, 'frame')} at this size); cut or shrink "
                           f"the video", 413)

    def _stopping(self) -> None:
        if self.closed.is_set():
            raise WebError("the server is stopping", 503)

    def _open(self, path: Path, name: str) -> dict:
        """Check that path is a video within the bounds (from its header, before decoding), decode the page's
        frames, and keep it; errors name `name`."""
        try:
            frames, H, W, fps, duration = video_header(path)
            if frames < 1:
                raise VideoError(f"{path}: no video frames")
            if frames < MIN_FRAMES:
                raise WebError(too_few_frames(name, frames))
            if H * W > MAX_FRAME_PIXELS:
                raise WebError(f"{name}: frames of {W}x{H} are over the bound of {MAX_FRAME_PIXELS:,} pixels "
                               f"(1920x1080); shrink the video (e.g. ffmpeg -i in.mp4 -vf scale=1280:-2 out.mp4)", 413)
            self.check_size(name, frames, default_model_hw((H, W)), " (at the size PIPs++ tracks it)")
            with self.open_lock:
                self._stopping()
                self.own_folder(self.work / "previews")
                preview = DecodedFrames(path, lambda src_hw: preview_hw(src_hw, frames), self.work / "previews",
                                        MAX_PREVIEW_BYTES, name, self._stopping)
        except VideoError as e:
            raise WebError(one_line(e).replace(str(path), name)) from None
        except WebError:
            raise
        except Exception as e:  # a decoder failing mid-stream: still one line about this file
            if isinstance(e, OSError) and is_space_error(e):  # the server's disk, not the file
                raise WebError(self.full_disk(name, "its page frames need room there"), 507) from None
            raise WebError(f"{name}: cannot decode ({one_line(e)})") from None
        if (decoded := len(preview)) < MIN_FRAMES:  # its header promised more than decode
            preview.close()
            raise WebError(too_few_frames(name, decoded))
        video = Video(uuid.uuid4().hex[:12], name, path, preview, len(preview), preview.src_hw, fps)
        expected = round(duration * fps)
        if video.frames < 0.95 * expected - 1:  # e.g. a file cut short: say so; the page shows what decodes
            video.warning = (f"{name}: its header says {duration:g} s ({count(expected, 'frame')} at {fps:g} fps) "
                             f"but only {video.frames} frames decode (a file cut short?)")
        if self.closed.is_set():
            raise WebError("the server is stopping", 503)
        with self.lock:
            self.videos[video.id] = video
        self._evict()
        return video.as_json()

    def _busy_videos(self) -> set[str]:
        return {j.video.id for j in self.jobs.values() if j.state == "running"}

    def _drop(self, video: Video) -> None:
        """Delete a forgotten video's files (not a bundled clip's)."""
        video.preview.close()
        if video.path.parent == self.work / "uploads":
            video.path.unlink(missing_ok=True)

    def forget(self, vid) -> None:
        """Forget a video the page replaces (its files go now, or when a job using it ends)."""
        if vid is not None and not isinstance(vid, str):
            raise WebError(f"replaces must be a video id, got {shown(vid)}")
        with self.lock:
            video = self.videos.pop(vid, None) if vid else None
            busy = video is not None and video.id in self._busy_videos()
        if video is not None and not busy:
            self._drop(video)

    def _evict(self) -> None:
        """Forget all but the KEEP newest videos and finished jobs, deleting their files (not a running job's
        video, nor a cached clip)."""
        with self.lock:
            busy = self._busy_videos()
            jobs = [j for j in self.jobs.values() if j.state != "running"][:-KEEP]
            videos = [v for v in list(self.videos.values())[:-KEEP] if v.id not in busy]
            for j in jobs:
                del self.jobs[j.id]
            for v in videos:
                del self.videos[v.id]
        for j in jobs:
            shutil.rmtree(j.out_dir, ignore_errors=True)
        for v in videos:
            self._drop(v)

    def own_folder(self, folder: Path) -> None:
        """Make `folder`, inside the server's private folder, which must still be there, its own (mode 0700): a
        temp cleaner may have removed it, and remaking it by name (parents=True) wrote the user's frames and results
        into a folder another user had made under that name."""
        try:
            st = os.lstat(self.work)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise FileNotFoundError(errno.ENOENT, "not this server's folder")
        except OSError:
            raise WebError(f"the server's temporary folder {self.work} is gone (a temp cleaner?) or no longer its "
                           f"own; restart the server", 503) from None
        here = self.work
        for part in folder.relative_to(self.work).parts:  # each level made here, none through a link
            here = here / part
            here.mkdir(mode=0o700, exist_ok=True)

    def full_disk(self, name: str, why: str) -> str:
        """The one line for the server's temporary folder full (answered 507): where, how much is free, and why
        this request needs room there."""
        try:
            free = f"{shutil.disk_usage(self.work).free / 2**20:.0f} MB free"
        except OSError:
            free = "its free space unknown"
        return f"{name}: the server's temporary folder ({self.work.parent}) is full ({free}): {why}"

    def add_upload(self, name: str, body, length: int, replaces: str | None = None) -> dict:
        """Store an uploaded video of `length` bytes read from `body` and open it; the file is deleted if it is
        not a video within the bounds."""
        name = re.sub(r"[\x00-\x1f\x7f]", "?", Path(name or "upload").name[:100]) or "upload"  # one line
        if length > MAX_UPLOAD_BYTES:
            raise WebError(f"{name}: {length / 2**20:.0f} MB is over the upload limit of "
                           f"{MAX_UPLOAD_BYTES // 2**20} MB", 413)
        if length <= 0:
            raise WebError(f"{name}: empty file")
        self.forget(replaces)
        part = self.work / "uploads" / f"{uuid.uuid4().hex[:12]}.part"
        self.own_folder(part.parent)
        path = part
        try:
            left = length
            try:
                with open(part, "wb") as f:  # its close writes too
                    while left:
                        chunk = body.read(min(left, 1 << 20))
                        if not chunk:
                            raise WebError(f"{name}: upload ended after {length - left} of {count(length, 'byte')}")
                        f.write(chunk)
                        left -= len(chunk)
            except OSError as e:
                if not is_space_error(e):
                    raise
                # while it arrives an upload is on this disk twice: waitress's spool and this copy
                raise WebError(self.full_disk(name, "an upload needs twice its size there while it arrives"),
                               507) from None
            with open(part, "rb") as f:
                suffix = container_suffix(f.read(512))
            if suffix is None:  # a playlist or list file would have ffmpeg open other files
                raise WebError(f"{name}: not a video file this demo opens ({CONTAINER_NAMES})", 415)
            path = part.rename(part.with_suffix(suffix))
            return self._open(path, name)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def add_clip(self, name: object, replaces: str | None = None) -> dict:
        """Open a bundled synthetic clip, generating it into the clip cache the first time."""
        if not isinstance(name, str) or name not in CLIPS:
            raise WebError(f"unknown clip {shown(name)} (bundled: {', '.join(CLIPS)})")
        self.forget(replaces)
        path = self.clip_dir / f"{name}.mp4"
        with self.clip_lock:
            if self._clip_cache_problem(path):  # made afresh in this server's own folder: never another user's
                self.own_folder(self.work / "clips")
                path = self.work / "clips" / f"{name}.mp4"
            if not path.is_file():
                if path.parent == self.clip_dir:
                    self.clip_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{name}.{uuid.uuid4().hex[:8]}.mp4")  # temp + rename: no half clip
                try:
                    write_synthetic_video(tmp, CLIPS[name], CLIP_FRAMES, CLIP_HW)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return self._open(path, name)

    def _clip_cache_problem(self, path: Path) -> str | None:
        """Why the clip cache may not hold `path` (the hub cache's rules: another user could put their video where
        a bundled clip is looked for, or a link where one is written), or None."""
        try:
            if os.path.lexists(self.clip_dir):
                if problem := (_copy_problem(os.lstat(self.clip_dir), self.clip_dir.parent)
                               or _cache_folder_problem(self.clip_dir)):
                    return problem
            elif self.clip_dir.parent.is_dir() and (problem := _cache_folder_problem(self.clip_dir.parent)):
                return problem
            return _copy_problem(os.lstat(path), self.clip_dir) if os.path.lexists(path) else None
        except OSError as e:
            return str(e)

    def _find(self, table: dict, key: str, missing: str):
        """table[key] under the lock, or a 404 saying `missing`."""
        with self.lock:
            found = table.get(key)
        if found is None:
            raise WebError(missing, 404)
        return found

    def video(self, vid: str) -> Video:
        """The opened video with this id."""
        return self._find(self.videos, vid, "unknown video: open a video or a clip first")

    def frame_jpeg(self, vid: str, t: int) -> bytes:
        """Frame t of a video at preview size, JPEG-encoded."""
        video = self.video(vid)
        if not 0 <= t < video.frames:
            raise WebError(f"{video.name}: frame {t} is outside 0..{video.frames - 1}", 404)
        rgb = video.preview.get(t, t + 1)[0]
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise WebError(f"{video.name}: cannot encode frame {t}", 500)
        return buf.tobytes()

    def queries(self, video: Video, req: dict) -> np.ndarray:
        """(N,3) queries (t, x, y) from the request: clicked points, then a grid on grid_frame if grid_size > 0
        (where the mask, if any, is painted); every value checked against its bound."""
        T, (H, W) = video.frames, video.src_hw
        points = req.get("points") or []
        if not isinstance(points, list):
            raise WebError("points must be a list of [t, x, y]")
        if len(points) > MAX_CLICKS:
            raise WebError(f"{len(points)} points: at most {MAX_CLICKS} clicked points (and a grid)")
        rows = []
        for i, p in enumerate(points):
            if not isinstance(p, list) or len(p) != 3:
                raise WebError(f"point {i} must be [t, x, y], got {shown(p)}")
            t = whole(p[0], f"point {i}'s frame", 0, T - 1)
            x, y = finite(p[1], f"point {i}'s x"), finite(p[2], f"point {i}'s y")
            if not (0 <= x <= W - 1 and 0 <= y <= H - 1):
                raise WebError(f"point {i} ({x:g}, {y:g}) is outside the {W}x{H} frame")
            rows.append((t, x, y))
        g = whole(req.get("grid_size", 0) if req.get("grid_size") is not None else 0, "grid size", 0, MAX_GRID)
        gt = whole(req.get("grid_frame") if req.get("grid_frame") is not None else 0, "grid frame", 0, T - 1)
        mask = req.get("mask")
        if mask is not None and not isinstance(mask, str):
            raise WebError("mask must be a PNG data URL")
        if g:
            grid = grid_queries(video.src_hw, g, gt, decode_mask(mask, video.src_hw) if mask else None)
            if not len(grid):
                raise WebError("no grid point falls inside the painted mask")
            rows += grid.tolist()
        if not rows:
            raise WebError("no points: click on the frame or set a grid size")
        if len(rows) * T > MAX_TRACK_VALUES:
            raise WebError(f"{len(rows)} points x {T} frames is over the bound of {MAX_TRACK_VALUES} track values; "
                           f"use fewer points or a shorter video", 413)
        return np.asarray(rows, np.float32)

    def start_job(self, req: dict) -> dict:
        """Check a track request and run it in a background thread; 409 while another job runs."""
        video = self.video(str(req.get("video", "")))
        model = req.get("model") or self.model
        if model not in MODELS:
            raise WebError(f"model must be one of {', '.join(MODELS)}, got {shown(model)}")
        choices = self.checkpoints(model)
        checkpoint = req.get("checkpoint") or self.default_checkpoint(model)
        if checkpoint not in choices:  # paths come from the command line only
            raise WebError(f"checkpoint for {model} must be one of {', '.join(choices)} (to use another, restart "
                           f"the server with --model={model} --init_dir=<its folder or file>)")
        choice = self.choice(model, checkpoint)
        if choice.state == "missing":  # said before the work, not after the upload, the clicks and Track
            raise WebError(choice.note, 409)
        q = self.queries(video, req)
        S = whole(req["S"], "S", *S_RANGE) if req.get("S") is not None else self.S
        iters = whole(req["iters"], "iters", *ITERS_RANGE) if req.get("iters") is not None else self.iters
        backward = req.get("backward")
        backward = False if backward is None else backward  # absent or null; 0, "" or [] are no more boolean than 1
        if not isinstance(backward, bool):
            raise WebError(f"backward must be true or false, got {shown(backward)}")
        if model == "pips2":  # LBM's size is known once its checkpoint is loaded; the job checks it then
            self.check_size(video.name, video.frames, default_model_hw(video.src_hw))
        job_id = uuid.uuid4().hex[:12]
        job = Job(job_id, video, self.work / "jobs" / job_id, len(q))
        with self.lock:
            self._stopping()
            running = [j for j in self.jobs.values() if j.state == "running"]
            if running:
                raise WebError("busy: another job is tracking; cancel it or wait for it to end", 409)
            self.jobs[job_id] = job
            job.thread = threading.Thread(target=self._run, args=(job, q, choice, backward, S, iters),
                                          daemon=True, name=f"track-{job_id}")
        self.own_folder(job.out_dir)
        self._evict()
        job.thread.start()
        return {"job": job_id}

    def cancel(self, job_id: str) -> dict:
        """Ask a job to stop; it does within one frame or model call."""
        job = self.job(job_id)
        job.cancel.set()
        return job.as_json()

    def load_net(self, model: str, checkpoint: str) -> Pips | LBM:
        """The tracker for the page's model and checkpoint (a --init_dir path, or a hub name), kept for reuse."""
        if self.net is not None and self.net_key == (model, checkpoint):
            return self.net
        self.net_key, self.net = None, None  # free the old model before loading another
        net = load_model(checkpoint, self.device, kind=model)
        self.net_key, self.net = (model, checkpoint), net
        return net

    def _run(self, job: Job, q: np.ndarray, choice: Choice, backward: bool, S: int, iters: int) -> None:
        """The worker: load the model, decode, track with progress, draw the result video; errors and a cancel
        end in job.state and job.message, and leave no files behind."""
        src = None
        try:
            job.stage = "downloading the model (once)" if choice.state == "download" else "loading the model"
            model = choice.model
            try:
                net = self.load_net(model, choice.name)
            except (ValueError, OSError, CheckpointError) as e:
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
                raise ValueError(load_failure(choice, e)) from None
            job.check()
            lbm = is_lbm(net)
            # at the size track() would pick for a path: LBM's input size, else the video's rounded to 8
            model_hw = resolve_model_hw(net, job.video.src_hw)
            self.check_size(job.video.name, job.video.frames, model_hw, f" (at {model}'s input size)")
            job.stage, job.total = "decoding the video (frames)", job.video.frames

            def decoded() -> None:
                job.check()
                job.done += 1

            self.own_folder(self.work / "frames")
            src = DecodedFrames(job.video.path, lambda _: model_hw, self.work / "frames", self.max_decoded,
                                job.video.name, decoded)
            total = tracking_steps(q[:, 0].astype(int), len(src), S, backward, lbm)
            job.stage, job.done, job.total = "tracking (frames read + windows run)", 0, total

            def step(n: int) -> None:
                job.done = min(job.total, job.done + n)

            hooks = [] if lbm else [net.register_forward_pre_hook(lambda *_: job.check()),
                                    net.register_forward_hook(lambda *_: step(1))]  # a window's point batch
            try:
                res = track(net, CountingFrames(src, step, job.check), q, S=S, iters=iters, backward=backward,
                            point_batch=POINT_BATCH)
            finally:
                for hook in hooks:
                    hook.remove()
            src.close()
            job.stage, job.done, job.total = "drawing the result video (frames)", 0, res["tracks"].shape[0]

            def drawn(t: int) -> None:
                job.check()
                job.done = t + 1

            radius, line = mark_size(job.video.src_hw)
            write_outputs(job.out_dir, job.video.path, q, res["tracks"], res["estimated"], job.video.fps,
                          res["visibility"], on_frame=drawn, radius=radius, thickness=line)
            job.stage, job.state = "done", "done"
        except Cancelled:
            job.stage, job.state, job.message = "cancelled", "cancelled", "cancelled"
        except (ValueError, VideoError, OSError, CheckpointError, WebError) as e:
            job.state, job.message = "error", one_line(e)
            if isinstance(e, OSError) and is_space_error(e):
                job.message = self.full_disk(job.video.name, "tracking decodes its frames and writes its results there")
        except Exception as e:  # the page gets one line; the console keeps the traceback for a bug report
            if job.cancel.is_set():  # e.g. ffmpeg ended by the Ctrl-C that stops the server
                job.stage, job.state, job.message = "cancelled", "cancelled", "cancelled"
            else:
                traceback.print_exc()
                job.state, job.message = "error", f"tracking failed: {type(e).__name__}: {one_line(e)}"
        finally:
            if src is not None:
                src.close()
            if job.state != "done":
                shutil.rmtree(job.out_dir, ignore_errors=True)
                job.message = job.message.replace(str(job.video.path), job.video.name)
            with self.lock:
                gone = job.video.id not in self.videos
            if gone:  # replaced while it was tracked
                self._drop(job.video)

    def job(self, job_id: str) -> Job:
        """The job with this id."""
        return self._find(self.jobs, job_id, "unknown job")

    def output(self, job_id: str, name: str) -> Path:
        """A finished job's output file."""
        job = self.job(job_id)
        if name not in OUTPUTS or job.state != "done":
            raise WebError(f"no file {shown(name)} for this job", 404)
        return job.out_dir / name


# ---------------------------------------------------------------------------------------------------------
# HTTP: the WSGI application and the waitress server.

SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    # the page is one file with its script and style inline; it loads nothing from elsewhere
    ("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src 'self' data: blob:; frame-ancestors 'none'; form-action 'none'"),
]


def _json_body(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


MAX_INT_DIGITS = 100  # a whole number in a request (a frame count, a size): far more digits than any needs


def _bounded_int(text: str) -> int:
    """A JSON whole number of at most MAX_INT_DIGITS digits: Python's own limit (4300) says 'not JSON' in effect."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-'))} digits is not one JSON allows here (at most "
                         f"{MAX_INT_DIGITS})")
    return int(text)


class Request:
    """What the routes read from a WSGI environ."""

    def __init__(self, environ: dict):
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.path = environ.get("PATH_INFO", "") or "/"
        try:
            query = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=16)
        except ValueError:
            raise WebError("too many query parameters") from None
        self.query = {k: v[-1] for k, v in query.items()}

    def header(self, name: str) -> str | None:
        """A request header (None when absent)."""
        key = name.upper().replace("-", "_")
        return self.environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}")

    def length(self) -> int:
        """The body's length (waitress has checked that it is digits, and read the whole body)."""
        text = self.header("Content-Length")
        if text is None:
            raise WebError("a Content-Length is required", 411)
        return int(text)

    def declared_length(self) -> int:
        """The Content-Length, 0 when there is none."""
        text = self.header("Content-Length") or "0"
        if not text.isdigit() or not text.isascii():
            raise WebError(f"Content-Length {shown(text)} is not a whole number")
        return int(text)

    def content_type(self) -> str:
        """The Content-Type without its parameters, in lower case ('' when absent)."""
        return (self.header("Content-Type") or "").split(";")[0].strip().lower()

    def json(self) -> dict:
        """The body as a JSON object with finite numbers (`Site.admit` has checked its type and size)."""
        length = self.length()
        try:
            req = json.loads(self.environ["wsgi.input"].read(length), parse_constant=_refuse_constant,
                             parse_int=_bounded_int)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, Infinity or NaN, a 5000-digit number
            why = one_line(e) if "JSON allows" in str(e) else "not JSON"
            raise WebError(f"request body: {why}") from None
        if not isinstance(req, dict):
            raise WebError("request body must be a JSON object")
        return req


class Site:
    """The WSGI application: `guard` checks every request, then a route answers it from the App."""

    def __init__(self, app: App, token: str, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, hosts

    def __call__(self, environ: dict, start_response):
        """Answer one request; every error as one JSON line with its status."""
        head = environ.get("REQUEST_METHOD") == "HEAD"
        try:
            status, headers, body = self.respond(Request(environ))
        except WebError as e:
            status, headers, body = e.status, [("Content-Type", "application/json")], _json_body({"error": str(e)})
        except Exception as e:  # a bug: one line for the client, the traceback on the console
            if not self.app.closed.is_set():
                traceback.print_exc()
            status, headers = 500, [("Content-Type", "application/json")]
            body = _json_body({"error": f"server error: {type(e).__name__}: {one_line(e)}"})
        if isinstance(body, bytes):
            headers = [*headers, ("Content-Length", str(len(body)))]
            body = [] if head else [body]
        elif head:
            body = []
        start_response(f"{status} {HTTPStatus(status).phrase}", headers + SECURITY_HEADERS)
        return body

    def guard(self, req: Request) -> None:
        """Refuse a request that does not come from the page: a Host that is not this server's name (DNS
        rebinding), a cross-site fetch, a cross-origin Origin, or no token (a missing Origin is a client that is
        no browser, which needs the token too)."""
        host = (req.header("Host") or "").lower()
        target = req.environ.get("REQUEST_URI", "/")
        if not target.startswith("/"):
            # the absolute form (GET http://name/...): its authority, not Host, names the site (RFC 9112), and
            # waitress passes on only its path; a browser sends it to proxies only, so it is refused
            raise WebError(f"request target {shown(target)} is not a path (this server is no proxy)")
        if host not in self.hosts:
            raise WebError(f"Host {shown(host or 'none')} is not this server's name "
                           f"(it answers to {', '.join(sorted(self.hosts))})", 421)
        site = req.header("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise WebError(f"a {shown(site)} request is refused: only the demo's own page may call it", 403)
        origin = req.header("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            raise WebError(f"a request from {shown(origin)} is refused: only the demo's own page may call it", 403)

    def authorised(self, req: Request) -> bool:
        """Whether the request carries the run's token, compared in constant time: the header, or on a GET the
        query's `token` (a page cannot put a header on an <img>, a <video> or a link). Never a cookie: the browser
        sends a cookie to every port of the host (docs/WEBAPP.md). A POST (work started, a file
        stored) must use the header, which no form or link can carry."""
        given = req.header(TOKEN_HEADER)
        if given is None and req.method in ("GET", "HEAD"):
            given = req.query.get("token")
        return hmac.compare_digest((given or "").encode("utf-8", "replace"), self.token.encode())

    def admit(self, req: Request, length: int | None) -> bool:
        """Refuse a request from its method, path and headers alone, before its body is read: `guard`, the
        token, and its body's type and size for its path (`length`: None for a chunked body, whose size is
        unknown until it has arrived). Returns whether it is an upload, the one request with a large body."""
        self.guard(req)
        method, path = ("GET" if req.method == "HEAD" else req.method), req.path
        if method not in ("GET", "POST"):
            raise WebError(f"method {shown(req.method)} is not allowed", 405)
        if not self.authorised(req):
            raise WebError("missing or wrong token: open the address the server printed when it started "
                           "(it ends in ?token=...)", 403)
        if length is None:
            raise WebError("a Content-Length is required (a chunked body is not accepted)", 411)
        upload = (method, path) == ("POST", "/api/upload")
        want = "application/octet-stream" if upload else "application/json"
        if (upload or (method == "POST" and path in JSON_CALLS)) and req.content_type() != want:
            raise WebError(f"Content-Type must be {want}, got {shown(req.content_type() or 'none')}", 415)
        if not upload and length > MAX_JSON_BYTES:
            raise WebError(f"request of {length} bytes is over the limit of {MAX_JSON_BYTES} bytes", 413)
        return upload

    def respond(self, req: Request) -> tuple[int, list, bytes | Iterable[bytes]]:
        """Admit, then route."""
        self.admit(req, req.declared_length())
        app, method, path, query = self.app, req.method, req.path, req.query
        if method == "HEAD":
            method = "GET"
        if (method, path) == ("GET", "/"):
            return 200, [("Content-Type", "text/html; charset=utf-8")], PAGE.read_bytes()
        if (method, path) == ("GET", "/api/config"):
            return 200, [("Content-Type", "application/json")], _json_body(app.config())
        if (method, path) == ("POST", "/api/upload"):
            video = app.add_upload(query.get("name", "upload"), req.environ["wsgi.input"], req.length(),
                                   query.get("replaces"))
            return 200, [("Content-Type", "application/json")], _json_body(video)
        if (method, path) == ("GET", "/api/frame"):
            try:
                t = int(query.get("t", "0"))
            except ValueError:
                raise WebError("frame number must be a whole number") from None
            return 200, [("Content-Type", "image/jpeg")], app.frame_jpeg(query.get("video", ""), t)
        if (method, path) == ("GET", "/api/job"):
            return 200, [("Content-Type", "application/json")], _json_body(app.job(query.get("id", "")).as_json())
        if method == "POST" and path in JSON_CALLS:
            body = req.json()
            if path == "/api/clip":
                out = app.add_clip(body.get("name"), body.get("replaces"))
            elif path == "/api/track":
                out = app.start_job(body)
            else:
                out = app.cancel(str(body.get("job", "")))
            return 200, [("Content-Type", "application/json")], _json_body(out)
        if method == "GET" and (m := re.fullmatch(r"/files/(\w+)/([\w.]+)", path)):
            return self.file(req, app.output(m[1], m[2]), OUTPUTS[m[2]])
        raise WebError(f"no such page: {shown(req.method)} {shown(path)}", 404)

    @staticmethod
    def file(req: Request, path: Path, ctype: str) -> tuple[int, list, bytes | Iterable[bytes]]:
        """A file, or the byte range a <video> asks for, streamed in chunks."""
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d{0,18})-(\d{0,18})", (req.header("Range") or "").strip())
        if m and (m[1] or m[2]):
            start, end = (int(m[1]), int(m[2]) if m[2] else size - 1) if m[1] else (max(0, size - int(m[2])), size - 1)
            end = min(end, size - 1)
            if start > end:
                return 416, [("Content-Range", f"bytes */{size}"), ("Content-Type", ctype)], b""
            status = 206
        headers = [("Content-Type", ctype), ("Content-Length", str(end - start + 1)), ("Accept-Ranges", "bytes")]
        if status == 206:
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        if not ctype.startswith("video/"):
            headers.append(("Content-Disposition", f'attachment; filename="{path.name}"'))

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    yield chunk
                    left -= len(chunk)

        return status, headers, chunks()


class _Refused(HTTPError):
    """A request refused from its headers (`Site.admit`, the upload slots) or cut off at its deadline."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.code, self.reason = status, HTTPStatus(status).phrase


class _OneLineErrorTask(ErrorTask):
    """The answer to a request refused before it reached the application, as the API's one JSON line:
    malformed (a bad Content-Length, a header too large, a body over the limit...) or `_Refused`."""

    def execute(self) -> None:
        # waitress's stub calls the task's request an Error; it is the request's parser, which holds the error
        e = cast(HTTPRequestParser, self.request).error
        assert e is not None  # an ErrorTask is made for a request whose parsing failed
        msg = f"{e.reason}: {one_line(RuntimeError(e.body))}"
        if isinstance(e, _Refused):
            msg = e.body
        elif isinstance(e, RequestEntityTooLarge):
            msg = f"request body over the limit of {MAX_UPLOAD_BYTES // 2**20} MB"
        body = _json_body({"error": msg})
        # the parser's one 5xx, an unknown Transfer-Encoding, is the client's error like every other here
        self.status = f"{e.code} {e.reason}" if e.code < 500 or isinstance(e, _Refused) else "400 Bad Request"
        self.response_headers = [*self.response_headers, ("Content-Type", "application/json"), *SECURITY_HEADERS]
        self.set_close_on_finish()
        channel = self.channel
        assert isinstance(channel, _Channel)  # the one channel class whose error task this is
        channel.refused = True  # its body may still be arriving: the close lingers (_Channel.handle_close)
        self.content_length = len(body)
        self.write(body)


class _Parser(HTTPRequestParser):
    """waitress's parser of one request, which has its connection admit the request as soon as its headers
    are in, before any of its body is read, and which holds the request's deadline."""

    checked = False  # the headers have been judged
    upload = False  # it holds one of the server's upload slots until it is closed

    def __init__(self, adj, channel: _Channel):
        super().__init__(adj)
        self.channel = channel
        self.deadline = time.monotonic() + HEADER_SECONDS  # made when the request's first byte arrives

    def received(self, data: bytes) -> int:
        """Parse what arrived (waitress); once the headers are in, admit the request or refuse it."""
        n = super().received(data)
        if self.headers_finished and not self.checked and not self.empty and self.error is None:
            self.checked = True
            self.error = self.channel.admit(self)
            if self.error is not None:
                self.completed, self.expect_continue = True, False  # answered now: no "100 Continue"
        if self.error is not None:
            # answered now, without "100 Continue": waitress invites the body of a request it has already refused
            # from its headers (a Content-Length over the limit), then reads it whole before its 413
            self.completed, self.expect_continue = True, False
            return len(data)  # the rest is its body: dropped, never parsed as another request
        return n

    def close(self) -> None:
        """Free the body's buffer (a temporary file past 512 KB) and the upload slot."""
        super().close()
        if self.upload:
            self.upload = False
            self.channel.demo.end_upload()


class _Task(WSGITask):
    """waitress's task that runs the application on a request, which frees the request's body (its
    temporary file, its upload slot) as the answer starts: the application is done with it, and a client that
    sends its next upload on this answer finds the slot free."""

    def build_response_header(self) -> bytes:
        # waitress's stub calls the task's request an Error; it is the request's parser
        cast(HTTPRequestParser, self.request).close()
        return super().build_response_header()


class _Channel(HTTPChannel):
    """waitress's connection, bounded in what it may hold (docs/WEBAPP.md): each request is judged from its
    headers and must arrive by its deadline, and a connection that has not shown the token is closed to make
    room for a new one when the connections are at their limit."""

    task_class, error_task_class = _Task, _OneLineErrorTask
    admitted = False  # one of its requests carried the token: it is never closed to make room
    refused = False  # it was answered with a refusal: its close lingers
    linger_until: float | None = None
    evicted = False  # closed to make room (DemoServer.make_room)
    dropped = 0  # bytes read and dropped while lingering
    demo: DemoServer  # the server it belongs to: set by DemoServer on its subclass of this one

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        # waitress only calls parser_class(adj); its stub asks for a class where any such callable does
        self.parser_class = functools.partial(_Parser, channel=self)  # pyright: ignore[reportAttributeAccessIssue]
        self.demo.room_check_at = 0.0

    def admit(self, request: _Parser) -> _Refused | None:
        """Judge a request from its headers (`Site.admit`), give an upload one of the upload slots, and set the
        deadline for its body; the refusal, or None."""
        # waitress's stub of the parser leaves out the path and query that its parse_header sets
        path: str = request.path  # pyright: ignore[reportAttributeAccessIssue]
        query: str = request.query  # pyright: ignore[reportAttributeAccessIssue]
        environ = {"REQUEST_METHOD": request.command.upper(), "QUERY_STRING": query,
                   "PATH_INFO": "/" + path.lstrip("/") if path.startswith("/") else path}  # as waitress passes it
        for key, value in request.headers.items():
            environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
        try:
            upload = self.demo.site.admit(Request(environ), None if request.chunked else request.content_length)
            if upload and not self.demo.start_upload():
                raise WebError(f"another upload is being received (at most {UPLOAD_SLOTS} at once): try again "
                               "when it has finished", 503)
        except WebError as e:
            return _Refused(e.status, str(e))
        except Exception as e:  # a bug: one line for the client, the traceback on the console
            traceback.print_exc()
            return _Refused(500, f"server error: {type(e).__name__}: {one_line(e)}")
        request.upload, self.admitted = upload, True
        request.deadline = time.monotonic() + BODY_GRACE + request.content_length / MIN_BODY_RATE
        return None

    def readable(self) -> bool:
        """Whether to read (waitress); called on every turn of the server's loop, at least once a second, it
        also ends a lingering close, cuts off a request past its deadline, closes a connection whose client
        stopped reading its answer, and makes room at the limit."""
        self.demo.make_room()
        if self.evicted:
            return False
        if self.total_outbufs_len and time.time() - self.last_activity > self.adj.channel_timeout:
            # an answer its client has not read for the channel timeout: it holds the connection, and past
            # waitress's buffer its task waits for room, holding a thread. waitress's own timeout skips a
            # connection with a task, and closes through will_close, which waits for the socket to be writable
            self.close_now()  # this socket is not yet among those the loop selects on
            return False
        now = time.monotonic()
        if self.linger_until is not None:
            if now < self.linger_until and self.dropped < LINGER_BYTES:
                return True
            self.close_now()
            return False
        request = self.request
        # every request is a _Parser (parser_class), which holds its deadline
        if isinstance(request, _Parser) and not request.completed and not self.requests and now > request.deadline:
            self.expire(request)
        return super().readable()

    def writable(self) -> bool:
        """Whether to write (waitress); never once closed (readable() may close it just before)."""
        # _fileno: wasyncore's, left out of its stub (None once the socket is closed)
        return self._fileno is not None and super().writable()  # pyright: ignore[reportAttributeAccessIssue]

    def expire(self, request: _Parser) -> None:
        """Answer a request that did not arrive by its deadline with 408, then close: a client that trickles
        bytes is never silent, so waitress's channel timeout would never close it."""
        # requests_lock, requests (a list) and add_task (of a channel) as waitress has them: its stub leaves out
        # the lock, calls the list a Sequence and add_task's argument a Task
        with self.requests_lock:  # pyright: ignore[reportAttributeAccessIssue]
            if self.request is not request:
                return
            request.error = _Refused(408, f"the request did not arrive in time: its headers must arrive within "
                                          f"{HEADER_SECONDS} s, its body at {MIN_BODY_RATE // 1024} KB/s or faster")
            request.completed, request.expect_continue, self.request = True, False, None
            self.requests.append(request)  # pyright: ignore[reportAttributeAccessIssue]
            self.server.add_task(self)  # pyright: ignore[reportArgumentType]

    def handle_read(self) -> None:
        """Read a request (waitress), or while lingering, read and drop."""
        if self.linger_until is None:
            super().handle_read()
            return
        try:
            self.dropped += len(self.recv(self.adj.recv_bytes))  # at the end of the stream recv() closes
        except OSError:
            self.close_now()

    def handle_close(self) -> None:
        """Close; after a refusal, linger first: stop sending and drop what the client still sends for up to
        LINGER_SECONDS, since closing with its body unread resets the connection, and a client still sending
        can then lose the answer."""
        if self.refused and not self.evicted and self.linger_until is None and self.connected \
                and not self.total_outbufs_len and self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.linger_until = time.monotonic() + LINGER_SECONDS
                self.will_close = self.close_when_flushed = self.admitted = False
                self.demo.room_check_at = 0.0
                return
        self.close_now()

    def evict(self) -> None:
        """Have it closed to make room, without lingering, when the loop next writes (waitress's way to close:
        closing a socket now could close one that the loop is about to select on)."""
        self.evicted = self.will_close = True
        self.server.pull_trigger()  # a turn of the loop now, not after its one-second select

    def close_now(self) -> None:
        """Close the connection and free what its unfinished request holds (its body's file, an upload slot)."""
        if self.request is not None:
            self.request.close()
            self.request = None
        HTTPChannel.handle_close(self)


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host headers the server answers to: the loopback names, and the --host name, with the port."""
    names = {"127.0.0.1", "localhost", "[::1]", (f"[{host}]" if ":" in host else host).lower()}
    return {f"{n}:{port}" for n in names} | ({*names} if port == 80 else set())


_QUIET = logging.getLogger("pips2.webapp.waitress")  # waitress's warnings about load, silenced (DemoServer)
_QUIET.setLevel(logging.ERROR)


FILE_RESERVE = 64  # descriptors kept for the server's own files: uploads, spooled bodies, the decoder's pipes


def descriptor_room(wanted: int) -> int:
    """How many connections the process's descriptor limit leaves room for: the soft limit is raised toward the
    hard one when it is too low for `wanted` (+ FILE_RESERVE), else fewer connections are taken. Past the limit
    waitress's accept fails on every loop, at 100 % CPU for as long as the connections are held."""
    try:
        import resource
    except ImportError:  # no such limit (Windows)
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need, infinite = wanted + FILE_RESERVE, resource.RLIM_INFINITY
    if soft != infinite and soft < need:
        raised = need if hard == infinite else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # not allowed here: take fewer connections
            pass
    if soft != infinite and soft < need:
        return max(4, soft - FILE_RESERVE)  # the page's own requests need a few
    return wanted


class DemoServer:
    """The demo's waitress server on host:port (port 0: any free port), with the run's token."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
                 channel_timeout: int = CHANNEL_TIMEOUT, cleanup_interval: int = CLEANUP, threads: int = THREADS):
        self.app, self.host = app, host
        self.token = token or secrets.token_urlsafe(32)
        self.map: dict = {}
        self.uploads, self.upload_lock = 0, threading.Lock()
        self.room_check_at = 0.0  # when make_room next looks for a connection to close (time.time())
        self.site = Site(app, self.token, set())
        self.server = create_server(self.site, map=self.map, host=host, port=port, threads=threads,
                                    channel_timeout=channel_timeout, cleanup_interval=cleanup_interval,
                                    connection_limit=CONNECTION_LIMIT, max_request_header_size=MAX_HEADER_BYTES,
                                    max_request_body_size=MAX_UPLOAD_BYTES + 1, log_socket_errors=False,
                                    expose_tracebacks=False, ident="pips2", asyncore_loop_timeout=1)
        self.listeners = [d for d in self.map.values() if isinstance(d, BaseWSGIServer)]
        # waitress warns on stderr each time the connections reach their limit (handled here: make_room) and
        # each time requests wait for a thread: under a flood of connections, a line for each
        self.server.task_dispatcher.queue_logger = _QUIET
        owner = self

        class Channel(_Channel):
            """This server's connections."""

            # the class, not each connection, names its server: waitress makes them with the listener's args only
            demo: DemoServer = owner

        for d in self.listeners:
            d.channel_class, d.logger = Channel, _QUIET
        self.adj = self.listeners[0].adj  # one for all listeners
        # waitress stops accepting when its map holds connection_limit sockets, its listeners and trigger included
        self.adj.connection_limit = len(self.map) + descriptor_room(CONNECTION_LIMIT)
        self.port = int(self.listeners[0].getsockname()[1])  # (host, port) as numbers, the server's effective_port
        self.site.hosts = allowed_hosts(host, self.port)

    def start_upload(self) -> bool:
        """Take one of the UPLOAD_SLOTS for an upload about to be received; False when all are taken."""
        with self.upload_lock:
            if self.uploads >= UPLOAD_SLOTS:
                return False
            self.uploads += 1
            return True

    def end_upload(self) -> None:
        """Give an upload's slot back (its request is closed: answered, refused or cut off)."""
        with self.upload_lock:
            self.uploads -= 1

    def has_room(self) -> bool:
        """Whether another connection can be accepted (at the limit, waitress stops accepting)."""
        return len(self.map) < self.adj.connection_limit

    def make_room(self) -> None:
        """While the connections are at their limit (where waitress stops accepting), close one that has not
        shown the token: one lingering after a refusal, else the oldest open for EVICT_AFTER s or more (a
        browser sends its request at once; a younger one may not have been read yet). So connections without
        the token never shut the user out. Called by every connection on every turn of the loop, it looks only
        when something changed: a connection was accepted, one began to linger, or one reached EVICT_AFTER."""
        now = time.time()  # waitress's clock (creation_time)
        if self.has_room() or now < self.room_check_at:
            return
        channels = [c for c in self.map.values() if isinstance(c, _Channel)]
        if any(c.evicted for c in channels):  # one at a time: it closes on this turn
            return
        waiting = [c for c in channels if not c.admitted]
        idle = [c for c in waiting if c.linger_until is not None or now - c.creation_time >= EVICT_AFTER]
        if idle:
            min(idle, key=lambda c: (c.linger_until is None, c.creation_time)).evict()
        else:
            self.room_check_at = min((c.creation_time + EVICT_AFTER for c in waiting), default=math.inf)

    @property
    def url(self) -> str:
        """The page's address (without the token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def token_url(self) -> str:
        """The address to open: the page's, with the token that lets the browser in."""
        return f"{self.url}?token={self.token}"

    def serve_forever(self) -> None:
        """Serve until shutdown() or Ctrl-C."""
        self.server.run()

    def shutdown(self) -> None:
        """Stop serving (from any thread): the server's own loop closes every socket and ends."""
        # waitress's stub types the trigger as an int; it is a waitress.trigger.trigger, whose pull_trigger runs a thunk
        trigger = self.listeners[0].trigger
        try:
            trigger.pull_trigger(lambda: close_all(self.map, ignore_all=True))  # pyright: ignore[reportAttributeAccessIssue]
        except OSError:  # its pipe already closed: the loop has ended and closed every socket with it
            pass

    def close(self) -> None:
        """Close the sockets and stop the worker threads (after serve_forever returned)."""
        close_all(self.map, ignore_all=True)
        self.server.task_dispatcher.shutdown(timeout=2)


def _interrupt(stops: list[int], signum: int, frame) -> None:
    """Stop-signal handler (SIGINT, SIGTERM, SIGHUP, ...): the first stops serving as Ctrl-C would and is kept in
    `stops`; later ones are ignored. Another KeyboardInterrupt during the cleanup, or while the interpreter exits
    with the job's thread inside torch, printed a traceback or aborted the process."""
    if not stops:
        stops.append(signum)
        raise_stop(signum, KeyboardInterrupt())


def serve(app: App, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the demo until Ctrl-C or SIGTERM, then stop the job, remove its uploads and results, and exit 128 + the
    signal's number (130, 143) as the other long jobs do."""
    try:
        # the name looked up first: waitress says only "Invalid host/port specified." (a traceback) for one
        # that does not resolve
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server = DemoServer(app, host, port)
    except (OSError, ValueError) as e:
        app.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
        print(f"error: cannot listen on {host}:{port} ({why})", file=sys.stderr, flush=True)
        sys.exit(2)
    stops: list[int] = []  # the signal that stopped the server
    try:
        if threading.current_thread() is threading.main_thread():  # `kill` or a closed terminal: as Ctrl-C
            handler = functools.partial(_interrupt, stops)
            for sig in caught_stop_signals():  # left as they are: the handlers stay to the process's end
                signal.signal(sig, handler)
        for line in app.checkpoint_report():
            print(line, flush=True)
        if host in ("0.0.0.0", "::", ""):  # listening everywhere, but a page is only answered for its own Host
            print(f"note: --host={host} listens on every address, but the demo answers only requests addressed to "
                  f"{host} or this machine's loopback names; to open it from another machine give "
                  f"--host=<this machine's name or address>", flush=True)
        print(f"web demo on {server.token_url} (open this address; Ctrl-C stops it)", flush=True)
        server.serve_forever()  # returns on the first stop signal (waitress catches the KeyboardInterrupt)
    except KeyboardInterrupt:
        if not stops:  # Ctrl-C where no handler of ours was installed
            stops.append(signal.SIGINT)
    finally:
        server.close()
        app.close()  # cancels the job and joins its thread: it stops within one model call
        by = f" by {signal.Signals(stops[0]).name}" if stops else ""
        print(f"stopped{by}; uploads and results removed", flush=True)
    if stops:  # a supervisor (systemd, a wrapper) tells a stop from a clean end by 128 + the signal's number
        sys.exit(128 + stops[0])
