"""The web demo behind app.py: a standard-library HTTP server, a small JSON API over `track()`, one HTML page.

Nothing beyond the standard library and the project: http.server (a thread per request) serves webapp.html
(plain HTML + JS, no network), and tracking runs in a background thread, one job at a time, whose progress the
page polls. Every error reaches the page as {"error": "<one line>"}; tracebacks go to the server's console only.

API (JSON answers unless noted):
  GET  /                           the page
  GET  /api/config                 defaults: models, checkpoint per model, bundled clips, upload limit
  POST /api/upload?name=<file>     body: the video file's bytes -> the video (id, frames, height, width, fps)
  POST /api/clip                   {"name": "synthetic-1"} -> the video (the clip is generated on first use)
  GET  /api/frame?video=<id>&t=<k> frame k as a JPEG (at most 640 px on its long side)
  POST /api/track                  {"video", "points": [[t, x, y], ...], "grid_size", "grid_frame", "mask",
                                    "model", "checkpoint", "backward"} -> {"job": id}; points in video pixels,
                                    mask (optional): a PNG data URL of the video's size, the grid kept where painted
  GET  /api/job?id=<id>            {"state": queued|running|done|error, "stage", "progress", "message", "files"}
  GET  /files/<job>/<name>         tracks.mp4, tracks.csv, tracks.npz (demo.py's files; byte ranges for the video)
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from pips2.datasets.synthetic import write_synthetic_video
from pips2.hub import KNOWN, cache_dir, load_model
from pips2.tracking import (
    FrameSource,
    VideoFileFrames,
    check_queries,
    grid_queries,
    is_lbm,
    load_tracker,
    track,
    window_starts,
)
from pips2.utils.checkpoint import CheckpointError
from pips2.utils.video import VideoError, video_info
from pips2.utils.vis import write_outputs

PAGE = Path(__file__).parent / "webapp.html"
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
PREVIEW_SIDE = 640  # the page's frames: enough to click on, small enough to send at every slider step
CLIPS = {"synthetic-1": 1, "synthetic-2": 2, "synthetic-3": 3}  # bundled clip name -> generator seed
CLIP_FRAMES, CLIP_HW = 48, (256, 384)  # demo.py's synthetic video
MODELS = ("pips2", "lbm")
OUTPUTS = {"tracks.mp4": "video/mp4", "tracks.csv": "text/csv; charset=utf-8", "tracks.npz": "application/zip"}
DEFAULT_PIPS = "./reference_model"  # what demo.py and load_tracker use without --init_dir
POINT_BATCH = 256  # track()'s default
KEEP = 8  # opened videos and finished jobs kept; older ones are deleted, or a long-running server fills its disk


class WebError(Exception):
    """A request answered with one line for the page, and an HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def one_line(e: BaseException) -> str:
    """An exception as the one line the page shows."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Video:
    """An opened video: its file, a preview store for the page's frames, and its size."""

    id: str
    name: str
    path: Path
    preview: FrameSource
    frames: int
    hw: tuple[int, int]
    fps: float

    def as_json(self) -> dict:
        """What the page needs to show and click on it."""
        return {"video": self.id, "name": self.name, "frames": self.frames, "height": self.hw[0],
                "width": self.hw[1], "fps": self.fps}


@dataclass
class Job:
    """One tracking run; the worker thread updates it, the status endpoint reads it."""

    id: str
    video: Video
    out_dir: Path
    points: int
    state: str = "queued"
    stage: str = "waiting for another job"
    done: int = 0
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)

    def as_json(self) -> dict:
        """The job's status for the page's progress bar, and its files once done."""
        files = {name.split(".")[1]: f"/files/{self.id}/{name}" for name in OUTPUTS} if self.state == "done" else {}
        return {"job": self.id, "state": self.state, "stage": self.stage, "done": self.done, "total": self.total,
                "progress": self.done / self.total if self.total else 0.0, "message": self.message,
                "elapsed": round(time.time() - self.started, 1), "points": self.points, "frames": self.video.frames,
                "files": files}


class CountingFrames(FrameSource):
    """A FrameSource that reports how many frames were read: PIPs++ encodes each frame once per direction and
    LBM reads one frame per step, so frames read is the tracker's progress without hooking into it."""

    def __init__(self, src: FrameSource, on_read):
        super().__init__(len(src), src.src_hw, src.model_hw)
        self.src, self.on_read = src, on_read

    def _read(self, start: int, end: int) -> np.ndarray:
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


def preview_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """The page's frame size: the video's, shrunk to at most PREVIEW_SIDE on the long side."""
    s = min(1.0, PREVIEW_SIDE / max(hw))
    return max(1, round(hw[0] * s)), max(1, round(hw[1] * s))


def decode_mask(data_url: str, hw: tuple[int, int]) -> np.ndarray:
    """The page's painted mask (a PNG data URL at the video's size) as (H,W), nonzero where painted (its alpha)."""
    try:
        raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (IndexError, ValueError, binascii.Error):
        raise WebError("mask: not a PNG data URL") from None
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise WebError("mask: unreadable image")
    mask = img[..., 3] if img.ndim == 3 and img.shape[2] == 4 else (img if img.ndim == 2 else img.max(2))
    if mask.shape != tuple(hw):  # a stretched mask would select the wrong points (as demo.py's --mask)
        raise WebError(f"mask: {mask.shape[1]}x{mask.shape[0]} but the video is {hw[1]}x{hw[0]}")
    return mask


class App:
    """The demo's state: opened videos, jobs, the loaded model; shared by the request threads."""

    def __init__(self, init_dir: str | None = None, model: str = "pips2", device: str = "cpu", S: int = 128,
                 iters: int = 16, clip_dir: str | os.PathLike | None = None):
        if model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
        self.init_dir, self.model, self.device, self.S, self.iters = init_dir, model, device, int(S), int(iters)
        self.clip_dir = Path(clip_dir) if clip_dir else cache_dir() / "demo_clips"
        self.work = Path(tempfile.mkdtemp(prefix="pips2_webapp_"))  # uploads and results; removed by close()
        self.videos: dict[str, Video] = {}
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()  # guards the dicts
        self.clip_lock = threading.Lock()
        self.run_lock = threading.Lock()  # one tracking job at a time: two would only share the CPU
        self.net_key, self.net = None, None

    def close(self) -> None:
        """Remove the uploads and results."""
        shutil.rmtree(self.work, ignore_errors=True)

    def default_checkpoint(self, model: str) -> str:
        """The checkpoint used when the page leaves it empty: --init_dir for --model, else demo.py's default."""
        if model == self.model and self.init_dir:
            return str(self.init_dir)
        return DEFAULT_PIPS if model == "pips2" else ""

    def config(self) -> dict:
        """Defaults for the page."""
        return {"model": self.model, "models": list(MODELS), "clips": list(CLIPS),
                "checkpoints": {m: self.default_checkpoint(m) for m in MODELS}, "known": list(KNOWN),
                "max_upload_mb": MAX_UPLOAD_BYTES // 2**20}

    def _open(self, path: Path, name: str) -> dict:
        """Check that path is a decodable video and keep it with its preview frames; errors name `name`."""
        try:
            _, H, W, fps = video_info(path)
            preview = VideoFileFrames(path, preview_hw((H, W)))
        except VideoError as e:
            raise WebError(one_line(e).replace(str(path), name)) from None
        except Exception as e:  # a decoder failing mid-stream: still one line about this file
            raise WebError(f"{name}: cannot decode ({one_line(e)})") from None
        video = Video(uuid.uuid4().hex[:12], name, path, preview, len(preview), (H, W), fps)
        with self.lock:
            self.videos[video.id] = video
        self._evict()
        return video.as_json()

    def _evict(self) -> None:
        """Forget all but the KEEP newest videos and finished jobs, deleting their files (not a busy job's video,
        nor a cached clip)."""
        with self.lock:
            busy = {j.video.id for j in self.jobs.values() if j.state in ("queued", "running")}
            jobs = [j for j in self.jobs.values() if j.state in ("done", "error")][:-KEEP]
            videos = [v for v in list(self.videos.values())[:-KEEP] if v.id not in busy]
            for j in jobs:
                del self.jobs[j.id]
            for v in videos:
                del self.videos[v.id]
        for j in jobs:
            shutil.rmtree(j.out_dir, ignore_errors=True)
        for v in videos:  # the preview's memmap goes with its last reference
            if v.path.parent == self.work / "uploads":
                v.path.unlink(missing_ok=True)

    def add_upload(self, name: str, body, length: int) -> dict:
        """Store an uploaded video of `length` bytes read from `body` and open it."""
        name = Path(name or "upload").name or "upload"
        if length > MAX_UPLOAD_BYTES:
            raise WebError(f"{name}: {length / 2**20:.0f} MB is over the upload limit of "
                           f"{MAX_UPLOAD_BYTES // 2**20} MB", 413)
        if length <= 0:
            raise WebError(f"{name}: empty file")
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(name).suffix)[:8]
        path = self.work / "uploads" / f"{uuid.uuid4().hex[:12]}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        left = length
        with open(path, "wb") as f:
            while left:
                chunk = body.read(min(left, 1 << 20))
                if not chunk:
                    raise WebError(f"{name}: upload ended after {length - left} of {length} bytes")
                f.write(chunk)
                left -= len(chunk)
        return self._open(path, name)

    def add_clip(self, name: str) -> dict:
        """Open a bundled synthetic clip, generating it into the clip cache the first time."""
        if name not in CLIPS:
            raise WebError(f"unknown clip {name!r} (bundled: {', '.join(CLIPS)})")
        path = self.clip_dir / f"{name}.mp4"
        with self.clip_lock:
            if not path.is_file():
                self.clip_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{name}.{uuid.uuid4().hex[:8]}.mp4")  # temp + rename: no half clip
                try:
                    write_synthetic_video(tmp, CLIPS[name], CLIP_FRAMES, CLIP_HW)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return self._open(path, name)

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
        (where the mask, if any, is painted)."""
        rows = list(req.get("points") or [])
        try:
            g = int(req.get("grid_size") or 0)
            gt = int(req.get("grid_frame") or 0)
        except (TypeError, ValueError):
            raise WebError("grid size and grid frame must be whole numbers") from None
        if g < 0 or g > 64:
            raise WebError(f"grid size must be 0..64, got {g}")
        if not 0 <= gt < video.frames:
            raise WebError(f"grid frame {gt} is outside 0..{video.frames - 1}")
        if g:
            mask = decode_mask(str(req["mask"]), video.hw) if req.get("mask") else None
            grid = grid_queries(video.hw, g, gt, mask)
            if not len(grid):
                raise WebError("no grid point falls inside the painted mask")
            rows += grid.tolist()
        if not rows:
            raise WebError("no points: click on the frame or set a grid size")
        try:
            q = check_queries(np.asarray(rows, np.float64), video.frames, video.hw)
        except (TypeError, ValueError) as e:
            raise WebError(one_line(e)) from None
        return np.concatenate([q[:, :1].round(), q[:, 1:]], 1).astype(np.float32)

    def start_job(self, req: dict) -> dict:
        """Check a track request and run it in a background thread."""
        video = self.video(str(req.get("video", "")))
        model = str(req.get("model") or self.model)
        if model not in MODELS:
            raise WebError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        q = self.queries(video, req)
        try:
            S, iters = int(req.get("S") or self.S), int(req.get("iters") or self.iters)
        except (TypeError, ValueError):
            raise WebError("S and iters must be whole numbers") from None
        if S < 2 or iters < 1:
            raise WebError(f"S must be at least 2 and iters at least 1, got S={S}, iters={iters}")
        job_id = uuid.uuid4().hex[:12]
        job = Job(job_id, video, self.work / "jobs" / job_id, len(q))
        job.out_dir.mkdir(parents=True)
        with self.lock:
            self.jobs[job_id] = job
        self._evict()
        args = (job, q, model, str(req.get("checkpoint") or "").strip(), bool(req.get("backward")), S, iters)
        threading.Thread(target=self._run, args=args, daemon=True, name=f"track-{job_id}").start()
        return {"job": job_id}

    def load_net(self, model: str, checkpoint: str):
        """The tracker for the page's model and checkpoint (a path, or a name the hub knows), kept for reuse."""
        text = checkpoint or self.default_checkpoint(model)
        if not text:
            raise ValueError("LBM needs a checkpoint: a .pt/.pth file or folder, or the name lbm (downloaded once)")
        if self.net_key == (model, text):
            return self.net
        self.net_key, self.net = None, None  # free the old model before loading another
        if text in KNOWN:  # a hub name is its model's name: refuse a mismatch before any download
            if text != model:
                raise ValueError(f"checkpoint {text!r} is the {text} model; choose model {text} or another checkpoint")
            net = load_model(text, self.device)
        else:
            net = load_tracker(model, text, self.device)
        self.net_key, self.net = (model, text), net
        return net

    def _run(self, job: Job, q: np.ndarray, model: str, checkpoint: str, backward: bool, S: int,
             iters: int) -> None:
        """The worker: load the model, track with progress, draw the result video; errors end in job.message."""
        with self.run_lock:
            job.state, job.stage, job.started = "running", "loading the model", time.time()
            try:
                net = self.load_net(model, checkpoint)
                job.stage = "decoding the video"
                # at the size track() would pick for a path: LBM's input size, else the video's rounded to 8
                src = VideoFileFrames(job.video.path, tuple(net.size) if is_lbm(net) else None)
                lbm = is_lbm(net)
                total = tracking_steps(q[:, 0].astype(int), len(src), S, backward, lbm)
                job.stage, job.done, job.total = "tracking (frames read + windows run)", 0, total

                def step(n: int) -> None:
                    job.done = min(job.total, job.done + n)

                hook = None if lbm else net.register_forward_hook(lambda *_: step(1))  # a window's point batch
                try:
                    res = track(net, CountingFrames(src, step), q, S=S, iters=iters, backward=backward,
                                point_batch=POINT_BATCH)
                finally:
                    if hook is not None:
                        hook.remove()
                job.stage, job.done, job.total = "drawing the result video (frames)", 0, res["tracks"].shape[0]

                def drawn(t: int) -> None:
                    job.done = t + 1

                write_outputs(job.out_dir, job.video.path, q, res["tracks"], res["estimated"], job.video.fps,
                              res["visibility"], on_frame=drawn)
                job.stage, job.state = "done", "done"
            except (ValueError, VideoError, OSError, CheckpointError) as e:
                job.state, job.message = "error", one_line(e)
            except Exception as e:  # the page gets one line; the console keeps the traceback for a bug report
                traceback.print_exc()
                job.state, job.message = "error", f"tracking failed: {type(e).__name__}: {one_line(e)}"
            if job.state == "error":
                job.message = job.message.replace(str(job.video.path), job.video.name)

    def job(self, job_id: str) -> Job:
        """The job with this id."""
        return self._find(self.jobs, job_id, "unknown job")

    def output(self, job_id: str, name: str) -> Path:
        """A finished job's output file."""
        job = self.job(job_id)
        if name not in OUTPUTS or job.state != "done":
            raise WebError(f"no file {name!r} for this job", 404)
        return job.out_dir / name


class Handler(BaseHTTPRequestHandler):
    """Routes the page's requests to the App; answers every error as one JSON line."""

    server: DemoServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        """Quiet: the page polls several times a second."""

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            self.close_connection = True
            raise WebError("request too large", 413)
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WebError("request body is not JSON") from None
        if not isinstance(req, dict):
            raise WebError("request body must be a JSON object")
        return req

    def _send_file(self, path: Path, ctype: str) -> None:
        """A file, or the byte range a <video> asks for."""
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if m and (m[1] or m[2]):
            start, end = (int(m[1]), int(m[2]) if m[2] else size - 1) if m[1] else (max(0, size - int(m[2])), size - 1)
            end = min(end, size - 1)
            if start > end:
                return self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if not ctype.startswith("video/"):
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def _route(self) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = (self.command if self.command != "HEAD" else "GET", url.path)
        if route == ("GET", "/"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif route == ("GET", "/api/config"):
            self._json(app.config())
        elif route == ("POST", "/api/upload"):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise WebError("bad Content-Length") from None
            if length > MAX_UPLOAD_BYTES:
                self.close_connection = True  # the body stays unread
            self._json(app.add_upload(query.get("name", "upload"), self.rfile, length))
        elif route == ("POST", "/api/clip"):
            self._json(app.add_clip(str(self._body_json().get("name", ""))))
        elif route == ("GET", "/api/frame"):
            try:
                t = int(query.get("t", "0"))
            except ValueError:
                raise WebError("frame number must be a whole number") from None
            self._send(200, app.frame_jpeg(query.get("video", ""), t), "image/jpeg")
        elif route == ("POST", "/api/track"):
            self._json(app.start_job(self._body_json()))
        elif route == ("GET", "/api/job"):
            self._json(app.job(query.get("id", "")).as_json())
        elif route[0] == "GET" and (m := re.fullmatch(r"/files/(\w+)/([\w.]+)", url.path)):
            self._send_file(app.output(m[1], m[2]), OUTPUTS[m[2]])
        else:
            raise WebError(f"no such page: {self.command} {url.path}", 404)

    def _handle(self) -> None:
        try:
            self._route()
        except WebError as e:
            self._json({"error": str(e)}, e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (e.g. a <video> cancelling a range request)
        except Exception as e:  # a bug: one line for the page, the traceback on the console
            traceback.print_exc()
            self._json({"error": f"server error: {type(e).__name__}: {one_line(e)}"}, 500)

    do_GET = do_POST = do_HEAD = _handle


class DemoServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the App its handlers use."""

    daemon_threads = True

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 7860):
        super().__init__((host, port), Handler)
        self.app = app

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def _interrupt(signum: int, frame) -> None:
    """SIGTERM handler: stop serving as Ctrl-C would."""
    raise KeyboardInterrupt


def serve(app: App, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the demo until Ctrl-C, then remove its uploads and results."""
    try:
        server = DemoServer(app, host, port)
    except OSError as e:
        app.close()
        print(f"error: cannot listen on {host}:{port} ({e.strerror or one_line(e)})", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"web demo on {server.url} (Ctrl-C stops it)", flush=True)
    if threading.current_thread() is threading.main_thread():  # `kill` cleans up as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
