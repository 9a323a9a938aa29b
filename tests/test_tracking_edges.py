"""One-frame windows (queries on the last frame, 1-frame videos and streams) and bad queries in track()."""

import warnings

import numpy as np
import pytest
import torch
from helpers import golden_model

from utils import tracking


class TwoFrameStub(torch.nn.Module):
    """Fails on a window of fewer than 2 frames (as the real model does) and moves later frames by +1 px."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.windows = []

    def encode_nhwc(self, rgbs):
        assert rgbs.shape[1] >= 2, f"model called with a {rgbs.shape[1]}-frame window"
        self.windows.append(rgbs.shape[1])
        return torch.zeros(1, rgbs.shape[1], 2, 2, 1)

    def forward(self, trajs, rgbs, iters=1, feat_init=None, fmaps=None, **kw):
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


def test_query_on_the_last_frame_with_the_real_model():
    T = 10
    q = np.array([[T - 1, 30.0, 40.0], [T - 1, 70.0, 20.0]], np.float32)
    res = tracking.track(golden_model(), _video(T), q, S=8, iters=1, backward=True)
    np.testing.assert_allclose(res["tracks"][T - 1], q[:, 1:], atol=1e-4)
    assert res["estimated"].all() and np.isfinite(res["tracks"]).all()


def test_one_frame_video():
    q = np.array([[0, 30.0, 40.0], [0, 10.0, 5.0]], np.float32)
    stub = TwoFrameStub()
    res = tracking.track(stub, _video(1), q, S=16, iters=1, backward=True)
    assert res["tracks"].shape == (1, 2, 2) and res["estimated"].all()
    np.testing.assert_allclose(res["tracks"][0], q[:, 1:], atol=1e-4)
    assert stub.windows == []


def test_one_frame_video_file(tmp_path):
    from utils.video import write_mp4

    write_mp4(tmp_path / "one.mp4", _video(1))
    res = tracking.track(golden_model(), str(tmp_path / "one.mp4"), np.array([[0, 30.0, 40.0]]), S=8, iters=1)
    np.testing.assert_allclose(res["tracks"][0, 0], [30.0, 40.0], atol=1e-3)


def test_run_window_of_one_frame_is_its_initialisation():
    init = torch.tensor([[[3.0, 4.0], [5.0, 6.0]]])
    out, feats = tracking.run_window(TwoFrameStub(), _video(1), init, ["carried"], point_batch=8)
    assert torch.equal(out, init) and feats == ["carried"]


@pytest.mark.parametrize("T", [1, 9, 16])  # S=8: 1 frame; 8 + 1 (the last window has 1 new frame); 2 windows
def test_online_tracker_short_last_window(T):
    S = 8
    stub = TwoFrameStub()
    video = _video(T, 128, 128)
    q = np.array([[10.0, 12.0], [90.0, 40.0]], np.float32)
    online = tracking.OnlineTracker(stub, q, (128, 128), S=S, iters=1)
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
    ([[0, 1, 1], [0, 2, 2], [0, 3, 3], [0, np.nan, 4]], r"^queries: row 3 has a non-finite x/y"),
    ([[0, 1, 1], [0, 2, np.inf]], r"^queries: row 1 has a non-finite x/y"),
    ([[np.nan, 1, 1]], r"^queries: row 0 has a non-finite frame"),
    ([[0, 1, 1], [24, 2, 2]], r"^queries: row 1 has frame 24; valid frames are 0\.\.23"),
    ([[-1, 1, 1]], r"^queries: row 0 has frame -1; valid frames are 0\.\.23"),
    ([[0, 1]], r"^queries: expected \(N,3\) rows"),
    (np.zeros((0, 3)), r"^queries: no queries"),
])
def test_bad_queries_are_refused_before_tracking(bad, message):
    stub = TwoFrameStub()
    with pytest.raises(ValueError, match=message) as e:
        tracking.track(stub, _video(24), np.array(bad, np.float32), S=8)
    assert "\n" not in str(e.value) and stub.windows == []


def test_points_outside_the_image_warn_once_and_are_tracked():
    q = np.array([[0, 30.0, 40.0], [0, 500.0, 10.0], [0, -3.0, 10.0]], np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = tracking.track(TwoFrameStub(), _video(4), q, S=8)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "2 point(s) outside the 160x128 image (first: row 1 at x=500" in msgs[0]
    assert "\n" not in msgs[0] and w[0].filename == __file__
    assert res["tracks"].shape == (4, 3, 2)
