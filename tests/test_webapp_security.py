"""The web demo against hostile pages and clients (docs/WEBAPP.md): real sockets against a server on 127.0.0.1,
raw requests for what no well-behaved client sends."""

import base64
import contextlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import golden_model, left_by_a_killed_owner
from test_app import TOKEN, call, finish, page_wording, serving, upload

from pips2 import webapp
from pips2.utils import checkpoint
from pips2.utils.procs import OWNER_LOCK
from pips2.utils.video import header_wh, write_mp4

ROOT = Path(__file__).resolve().parents[1]
T, H, W = 8, 64, 96


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    checkpoint.save(d, 5, golden_model())
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """8 frames of 64x96 noise."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vid") / "noise.mp4"
    write_mp4(path, (rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(T)))
    return path


@pytest.fixture
def server(ckpt, tmp_path):
    with serving(webapp.App(init_dir=str(ckpt), iters=1, S=8, clip_dir=tmp_path / "clips")) as srv:
        yield srv


def raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes as they are and read the answer until the server closes or its Content-Length is read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        want = int(headers.get("content-length", -1))
        while want < 0 or len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def one_line_error(body: bytes) -> str:
    """The error line of an answer; it must be one JSON line without a traceback."""
    msg = json.loads(body)["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"",
            token: bool = True) -> tuple[int, dict, bytes]:
    """A well-formed request with the given headers (Host and, unless token=False, the token by default)."""
    h = {"Host": f"127.0.0.1:{port}", **({webapp.TOKEN_HEADER: TOKEN} if token else {}), **(headers or {})}
    if body or method == "POST":
        h.setdefault("Content-Length", str(len(body)))
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None)
    return raw(port, text.encode("latin-1") + b"Connection: close\r\n\r\n" + body)


# ---------------------------------------------------------------------------------------------------------
# Who may call it: Host (DNS rebinding), the token, Origin and content type (cross-site pages).


def test_host_must_be_a_loopback_name_or_the_given_one(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/config", {"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}",
                 ""):
        status, _, body = request(port, "GET", "/api/config", {"Host": host})
        assert status == 421 and "is not this server's name" in one_line_error(body), (host, status, body)
    # a page on a rebound name cannot start work either
    status, _, body = request(port, "POST", "/api/clip", {"Host": f"evil.example:{port}",
                                                          "Content-Type": "application/json"}, b'{"name": "x"}')
    assert status == 421, body
    assert webapp.allowed_hosts("myhost.lan", 7860) >= {"myhost.lan:7860", "127.0.0.1:7860", "localhost:7860"}
    assert "myhost.lan" not in webapp.allowed_hosts("myhost.lan", 7860)  # the port is part of the name



def test_a_request_naming_its_site_in_the_target_is_refused(server):
    """In the absolute form (GET http://name/path) the target's authority names the site, not the Host header:
    another site's name there passed the Host check, as waitress hands on only the path."""
    port = server.port
    for target in ("http://evil.example/api/config", f"http://127.0.0.1:{port}/api/config", "*"):
        status, _, body = request(port, "GET", target)
        assert status == 400 and "is not a path" in one_line_error(body), (target, status, body)
    assert request(port, "GET", "/api/config")[0] == 200

def test_every_call_needs_the_token(server, video, monkeypatch):
    port = server.port
    for path in ("/", "/api/config", "/api/job?id=x", "/api/frame?video=x&t=0", "/files/x/tracks.csv"):
        for headers in ({}, {webapp.TOKEN_HEADER: "wrong"}, {"Cookie": f"pips2_token_{port}=wrong"},
                        {"Cookie": f"other={TOKEN}"}):
            status, _, body = request(port, "GET", path, headers, token=False)
            assert status == 403 and "token" in one_line_error(body), (path, headers, status)
        status, _, body = request(port, "GET", path + ("&" if "?" in path else "?") + "token=wrong", token=False)
        assert status == 403 and "token" in one_line_error(body), (path, status)
    status, _, body = request(port, "POST", "/api/clip", {"Content-Type": "application/json"}, b'{"name": "x"}',
                              token=False)
    assert status == 403, body
    # compared in constant time
    seen = []
    monkeypatch.setattr(webapp.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or a == b)
    assert request(port, "GET", "/api/config", {webapp.TOKEN_HEADER: "guess"}, token=False)[0] == 403
    assert (b"guess", TOKEN.encode()) in seen


def test_the_token_is_never_a_cookie(server, video):
    """A browser sends a host's cookies to every port of it (RFC 6265), so to any other server on 127.0.0.1 the
    user visits: the token is never set as a cookie, nor taken from one. The printed address serves the page
    itself; GETs (<img>, <video>, links) may carry the token in their query, POSTs only in the header, and
    no answer sends its address (with the token) on as a Referer."""
    port = server.port
    status, headers, page = request(port, "GET", f"/?token={TOKEN}", token=False)
    assert status == 200 and b"<html" in page and "set-cookie" not in headers, (status, headers)
    assert headers["referrer-policy"] == "no-referrer"
    # the old cookie's name and value are not a token
    for cookie in (f"pips2_token_{port}={TOKEN}", f"a=b; pips2_token_{port}={TOKEN}"):
        for path in ("/", "/api/config"):
            status, headers, body = request(port, "GET", path, {"Cookie": cookie}, token=False)
            assert status == 403 and "token" in one_line_error(body), (cookie, path, status)
            assert "set-cookie" not in headers and headers["referrer-policy"] == "no-referrer", headers
    # the query's token opens every GET
    assert request(port, "GET", f"/api/config?token={TOKEN}", token=False)[0] == 200
    status, up = upload(server.url, video)
    assert status == 200, up
    status, headers, body = request(port, "GET", f"/api/frame?video={up['video']}&t=1&token={TOKEN}", token=False)
    assert status == 200 and headers["content-type"] == "image/jpeg" and "set-cookie" not in headers
    assert headers["referrer-policy"] == "no-referrer"
    # ... but no POST: a page of another site can put a query on a form's address, not a header on a request
    status, _, body = request(port, "POST", f"/api/clip?token={TOKEN}", {"Content-Type": "application/json"},
                              b'{"name": "x"}', token=False)
    assert status == 403 and "token" in one_line_error(body), status
    data = video.read_bytes()
    status, _, body = request(port, "POST", f"/api/upload?name=v.mp4&token={TOKEN}",
                              {"Content-Type": "application/octet-stream"}, data, token=False)
    assert status == 403 and "token" in one_line_error(body), status


def test_cross_origin_and_wrong_content_types_are_refused(server, video):
    port = server.port
    clip = b'{"name": "nope"}'
    # what a form or a no-cors fetch of another site can send: text/plain, its Origin, Sec-Fetch-Site
    for headers in ({"Content-Type": "text/plain", "Origin": "http://evil.example"},
                    {"Content-Type": "application/json", "Origin": "http://evil.example"},
                    {"Content-Type": "application/json", "Origin": "null"},
                    {"Content-Type": "application/json", "Origin": f"http://localhost:{port}"},  # not this Host
                    {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
                    {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"}):
        for path in ("/api/clip", "/api/track", "/api/cancel"):
            status, _, body = request(port, "POST", path, headers, clip)
            assert status == 403 and "refused" in one_line_error(body), (path, headers, status, body)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, _, body = request(port, "POST", "/api/track", {"Content-Type": ctype}, b'{"video": "x"}')
        assert status == 415 and "application/json" in one_line_error(body), (ctype, status)
        status, _, body = request(port, "POST", "/api/upload?name=v.mp4", {"Content-Type": ctype},
                                  video.read_bytes())
        assert status == 415 and "application/octet-stream" in one_line_error(body), (ctype, status)
    assert server.app.videos == {} and server.app.jobs == {}
    # the page's own requests pass: same Origin, same-origin fetch
    same = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, _, body = request(port, "POST", "/api/clip", same, clip)
    assert status == 400 and "unknown clip" in one_line_error(body)
    for method in ("OPTIONS", "PUT", "DELETE"):  # a CORS preflight never succeeds
        status, headers, body = request(port, method, "/api/track", {"Origin": "http://evil.example",
                                                                     "Access-Control-Request-Method": "POST"})
        assert status in (403, 405) and not any(k.startswith("access-control") for k in headers), (method, status)


def test_checkpoint_field_cannot_probe_files(server, video, tmp_path):
    """Paths come from the command line only: an existing file, an unreadable one and a missing one get the
    same answer, and no job opens them."""
    vid = upload(server.url, video)[1]["video"]
    (tmp_path / "secret.txt").write_text("#!/bin/sh\n")
    answers = set()
    for ckpt in ("/etc/shadow", "/etc/passwd", str(tmp_path / "secret.txt"), str(tmp_path / "missing"), str(tmp_path),
                 "../reference_model", "lbm"):
        status, body = call(f"{server.url}api/track", {"video": vid, "points": [[0, 5, 5]], "checkpoint": ckpt})
        answers.add((status, one_line_error(body)))
    assert len(answers) == 1 and next(iter(answers))[0] == 400, answers
    assert server.app.jobs == {}


def test_a_bad_checkpoint_file_is_not_quoted(tmp_path, video, capsys):
    """A --init_dir that is no checkpoint: the page learns that it failed, not the file's bytes (the console
    keeps the whole line)."""
    bad = tmp_path / "model-000000001.pth"
    bad.write_text("#secret text\n")  # not a torch file at all: refused before any job, in the page's words
    with serving(webapp.App(init_dir=str(bad), clip_dir=tmp_path / "clips")) as srv:
        vid = upload(srv.url, video)[1]["video"]
        status, body = call(f"{srv.url}api/track", {"video": vid, "points": [[0, 5, 5]]})
        msg = page_wording(json.loads(body)["error"])
        assert status == 409 and "is not a checkpoint" in msg and "secret" not in msg, (status, msg)
        assert srv.app.jobs == {}
    bad.write_bytes(b"PK\x03\x04#secret text\n")  # starts as torch's zip files do: the job's load says it failed
    with serving(webapp.App(init_dir=str(bad), clip_dir=tmp_path / "clips")) as srv:
        vid = upload(srv.url, video)[1]["video"]
        status, body = call(f"{srv.url}api/track", {"video": vid, "points": [[0, 5, 5]]})
        s = finish(srv.url, json.loads(body)["job"])
    assert s["state"] == "error" and "not a checkpoint" in s["message"], s
    assert "secret" not in s["message"] and "text file" not in s["message"], s  # nothing of the file itself
    assert "operand" not in s["message"].lower() and "console" in s["message"], s  # "#" is operand 35
    assert "choose another checkpoint in the list" in page_wording(s["message"]), s
    assert "model-000000001.pth" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Bounds: every number a request carries, and every size a file declares, checked before anything is spent.


def track_answer(server, req: dict | bytes) -> tuple[int, str]:
    status, body = call(f"{server.url}api/track", req) if isinstance(req, dict) else \
        call(f"{server.url}api/track", req, {"Content-Type": "application/json"})
    return status, one_line_error(body)


def test_numbers_out_of_bounds_are_one_line(server, video, monkeypatch):
    vid = upload(server.url, video)[1]["video"]
    good = {"video": vid, "points": [[0, 5, 5]]}
    for key, value, words in (("iters", 1e9, "iters must be in 1..32"), ("iters", 0, "iters must be in"),
                              ("iters", -3, "iters must be in"), ("iters", 2.5, "whole number"),
                              ("iters", "16", "whole number"), ("iters", True, "whole number"),
                              ("S", 1, "S must be in 2..128"), ("S", 10**30, "S must be in"),
                              ("S", 1e308, "S must be in 2..128, got 1e+308"),  # not its 309 digits
                              ("grid_size", 65, "grid size must be in 0..64"), ("grid_size", -1, "grid size"),
                              ("grid_frame", T, f"grid frame must be in 0..{T - 1}"),
                              ("points", [[0, 5, 5]] * (webapp.MAX_CLICKS + 1), "at most"),
                              ("points", [[0.5, 5, 5]], "whole number"), ("points", [[0, -1, 5]], "outside"),
                              ("points", [[0, 5, 1e30]], "outside"), ("points", [[0, 5]], "[t, x, y]"),
                              ("points", [[0, "5", 5]], "finite number"), ("points", "abc", "list"),
                              ("backward", "yes", "true or false"), ("backward", 0, "true or false"),
                              ("backward", 1, "true or false"), ("backward", "", "true or false"),
                              ("model", ["pips2"], "model must be"),
                              ("mask", 5, "PNG data URL")):
        status, msg = track_answer(server, {**good, key: value, "grid_size": 1} if key == "mask" else
                                   {**good, key: value})
        assert status == 400 and words in msg, (key, value, status, msg)
    for value, words in ((b"Infinity", "request body: Infinity is not"), (b"NaN", "request body: NaN is not"),
                         (b"-Infinity", "request body: -Infinity is not"),
                         (b"1" + b"0" * 5000, "request body: a number of 5001 digits is not one JSON allows here "
                                              "(at most 100)"),
                         (b"-" + b"1" * 101, "request body: a number of 101 digits"),
                         (b"[1, 2", "request body: not JSON"),
                         (b"1e400", "S must be a whole number")):  # JSON's 1e400 is Python's inf
        text = b'{"video": "%s", "points": [[0, 5, 5]], "S": %s}' % (vid.encode(), value)
        status, msg = track_answer(server, text)
        assert status == 400 and words in msg, (value[:20], status, msg)
    monkeypatch.setattr(webapp, "MAX_TRACK_VALUES", 10 * T)
    status, msg = track_answer(server, {**good, "grid_size": 4})
    assert status == 413 and "track values" in msg, msg
    status, _, body = request(server.port, "POST", "/api/track", {"Content-Type": "application/json"},
                              b"[" * (webapp.MAX_JSON_BYTES + 1))
    assert status == 413 and "over the limit" in one_line_error(body)
    assert server.app.jobs == {}


def _files_of(work: Path) -> list[Path]:
    """The files the server keeps in its work folder, but the lock its owner holds there."""
    return [p for p in work.rglob("*") if p.is_file() and p.name != OWNER_LOCK]


def test_a_video_whose_frames_are_over_the_bound_is_refused_before_decoding(server, tmp_path):
    """An 8 KB mp4 of 300 grey 640x640 frames (369 MB decoded) is refused from its header: nothing decoded,
    the upload deleted."""
    grey = tmp_path / "grey.mp4"
    write_mp4(grey, (np.full((640, 640, 3), 128, np.uint8) for _ in range(300)))
    assert grey.stat().st_size < 20_000
    status, info = upload(server.url, grey)
    assert status == 413 and "300 frames of 640x640" in info["error"] and "over the bound of 256 MB" in info["error"]
    assert not _files_of(server.app.work)  # neither the upload nor any frames
    # one frame too large for the encoder's memory, whatever the frame count
    big = tmp_path / "big.mp4"
    write_mp4(big, [np.zeros((1200, 2000, 3), np.uint8)] * 2)
    status, info = upload(server.url, big, "a%0Ab.mp4")  # a newline in the name
    assert status == 413 and info["error"].startswith("a?b.mp4: frames of 2000x1200 are over the bound"), info
    assert not _files_of(server.app.work)


def test_a_video_cut_short_says_so(server, tmp_path):
    """An mp4 cut in half is refused in one line (utils/video finds the cut from its boxes); a cut container of
    another kind opens with the frames that decode, and a warning naming both counts."""
    ffmpeg = webapp.imageio_ffmpeg.get_ffmpeg_exe()
    noise = "color=gray:s=96x64:r=24:d=2,noise=alls=100:allf=t"  # 2 s of noise: each frame takes its share
    for name, extra in (("whole.mp4", ["-movflags", "+faststart"]), ("whole.mkv", [])):
        subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", noise, "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        *extra, str(tmp_path / name)], check=True)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name.replace("whole", "cut")).write_bytes(data[: len(data) // 2])
    status, info = upload(server.url, tmp_path / "cut.mp4")
    assert status == 400 and info["error"].startswith("cut.mp4: cut short (the file ends at byte"), info
    status, info = upload(server.url, tmp_path / "cut.mkv")
    assert status == 200 and 0 < info["frames"] < 48, info
    assert info["warning"] == (f"cut.mkv: its header says 2 s (48 frames at 24 fps) but only {info['frames']} frames "
                               f"decode (a file cut short?)")
    assert upload(server.url, tmp_path / "whole.mp4")[1]["warning"] == ""
    assert upload(server.url, tmp_path / "whole.mkv")[1]["warning"] == ""


def test_decoding_stops_at_its_bound(video, tmp_path):
    """Whatever a header declared, decoding writes at most `limit` frames, and nothing once it fails."""
    with pytest.raises(webapp.VideoError, match="decodes to more than 3 frames of 48x32"):
        webapp.DecodedFrames(video, lambda hw: (32, 48), tmp_path, 3 * 32 * 48 * 3 + 100, "noise.mp4")
    assert list(tmp_path.iterdir()) == []
    frames = webapp.DecodedFrames(video, lambda hw: (hw[0] // 2, hw[1] // 2), tmp_path, T * 32 * 48 * 3, "noise.mp4")
    assert len(frames) == T and frames.src_hw == (H, W) and frames.get(2, 5).shape == (3, 32, 48, 3)
    assert frames.file.stat().st_size == T * 32 * 48 * 3
    frames.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed DecodedFrames"):  # not a TypeError about None
        frames.get(0, 1)
    # the page's frames shrink until a long video's fit their bound
    h, w = webapp.preview_hw((1080, 1920), 5000)
    assert 5000 * h * w * 3 <= webapp.MAX_PREVIEW_BYTES and w / h == pytest.approx(1920 / 1080, rel=0.02)
    assert webapp.preview_hw((96, 128), 10) == (96, 128)


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h (its pixels: one empty row's worth of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))


def test_a_mask_is_sized_from_its_header_before_decoding(server, video, monkeypatch):
    vid = upload(server.url, video)[1]["video"]
    decoded = []
    real = webapp.cv2.imdecode
    monkeypatch.setattr(webapp.cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    for raw, words in ((png_header(20000, 20000), f"20000x20000 but the video is {W}x{H}"),
                       (cv2.imencode(".jpg", np.zeros((H + 1, W, 3), np.uint8))[1].tobytes(), f"{W}x{H + 1} but"),
                       (cv2.imencode(".bmp", np.zeros((H, W, 3), np.uint8))[1].tobytes(), "PNG or JPEG"),
                       (b"\xff\xd8\xff\xe0\x00", "PNG or JPEG")):
        mask = "data:image/png;base64," + base64.b64encode(raw).decode()
        status, msg = track_answer(server, {"video": vid, "grid_size": 2, "mask": mask})
        assert status == 400 and words in msg, (status, msg)
    assert decoded == []
    for img in (np.zeros((H, W), np.uint8), np.zeros((H, W, 3), np.uint8)):
        for ext in (".png", ".jpg"):
            raw = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if ext == ".jpg" else [])[1].tobytes()
            assert header_wh(raw) == (W, H), ext


# ---------------------------------------------------------------------------------------------------------
# Jobs: one at a time, a clear "busy", and a cancel.


def slow_track(net, src, q, **kwargs):
    """A tracker that reads frame 0 again and again for up to 20 s (the real one, with a cancel, stops sooner)."""
    end = time.time() + 20
    while time.time() < end:
        src.get(0, 1)
        time.sleep(0.02)
    return {"tracks": np.zeros((len(src), len(q), 2), np.float32), "estimated": np.ones((len(src), len(q)), bool),
            "visibility": None}


def test_one_job_at_a_time_and_cancel(server, video, monkeypatch):
    monkeypatch.setattr(webapp, "track", slow_track)
    vid = upload(server.url, video)[1]["video"]
    status, body = call(f"{server.url}api/track", {"video": vid, "points": [[0, 5, 5]]})
    assert status == 200, body
    job = json.loads(body)["job"]
    deadline = time.time() + 30
    while json.loads(call(f"{server.url}api/job?id={job}")[1])["stage"].startswith(("starting", "loading",
                                                                                    "decoding")):
        assert time.time() < deadline
        time.sleep(0.05)
    status, body = call(f"{server.url}api/track", {"video": vid, "points": [[0, 5, 5]]})
    assert status == 409 and "busy" in one_line_error(body)
    t0 = time.time()
    status, body = call(f"{server.url}api/cancel", {"job": job})
    assert status == 200, body
    s = finish(server.url, job, timeout=10)
    assert s["state"] == "cancelled" and s["files"] == {} and time.time() - t0 < 5, s
    assert not (server.app.work / "jobs" / job).exists() and not list((server.app.work / "frames").iterdir())
    assert call(f"{server.url}api/cancel", {"job": "nope"})[0] == 404
    # the server takes the next job
    monkeypatch.undo()
    status, body = call(f"{server.url}api/track", {"video": vid, "points": [[0, 5, 5]]})
    assert status == 200 and finish(server.url, json.loads(body)["job"])["state"] == "done"


# ---------------------------------------------------------------------------------------------------------
# Uploads leave nothing behind.


def test_uploads_are_removed_when_they_fail_are_cut_off_or_replaced(server, video, tmp_path):
    uploads = server.app.work / "uploads"
    (tmp_path / "notes.mp4").write_text("not a video\n")
    assert upload(server.url, tmp_path / "notes.mp4")[0] == 415
    assert not list(uploads.iterdir())
    # cut off: the client sends 1000 of 100000 bytes and goes away
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /api/upload?name=v.mp4 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"{webapp.TOKEN_HEADER}: {TOKEN}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: 100000\r\n\r\n".encode() + video.read_bytes()[:1000])
    time.sleep(0.5)
    assert not list(uploads.iterdir())
    # replaced: the page's next video removes its previous one
    first = upload(server.url, video)[1]["video"]
    stored = server.app.video(first)
    second = json.loads(call(f"{server.url}api/upload?name=b.mp4&replaces={first}", video.read_bytes(),
                             {"Content-Type": "application/octet-stream"})[1])["video"]
    assert not stored.path.exists() and not stored.preview.file.exists() and first not in server.app.videos
    assert call(f"{server.url}api/clip", {"name": "nope", "replaces": second})[0] == 400
    status, body = call(f"{server.url}api/clip", {"name": "synthetic-1", "replaces": [second]})
    assert status == 400 and "replaces" in one_line_error(body)


# ---------------------------------------------------------------------------------------------------------
# HTTP: malformed and half-sent requests.


def test_malformed_requests_are_4xx_with_one_line(server):
    port = server.port
    host = f"Host: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
    upload_head = f"POST /api/upload?name=v.mp4 HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
    track_head = f"POST /api/track HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
    cases = {
        "Content-Length -1": upload_head + "Content-Length: -1\r\n\r\n",
        "Content-Length abc": upload_head + "Content-Length: abc\r\n\r\n",
        "Content-Length 1e3": upload_head + "Content-Length: 1e3\r\n\r\n",
        "two Content-Lengths": upload_head + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
        "no Content-Length": upload_head + "\r\n",
        "JSON without a length": f"POST /api/track HTTP/1.1\r\n{host}Content-Type: application/json\r\n\r\n",
        "huge Content-Length": upload_head + f"Content-Length: {10**30}\r\n\r\n",
        "body over the limit": upload_head + f"Content-Length: {webapp.MAX_UPLOAD_BYTES + 1}\r\n\r\n",
        "bad chunks": upload_head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "unknown transfer coding": upload_head + "Transfer-Encoding: gzip\r\n\r\n",
        "garbage request line": "GARBAGE\r\n\r\n",
        "header without a colon": f"GET /api/config HTTP/1.1\r\n{host}Nonsense\r\n\r\n",
        "bare LF in the request line": "GET /api/config\nHTTP/1.1\r\n\r\n",
        "huge header": f"GET /api/config HTTP/1.1\r\n{host}X-Big: {'a' * 70000}\r\n\r\n",
        "no Host (HTTP/1.0)": "GET /api/config HTTP/1.0\r\n\r\n",
        "unknown method": f"BREW /api/config HTTP/1.1\r\n{host}\r\n",
        "bad frame number": f"GET /api/frame?video=x&t=1e9 HTTP/1.1\r\n{host}\r\n",
        "too many parameters": f"GET /api/job?{'&'.join(f'a{i}=1' for i in range(50))} HTTP/1.1\r\n{host}\r\n",
        "bad cookie": f"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: ;;==\x01\r\n\r\n",
        "absurd range": f"GET /files/x/tracks.mp4 HTTP/1.1\r\n{host}Range: bytes={'9' * 40}-\r\n\r\n",
        "not JSON": track_head + "Content-Length: 3\r\n\r\n\xff\xfe{",
        "JSON array": track_head + "Content-Length: 2\r\n\r\n[]",
        "deep JSON": track_head + f"Content-Length: 200000\r\n\r\n{'[' * 100000}{']' * 100000}",
    }
    for name, text in cases.items():
        status, _, body = raw(port, text.encode("latin-1"))
        assert 400 <= status < 500, (name, status, body[:200])
        one_line_error(body)


def test_half_sent_requests_hold_no_thread_and_are_closed(ckpt, tmp_path):
    """50 connections that send half a request (half of them the headers and a bit of the body of a request
    with the token, which the server admits and then waits for): the server still answers others at once, and
    closes them once silent for its channel timeout (1 s here, 30 s by default)."""
    app = webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")
    with serving(app, channel_timeout=1, cleanup_interval=1) as srv:
        held = []
        try:
            for i in range(50):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                half = (f"POST /api/clip HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{")
                s.sendall(b"GET /api/con" if i % 2 else half.encode())
                held.append(s)
            t0 = time.time()
            assert call(f"{srv.url}api/config")[0] == 200 and time.time() - t0 < 2
            deadline = time.time() + 10
            for s in held:  # each is closed by the server (recv returns b"" once it is)
                s.settimeout(max(0.1, deadline - time.time()))
                assert s.recv(100) == b""
        finally:
            for s in held:
                s.close()


# ---------------------------------------------------------------------------------------------------------
# What connections may hold: a request is judged from its headers before its body is read, uploads are
# received two at a time, a request that does not arrive in time is cut off, and connections without the
# token never shut the user out (docs/WEBAPP.md).


def open_files() -> int:
    """Deleted-but-open files of this process (the server runs in it): where waitress spools bodies."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            n += os.readlink(fd).endswith("(deleted)")
        except OSError:
            pass
    return n


def answer(s: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """The status and body of the answer on s, or None when none came within timeout seconds."""
    buf, end = b"", time.time() + timeout
    try:
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None, head  # the server's every answer has one
                want = int(length[1])
                if len(body) >= want:
                    return int(head.split()[1]), body[:want]
            s.settimeout(max(0.01, end - time.time()))
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
    except (TimeoutError, ConnectionError):
        return None


def test_a_refused_request_is_answered_from_its_headers_and_its_body_never_stored(server, video):
    """The demo's checks run on the headers: a refused request gets its one line at once, while the client is
    still sending, and the server keeps none of its body (3 MB each here of a declared 150 MB; waitress would
    otherwise spool each to a temporary file for as long as the client keeps sending)."""
    port, big = server.port, 150 * 2**20
    ok = f"Host: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
    up = "POST /api/upload?name=v.mp4 HTTP/1.1\r\n"
    cases = [
        (421, "is not this server's name", f"{up}Host: evil.example\r\nContent-Type: text/plain\r\n"),
        (403, "token", f"{up}Host: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"),
        (403, "refused", f"{up}{ok}Origin: http://evil.example\r\nContent-Type: application/octet-stream\r\n"),
        (415, "application/octet-stream", f"{up}{ok}Content-Type: text/plain\r\n"),
        (415, "application/json", f"POST /api/track HTTP/1.1\r\n{ok}Content-Type: text/plain\r\n"),
        (413, "over the limit", f"POST /api/clip HTTP/1.1\r\n{ok}Content-Type: application/json\r\n"),
        (413, "over the limit", f"GET /api/config HTTP/1.1\r\n{ok}"),
    ]
    before, socks = open_files(), []
    try:
        for _, _, head in cases:
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
            s.sendall(f"{head}Content-Length: {big}\r\n\r\n".encode())
            with contextlib.suppress(OSError):  # the server may have closed already: it drops the rest
                s.sendall(b"\0" * (3 * 2**20))
        time.sleep(0.3)
        assert open_files() <= before, "bodies of refused requests are held in temporary files"
        for s, (status, words, head) in zip(socks, cases, strict=True):
            got = answer(s, 5)
            assert got is not None, f"no answer before the body was sent: {head!r}"
            assert got[0] == status and words in one_line_error(got[1]), (head, got)
        # a chunked body (its size is unknown until it has arrived) is refused the same way
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
        s.sendall(f"{up}{ok}Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        got = answer(s, 5)
        assert got is not None and got[0] == 411 and "Content-Length" in one_line_error(got[1]), got
    finally:
        for s in socks:
            s.close()
    assert server.app.videos == {} and server.app.jobs == {}
    # the page's own requests still pass
    upload_ok(port, video.read_bytes())


def test_a_body_over_the_limit_is_refused_before_the_client_is_invited_to_send_it(server):
    """`Expect: 100-continue` (curl's way for files over 1 MB) with a Content-Length over the upload limit: the
    server answered "100 Continue", read and spooled 200 MB, and only then said 413. The 413 is now the first
    answer, from the headers."""
    port = server.port
    head = (f"POST /api/upload?name=v.mp4 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n")
    for length in (webapp.MAX_UPLOAD_BYTES + 1, 99999999999):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode())
            s.settimeout(5)
            first = b""
            while chunk := s.recv(65536):  # the server may send its headers and body apart: up to its close
                first += chunk
        assert first.startswith(b"HTTP/1.1 413 "), first[:200]
        assert b"100 Continue" not in first and b"over the limit" in first, first[:400]
    assert server.app.videos == {}


def test_a_refused_client_still_sending_gets_its_answer_and_a_clean_end(server):
    """After a refusal the server stops sending and, for a moment (LINGER_SECONDS), reads and drops what the
    client still sends: closing with the body unread would reset the connection, and a client (Windows drops
    what it received on a reset) could lose the answer."""
    port = server.port
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST /api/upload HTTP/1.1\r\nHost: evil.example\r\nContent-Length: {10**8}\r\n\r\n".encode()
                  + b"\0" * 100_000)
        got = answer(s, 5)
        assert got is not None and got[0] == 421, got
        time.sleep(0.2)
        s.sendall(b"\0" * 100_000)  # still sending: read and dropped, no reset
        s.settimeout(5)
        assert s.recv(100) == b""  # the server's end of its side, after the answer


def upload_head(port: int, length: int) -> bytes:
    """The headers of an upload of `length` bytes, with the token."""
    return (f"POST /api/upload?name=v.mp4 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()


def upload_ok(port: int, data: bytes) -> None:
    """An upload with the token goes through."""
    status, _, body = raw(port, upload_head(port, len(data)) + data)
    assert status == 200, body


def test_uploads_are_received_a_few_at_a_time(server, video, monkeypatch):
    """Each upload is spooled to a temporary file while it arrives: only UPLOAD_SLOTS at once (1 here), so
    the disk they take is bounded; another gets 503 and one line at once, from its headers."""
    monkeypatch.setattr(webapp, "UPLOAD_SLOTS", 1, raising=False)
    port, data = server.port, video.read_bytes()
    first = socket.create_connection(("127.0.0.1", port))
    try:
        first.sendall(upload_head(port, len(data)) + data[:1000])
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(upload_head(port, len(data)))
            got = answer(s, 5)
        assert got is not None and got[0] == 503 and "another upload" in one_line_error(got[1]), got
        first.sendall(data[1000:])
        got = answer(first, 30)
        assert got is not None and got[0] == 200, got
    finally:
        first.close()
    upload_ok(port, data)  # the slot is free again once an upload is done...
    with socket.create_connection(("127.0.0.1", port)) as s:  # ... or cut off
        s.sendall(upload_head(port, len(data)) + data[:1000])
        time.sleep(0.3)
    time.sleep(0.3)
    upload_ok(port, data)


class Trickle(threading.Thread):
    """Sockets that each send their request's first bytes, then one more byte every 0.2 s until the server
    answers or closes; `answers` holds (status, seconds after the start) for each, in the order they came."""

    def __init__(self, port: int, heads: list[bytes]):
        super().__init__(daemon=True)
        self.port, self.heads, self.answers, self.stop = port, heads, [], threading.Event()

    def run(self) -> None:
        t0 = time.time()
        socks = []
        try:
            for head in self.heads:  # as a browser does: the headers right after connecting
                socks.append(socket.create_connection(("127.0.0.1", self.port)))
                socks[-1].sendall(head)
                time.sleep(0.05)
            live = list(socks)
            while live and not self.stop.wait(0.2):
                ready, _, _ = select.select(live, [], [], 0)
                for s in ready:
                    got = answer(s, 2)
                    self.answers.append((got and got[0], time.time() - t0))
                    live.remove(s)
                for s in list(live):
                    try:
                        s.sendall(b" ")
                    except OSError:  # closed since the select(): its answer may have come first
                        got = answer(s, 1)
                        self.answers.append((got and got[0], time.time() - t0))
                        live.remove(s)
        finally:
            for s in socks:
                s.close()


def test_requests_that_trickle_are_cut_off_at_their_deadline(ckpt, tmp_path, monkeypatch):
    """Connections that send a byte now and then are never silent, so the channel timeout never closes
    them: each request must arrive by its deadline (its headers within HEADER_SECONDS of its first byte, its
    body at MIN_BODY_RATE after BODY_GRACE s), or it gets 408 and its connection is closed. Here 5 trickling
    requests with the token against a limit of 4 connections: on the user's side, a request is answered
    once the first deadline passes (1 s here; by default 10 s + a body's length at 256 KB/s)."""
    monkeypatch.setattr(webapp, "CONNECTION_LIMIT", 4)
    for name, value in {"HEADER_SECONDS": 1, "BODY_GRACE": 1, "MIN_BODY_RATE": 10**6}.items():
        monkeypatch.setattr(webapp, name, value, raising=False)
    app = webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")
    with serving(app) as srv:
        port = srv.port
        body = (f"POST /api/clip HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").encode()
        trickle = Trickle(port, [body] * 5)
        trickle.start()
        try:
            time.sleep(0.5)
            t0 = time.time()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {TOKEN}"
                          f"\r\n\r\n".encode())
                got = answer(s, 8)
            assert got is not None and got[0] == 200, got
            assert time.time() - t0 < 6
            trickle.join(10)
            assert [a for a, _ in trickle.answers] == [408] * 5, trickle.answers
            assert all(t < 8 for _, t in trickle.answers), trickle.answers
            # headers sent a byte at a time are cut off the same way, token or not
            heads = Trickle(port, [f"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode(), b"G"])
            heads.start()
            heads.join(10)
            assert [a for a, _ in heads.answers] == [408] * 2 and all(t < 6 for _, t in heads.answers), heads.answers
        finally:
            trickle.stop.set()


def test_connections_without_the_token_never_shut_the_user_out(ckpt, tmp_path, monkeypatch):
    """Connections that send nothing, or trickle headers without the token, fill the connection limit (4
    here, 100 by default), where waitress stops accepting; then the oldest connection that has not shown the
    token for EVICT_AFTER (1 s) is closed, one at a time, so the user is answered within about a second, not
    when the channel timeout (30 s) closes one."""
    monkeypatch.setattr(webapp, "CONNECTION_LIMIT", 4)
    app = webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")
    with serving(app) as srv:
        port = srv.port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        trickle = Trickle(port, [f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()] * 3)
        trickle.start()
        try:
            time.sleep(1.5)  # they have not shown the token for over a second (EVICT_AFTER)
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(f"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: "
                              f"{TOKEN}\r\n\r\n".encode())
                    got = answer(s, 5)  # the channel timeout would close one after 30 s
                assert got is not None and got[0] == 200, got
        finally:
            trickle.stop.set()
            for s in silent:
                s.close()


@pytest.mark.parametrize("mb", [64, 8])
def test_clients_that_stop_reading_an_answer_are_closed(ckpt, tmp_path, monkeypatch, mb):
    """A download the client stops reading (a paused <video>, a stuck program). Over waitress's 16 MB buffer
    (64 MB here) its task waits for room, holding one of the 4 threads; under it (8 MB) the answer waits in
    the buffer, holding the connection (a limit of 4 here). Either way the connection is never silent for
    waitress's channel timeout, which in any case closes only once the socket can be written. Such a
    connection is closed after the channel timeout without progress (1 s here, 30 s by default), so 4 of
    them do not hang the server."""
    monkeypatch.setattr(webapp, "CONNECTION_LIMIT", 4)
    big = tmp_path / "tracks.csv"
    with open(big, "wb") as f:
        f.truncate(mb * 2**20)  # sparse: nothing written
    app = webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")
    monkeypatch.setattr(app, "output", lambda job_id, name: big)
    with serving(app, channel_timeout=1, cleanup_interval=1) as srv:
        port, held = srv.port, []
        try:
            for _ in range(4):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port))
                s.sendall(f"GET /files/abc/tracks.csv HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"{webapp.TOKEN_HEADER}: {TOKEN}\r\n\r\n".encode())
                held.append(s)
            time.sleep(1)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: "
                          f"{TOKEN}\r\n\r\n".encode())
                got = answer(s, 8)
            assert got is not None and got[0] == 200, got
        finally:
            for s in held:
                s.close()


# ---------------------------------------------------------------------------------------------------------
# The server as a program: the token printed, a quiet console, nothing left at exit.


def start_app(tmp_path: Path, cwd: Path, *args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """python app.py in cwd on a free port (and `args`) with its temp folder in tmp_path; (process, the printed
    address, the lines printed before it)."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PIPS2_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port=0", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, end = b"", time.time() + 60
    assert proc.stdout is not None  # stdout=PIPE
    while b"?token=" not in out or not out.endswith(b"\n"):
        # the pipe's own bytes: a buffered readline() would hide lines from select()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.time()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            break
        out += chunk
    *before, line = out.decode().splitlines() or [""]
    assert "?token=" in line, (before, line, proc.poll())
    return proc, line.split()[3], before


def reset(port: int, data: bytes) -> None:
    """Send data, then drop the connection with a reset (what a browser does to a cancelled <video> request)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(data)
    s.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_app_prints_the_token_is_quiet_and_leaves_nothing(tmp_path, video, sig):
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    proc, url, before = start_app(tmp, cwd)
    try:
        # before the address: each checkpoint the page offers, ready or how to get it (none is, here)
        assert before[0] == "checkpoints the page offers:" and len(before) == 5, before
        assert before[1].startswith("  pips2: ./reference_model (demo.py's default, in ") and \
            "./get_reference_model.sh" in before[1], before
        # lbm: the suite runs with HF_HUB_OFFLINE=1, so no Track could download it
        assert "not downloaded yet" in before[2] and "HF_HUB_OFFLINE is set" in before[3], before
        assert before[4].startswith("no checkpoint is on this machine yet"), before
        base, token = url.split("?token=")
        port = int(base.rstrip("/").rsplit(":", 1)[1])
        assert len(token) >= 32
        got = raw(port, f"GET /?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert got[0] == 200 and b"<html" in got[2] and "set-cookie" not in got[1]
        h = f"Host: 127.0.0.1:{port}\r\n{webapp.TOKEN_HEADER}: {token}\r\n"
        data = video.read_bytes()
        status, _, body = raw(port, f"POST /api/upload?name=v.mp4 HTTP/1.1\r\n{h}Content-Type: application/octet-stream"
                                    f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        assert status == 200, body
        vid = json.loads(body)["video"]
        # browsers going away: mid-request, after a request (before its answer), and idle after an answer
        reset(port, f"POST /api/upload HTTP/1.1\r\n{h}Content-Length: 100000\r\n\r\nabc".encode())
        for _ in range(5):
            reset(port, f"GET /api/frame?video={vid}&t=1 HTTP/1.1\r\n{h}\r\n".encode())
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /api/config HTTP/1.1\r\n{h}\r\n".encode())
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        time.sleep(0.5)
        assert [p.name for p in tmp.iterdir() if p.name.startswith(f"{webapp.WORK_PREFIX}.")]
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (out, err)  # a supervisor tells a stop from a clean end
    assert "Traceback" not in err and "Error" not in err, err
    assert out.rstrip().endswith(f"stopped by {signal.Signals(sig).name}; uploads and results removed"), out
    assert not [p for p in tmp.rglob("*") if "cache" not in p.parts], list(tmp.rglob("*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_two_stop_signals_close_together_stop_the_app_once(tmp_path, ckpt, sig):
    """A second SIGTERM or Ctrl-C 10 ms after the first, while a job tracks: before, it raised another
    KeyboardInterrupt in the cleanup or at the interpreter's exit (a traceback, or an abort in C++ with the job's
    thread still inside torch: exit 134). Now later signals are only recorded: the job is cancelled and joined,
    one "stopped" line, exit 128 + the first signal's number, nothing left."""
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    rng = np.random.default_rng(1)
    long = tmp_path / "long.mp4"
    write_mp4(long, (rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(240)))
    proc, url, _ = start_app(tmp, cwd, f"--init_dir={ckpt}")
    try:
        base, token = url.split("?token=")
        h = {webapp.TOKEN_HEADER: token}
        status, body = call(f"{base}api/upload?name=long.mp4", long.read_bytes(),
                            {"Content-Type": "application/octet-stream", **h})
        assert status == 200, body
        up = json.loads(body)
        status, body = call(f"{base}api/track", {"video": up["video"], "grid_size": 8, "S": 8, "iters": 2}, h)
        assert status == 200, body
        job, end = json.loads(body)["job"], time.time() + 60
        while time.time() < end:  # into the model's calls
            s = json.loads(call(f"{base}api/job?id={job}", headers=h)[1])
            if s["state"] != "running" or (s["stage"].startswith("tracking") and s["done"] > 0):
                break
            time.sleep(0.05)
        assert s["state"] == "running" and s["stage"].startswith("tracking"), s
    finally:
        proc.send_signal(sig)
        time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)  # the first signal decides
    for bad in ("Traceback", "terminate called", "Exception ignored", "Error"):
        assert bad not in out + err, (out, err)
    assert out.count("stopped") == 1, out
    assert out.rstrip().endswith(f"stopped by {signal.Signals(sig).name}; uploads and results removed"), out
    assert not [p for p in tmp.rglob("*") if "cache" not in p.parts], list(tmp.rglob("*"))


def test_an_upload_is_opened_as_the_container_its_bytes_are_never_as_its_name_says(server, video, tmp_path):
    """An .m3u8 playlist naming file: segments made the server decode any video of its own disk (and serve its
    frames); ffmpeg picks its demuxer from the name and content. Uploads are now named by their first bytes."""
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(video.read_bytes())
    playlist = tmp_path / "y.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:{secret}\n#EXT-X-ENDLIST\n")
    status, body = upload(server.url, playlist)
    assert status == 415 and body["error"] == ("y.m3u8: not a video file this demo opens (MP4/MOV, MKV/WebM, AVI, "
                                               "GIF, Ogg, FLV, MPEG-PS/TS)")
    concat = tmp_path / "list.txt"
    concat.write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    assert upload(server.url, concat)[0] == 415
    assert not list((server.app.work / "uploads").iterdir())
    # a real video under any name is opened as what it is
    status, body = upload(server.url, video, name="holiday.m3u8")
    assert status == 200 and body["frames"] >= 2, body
    assert [p.suffix for p in (server.app.work / "uploads").iterdir()] == [".mp4"]


def test_a_killed_servers_uploads_are_removed_by_the_next_start(tmp_path, ckpt, monkeypatch):
    """A server killed before it could clean up (SIGKILL; SIGHUP before it was a stop signal) left its uploads and
    results (up to about 2 GB) in TMPDIR for good. Its folder is named by host and pid, and the next server
    removes those of processes that are gone; a live server's stays."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"{webapp.WORK_PREFIX}.{host}.{dead}.abc_12"
    live = tmp_path / f"{webapp.WORK_PREFIX}.{host}.{os.getpid()}.xyz"
    for d in (stale, live):
        (d / "uploads").mkdir(parents=True)
    left_by_a_killed_owner(stale)
    app = webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")
    try:
        assert not stale.exists() and live.exists()
        assert app.work.parent == tmp_path and app.work.name.startswith(f"{webapp.WORK_PREFIX}.{host}.{os.getpid()}.")
    finally:
        app.close()


def test_load_warnings_stay_off_the_console(server, caplog):
    """A few concurrent requests made waitress print "Task queue depth is 1" on the demo's console."""
    import logging
    import time

    class Slow:  # the task interface waitress's dispatcher drives
        def defer(self):
            pass

        def service(self):
            time.sleep(0.2)

        def cancel(self):
            pass

    with caplog.at_level(logging.DEBUG):
        for _ in range(webapp.THREADS + 3):
            server.server.task_dispatcher.add_task(Slow())
        time.sleep(0.5)
    assert "queue depth" not in caplog.text.lower(), caplog.text


def test_the_connection_limit_fits_the_descriptor_limit(tmp_path):
    """Under `ulimit -n 40` (below the connection limit plus the server's own files) 80 idle connections made
    waitress's accept fail on every loop: a whole CPU spent for as long as they were held. The soft limit is now
    raised toward the hard one, and where that is too low the server takes fewer connections."""
    code = """if True:
        import resource, sys
        from pips2 import webapp
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard >= 100 + webapp.FILE_RESERVE:
            resource.setrlimit(resource.RLIMIT_NOFILE, (60, hard))
            assert webapp.descriptor_room(100) == 100
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 100 + webapp.FILE_RESERVE
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))  # as `ulimit -n 40` sets both
        assert webapp.descriptor_room(100) == 4
        srv = webapp.DemoServer(webapp.App(clip_dir=sys.argv[1]), "127.0.0.1", 0)
        try:
            assert srv.adj.connection_limit == len(srv.map) + 4, (srv.adj.connection_limit, len(srv.map))
        finally:
            srv.close()
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clips")], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_full_temporary_folder_during_an_upload_is_one_line_and_leaves_nothing(server, video, monkeypatch):
    """The server's disk filling while an upload is copied from waitress's spool: a 500 "server error: OSError" and
    a traceback on the console. Now a 507 line saying where the room is missing and why an upload needs twice its
    size; the part file goes, and the server serves on."""
    import errno
    import io

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if mode == "wb" and str(path).endswith(".part") else f

    data = video.read_bytes()
    monkeypatch.setattr(webapp, "open", full_open, raising=False)
    with pytest.raises(webapp.WebError) as e:
        server.app.add_upload("v.mp4", io.BytesIO(data), len(data))
    assert e.value.status == 507 and "the server's temporary folder (" in str(e.value), e.value
    assert "an upload needs twice its size there" in str(e.value) and "\n" not in str(e.value)
    assert not list((server.app.work / "uploads").glob("*")) and server.app.videos == {}
    monkeypatch.undo()
    upload_ok(server.port, data)

    def no_room_for_frames(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(webapp, "DecodedFrames", no_room_for_frames)  # the page frames of an opened video
    with pytest.raises(webapp.WebError) as e:
        server.app.add_upload("v.mp4", io.BytesIO(data), len(data))
    assert e.value.status == 507 and "its page frames need room there" in str(e.value), e.value  # not "cannot decode"


def test_a_temporary_folder_removed_under_the_server_is_never_remade_by_name(server, video):
    """A temp cleaner removed the server's private folder while it ran: the server remade it by name (mode 0755,
    no lock), and where another user had made that name first (mode 0777) it wrote the user's frames, previews and
    results into the attacker's folder. It now refuses, saying to restart."""
    import io
    import shutil as sh

    data = video.read_bytes()
    work = server.app.work
    sh.rmtree(work)
    for made in (None, 0o777):  # gone; then remade by someone else, open to all
        if made is not None:
            work.mkdir()
            os.chmod(work, made)
        with pytest.raises(webapp.WebError) as e:
            server.app.add_upload("v.mp4", io.BytesIO(data), len(data))
        assert e.value.status == 503 and "is gone (a temp cleaner?) or no longer its own; restart" in str(e.value)
        assert not list(work.glob("*")) if work.exists() else True
    sh.rmtree(work)
    work.mkdir(mode=0o700)  # as the fixture's teardown expects to find it
