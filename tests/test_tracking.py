"""Windowed tracking, any-frame queries, backward tracking, streaming and bounded memory."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import golden_model

from utils import tracking

ROOT = Path(__file__).resolve().parents[1]


class StubModel(torch.nn.Module):
    """Records every window and moves each frame after the first by +1 px in x; feats count windows."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def encode_nhwc(self, rgbs):
        self.frames = rgbs[0, :, 0, 0, 0].clone()  # frame ids are written into pixel (0, 0)
        return torch.zeros(1, rgbs.shape[1], 2, 2, 1)

    def forward(self, trajs, rgbs, iters=1, feat_init=None, fmaps=None, **kw):
        self.calls.append(dict(frames=self.frames.long().tolist(), init=trajs[0].clone(), feat_init=feat_init))
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
    online = tracking.OnlineTracker(model, q, (128, 128), S=S, iters=2)
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
    np.testing.assert_allclose(np.stack([got[t] for t in range(T)]), offline, atol=1e-4)


def test_long_video_memory_is_bounded(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(f"""
import re, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import numpy as np, torch
from helpers import golden_model
from utils import tracking
from utils.video import write_mp4

def mib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

T = 300
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
    print(S, mib("VmHWM") - before)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    growth = dict(line.split() for line in out.stdout.strip().splitlines())
    windowed, whole = float(growth["16"]), float(growth["300"])
    # measured: ~61 MiB with 16-frame windows, ~315 MiB with the whole 300-frame video in one window
    assert windowed < 150, growth
    assert whole > 2 * windowed, growth  # the measurement sees the difference, so the bound means something
