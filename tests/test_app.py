"""app.py / pips2.webapp: the JSON API without a browser, then the page itself in headless Chromium."""

import base64
import contextlib
import csv
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import golden_model, run_main
from huggingface_hub import constants as hf_constants

from pips2 import webapp
from pips2.cli import app
from pips2.hub import save_authors_format
from pips2.nets.lbm import LBM
from pips2.tracking import as_frame_source, track
from pips2.utils import checkpoint
from pips2.utils.video import read_video, write_mp4

try:  # optional: the browser test skips without it (or fails, under PIPS2_REQUIRE_BROWSER=1)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
T, H, W = 12, 96, 128
TOKEN = "test-token"  # the server's per-run token in these tests (a random one otherwise)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    checkpoint.save(d, 5, golden_model())
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """12 frames of 96x128 texture panning right by 2 px a frame."""
    rng = np.random.default_rng(0)
    base = cv2.resize((rng.random((40, 60, 3)) * 255).astype(np.uint8), (W + 2 * T, H), interpolation=cv2.INTER_CUBIC)
    path = tmp_path_factory.mktemp("vid") / "pan.mp4"
    write_mp4(path, (np.ascontiguousarray(base[:, 2 * t:2 * t + W]) for t in range(T)))
    return path


@contextlib.contextmanager
def serving(app: webapp.App, **kwargs):
    """The app served on a free port of 127.0.0.1 in a thread, with the token TOKEN; stopped and cleaned after."""
    srv = webapp.DemoServer(app, "127.0.0.1", 0, token=TOKEN, **kwargs)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(5)
        srv.close()
        app.close()


@pytest.fixture
def server(ckpt, tmp_path):
    with serving(webapp.App(init_dir=str(ckpt), iters=2, clip_dir=tmp_path / "clips")) as srv:
        yield srv


def call(url: str, data=None, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a request with the run's token; a JSON body for dicts, raw bytes otherwise."""
    if isinstance(data, dict):
        data, headers = json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
    headers = {webapp.TOKEN_HEADER: TOKEN, **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def upload(base: str, path: Path, name: str | None = None) -> tuple[int, dict]:
    status, body = call(f"{base}api/upload?name={name or path.name}", path.read_bytes(),
                        {"Content-Type": "application/octet-stream"})
    return status, json.loads(body)


def finish(base: str, job: str, timeout: float = 120) -> dict:
    """Poll a job until it ends; the progress seen on the way is recorded in the result's 'seen'."""
    seen, end = [], time.time() + timeout
    while time.time() < end:
        status, body = call(f"{base}api/job?id={job}")
        s = json.loads(body)
        assert status == 200 and 0 <= s["progress"] <= 1, s
        seen.append((s["stage"], s["done"], s["total"]))
        if s["state"] in ("done", "error", "cancelled"):
            return {**s, "seen": seen}
        time.sleep(0.05)
    raise AssertionError(f"job {job} still running after {timeout} s: {seen[-3:]}")


def read_csv(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_api_track_points_and_grid(server, video):
    base = server.url
    status, info = upload(base, video)
    assert status == 200, info
    assert (info["frames"], info["height"], info["width"]) == (T, H, W)
    status, jpg = call(f"{base}api/frame?video={info['video']}&t=7")
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and img is not None and img.shape == (H, W, 3)
    # two clicked points, the second on frame 5, and a 2x2 grid on frame 3
    req = {"video": info["video"], "points": [[0, 30.5, 40], [5, 64, 48]], "grid_size": 2, "grid_frame": 3}
    status, body = call(f"{base}api/track", req)
    assert status == 200, body
    s = finish(base, json.loads(body)["job"])
    assert s["state"] == "done", s["message"]
    assert s["stage"] == "done" and s["done"] == s["total"] == T  # the last stage drew every frame
    status, npz = call(base.rstrip("/") + s["files"]["npz"])
    assert status == 200
    z = np.load(io.BytesIO(npz), allow_pickle=False)
    assert z["tracks"].shape == (T, 6, 2) and z["queries"].shape == (6, 3)
    assert z["queries"][:, 0].tolist() == [0, 5, 3, 3, 3, 3]
    np.testing.assert_allclose(z["tracks"][5, 1], [64, 48], atol=1e-3)  # a query holds its point on its frame
    # queries start on their own frame: nothing before it is estimated (no backward)
    assert not z["estimated"][:5, 1].any() and z["estimated"][5:, 1].all() and z["estimated"][:, 0].all()
    assert not z["estimated"][:3, 2:].any() and z["estimated"][3:, 2:].all()
    status, text = call(base.rstrip("/") + s["files"]["csv"])
    rows = read_csv(text)
    assert status == 200 and len(rows) == T * 6 and list(rows[0]) == ["frame", "point", "x", "y", "estimated"]
    assert float(rows[5 * 6 + 1]["x"]) == pytest.approx(64, abs=1e-3)
    status, mp4 = call(base.rstrip("/") + s["files"]["mp4"])
    out = Path(server.app.work) / "check.mp4"
    out.write_bytes(mp4)
    assert status == 200 and read_video(out).shape == (T, H, W, 3)
    # a <video> asks for byte ranges
    status, part = call(base.rstrip("/") + s["files"]["mp4"], headers={"Range": "bytes=10-109"})
    assert status == 206 and part == mp4[10:110]


@pytest.mark.parametrize("backward", [False, True])
def test_progress_steps_are_counted_exactly(video, backward, monkeypatch):
    """The page's tracking progress ends exactly at its total: every frame read and every model call (window x
    point batch) is a step, as the job counts them."""
    monkeypatch.setattr(webapp, "POINT_BATCH", 2)  # two batches for the 3 queries on frame 3
    src = as_frame_source(str(video))
    q = np.array([[5, 64, 48], [3, 10, 10], [3, 20, 30], [3, 40, 40]], np.float32)
    qt = q[:, 0].astype(int)
    assert webapp.frames_to_read(qt, T, backward) == (T - 3) + (6 if backward else 0)
    net, reads, calls = golden_model(), [], []
    net.register_forward_hook(lambda *_: calls.append(1))
    res = track(net, webapp.CountingFrames(src, reads.append), q, S=8, iters=1, backward=backward, point_batch=2)
    assert sum(reads) == webapp.frames_to_read(qt, T, backward)
    assert sum(reads) + len(calls) == webapp.tracking_steps(qt, T, 8, backward, lbm=False)
    assert res["estimated"][:, 0].sum() == (T if backward else T - 5)


def test_api_errors_are_one_line(server, video, tmp_path, monkeypatch):
    base = server.url

    def error(status_body, status):
        got, body = status_body
        msg = (body if isinstance(body, dict) else json.loads(body))["error"]
        assert got == status and "\n" not in msg and "Traceback" not in msg, (got, msg)
        return msg

    (tmp_path / "notes.txt").write_text("not a video\n")
    assert "notes.txt: not a video file this demo opens" in error(upload(base, tmp_path / "notes.txt"), 415)
    # a still image, or a video of one frame, is nothing to track (a PNG opened as a 1-frame video)
    cv2.imwrite(str(tmp_path / "still.png"), np.full((H, W, 3), 128, np.uint8))
    write_mp4(tmp_path / "one.mp4", [np.full((H, W, 3), 128, np.uint8)])
    for name in ("still.png", "one.mp4"):
        msg = error(upload(base, tmp_path / name), 400)
        assert msg == f"{name}: only 1 frame, so nothing to track: open a video of at least 2 frames (a still image " \
                      f"is one frame)", msg
    assert list((server.app.work / "uploads").iterdir()) == []
    data = video.read_bytes()
    (tmp_path / "broken.mp4").write_bytes(data[:48] + bytes(len(data) - 48))  # header kept, the rest zeroed
    assert "broken.mp4" in error(upload(base, tmp_path / "broken.mp4"), 400)
    assert "empty" in error(call(f"{base}api/upload?name=e.mp4", b"", {"Content-Type": "application/octet-stream"}),
                            400)
    monkeypatch.setattr(webapp, "MAX_UPLOAD_BYTES", 1000)
    assert "upload limit" in error(upload(base, video), 413)
    monkeypatch.undo()
    assert "unknown clip" in error(call(f"{base}api/clip", {"name": "nope"}), 400)
    assert "unknown video" in error(call(f"{base}api/track", {"video": "x", "points": [[0, 1, 1]]}), 404)
    _, info = upload(base, video)
    vid = info["video"]
    assert "no points" in error(call(f"{base}api/track", {"video": vid}), 400)
    assert "got 40" in error(call(f"{base}api/track", {"video": vid, "points": [[40, 1, 1]]}), 400)
    assert "not JSON" in error(call(f"{base}api/track", b"{", {"Content-Type": "application/json"}), 400)
    # a checkpoint the command line did not name is refused before any job or download
    for model, ckpt in (("pips2", str(tmp_path / "no_such_ckpt")), ("lbm", "pips2"), ("lbm", str(tmp_path))):
        req = {"video": vid, "points": [[0, 10, 10]], "model": model, "checkpoint": ckpt}
        assert "must be one of" in error(call(f"{base}api/track", req), 400)
    assert server.app.jobs == {}


def png_url(img: np.ndarray) -> str:
    """An image as the page sends its painted mask: a PNG data URL."""
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()


def test_api_grid_in_a_painted_mask(server, video):
    base = server.url
    vid = upload(base, video)[1]["video"]
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2] = (48, 209, 88, 255)  # painted (opaque) on the left half, transparent elsewhere
    req = {"video": vid, "points": [[0, 100, 50]], "grid_size": 4, "grid_frame": 2, "mask": png_url(rgba)}
    status, body = call(f"{base}api/track", req)
    assert status == 200, body
    s = finish(base, json.loads(body)["job"])
    assert s["state"] == "done", s["message"]
    q = np.load(io.BytesIO(call(base.rstrip("/") + s["files"]["npz"])[1]), allow_pickle=False)["queries"]
    grid = webapp.grid_queries((H, W), 4, 2)
    np.testing.assert_array_equal(q[1:], grid[grid[:, 1] < W / 2])  # 2 of the grid's 4 columns, on frame 2
    assert len(q) == 1 + 8 and q[0].tolist() == [0, 100, 50]  # clicked points are not masked

    def refused(mask, words):
        status, body = call(f"{base}api/track", {**req, "mask": mask})
        msg = json.loads(body)["error"]
        assert status == 400 and words in msg and "\n" not in msg, (status, msg)

    refused(png_url(np.zeros((H, W, 4), np.uint8)), "no grid point falls inside")
    refused(png_url(np.full((H // 2, W, 4), 255, np.uint8)), f"but the video is {W}x{H}")
    refused("data:image/png;base64,@@@", "not a PNG data URL")
    refused("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "unreadable")


def test_api_tracks_with_lbm(video, tmp_path):
    """The page's other model end to end: LBM's visibility reaches the CSV and NPZ."""
    torch.manual_seed(0)
    net = LBM(input_size=(64, 96), embed_dim=32, num_layers=2, num_neighbors=4, top_k_regions=4, memory_size=4)
    ckpt = save_authors_format(net, tmp_path / "lbm.pt")
    with serving(webapp.App(init_dir=str(ckpt), model="lbm", clip_dir=tmp_path / "clips")) as server:
        tracked_with_lbm(server, video)


def tracked_with_lbm(server, video) -> None:
    assert json.loads(call(f"{server.url}api/config")[1])["checkpoints"]["lbm"] == [str(server.app.init_dir), "lbm"]
    vid = upload(server.url, video)[1]["video"]
    req = {"video": vid, "points": [[3, 40, 30], [0, 90, 60]], "model": "lbm", "backward": True}
    status, body = call(f"{server.url}api/track", req)
    assert status == 200, body
    s = finish(server.url, json.loads(body)["job"])
    assert s["state"] == "done", s["message"]
    rows = read_csv(call(server.url.rstrip("/") + s["files"]["csv"])[1])
    assert len(rows) == 2 * T and list(rows[0]) == ["frame", "point", "x", "y", "estimated", "visibility"]
    assert all(r["estimated"] == "1" for r in rows)  # backward: every frame of both points
    z = np.load(io.BytesIO(call(server.url.rstrip("/") + s["files"]["npz"])[1]), allow_pickle=False)
    assert z["visibility"].shape == (T, 2) and z["visibility"].dtype == bool


def test_bundled_clip_is_made_once(server, monkeypatch):
    monkeypatch.setattr(webapp, "CLIP_FRAMES", 4)  # 48 by default: seconds to generate
    status, body = call(f"{server.url}api/clip", {"name": "synthetic-2"})
    info = json.loads(body)
    assert status == 200 and (info["frames"], info["height"], info["width"]) == (4, 256, 384), info
    made = server.app.clip_dir / "synthetic-2.mp4"
    stamp = made.stat().st_mtime_ns
    assert call(f"{server.url}api/clip", {"name": "synthetic-2"})[0] == 200 and made.stat().st_mtime_ns == stamp
    assert [p.name for p in server.app.clip_dir.iterdir()] == ["synthetic-2.mp4"]  # no temp file left


def test_old_videos_are_forgotten(server, video, monkeypatch):
    monkeypatch.setattr(webapp, "KEEP", 1)
    first = upload(server.url, video)[1]["video"]
    stored = server.app.video(first).path
    second = upload(server.url, video)[1]["video"]
    assert call(f"{server.url}api/frame?video={first}&t=0")[0] == 404 and not stored.exists()
    assert call(f"{server.url}api/frame?video={second}&t=0")[0] == 200


def test_app_cli_errors_are_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for kwargs, words in (({"model": "nope"}, "--model"), ({"port": busy.getsockname()[1]}, "cannot listen"),
                              ({"S": 1000}, "--S must be"), ({"iters": 0}, "--iters must be"),
                              ({"max_decoded_mb": 0}, "--max_decoded_mb must be")):
            res = run_main(app.main, capsys, **kwargs)
            assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res



@pytest.mark.parametrize("kwargs, line", [
    ({"port": -1}, "error: --port must be a whole number in 0..65535 (0: any free port), got -1"),
    ({"port": 70000}, "error: --port must be a whole number in 0..65535 (0: any free port), got 70000"),  # not 4464
    ({"host": "no-such-host.invalid", "port": 0}, "error: cannot listen on no-such-host.invalid:0 ("),
    ({"host": "localhost:7990", "port": 0}, "error: --host=localhost:7990 holds a port; give the name or address alone "
                                            "and the port with --port"),
    ({"host": "[::1]:8000", "port": 0}, "error: --host=[::1]:8000 holds a port"),
    ({"device": "foo"}, "error: --device 'foo': expected auto, cpu, cuda, cuda:N or mps"),
])
def test_app_port_host_and_device_are_checked_at_start(capsys, monkeypatch, kwargs, line):
    def served(server):  # before: 70000 served on 4464, --device=foo served and failed in the first job
        pytest.fail(f"serves on {server.url}")

    monkeypatch.setattr(webapp.DemoServer, "serve_forever", served)
    res = run_main(app.main, capsys, **kwargs)
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res
    assert res.stderr.startswith(line), res.stderr

def test_an_ipv6_host_may_be_given_as_urls_write_it(capsys, monkeypatch, ckpt):
    """--host=[::1] (the form a URL uses) was "cannot listen on [::1]:7961 (Name or service not known)"."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    listened = []
    monkeypatch.setattr(webapp.DemoServer, "serve_forever", lambda server: listened.append(server.url))
    monkeypatch.setattr(webapp.signal, "signal", lambda *a: None)  # the server's stop handlers: not pytest's
    res = run_main(app.main, capsys, host="[::1]", port=0, init_dir=str(ckpt))
    assert res.returncode in (0, None) and "error" not in res.stderr, res
    assert listened and listened[0].startswith("http://[::1]:"), listened


def test_a_wildcard_host_says_how_to_be_reached_from_elsewhere(capsys, monkeypatch, ckpt):
    """--host=0.0.0.0 printed http://0.0.0.0:PORT and then answered 421 to every request from another machine
    (their Host is this machine's name): the usual idiom silently did not work."""
    monkeypatch.setattr(webapp.DemoServer, "serve_forever", lambda server: None)
    monkeypatch.setattr(webapp.signal, "signal", lambda *a: None)  # the server's stop handlers: not pytest's
    res = run_main(app.main, capsys, host="0.0.0.0", port=0, init_dir=str(ckpt))
    assert res.returncode in (0, None), res
    assert ("note: --host=0.0.0.0 listens on every address, but the demo answers only requests addressed to 0.0.0.0 "
            "or this machine's loopback names; to open it from another machine give --host=<this machine's name or "
            "address>") in res.stdout


def page_wording(msg: str) -> str:
    """A line meant for the page: it names no command-line flag, except after "restart the server with"."""
    assert "pass --" not in msg and "--" not in re.sub(r"restart the server with( --\S+)+", "", msg), msg
    return msg


@pytest.fixture
def no_checkpoints(tmp_path, monkeypatch):
    """A server folder without ./reference_model, and an empty hub cache; the cache's path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPS2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoints_are_checked_at_start(no_checkpoints, tmp_path, monkeypatch):
    """Each checkpoint the page offers is checked when the server starts: one console line saying it is ready or
    how to get it, and the page's list, notice and Track say the same."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # the suite's setting; offline below
    clips = tmp_path / "clips"
    app_ = webapp.App(clip_dir=clips)
    lines = app_.checkpoint_report()
    assert lines[0] == "checkpoints the page offers:" and len(lines) == 5, lines  # 3 choices, then "none ready"
    default, hub_pips, hub_lbm = lines[1:4]
    assert default.startswith("  pips2: ./reference_model (demo.py's default, in ") and "no checkpoint there" in default
    for words in ("./get_reference_model.sh", "REF_MODEL_URL=file:///path/to/reference_model.tar.gz",
                  "`make demo` trains a small one into demo_out/checkpoints/"):
        assert words in default, default
    assert hub_pips == (f"  pips2: pips2 (hub name): not downloaded yet; the first Track with it downloads it into "
                        f"{no_checkpoints / 'reference_model'} (needs the internet; offline, start the server with "
                        f"PIPS2_URL_PIPS2=file:///path/to/reference_model.tar.gz)")
    assert hub_lbm.startswith("  lbm: lbm (hub name): not downloaded yet") and "PIPS2_URL_LBM=file:///path/to/lbm.pt" \
        in hub_lbm
    assert "no checkpoint is on this machine yet" in lines[4]
    config = app_.config()
    assert [c["state"] for c in config["choices"]["pips2"]] == ["missing", "download"]
    assert config["default_checkpoint"] == {"pips2": "./reference_model", "lbm": "lbm"}
    assert "No checkpoint is on this machine yet" in page_wording(config["notice"])
    note = page_wording(config["choices"]["pips2"][0]["note"])
    assert note.startswith("./reference_model is missing: fetch the authors' model with ./get_reference_model.sh")
    assert "reload this page" in note and "choose another checkpoint in the list" in note
    # a model `make demo` trained is named, on the console and on the page
    checkpoint.save(tmp_path / "demo_out" / "checkpoints" / "run1", 5, golden_model())
    assert "`make demo` trained a small one in demo_out/checkpoints/run1/" in app_.checkpoint_report()[1]
    assert "--init_dir=demo_out/checkpoints/run1/" in page_wording(app_.choice("pips2", "./reference_model").note)
    # fetched while the server runs: ready from then on (the cache's copy of the authors' model)
    checkpoint.save(no_checkpoints / "reference_model", 5, golden_model())
    lines = app_.checkpoint_report()
    assert lines[2] == f"  pips2: pips2 (hub name): ready, in {no_checkpoints / 'reference_model'}" and len(lines) == 4
    assert app_.default_checkpoint("pips2") == "pips2" and app_.config()["notice"] == ""
    # a cached copy the loader would refuse is not offered as ready (it was, and preselected), nor lbm as a download
    # when HF_HUB_OFFLINE forbids one: each says the loader's own line
    no_checkpoints.chmod(0o1777)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    lines = app_.checkpoint_report()
    assert lines[2] == (f"  pips2: pips2 (hub name): {no_checkpoints}: other users may put files in the cache folder "
                        f"(mode 1777; if it is meant for you alone: chmod go-w {no_checkpoints}): whoever may put "
                        f"files there could put their own weights where the authors' are looked for; not loaded. Set "
                        f"PIPS2_CACHE to a folder of your own"), lines
    assert lines[3].startswith("  lbm: lbm (hub name): not in the Hugging Face cache (") and \
        "and HF_HUB_OFFLINE is set; fetch it once with the internet" in lines[3], lines
    states = {c["name"]: c["state"] for m in ("pips2", "lbm") for c in app_.config()["choices"][m]}
    assert states["pips2"] == states["lbm"] == "missing"
    assert "Set PIPS2_CACHE to a folder of your own" in page_wording(app_.choice("pips2", "pips2").note)
    # nor is a download into such a cache promised: the loader would refuse to fetch into it
    (no_checkpoints / "reference_model").rename(tmp_path / "ref_aside")
    lines = app_.checkpoint_report()
    assert lines[2].startswith(f"  pips2: pips2 (hub name): {no_checkpoints}: other users may put files in the cache "
                               f"folder") and "a copy fetched there could be replaced by theirs" in lines[2], lines
    (tmp_path / "ref_aside").rename(no_checkpoints / "reference_model")
    no_checkpoints.chmod(0o755)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    shutil.copytree(no_checkpoints / "reference_model", "reference_model")
    assert app_.checkpoint_report()[1].startswith(f"  pips2: ./reference_model: ready ({Path.cwd()}/reference_model/"
                                                  f"model-0")
    assert app_.default_checkpoint("pips2") == "./reference_model"
    app_.close()
    app_ = webapp.App(init_dir="pips2", clip_dir=clips)  # the hub name given as --init_dir: offered once
    assert app_.checkpoints("pips2") == ["pips2"] and len(app_.checkpoint_report()) == 3  # pips2, lbm
    app_.close()
    # a --init_dir that holds nothing, for either model
    for model, given in (("pips2", tmp_path / "empty"), ("lbm", tmp_path / "lbm.pt")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        app_ = webapp.App(init_dir=str(given), model=model, clip_dir=clips)
        line = next(ln for ln in app_.checkpoint_report() if str(given) in ln)
        assert line.startswith(f"  {model}: {given} (--init_dir): no checkpoint there; restart with --init_dir="), line
        assert page_wording(app_.choice(model, str(given)).note).startswith(
            f"{given} (named when the server started) holds no checkpoint: choose another checkpoint in the list")
        app_.close()
    # a file that is no checkpoint (--init_dir=/etc/passwd was offered as ready): missing, and said so
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    app_ = webapp.App(init_dir=str(tmp_path / "passwd"), clip_dir=clips)
    line = next(ln for ln in app_.checkpoint_report() if "passwd" in ln)
    assert line == (f"  pips2: {tmp_path / 'passwd'}: {tmp_path / 'passwd'} is not a checkpoint (not a file torch.save "
                    f"writes); restart with --init_dir=<a checkpoint folder or file>"), line
    assert app_.choice("pips2", str(tmp_path / "passwd")).state == "missing"
    app_.close()


def test_a_missing_checkpoint_is_refused_before_the_work(no_checkpoints, tmp_path, video):
    """Track with a checkpoint that is not there is refused at once in the page's words (it used to fail after
    the job started, saying `pass --init_dir`); a job never starts."""
    for init_dir in (None, str(tmp_path / "nothing")):
        with serving(webapp.App(init_dir=init_dir, clip_dir=tmp_path / "clips")) as srv:
            vid = upload(srv.url, video)[1]["video"]
            for req in ({}, {"checkpoint": init_dir or "./reference_model"}):
                status, body = call(f"{srv.url}api/track", {"video": vid, "points": [[0, 5, 5]], **req})
                msg = page_wording(json.loads(body)["error"])
                assert status == 409 and "choose another checkpoint in the list" in msg, (status, msg)
            assert srv.app.jobs == {}


def test_result_video_marks_scale_with_the_frame(ckpt, tmp_path, monkeypatch):
    """The result video's dots and trails grow with the frame (3 px dots vanished on 1280x720 and larger)."""
    assert webapp.mark_size((96, 128)) == (3, 1) and webapp.mark_size((720, 1280)) == (6, 2)
    radius, line = webapp.mark_size((1080, 1920))
    assert (radius, line) == (9, 3)
    grey = tmp_path / "grey.mp4"
    write_mp4(grey, [np.full((1080, 1920, 3), 128, np.uint8)] * 2)

    def fixed(net, src, q, **kwargs):  # the tracker's cost is not what this test is about
        n = len(q)
        return {"tracks": np.tile(q[None, :, 1:], (len(src), 1, 1)), "estimated": np.ones((len(src), n), bool),
                "visibility": None}

    monkeypatch.setattr(webapp, "track", fixed)
    with serving(webapp.App(init_dir=str(ckpt), clip_dir=tmp_path / "clips")) as srv:
        vid = upload(srv.url, grey)[1]["video"]
        status, body = call(f"{srv.url}api/track", {"video": vid, "points": [[0, 600, 500]]})
        s = finish(srv.url, json.loads(body)["job"])
        assert s["state"] == "done", s["message"]
        out = tmp_path / "tracks.mp4"
        out.write_bytes(call(srv.url.rstrip("/") + s["files"]["mp4"])[1])
    frame = read_video(out)[1].astype(int)
    row = np.abs(frame[500, 560:640] - 128).max(1) > 40  # the dot's pixels across its centre
    width = int(row.sum())
    assert row[40] and 2 * radius <= width <= 2 * (radius + line) + 2, width


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if webdriver is None:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium, shared by the page's tests (skipped without it, or failed under
    PIPS2_REQUIRE_BROWSER=1)."""
    why = browser_missing()
    if why:
        if os.environ.get("PIPS2_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PIPS2_REQUIRE_BROWSER=1 but {why} missing (apt-get install chromium chromium-driver; "
                        f"pip install selenium)")
        pytest.skip(f"no browser: {why} missing")
    assert webdriver is not None  # browser_missing() names selenium otherwise
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium-manager must never download a driver
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1100,900", "--autoplay-policy=no-user-gesture-required"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def open_file(driver, wait, path: Path, width: int) -> None:
    """Open a video file on the page and wait until its first frame is shown."""
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "run").is_displayed())
    wait.until(lambda d: d.execute_script("return document.getElementById('t-label').textContent") == "0")
    # the frame came with the token in its address (an <img> sends no header of the page's)
    wait.until(lambda d: d.execute_script("return image && video.width") == width)


def track_on_page(driver, wait, previous: str | None = None) -> None:
    """Press Track and wait for the result (a new one when `previous` is the last result's csv link) or an error."""
    driver.find_element(By.ID, "track").click()
    wait.until(lambda d: (d.find_elements(By.ID, "result-video") and d.find_element(By.ID, "result").is_displayed()
                          and d.find_element(By.ID, "csv-link").get_attribute("href") != previous)
               or d.find_element(By.ID, "msg").text)
    assert not text(driver, "msg"), text(driver, "msg")


def test_page_in_a_real_browser(browser, server, video, tmp_path, capfd):
    driver = browser
    wait = WebDriverWait(driver, 90)
    driver.set_window_size(1100, 900)
    driver.get(server.url)  # without the token: refused
    assert "token" in driver.find_element(By.TAG_NAME, "body").text
    driver.get(server.token_url)  # the printed address: the page itself, its script takes the token from it
    assert driver.current_url == server.token_url
    wait.until(lambda d: d.find_element(By.ID, "clip").find_elements(By.TAG_NAME, "option"))
    assert not driver.find_element(By.ID, "notice").is_displayed()  # a checkpoint is ready: nothing to say
    open_file(driver, wait, video, W)
    # no cookie: the browser would send it to every other server on 127.0.0.1, whatever the port
    assert driver.get_cookies() == []
    assert text(driver, "video-info") == f"pan.mp4: {T} frames, {W}x{H}"
    assert driver.find_element(By.ID, "checkpoint").get_attribute("value") == str(server.app.init_dir)
    assert driver.find_element(By.ID, "track").is_enabled() and not text(driver, "checkpoint-note")
    canvas = driver.find_element(By.ID, "frame")
    ActionChains(driver).move_to_element_with_offset(canvas, -30, -20).click().perform()  # frame 0
    assert text(driver, "count") == "1 point"
    # in a short window the result appears below the frame: it is scrolled into view when it is done
    driver.set_window_size(1100, 450)
    driver.execute_script("window.scrollTo(0, 0)")
    track_on_page(driver, wait)
    assert text(driver, "status").startswith(f"done: 1 point x {T} frames in "), text(driver, "status")
    top, bottom, height = driver.execute_script("const r = document.getElementById('result').getBoundingClientRect();"
                                                "return [r.top, r.bottom, window.innerHeight]")
    assert 0 <= top and bottom <= height, (top, bottom, height)
    driver.set_window_size(1100, 900)
    driver.execute_script("window.scrollTo(0, 0)")
    href = driver.find_element(By.ID, "csv-link").get_attribute("href")
    assert driver.find_element(By.ID, "csv-link").is_displayed() and href.startswith(server.url)
    assert href.endswith(f"?token={TOKEN}"), href  # a link sends no header: the token is in its address
    rows = read_csv(call(href)[1])
    assert len(rows) == T and {r["point"] for r in rows} == {"0"}
    first = next(r for r in rows if r["frame"] == "0")
    assert abs(float(first["x"]) - (W / 2 - 30)) < 3 and abs(float(first["y"]) - (H / 2 - 20)) < 3
    src = driver.find_element(By.ID, "result-video").get_attribute("src")
    (server.app.work / "browser.mp4").write_bytes(call(src)[1])
    assert read_video(server.app.work / "browser.mp4").shape == (T, H, W, 3)
    h264 = "return document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.42E01E\"')"
    if driver.execute_script(h264):
        wait.until(lambda d: d.execute_script("return document.getElementById('result-video').readyState") >= 1)
        assert driver.execute_script("return document.getElementById('result-video').videoWidth") == W
    # a second point, on frame 4, and a mask painted down the left edge (x=10, y=4..92, a 16 px brush) that keeps
    # the grid's first column (x=6.35)
    driver.execute_script("const s = document.getElementById('t'); s.value = 4; s.dispatchEvent(new Event('input'));")
    ActionChains(driver).move_to_element_with_offset(canvas, 20, 10).click().perform()  # frame 4
    assert text(driver, "count") == "2 points"
    driver.find_element(By.ID, "grid").clear()
    driver.find_element(By.ID, "grid").send_keys("4")  # a 4x4 grid on the shown frame, 4
    driver.find_element(By.ID, "mask-mode").click()
    ActionChains(driver).move_to_element_with_offset(canvas, 10 - W // 2, 4 - H // 2).click_and_hold() \
        .move_by_offset(0, H - 8).release().perform()
    assert text(driver, "count") == "2 points + 4 of a 4x4 grid (in the mask)"
    track_on_page(driver, wait, href)
    assert text(driver, "status").startswith(f"done: 6 points x {T} frames in "), text(driver, "status")
    rows = read_csv(call(driver.find_element(By.ID, "csv-link").get_attribute("href"))[1])
    assert len(rows) == 6 * T
    est = {(int(r["frame"]), int(r["point"])): r["estimated"] == "1" for r in rows}
    assert [est[t, 1] for t in range(T)] == [t >= 4 for t in range(T)]  # clicked on frame 4: starts there
    at4 = [r for r in rows if r["frame"] == "4" and int(r["point"]) >= 2]  # a query holds its point there
    assert sorted(round(float(r["y"]), 2) for r in at4) == [4.75, 33.25, 61.75, 90.25]
    assert all(float(r["x"]) == pytest.approx(6.35, abs=1e-3) for r in at4)
    # a failed upload after a good one (a still image: one frame): the old video, its points and its result leave
    # the screen (Track would run on the old video), and the server forgets the old upload
    old = server.app.videos[driver.execute_script("return video.video")]
    cv2.imwrite(str(tmp_path / "still.png"), np.full((H, W, 3), 90, np.uint8))
    driver.find_element(By.ID, "file").send_keys(str(tmp_path / "still.png"))
    wait.until(lambda d: d.find_element(By.ID, "msg").text)
    assert text(driver, "msg") == ("still.png: only 1 frame, so nothing to track: open a video of at least 2 frames "
                                   "(a still image is one frame)")
    for part in ("pick", "run", "result"):
        assert not driver.find_element(By.ID, part).is_displayed(), part
    assert not text(driver, "video-info") and not driver.find_elements(By.ID, "result-video")
    assert old.id not in server.app.videos and not old.path.exists() and not old.preview.file.exists()
    assert list((server.app.work / "uploads").iterdir()) == []  # nor is the failed one kept
    # on a large frame the clicked dot is drawn at the size the result video draws it (3 px vanished)
    big = tmp_path / "big.mp4"
    write_mp4(big, [np.full((720, 1296, 3), 128, np.uint8)] * 2)
    open_file(driver, wait, big, 1296)
    assert not text(driver, "msg")
    driver.find_element(By.ID, "mask-mode").click()  # back to clicking points
    ActionChains(driver).move_to_element(canvas).click().perform()
    radius, line = webapp.mark_size((720, 1296))
    width = driver.execute_script("""
        const [, x, y] = points[0], c = document.getElementById('frame').getContext('2d');
        const row = c.getImageData(Math.round(x) - 40, Math.round(y), 81, 1).data;
        let n = 0;
        for (let i = 0; i < 81; i++) if (Math.abs(row[4 * i] - 128) > 40 || Math.abs(row[4 * i + 2] - 128) > 40) n++;
        return n;""")
    assert abs(width - (2 * radius + line)) <= 2, (width, radius, line)
    # the browser dropped the result video's requests when it left the page: nothing on the console
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_page_says_when_no_checkpoint_is_ready(browser, no_checkpoints, tmp_path, video):
    """No checkpoint on this machine: the page says so up front, and Track is off, with the reason, for a
    checkpoint that is missing, before any upload or click is wasted on it."""
    driver = browser
    wait = WebDriverWait(driver, 60)
    driver.set_window_size(1100, 900)
    with serving(webapp.App(iters=2, clip_dir=tmp_path / "clips")) as srv:
        driver.get(srv.token_url)
        wait.until(lambda d: d.find_element(By.ID, "notice").is_displayed())
        assert text(driver, "notice").startswith("No checkpoint is on this machine yet: fetch the authors' PIPs++ "
                                                 "model with ./get_reference_model.sh")
        open_file(driver, wait, video, W)
        assert driver.find_element(By.ID, "checkpoint").get_attribute("value") == "./reference_model"
        assert not driver.find_element(By.ID, "track").is_enabled()
        assert text(driver, "checkpoint-note").startswith("./reference_model is missing: fetch the authors' model")
        labels = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#checkpoint option")]
        assert labels == ["./reference_model (missing)", "pips2 (downloads once, needs the internet)"]
        driver.execute_script("const s = document.getElementById('checkpoint'); s.value = 'pips2';"
                              "s.dispatchEvent(new Event('change'));")
        assert driver.find_element(By.ID, "track").is_enabled()
        assert "downloads the authors' weights" in text(driver, "checkpoint-note")
        # fetched while the page is open: the next video opened finds it ready, and the notice goes
        checkpoint.save(tmp_path / "reference_model", 5, golden_model())  # ./reference_model of the server
        shutil.copy(video, tmp_path / "again.mp4")  # the same file chosen again is no change for the file box
        open_file(driver, wait, tmp_path / "again.mp4", W)
        wait.until(lambda d: not d.find_element(By.ID, "notice").is_displayed())
        assert driver.find_element(By.ID, "checkpoint").get_attribute("value") == "pips2"  # the user's choice kept
        labels = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#checkpoint option")]
        assert labels[0] == "./reference_model" and driver.find_element(By.ID, "track").is_enabled()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files another user's uid")
def test_the_clip_cache_follows_the_cache_rules(tmp_path):
    """The bundled clips were written into $PIPS2_CACHE/demo_clips and read back from it whatever the cache was: in a
    shared cache another user's video was served as a bundled clip, and a link of theirs was written through. A clip
    cache that anyone else may change is passed over: the clip is made in the server's own folder."""
    clips = tmp_path / "clips"
    clips.mkdir()
    name = next(iter(webapp.CLIPS))
    (clips / f"{name}.mp4").write_bytes(b"their video")
    os.chown(clips / f"{name}.mp4", 2002, 2002)
    app_ = webapp.App(clip_dir=clips)
    try:
        got = app_.add_clip(name)
        video = app_.video(got["video"])
        assert video.path == app_.work / "clips" / f"{name}.mp4" and video.path.stat().st_size > 1000
        assert (clips / f"{name}.mp4").read_bytes() == b"their video"
    finally:
        app_.close()
    (clips / f"{name}.mp4").unlink()
    app_ = webapp.App(clip_dir=clips)  # the user's own cache: used as before
    try:
        got = app_.add_clip(name)
        assert app_.video(got["video"]).path == clips / f"{name}.mp4"
    finally:
        app_.close()
