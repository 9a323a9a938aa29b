"""LBM through the tracking API: track() equals LBM.inference, streaming equals offline, memory stays bounded."""

import math
from typing import Any

import numpy as np
import pytest
import torch

from pips2 import tracking
from pips2.nets.lbm import LBM

SMALL: dict[str, Any] = dict(input_size=(64, 96), embed_dim=32, num_layers=2, num_neighbors=4, top_k_regions=4,
                             memory_size=4)


def _video(T=9, H=40, W=56, seed=0):
    """A textured scene sliding by (1, 2) px per frame, at a size unlike the model's (the model resizes)."""
    rng = np.random.default_rng(seed)
    base = (rng.random((H + 2 * T, W + 2 * T, 3)) * 255).astype(np.uint8)
    return np.stack([base[2 * t:2 * t + H, t:t + W] for t in range(T)])


def small_lbm(dtype=torch.float64, video=None) -> LBM:
    """A random small LBM whose visibility bias puts the threshold at its median logit on `video`, so that
    about half the predictions are visible and memory slots are read (a fresh model predicts few visible)."""
    torch.manual_seed(0)
    m = LBM(**SMALL).to(dtype).eval()
    video = _video() if video is None else video
    x = torch.from_numpy(video).permute(0, 3, 1, 2)[None].to(dtype)
    q = torch.tensor([[[0, 10.0, 12.0], [0, 30.0, 20.0], [1, 44.0, 33.0], [2, 5.0, 30.0]]], dtype=dtype)
    logit = m.inference(x, q, with_raw=True)["vis_logit"]
    with torch.no_grad():
        m.get_parameter("transformer.vis_head.net.3.bias")[0] += math.log(0.8 / 0.2) - logit.median()
    return m


@pytest.fixture(scope="module")
def model():
    return small_lbm()


QUERIES = np.array([[0, 10.0, 12.0], [3, 30.0, 20.0], [0, 44.0, 33.0], [5, 5.5, 30.25], [8, 20.0, 20.0]], np.float32)


def test_track_equals_inference_from_each_query_frame(model):
    video = _video()
    res = tracking.track(model, video, QUERIES)
    ref = model.inference(torch.from_numpy(video).permute(0, 3, 1, 2)[None].double(),
                          torch.from_numpy(QUERIES).double()[None])
    T, N = video.shape[0], len(QUERIES)
    assert res["visibility"] is not None  # an LBM predicts it
    assert res["tracks"].shape == (T, N, 2) and res["visibility"].shape == (T, N)
    qt = QUERIES[:, 0].astype(int)
    after = np.arange(T)[:, None] >= qt[None, :]
    np.testing.assert_array_equal(res["estimated"], after)
    pts, vis = ref["points"][0].numpy(), ref["visibility"][0].numpy()
    np.testing.assert_allclose(res["tracks"][after], pts[after], rtol=0, atol=1e-5)  # float32 output
    np.testing.assert_array_equal(res["visibility"][after], vis[after])
    assert vis[after].any() and (~vis[after]).any()  # both kinds occur: the comparison can fail
    # before its frame a query holds its point and is not visible
    before = ~after
    np.testing.assert_array_equal(res["tracks"][before], np.broadcast_to(QUERIES[:, 1:], (T, N, 2))[before])
    assert not res["visibility"][before].any()


def test_streaming_equals_offline_with_adds_and_removes(model):
    video = _video()
    offline = tracking.track(model, video, QUERIES)
    assert offline["visibility"] is not None
    first = QUERIES[QUERIES[:, 0] == 0, 1:]
    tracker = tracking.LBMStreamTracker(model, first, video.shape[1:3])
    assert isinstance(tracker, tracking.StreamTracker)  # the protocol PIPs++'s PipsStreamTracker follows too
    ids = [0, 2]
    for t, frame in enumerate(video):
        new = [i for i in range(len(QUERIES)) if QUERIES[i, 0] == t and t > 0]
        remove = np.array([i == 2 for i in ids]) if t == 6 else None  # drop query 2 on frame 6
        if remove is not None:
            ids = [i for i in ids if i != 2]
        out = tracker.push(frame, add=QUERIES[new, 1:] if new else None, remove=remove)
        ids += new
        assert [o[0] for o in out] == [t] and tracker.num_queries == len(ids)
        _, xy, vis = out[0]
        np.testing.assert_allclose(xy, offline["tracks"][t, ids], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(vis, offline["visibility"][t, ids])
    assert tracker.finish() == []
    # dropping every query leaves an empty tracker that accepts new ones
    (_, xy, vis), = tracker.push(video[0], remove=np.ones(len(ids), bool))
    assert xy.shape == (0, 2) and tracker.num_queries == 0
    (_, xy, _), = tracker.push(video[0], add=QUERIES[:1, 1:])
    np.testing.assert_allclose(xy, offline["tracks"][0, :1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected 1 flags"):
        tracker.push(video[1], remove=np.array([True, False]))


def test_memory_does_not_grow_with_the_stream():
    m = small_lbm(torch.float32)
    rng = np.random.default_rng(1)
    frames = (rng.random((8, 24, 32, 3)) * 255).astype(np.uint8)
    tracker = tracking.LBMStreamTracker(m, np.array([[5.0, 5.0], [20.0, 10.0]]), (24, 32))
    shapes = set()
    for t in range(300):
        add = np.array([[t % 32, 12.0]]) if t % 50 == 25 else None  # a query joins every 50 frames ...
        remove = np.arange(tracker.num_queries) == 0 if t % 50 == 26 else None  # ... and the oldest one leaves
        (_, xy, _), = tracker.push(frames[t % 8], add=add, remove=remove)
        mem = tracker.state.memory
        assert tracker.state.query is not None and mem is not None
        shapes.add((tracker.state.query.shape, *(tuple(x.shape) for x in
                                                   (mem.collision, mem.stream, mem.vis_mask, mem.mem_mask))))
        assert np.isfinite(xy).all()
    # two sizes only (2 queries, or 3 between a join and the next leave), each with 4 slots of memory
    assert shapes == {(torch.Size([1, n, 32]), (1, n, 4, 32), (1, n, 4, 32), (1, n, 4), (1, n, 4)) for n in (2, 3)}
    assert set(vars(tracker)) == {"model", "src_hw", "model_hw", "state", "param", "pending", "count"}


def test_properties_that_hold_for_any_weights(model):
    video = _video()
    full = tracking.track(model, video, QUERIES)
    # causality: the first frames' results do not depend on later frames
    head = tracking.track(model, video[:6], QUERIES[QUERIES[:, 0] < 6])
    np.testing.assert_allclose(head["tracks"], full["tracks"][:6, QUERIES[:, 0] < 6], rtol=0, atol=1e-5)
    # queries are tracked independently of one another
    one = tracking.track(model, video, QUERIES[[3]])
    assert one["visibility"] is not None and full["visibility"] is not None
    np.testing.assert_allclose(one["tracks"][:, 0], full["tracks"][:, 3], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(one["visibility"][:, 0], full["visibility"][:, 3])
    # a query on frame t is a query on frame 0 of the video cut at t
    cut = tracking.track(model, video[3:], np.array([[0, 30.0, 20.0]]))
    np.testing.assert_allclose(cut["tracks"][:, 0], full["tracks"][3:, 1], rtol=0, atol=1e-5)
    # backward: frames before the query frame are forward tracking of the reversed video from it
    back = tracking.track(model, video, QUERIES, backward=True)
    assert back["estimated"].all()
    np.testing.assert_allclose(back["tracks"][full["estimated"]], full["tracks"][full["estimated"]], atol=1e-6)
    rev = tracking.track(model, video[5::-1].copy(), np.array([[0, 5.5, 30.25]]))
    assert back["visibility"] is not None and rev["visibility"] is not None
    np.testing.assert_allclose(back["tracks"][:6, 3][::-1], rev["tracks"][:, 0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(back["visibility"][:6, 3][::-1], rev["visibility"][:, 0])


def test_frames_given_at_another_size_and_checked_queries(model):
    video = _video()
    res = tracking.track(model, video, QUERIES[:2], model_hw=(64, 96))  # resized by cv2 first: close, not equal
    ref = tracking.track(model, video, QUERIES[:2])
    assert np.abs(res["tracks"] - ref["tracks"]).max() < 4
    with pytest.raises(ValueError, match="frames 0..8"):
        tracking.track(model, video, np.array([[9, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="amp"):
        tracking.track(model, video, QUERIES, amp="bf16")
