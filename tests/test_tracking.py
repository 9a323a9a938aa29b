"""pips2/tracking.py: the window schedule, windowed tracking, any-frame queries, backward tracking, one
encoding per frame, streaming, one-frame windows, bad queries and bounded memory."""

import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import golden_model, left_by_a_killed_owner

from pips2 import tracking
from pips2.utils.procs import OWNER_LOCK
from pips2.utils.video import VideoError, write_mp4

ROOT = Path(__file__).resolve().parents[1]


class StubModel(torch.nn.Module):
    """Records every window and every encoded frame; moves each frame after the first by +1 px in x; feats
    count windows. Frame ids, written into pixel (0, 0), travel in the feature maps to the window's model call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []
        self.encoded = []

    def encode_nhwc(self, rgbs):
        self.encoded += rgbs[0, :, 0, 0, 0].long().tolist()
        fmaps = torch.zeros(1, rgbs.shape[1], 2, 2, 1)
        fmaps[0, :, 0, 0, 0] = rgbs[0, :, 0, 0, 0]
        return fmaps

    def forward(self, trajs, rgbs, iters=1, feat_init=None, fmaps=None, **kw):
        assert fmaps is not None  # track() hands over the window's maps
        assert fmaps.shape[1] >= 2, f"model called with a {fmaps.shape[1]}-frame window"
        frames = fmaps[0, :, 0, 0, 0].long().tolist()
        self.calls.append(dict(frames=frames, init=trajs[0].clone(), feat_init=feat_init))
        out = trajs.clone()
        out[:, 1:, :, 0] += 1
        feats = (0 if feat_init is None else feat_init[0]) + 1
        return [out], [out], (feats, feats, feats), None


def _ids_video(T, h=128, w=128):
    v = np.zeros((T, h, w, 3), np.uint8)
    v[:, 0, 0, 0] = np.arange(T) % 256
    return v


@pytest.mark.parametrize("T,S,expected", [
    (300, 128, [(0, 128), (127, 255), (172, 300)]),
    (128, 128, [(0, 128)]),
    (100, 128, [(0, 100)]),
    (129, 128, [(0, 128), (1, 129)]),
    (255, 128, [(0, 128), (127, 255)]),
])
def test_window_starts(T, S, expected):
    assert tracking.window_starts(T, S) == expected


def test_window_arithmetic_with_a_recording_model():
    T, S = 40, 16
    stub = StubModel()
    src = tracking.ArrayFrames(_ids_video(T), (128, 128))
    init = torch.zeros(T, 3, 2)
    out = tracking.track_windows(stub, src, init, S=S, iters=1, point_batch=2)
    windows = tracking.window_starts(T, S)  # (0,16) (15,31) (24,40)
    assert [c["frames"][0] for c in stub.calls[::2]] == [s for s, _ in windows]
    assert all(len(c["frames"]) == S for c in stub.calls)
    # second window starts from the first window's estimates: frame 15 was moved once (+1)
    w2 = stub.calls[2]
    assert torch.allclose(w2["init"][0, :, 0], torch.ones(2))
    # zero-velocity future: every later frame was initialised with the window's last estimate
    assert torch.allclose(w2["init"][:, :, 0], torch.ones(S, 2))
    # last window shifted back: frames 24..30 come with window-2 estimates (2), 31.. with the last one (2)
    w3 = stub.calls[4]
    assert w3["frames"] == list(range(24, 40))
    assert torch.allclose(w3["init"][:, :, 0], torch.full((S, 2), 2.0))
    # feat_init is carried window to window, per batch of points
    assert stub.calls[0]["feat_init"] is None and stub.calls[2]["feat_init"][0] == 1
    assert stub.calls[4]["feat_init"][0] == 2
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == 1 and out[39, 0, 0] == 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return golden_model()


def test_single_window_equals_direct_call_and_batching_is_exact(model):
    rng = np.random.default_rng(0)
    video = (rng.random((10, 128, 160, 3)) * 255).astype(np.uint8)
    q = torch.tensor(rng.uniform([5, 5], [150, 120], (7, 2)), dtype=torch.float32)
    src = tracking.ArrayFrames(video, (128, 160))
    init = q[None].repeat(10, 1, 1)
    a = tracking.track_windows(model, src, init, S=16, iters=2, point_batch=3)
    with torch.no_grad():
        rgbs = torch.from_numpy(video).permute(0, 3, 1, 2).float()[None]
        direct = model(init[None], rgbs, iters=2)[0][-1][0]
    torch.testing.assert_close(a, direct, atol=1e-4, rtol=0)


def test_track_api_middle_frame_queries_with_backward(model):
    rng = np.random.default_rng(1)
    T = 12
    video = (rng.random((T, 128, 144, 3)) * 255).astype(np.uint8)
    queries = np.array([[5, 20.0, 30.0], [5, 100.0, 90.0], [0, 50.0, 50.0]], np.float32)
    res = tracking.track(model, video, queries, S=8, iters=2, backward=True)
    tracks, est = res["tracks"], res["estimated"]
    assert tracks.shape == (T, 3, 2) and est.all()
    np.testing.assert_allclose(tracks[5, :2], queries[:2, 1:], atol=1e-4)  # the query frame holds the query
    np.testing.assert_allclose(tracks[0, 2], queries[2, 1:], atol=1e-4)
    # the backward half is forward tracking of the reversed video from the query frame
    rev = tracking.track(model, video[5::-1].copy(), np.array([[0, 20.0, 30.0]], np.float32), S=8, iters=2)
    np.testing.assert_allclose(tracks[:6, 0][::-1], rev["tracks"][:, 0], atol=1e-3)
    fwd_only = tracking.track(model, video, queries, S=8, iters=2, backward=False)
    assert not fwd_only["estimated"][:5, :2].any() and fwd_only["estimated"][5:, :2].all()
    np.testing.assert_allclose(fwd_only["tracks"][5:], tracks[5:], atol=1e-4)


def test_track_maps_back_to_video_pixels(model):
    video = np.zeros((3, 100, 90, 3), np.uint8)  # smaller than 128: resized up to the model's minimum
    res = tracking.track(model, video, np.array([[0, 10.0, 20.0]]), S=8, iters=1)
    np.testing.assert_allclose(res["tracks"][0, 0], [10.0, 20.0], atol=1e-4)


def test_grid_queries_and_mask():
    q = tracking.grid_queries((100, 200), grid_size=4, t=3)
    assert q.shape == (16, 3) and (q[:, 0] == 3).all()
    mask = np.zeros((100, 200), np.uint8)
    mask[:, :100] = 1
    qm = tracking.grid_queries((100, 200), grid_size=4, mask=mask)
    assert len(qm) == 8 and (qm[:, 1] < 100).all()


def test_streaming_equals_offline(model):
    rng = np.random.default_rng(2)
    T, S = 21, 8
    video = (rng.random((T, 128, 128, 3)) * 255).astype(np.uint8)
    q = np.array([[10.0, 12.0], [90.0, 40.0]], np.float32)
    offline = tracking.track(model, video, np.concatenate([np.zeros((2, 1)), q], 1), S=S, iters=2)["tracks"]
    online = tracking.PipsStreamTracker(model, q, (128, 128), S=S, iters=2)
    got = {}
    lags = []
    for t in range(T):
        for ti, xy in online.push(video[t]):
            got[ti] = xy
            lags.append(t - ti)
        assert len(online.frames) <= S
    for ti, xy in online.finish():
        got[ti] = xy
    assert sorted(got) == list(range(T)) and max(lags) < S
    # the same windows, inits, feats and maps: the same numbers, not merely close ones
    np.testing.assert_array_equal(np.stack([got[t] for t in range(T)]), offline)


class TwoFrameStub(torch.nn.Module):
    """Fails on a window of fewer than 2 frames (as the real model does) and moves later frames by +1 px."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.windows = []
        self.encoded = 0

    def encode_nhwc(self, rgbs):
        self.encoded += rgbs.shape[1]
        return torch.zeros(1, rgbs.shape[1], 2, 2, 1)

    def forward(self, trajs, rgbs, iters=1, feat_init=None, fmaps=None, **kw):
        assert fmaps is not None  # track() hands over the window's maps
        assert fmaps.shape[1] >= 2, f"model called with a {fmaps.shape[1]}-frame window"
        self.windows.append(fmaps.shape[1])
        out = trajs.clone()
        out[:, 1:, :, 0] += 1
        return [out], [out], (None, None, None), None


def _video(T, h=128, w=160):
    return (np.random.default_rng(T).random((T, h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("backward", [False, True])
def test_queries_on_the_last_frame(backward):
    T = 24
    stub = TwoFrameStub()
    q = np.array([[T - 1, 30.0, 40.0], [T - 1, 100.0, 90.0], [0, 50.0, 60.0]], np.float32)
    res = tracking.track(stub, _video(T), q, S=16, iters=1, backward=backward)
    np.testing.assert_allclose(res["tracks"][T - 1, :2], q[:2, 1:], atol=1e-4)
    assert res["estimated"][T - 1].all()
    assert res["estimated"][:T - 1, :2].all() == backward
    if backward:  # the backward pass ran over the whole video, in windows of S frames
        assert res["tracks"][0, 0, 0] > q[0, 1]


def test_query_on_the_last_frame_with_the_real_model(model):
    T = 10
    q = np.array([[T - 1, 30.0, 40.0], [T - 1, 70.0, 20.0]], np.float32)
    res = tracking.track(model, _video(T), q, S=8, iters=1, backward=True)
    np.testing.assert_allclose(res["tracks"][T - 1], q[:, 1:], atol=1e-4)
    assert res["estimated"].all() and np.isfinite(res["tracks"]).all()


def test_one_frame_video():
    q = np.array([[0, 30.0, 40.0], [0, 10.0, 5.0]], np.float32)
    stub = TwoFrameStub()
    res = tracking.track(stub, _video(1), q, S=16, iters=1, backward=True)
    assert res["tracks"].shape == (1, 2, 2) and res["estimated"].all()
    np.testing.assert_allclose(res["tracks"][0], q[:, 1:], atol=1e-4)
    assert stub.windows == [] and stub.encoded == 0


def test_one_frame_video_file(tmp_path, model):
    write_mp4(tmp_path / "one.mp4", _video(1))
    res = tracking.track(model, str(tmp_path / "one.mp4"), np.array([[0, 30.0, 40.0]]), S=8, iters=1)
    np.testing.assert_allclose(res["tracks"][0, 0], [30.0, 40.0], atol=1e-3)


def test_run_window_of_one_frame_is_its_initialisation():
    init = torch.tensor([[[3.0, 4.0], [5.0, 6.0]]])
    out, feats = tracking.run_window(TwoFrameStub(), _video(1), init, ["carried"], point_batch=8)
    assert torch.equal(out, init) and feats == ["carried"]


@pytest.mark.parametrize("T", [1, 9, 16])  # S=8: 1 frame; 8 + 1 (the last window has 1 new frame); 2 windows
def test_stream_tracker_short_last_window(T):
    S = 8
    stub = TwoFrameStub()
    video = _video(T, 128, 128)
    q = np.array([[10.0, 12.0], [90.0, 40.0]], np.float32)
    online = tracking.PipsStreamTracker(stub, q, (128, 128), S=S, iters=1)
    assert isinstance(online, tracking.StreamTracker)
    got = {}
    for t in range(T):
        got.update(online.push(video[t]))
    got.update(online.finish())
    assert sorted(got) == list(range(T))
    np.testing.assert_allclose(got[0], q, atol=1e-4)
    offline = tracking.track(TwoFrameStub(), video, np.concatenate([np.zeros((2, 1)), q], 1), S=S, iters=1)
    np.testing.assert_allclose(np.stack([got[t] for t in range(T)]), offline["tracks"], atol=1e-4)


def test_window_size_below_two_is_refused():
    with pytest.raises(ValueError, match="S must be at least 2"):
        tracking.track(TwoFrameStub(), _video(4), np.array([[0, 1.0, 1.0]]), S=1)


@pytest.mark.parametrize("bad,message", [
    ([[0, 1, 1], [0, 2, 2], [0, 3, 3], [0, np.nan, 4]], r"^queries: row 3: non-finite point"),
    ([[0, 1, 1], [0, 2, np.inf]], r"^queries: row 1: non-finite point"),
    ([[np.nan, 1, 1]], r"^queries: row 0: non-finite query frame"),
    ([[0, 1, 1], [24, 2, 2]], r"^queries: row 1: query frame 24 is outside the video's frames 0\.\.23"),
    ([[-1, 1, 1]], r"^queries: row 0: query frame -1 is outside the video's frames 0\.\.23"),
    ([[0.5, 1, 1]], r"^queries: row 0: query frame 0\.5 is not a whole frame number"),
    ([[0, 1]], r"^queries: expected \(N,3\) rows"),
    (np.zeros((0, 3)), r"^queries: no queries"),
])
def test_bad_queries_are_refused_before_tracking(bad, message):
    stub = TwoFrameStub()
    with pytest.raises(ValueError, match=message) as e:
        tracking.track(stub, _video(24), np.array(bad, np.float32), S=8)
    assert "\n" not in str(e.value) and stub.windows == [] and stub.encoded == 0


def test_points_outside_the_image_warn_once_and_are_tracked():
    q = np.array([[0, 30.0, 40.0], [0, 500.0, 10.0], [0, -3.0, 10.0]], np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = tracking.track(TwoFrameStub(), _video(4), q, S=8)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1
    assert msgs[0].startswith("queries: row 1: 2 of 3 points lie outside the 160x128 image (first: x=500")
    assert "\n" not in msgs[0] and w[0].filename == __file__
    assert res["tracks"].shape == (4, 3, 2)


@pytest.mark.parametrize("backward", [False, True])
def test_each_frame_is_encoded_once_per_direction(backward):
    T, S = 40, 8
    stub = StubModel()
    t0s = [0, 3, 7, 15, 22, 39]  # K=6 query frames, the last frame among them
    q = np.array([[t, 10.0 + t, 20.0] for t in t0s], np.float32)
    res = tracking.track(stub, _ids_video(T), q, S=S, iters=1, backward=backward)
    counts = np.bincount(stub.encoded, minlength=T)
    # once forward; backward passes (from 3, 7, 15, 22 and 39) sweep the video again in reverse
    assert (counts == (2 if backward else 1)).all(), counts
    assert res["estimated"].all() == backward
    # every window's maps were consecutive frames in the pass's order of time, S of them unless the pass is shorter
    steps = {tuple(set(np.diff(c["frames"]).tolist())) for c in stub.calls}
    assert steps == ({(1,), (-1,)} if backward else {(1,)}), steps
    assert {len(c["frames"]) for c in stub.calls} == ({4, 8} if backward else {8})  # the pass from 3 has 4 frames


def test_shared_encoding_gives_each_group_its_own_numbers(model, monkeypatch):
    """Queries on K frames of one video, tracked together with every frame encoded once per direction,
    equal each group tracked alone on the video cut at (and reversed from) its query frame."""
    rng = np.random.default_rng(3)
    T, S = 20, 8
    video = (rng.random((T, 128, 128, 3)) * 255).astype(np.uint8)
    t0s = [0, 5, 5, 11, 19]
    q = np.array([[t, rng.uniform(10, 110), rng.uniform(10, 110)] for t in t0s], np.float32)
    encoded = []
    real = model.encode_nhwc

    def counting(rgbs):
        encoded.append(rgbs.shape[1])
        return real(rgbs)

    monkeypatch.setattr(model, "encode_nhwc", counting)
    res = tracking.track(model, video, q, S=S, iters=1, backward=True)
    assert sum(encoded) == 2 * T and min(encoded) >= 2  # once forward, once backward (passes from 5, 11, 19)
    monkeypatch.undo()
    for t0 in sorted(set(t0s)):
        sel = np.array(t0s) == t0  # a group's points go through the model together, as in the shared call
        alone = np.concatenate([np.zeros((sel.sum(), 1), np.float32), q[sel, 1:]], 1)
        fwd = tracking.track(model, video[t0:], alone, S=S, iters=1)["tracks"]
        np.testing.assert_array_equal(res["tracks"][t0:, sel], fwd)
        bwd = tracking.track(model, video[t0::-1].copy(), alone, S=S, iters=1)["tracks"]
        np.testing.assert_array_equal(res["tracks"][:t0 + 1, sel][::-1], bwd)


def test_window_schedule_drives_the_stream_tracker():
    T, S = 30, 8
    stub = StubModel()
    online = tracking.PipsStreamTracker(stub, np.array([[10.0, 12.0]], np.float32), (128, 128), S=S, iters=1)
    for frame in _ids_video(T):
        online.push(frame)
    online.finish()
    assert [(c["frames"][0], c["frames"][-1] + 1) for c in stub.calls] == tracking.window_starts(T, S)
    # the overlap frame is encoded once; the last window re-encodes the frames it reaches back to
    end_full = tracking.window_starts(T, S)[-2][1]  # (21, 29): frame 29 is first seen by the last window
    assert np.bincount(stub.encoded, minlength=T).tolist() == [2 if T - S <= t < end_full else 1 for t in range(T)]


def test_long_video_memory_is_bounded(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(f"""
import re
import numpy as np
from helpers import golden_model
from pips2 import tracking
from pips2.utils.video import write_mp4

def mib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

T = 100
rng = np.random.default_rng(0)
base = (rng.random((160, 240, 3)) * 255).astype(np.uint8)
write_mp4({str(tmp_path / 'v.mp4')!r}, (np.roll(base, t, 1)[:128, :192] for t in range(T)))
model = golden_model()
# one-time, size-independent state (oneDNN primitives, the delta block's Winograd filters) is made first,
# so that what is measured is what grows with the video
tracking.track(model, np.zeros((8, 128, 192, 3), np.uint8), tracking.grid_queries((128, 192), 4), S=8, iters=1)
for S in (16, T):  # windows of 16 frames, then one window over the whole video as the control
    before = mib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
    res = tracking.track(model, {str(tmp_path / 'v.mp4')!r}, tracking.grid_queries((128, 192), 4), S=S, iters=1)
    assert res["tracks"].shape == (T, 16, 2), res["tracks"].shape
    print("windowed" if S < T else "whole", mib("VmHWM") - before)
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # the child imports helpers.py
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, env=env)
    growth = dict(line.split() for line in out.stdout.strip().splitlines())
    windowed, whole = float(growth["windowed"]), float(growth["whole"])
    # measured (100 frames): 9-18 MiB with 16-frame windows, ~94 MiB with the whole video in one window
    assert windowed < 150, growth
    assert whole > 2 * windowed, growth  # the measurement sees the difference, so the bound means something


# --- requests checked before any frame is read; bounds; the decoded video's temp file ------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(iters=0), r"^iters must be at least 1 \(0 would return every query as its track\), got 0$"),
    (dict(iters=65), r"^iters must be at most 64 \(each step is one more pass .*\), got 65$"),
    (dict(S=-3), r"^S must be at least 2 \(windows overlap by one frame\), got -3$"),
    (dict(point_batch=0), r"^point_batch must be at least 1, got 0$"),
    (dict(S=8.5), r"^S must be a whole number, got 8\.5$"),
    (dict(model_hw=(16, 16)), r"^model_hw must be H,W each from 128 \(the smallest PIPs\+\+ accepts\) to 4096, "
                              r"got 16,16$"),
    (dict(model_hw=(128, 100000)), r"^model_hw must be H,W each from 128 .* to 4096, got 128,100000$"),
    (dict(model_hw="abc"), r"^model_hw must be H,W \(two whole numbers\), got 'abc'$"),
])
def test_track_arguments_are_checked_before_any_frame_is_read(tmp_path, kw, message, monkeypatch):
    """iters=0 returned every query as its track; the others failed deep inside, after the video was decoded."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write_mp4(tmp_path / "v.mp4", _video(4))
    stub = TwoFrameStub()
    for video in (_video(4), str(tmp_path / "v.mp4")):
        with pytest.raises(ValueError, match=message):
            tracking.track(stub, video, np.array([[0, 1.0, 1.0]]), **{"S": 8, **kw})
    assert stub.encoded == 0 and not list(tmp_path.glob(f"{tracking.FRAMES_PREFIX}*"))  # nothing decoded
    with pytest.raises(ValueError, match=message):
        tracking.PipsStreamTracker(stub, np.array([[1.0, 1.0]]), (128, 160), **{"S": 8, **kw})


def test_a_video_smaller_than_a_feature_cell_is_refused():
    with pytest.raises(ValueError, match=r"^video: the video is 1x1; tracking needs at least 8x8 pixels$"):
        tracking.track(TwoFrameStub(), np.zeros((3, 1, 1, 3), np.uint8), np.array([[0, 0.0, 0.0]]), S=8)


def test_a_point_far_outside_the_image_is_refused():
    """x=1e30 was tracked (with a warning) and drawing its track failed after the whole run."""
    stub = TwoFrameStub()
    for q, what in (([[0, 1e30, 5.0]], "row 0: point x=1e+30, y=5 lies more than 4 image widths"),
                    ([[0, 10.0, 10.0], [0, 5.0, -600.0]], "row 1: point x=5, y=-600 lies more than 4 image heights")):
        with pytest.raises(ValueError) as e:
            tracking.track(stub, _video(4), np.array(q, np.float32), S=8)
        assert str(e.value) == f"queries: {what} outside the 160x128 image"
    assert stub.encoded == 0
    with warnings.catch_warnings(record=True) as w:  # within 4 image sizes: still tracked, with the warning
        warnings.simplefilter("always")
        tracking.track(stub, _video(4), np.array([[0, 160 * 5 - 1.0, 5.0]], np.float32), S=8)
    assert len(w) == 1 and "lie outside the 160x128 image" in str(w[0].message)


def test_the_number_of_points_is_bounded():
    """--grid_size=3000 asked for 9 million points on a 160x128 video, and was accepted."""
    assert len(tracking.grid_queries((128, 160), 100)) == tracking.MAX_POINTS == 10_000
    bads: list[Any] = [3000, 101, 0, -1, 2.5, True]  # wrong values and types, as a command line may give
    for bad in bads:
        with pytest.raises(ValueError, match=r"^grid_size must be a whole number from 1 to 100 \(at most 10000 points"):
            tracking.grid_queries((128, 160), bad)
    q = np.zeros((tracking.MAX_POINTS + 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"^pts\.csv: 10001 points; at most 10000 are tracked at once"):
        tracking.check_queries(q, 4, (128, 160), "pts.csv")
    assert len(tracking.check_queries(q, 4, (128, 160), max_points=None)) == 10_001  # the evaluations' own counts


class NaNStub(TwoFrameStub):
    """A model whose weights are damaged: its estimates are NaN."""

    def forward(self, trajs, rgbs, iters=1, feat_init=None, fmaps=None, **kw):
        out = trajs.clone() * float("nan")
        return [out], [out], (None, None, None), None


def test_estimates_that_are_not_finite_are_refused():
    with pytest.raises(ValueError, match=r"^the model's estimates are not finite \(NaN or inf\) for 2 of 2 points"):
        tracking.track(NaNStub(), _video(6), np.array([[0, 10.0, 10.0], [0, 20.0, 20.0]], np.float32), S=4)


class FailingStub(TwoFrameStub):
    """Fails in its second window, as a model out of memory or a signal would interrupt it."""

    def forward(self, *args, **kw):
        if self.windows:
            raise RuntimeError("out of memory")
        return super().forward(*args, **kw)


def test_the_decoded_video_is_removed_on_every_way_out(tmp_path, monkeypatch):
    """The temp file of decoded frames (GBs for a long video) stayed as long as the exception was kept (a notebook
    keeps the last one; a server may log it), and for good when a signal killed the process (demo.py's test)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_mp4(tmp_path / "v.mp4", _video(12))
    q = np.array([[0, 10.0, 10.0]], np.float32)
    with pytest.raises(RuntimeError, match="out of memory") as kept:
        tracking.track(FailingStub(), str(tmp_path / "v.mp4"), q, S=4)
    assert kept.value.__traceback__ is not None and list((tmp_path / "tmp").iterdir()) == []
    del kept
    assert tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), q, S=4)["tracks"].shape == (12, 1, 2)
    assert list((tmp_path / "tmp").iterdir()) == []
    # a source the caller made stays open; close() removes its file
    src = tracking.VideoFileFrames(tmp_path / "v.mp4")
    tracking.track(TwoFrameStub(), src, q, S=4)
    assert (src.dir / "frames.u8").is_file() and len(src.get(0, 12)) == 12
    src.close()
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(ValueError, match="closed frame source"):  # not a TypeError about None
        src.get(0, 1)


def test_frame_folders_of_killed_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"{tracking.FRAMES_PREFIX}.{host}.{dead}.abc_12"
    live = tmp_path / f"{tracking.FRAMES_PREFIX}.{host}.{os.getpid()}.xyz"
    other_host = tmp_path / f"{tracking.FRAMES_PREFIX}.elsewhere.{dead}.abc"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "frames.u8").write_bytes(b"\0" * 100)
    left_by_a_killed_owner(stale)
    write_mp4(tmp_path / "v.mp4", _video(3))
    tracking.VideoFileFrames(tmp_path / "v.mp4").close()
    assert not stale.exists() and live.is_dir() and other_host.is_dir()


def test_a_folder_of_a_killed_process_in_another_pid_namespace_is_removed(tmp_path, monkeypatch):
    """A container restarted (same host name and TMPDIR, a new PID namespace) left the folders of its killed
    processes for good: their pids mean nothing in the new namespace. Each folder's owner now keeps a lock in it
    while it lives, which any namespace of the machine can test."""
    from pips2.utils.procs import owned_tempdir, pid_namespace, remove_owned

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root, tmp, prefix = str(Path(tracking.__file__).parents[1]), str(tmp_path), tracking.FRAMES_PREFIX
    code = (f"import sys, time; sys.path.insert(0, {root!r}); import tempfile; tempfile.tempdir = {tmp!r}; "
            f"from pips2.utils.procs import owned_tempdir; print(owned_tempdir({prefix!r}), flush=True); "
            "time.sleep(60)")
    owners = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = []
    try:
        for p in owners:
            assert p.stdout is not None
            made = Path(p.stdout.readline().strip())
            # as if made in another PID namespace: the name's namespace is not this one
            ns = pid_namespace()
            moved = made.with_name(made.name.replace(f".{p.pid}.{ns}.", f".{p.pid}.{ns + 1}.", 1))
            assert moved != made
            made.rename(moved)
            folders.append(moved)
        owners[0].kill()
        owners[0].wait()
        mine = owned_tempdir(tracking.FRAMES_PREFIX)
        assert tracking.remove_stale_frame_dirs() == [folders[0]]
        assert folders[1].is_dir() and mine.is_dir()  # a live owner's, and this process's own
        remove_owned(mine)
        assert not mine.exists()
    finally:
        for p in owners:
            p.kill()
            p.wait()


def test_a_full_disk_while_decoding_is_one_line(tmp_path, monkeypatch):
    """The frames are memory-mapped: without space reserved first, a full disk ends the process with SIGBUS."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_mp4(tmp_path / "v.mp4", _video(3))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(VideoError) as e:
        tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), np.array([[0, 1.0, 1.0]]), S=4)
    assert str(e.value).startswith(f"{tmp_path / 'v.mp4'}: no space in {tmp_path / 'tmp'} for its decoded frames")
    assert "TMPDIR" in str(e.value) and list((tmp_path / "tmp").iterdir()) == []


def _small_disk(monkeypatch, tmp: Path, free: int, total: int = 100 * 2**30) -> None:
    """TMPDIR = tmp on a disk with `free` bytes free besides what its files take (shutil.disk_usage faked)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    tmp.mkdir(exist_ok=True)

    def usage(path):
        taken = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        return SimpleNamespace(total=total, used=total - free + taken, free=free - taken)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_a_video_beyond_tmpdirs_free_space_is_refused_before_it_fills_it(tmp_path, monkeypatch):
    """An 8 KB video of many grey frames grew its decoded-frame file until the disk was nearly full (other programs
    writing there met ENOSPC) before 'no space'. Its frames x the model's size are compared with TMPDIR's free
    space less 1 GB (a tenth of a disk under 10 GB) before decoding, when an mp4 header declares the count, and as
    the file grows, when it does not."""
    tmp = tmp_path / "tmp"
    write_mp4(tmp_path / "v.mp4", _video(3))  # tracked at 128x160: 61,440 bytes a frame
    _small_disk(monkeypatch, tmp, 2**30 + 100_000)  # room for one frame
    q = np.array([[0, 1.0, 1.0]])
    with pytest.raises(ValueError) as e:
        tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), q, S=4)
    assert str(e.value) == (f"{tmp_path / 'v.mp4'}: decoding its 3 frames needs 0.00 GB at the model's size, {tmp} has "
                            f"1.00 GB free (less 1 GB or a tenth of its disk kept for other programs); set TMPDIR or "
                            f"cut the video")
    assert list(tmp.iterdir()) == []
    monkeypatch.setattr(tracking, "declared_frames", lambda path: None)  # a format without a frame count
    with pytest.raises(ValueError, match=r"decoding more than 1 frames needs 0\.00 GB .*; set TMPDIR or cut the"):
        tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), q, S=4)
    assert list(tmp.iterdir()) == []
    _small_disk(monkeypatch, tmp, 2**30 + 3 * 61_440)  # exactly room for the 3 frames: tracked
    assert tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), q, S=4)["tracks"].shape == (3, 1, 2)
    small = 2**30 // 2  # a 512 MB disk keeps a tenth of it free, not 1 GB
    _small_disk(monkeypatch, tmp, small // 10 + 3 * 61_440, total=small)
    assert tracking.track(TwoFrameStub(), str(tmp_path / "v.mp4"), q, S=4)["tracks"].shape == (3, 1, 2)


def test_a_video_too_large_for_its_own_size_needs_model_hw(tmp_path, monkeypatch):
    """Tracked at its own size by default, a 4104-pixel-high video would hold S frames of feature maps of that
    size; it is refused before its frames are decoded, naming model_hw and --image_size, and tracks with it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tall = np.zeros((2, 4104, 16, 3), np.uint8)
    write_mp4(tmp_path / "tall.mp4", tall)
    q = np.array([[0, 8.0, 100.0]], np.float32)
    for video, name in ((tall, "video"), (str(tmp_path / "tall.mp4"), str(tmp_path / "tall.mp4"))):
        with pytest.raises(ValueError) as e:
            tracking.track(TwoFrameStub(), video, q, S=4)
        assert str(e.value) == (f"{name}: the video is 16x4104, beyond the 4096 pixels a side that it is tracked at "
                                f"by default; give a size to track it at (model_hw, the scripts' --image_size=H,W) "
                                f"of at most 4096 a side")
    assert list((tmp_path / "tmp").iterdir()) == []
    res = tracking.track(TwoFrameStub(), str(tmp_path / "tall.mp4"), q, S=4, model_hw=(1024, 128))
    assert res["tracks"].shape == (2, 1, 2)


# --- progress: one labelled bar per pass, over work counted up front, moving within a window, ending at its total ---

def test_progress_moves_within_a_window_and_ends_at_its_total(model):
    """A clip shorter than one window showed `windows: 0%| 0/1` for the whole run: now its frames as they are
    encoded, then each iteration of each batch of points."""
    video = _video(10)
    q = np.array([[0, 30.0, 40.0], [0, 100.0, 90.0], [0, 60.0, 20.0]], np.float32)
    seen = []
    tracking.track(model, video, q, S=16, iters=2, point_batch=2, progress=lambda *a: seen.append(a))
    # 10 frames encoded in one piece, then 2 iterations x 2 batches of points, one step each, as they end
    assert seen == [("forward", n, 14) for n in (10, 11, 12, 13, 14)]


class _Bars:
    """tqdm as tracking makes its bars, each recorded with its label, unit and count when closed."""

    def __init__(self, monkeypatch):
        self.closed = []
        bars = self

        class Recording(tracking.tqdm):
            def close(self):
                if not self.disable:
                    bars.closed.append((self.desc, self.unit, self.n, self.total))
                super().close()

        monkeypatch.setattr(tracking, "tqdm", Recording)


def _exact_steps(monkeypatch) -> list:
    """Make PassProgress check that a finished pass counted exactly its total (close() would fill the rest)."""
    counts = []
    if not hasattr(tracking, "PassProgress"):  # code before PassProgress: the bars' own checks tell what is wrong
        return counts
    close = tracking.PassProgress.close

    def checked(self, finished=True):
        if finished:
            counts.append((self.label, self.done, self.total))
        close(self, finished)

    monkeypatch.setattr(tracking.PassProgress, "close", checked)
    return counts


@pytest.mark.parametrize("T,S,qt,backward,iters,point_batch", [
    (10, 16, [0, 0, 0], True, 2, 2),  # shorter than a window; backward has nothing to do (queries on frame 0)
    (24, 8, [5, 5, 0], True, 3, 2),  # several windows, a shorter last one, two query frames each way
    (24, 8, [23, 23, 0], True, 1, 8),  # a one-frame forward pass (queries on the last frame)
    (17, 8, [0, 2], False, 2, 1),  # windows sharing frames across two passes
])
def test_every_pass_bar_is_labelled_and_counts_its_steps_exactly(T, S, qt, backward, iters, point_batch, model,
                                                                    monkeypatch, capsys):
    """With --backward the forward bar stopped at 83 % and an unlabelled second bar began: each pass now has
    its own bar named after its direction, closed at exactly its total."""
    bars = _Bars(monkeypatch)
    counts = _exact_steps(monkeypatch)
    q = np.array([[t, 20.0 + 10 * i, 30.0 + 5 * i] for i, t in enumerate(qt)], np.float32)
    tracking.track(model, _video(T), q, S=S, iters=iters, point_batch=point_batch, backward=backward,
                   progress=True)
    labels = ["forward", "backward"] if backward and max(qt) > 0 else ["forward"]
    assert [b[0] for b in bars.closed] == labels and all(n == total > 0 for _, _, n, total in bars.closed)
    assert [c[0] for c in counts] == labels and all(done == total for _, done, total in counts)
    # what a person sees last of each bar: its name and 100 %
    shown = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    assert all(ln.startswith(("forward:", "backward:")) for ln in shown), shown
    for label in labels:
        assert "100%" in [ln for ln in shown if ln.startswith(label + ":")][-1]


def test_progress_steps_with_a_model_without_iteration_hooks(monkeypatch):
    """A model whose iterations cannot be seen (no delta block) advances by its iterations once each call returns."""
    counts = _exact_steps(monkeypatch)
    seen = []
    q = np.array([[23, 30.0, 40.0], [5, 100.0, 90.0], [0, 50.0, 60.0]], np.float32)
    tracking.track(TwoFrameStub(), _video(24), q, S=8, iters=3, backward=True, progress=lambda *a: seen.append(a))
    assert [c[0] for c in counts] == ["forward", "backward"] and all(d == t for _, d, t in counts)
    assert all(b[1] > a[1] for a, b in zip(seen, seen[1:], strict=False) if a[0] == b[0])


def test_a_pass_stopped_by_an_error_keeps_its_count(model, monkeypatch):
    """A bar is filled only when its pass ran to its end."""
    bars = _Bars(monkeypatch)

    class Broken(TwoFrameStub):
        def forward(self, *a, **kw):
            if len(self.windows) == 1:
                raise RuntimeError("boom")
            return super().forward(*a, **kw)

    with pytest.raises(RuntimeError, match="boom"):
        tracking.track(Broken(), _video(24), np.array([[0, 30.0, 40.0]], np.float32), S=8, iters=2, progress=True)
    ((label, _, n, total),) = bars.closed
    assert label == "forward" and 0 < n < total


@pytest.mark.parametrize("qt,labels", [([0, 0], ["forward"]), ([0, 4], ["forward", "backward"])])
def test_lbm_progress_is_one_labelled_bar_of_frames_per_pass(qt, labels, monkeypatch):
    from test_lbm_track import _video as lbm_video
    from test_lbm_track import small_lbm

    bars = _Bars(monkeypatch)
    counts = _exact_steps(monkeypatch)
    video = lbm_video(9)
    q = np.array([[t, 10.0 + 5 * i, 12.0] for i, t in enumerate(qt)], np.float32)
    tracking.track(small_lbm(torch.float32, video), video, q, backward=True, progress=True)
    # forward from the first query frame to the end, backward from the last query frame after 0 to frame 0
    assert bars.closed == [(lb, "frame", n, n) for lb, n in zip(labels, [9 - min(qt), max(qt) + 1], strict=False)]
    assert [c[0] for c in counts] == labels and all(d == t for _, d, t in counts)


_FAULTS_PER_FRAME = """
import resource, sys
import numpy as np
import pips2.tracking as tracking
from pips2.nets.pips2 import Pips
if sys.argv[1] == "off":
    tracking.reuse_freed_memory = lambda: False
model = Pips().eval()
video = np.random.default_rng(0).integers(0, 255, (8, 512, 896, 3), dtype=np.uint8)
queries = np.array([[0, 100.0, 100.0], [0, 200.0, 50.0]])
tracking.track(model, video[:2], queries, S=2, iters=1)  # the first call maps what the process needs
faults = []
for n in (2, 8):  # each call gives its kept memory back at its end: the frames after its first cost the difference
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tracking.track(model, video[:n], queries, S=n, iters=1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print((faults[1] - faults[0]) / 6)
"""


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's malloc")
@pytest.mark.skipif(_huge_pages_always(), reason="counts 4 KiB page faults; huge pages fault 2 MiB at once")
def test_tracking_reuses_the_memory_the_encoder_frees():
    """The encoder allocates and frees maps of the same large sizes frame after frame; glibc returned them to the
    system, and every page of the next was faulted in and zeroed again (a fifth of the encoder's time at
    512x896). Tracking now has malloc keep them: several times fewer page faults a frame than without."""
    faults = {}
    for mode in ("off", "on"):
        res = subprocess.run([sys.executable, "-c", _FAULTS_PER_FRAME, mode], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        faults[mode] = float(res.stdout.split()[-1])
    layer1_map_pages = 64 * 256 * 448 * 4 / 4096  # one of the encoder's largest maps at 512x896
    assert faults["off"] > 2 * layer1_map_pages, faults  # the pattern this guards against is there
    assert faults["on"] * 3 < faults["off"], faults


def test_a_folder_renamed_to_a_dead_process_s_temp_name_is_not_removed(tmp_path, monkeypatch):
    """In a folder others may write to, another user may rename a folder of this user's (which they may not
    empty) to a temp name of a dead process: the clean-up removed it and everything in it. Only a folder that is
    evidently one a killed process of this program left (mode 0700, holding its unlocked OWNER_LOCK) is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    kept = []
    for i, mode in enumerate((0o755, 0o700)):
        d = tmp_path / f"{tracking.FRAMES_PREFIX}.{host}.{dead}.paper{i}"
        d.mkdir(mode=mode)
        (d / "table.csv").write_text("the user's results")
        kept.append(d)
    (kept[0] / OWNER_LOCK).touch()  # a lock file, but not the private mode of a folder this program made
    removed = tracking.remove_stale_frame_dirs()
    assert removed == [] and all((d / "table.csv").read_text() == "the user's results" for d in kept)
