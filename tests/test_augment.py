"""Augmentations move pixels and tracks identically (dot centroids), and colour/occluder/time semantics."""

import numpy as np
import pytest

from pips2.utils import augment


def _dots(H, W, trajs, sigma=1.6):
    """Frames (S,H,W,3) of Gaussian dots at trajs (S,N,2) on black; dots never overlap in the tests."""
    S = trajs.shape[0]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = np.zeros((S, H, W, 3), np.float32)
    for t in range(S):
        for x, y in trajs[t]:
            frames[t, ..., 1] += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.clip(frames, 0, 255).astype(np.uint8)


def _centroid(img, x, y, r=6):
    H, W = img.shape[:2]
    x0, x1 = int(round(x)) - r, int(round(x)) + r + 1
    y0, y1 = int(round(y)) - r, int(round(y)) + r + 1
    if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
        return None
    patch = img[y0:y1, x0:x1, 1].astype(np.float64)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    m = patch.sum()
    return (xx * patch).sum() / m, (yy * patch).sum() / m


def _grid_tracks(S, H, W, rng, spacing=40):
    gx, gy = np.meshgrid(np.arange(30, W - 30, spacing), np.arange(30, H - 30, spacing))
    base = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32) + rng.uniform(-0.5, 0.5, (gx.size, 2))
    drift = np.cumsum(rng.uniform(-1.5, 1.5, (S, 1, 2)), 0)
    return (base[None] + drift).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("in_hw,crop", [((240, 320), (192, 256)), ((300, 420), (128, 160))])
def test_spatial_moves_dots_with_tracks(seed, in_hw, crop):
    rng = np.random.default_rng(seed)
    S, (H, W) = 4, in_hw
    trajs = _grid_tracks(S, H, W, rng)
    frames = _dots(H, W, trajs)
    plan = augment.plan_spatial(S, H, W, crop, rng, p=1.0, scale_range=(0.9, 1.5))
    out = augment.warp_frames(frames, plan)
    moved = augment.warp_tracks(trajs, plan)
    checked, errs = 0, []
    for t in range(S):
        for x, y in moved[t]:
            c = _centroid(out[t], x, y)
            if c is None:
                continue
            errs.append(np.hypot(c[0] - x, c[1] - y))
            checked += 1
    assert checked >= 5
    assert max(errs) < 0.25, (max(errs), plan.pre_scale)


def test_strong_downscale_uses_area_prescale_and_stays_exact():
    rng = np.random.default_rng(3)
    S, H, W = 3, 540, 960
    trajs = _grid_tracks(S, H, W, rng, spacing=80)
    frames = _dots(H, W, trajs, sigma=3.0)
    plan = augment.plan_spatial(S, H, W, (192, 256), rng, p=1.0, scale_range=(0.95, 1.0))
    assert plan.pre_scale < 1.0
    out, moved = augment.warp_frames(frames, plan), augment.warp_tracks(trajs, plan)
    errs = [np.hypot(*(np.array(c) - (x, y))) for t in range(S) for x, y in moved[t]
            if (c := _centroid(out[t], x, y, r=4)) is not None]
    assert len(errs) >= 5 and max(errs) < 0.25


def test_plain_crop_and_plain_resize_conventions():
    rng = np.random.default_rng(0)
    trajs = np.array([[[10.0, 20.0]]], np.float32)
    crop = augment.plan_spatial(1, 300, 400, (128, 160), rng, p=0.0)
    m = crop.affines[0]
    assert np.allclose(m[:, :2], np.eye(2))  # a pure shift
    res = augment.plan_spatial(1, 100, 150, (200, 300), rng, p=0.0)
    x = augment.warp_tracks(trajs, res)[0, 0]
    np.testing.assert_allclose(x, [(10 + 0.5) * 2 - 0.5, (20 + 0.5) * 2 - 0.5], atol=1e-5)


def test_dot_tests_cover_both_flips():
    # the dot-centroid test above is what proves the flip convention (x' = W - 1 - x: an off-by-one flip
    # would miss by 1 px); make sure its seeds really include horizontal and vertical flips
    flips = set()
    for in_hw, crop in [((240, 320), (192, 256)), ((300, 420), (128, 160))]:
        for seed in range(6):
            rng = np.random.default_rng(seed)
            _grid_tracks(4, *in_hw, rng)  # the same draws as the dot test before its plan
            A = augment.plan_spatial(4, *in_hw, crop, rng, p=1.0, scale_range=(0.9, 1.5)).affines[0]
            flips.add((bool(A[0, 0] < 0), bool(A[1, 1] < 0)))
    assert {h for h, _ in flips} == {True, False} and {v for _, v in flips} == {True, False}


def test_crop_visibility_rules():
    trajs = np.array([[[0.5, 50], [1.0, 50], [50, 50], [-63.0, 50], [-65.0, 50], [np.nan, 3]]], np.float32)
    vis = np.ones((1, 6), bool)
    val = np.ones((1, 6), bool)
    v, va = augment.crop_visibility(trajs, vis, val, (100, 100))
    assert v.tolist() == [[False, True, True, False, False, False]]
    assert va.tolist() == [[True, True, True, True, False, False]]


def test_color_same_params_every_frame():
    rng = np.random.default_rng(0)
    frame = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    frames = np.stack([frame] * 3)
    for seed in range(20):
        p = augment.sample_color_params(np.random.default_rng(seed))
        p.pop("noise_std", None)  # noise is redrawn per frame by design
        out = augment.apply_color(frames, p, rng)
        assert out.dtype == np.uint8 and out.shape == frames.shape
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_color_ops_change_pixels():
    rng = np.random.default_rng(0)
    frames = (np.random.default_rng(1).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    changed = 0
    for seed in range(10):
        p = augment.sample_color_params(np.random.default_rng(seed))
        if p:
            changed += not np.array_equal(augment.apply_color(frames, p, rng), frames)
    assert changed >= 8


def test_occluders_hide_covered_points_on_later_frames_only():
    S, H, W = 5, 100, 120
    frames = (np.random.default_rng(0).random((S, H, W, 3)) * 255).astype(np.uint8)  # no pixel equals a mean
    xs, ys = np.meshgrid(np.arange(2, W, 4), np.arange(2, H, 4))
    trajs = np.repeat(np.stack([xs.ravel(), ys.ravel()], 1)[None].astype(np.float32), S, 0)
    vis = np.ones(trajs.shape[:2], bool)
    for seed in range(50):
        out, v = augment.add_occluders(frames, trajs, vis, np.random.default_rng(seed), p=1.0, max_count=1)
        if not (~v).any():
            continue
        assert v[0].all() and np.array_equal(out[0], frames[0])  # frame 0 is never occluded
        t = int(np.nonzero((~v).any(1))[0][0])
        changed = (out[t] != frames[t]).any(-1)
        hidden = trajs[t][~v[t]].round().astype(int)
        assert changed[hidden[:, 1], hidden[:, 0]].all()  # every hidden point is under the rectangle
        shown = trajs[t][v[t]].round().astype(int)
        inner = changed[shown[:, 1], shown[:, 0]]
        assert not inner.any()
        return
    pytest.fail("no occluder drawn in 50 seeds")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_erase_and_replace_hide_exactly_the_points_on_changed_pixels(seed):
    rng = np.random.default_rng(seed)
    S, H, W = 6, 96, 128
    frames = rng.integers(0, 256, (S, H, W, 3), dtype=np.uint8)  # noise: a new colour is a changed pixel
    yy, xx = np.mgrid[0:H:3, 0:W:3]
    trajs = np.repeat(np.stack([xx.ravel(), yy.ravel()], -1)[None].astype(np.float32), S, 0)  # points on pixels
    visibs = np.ones(trajs.shape[:2], bool)
    out, vis = augment.erase_and_replace(frames, trajs, visibs, np.random.default_rng(seed), p=1.0)
    assert visibs.all() and out is not frames  # inputs untouched
    assert np.array_equal(out[0], frames[0]) and vis[0].all()  # never the first frame
    x, y = trajs[0, :, 0].astype(int), trajs[0, :, 1].astype(int)
    for t in range(1, S):
        changed = (out[t] != frames[t]).any(-1)
        assert changed.any()
        assert np.array_equal(~vis[t], changed[y, x])  # hidden <=> its pixel was covered
    # box sides scale with the frame: at 48x64 a side is under 100 * 48 / 512 + 1 px, and each of the two
    # passes draws one box per frame here, so at most 2 * 9 * 9 pixels change
    small = rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    out, _ = augment.erase_and_replace(small, np.zeros((40, 1, 2), np.float32), np.ones((40, 1), bool),
                                       np.random.default_rng(seed), p=1.0, max_count=1)
    counts = [(out[t] != small[t]).any(-1).sum() for t in range(1, 40)]
    assert sum(c > 0 for c in counts) > 30 and 20 < max(counts) <= 2 * 9 * 9  # a box can clip to nothing
    same, vis = augment.erase_and_replace(frames, trajs, visibs, np.random.default_rng(seed), p=0.0)
    assert np.array_equal(same, frames) and vis.all()


def test_reverse_time():
    a, b = np.arange(6).reshape(3, 2), np.arange(3)
    ra, rb = augment.reverse_time(a, b)
    assert ra.tolist() == [[4, 5], [2, 3], [0, 1]] and rb.tolist() == [2, 1, 0]


def test_flips_mirror_about_the_last_pixel():
    """x' = cw - 1 - x (and y' = ch - 1 - y): the same seed without flips draws the same plan up to the flips,
    which come last, so a flipped plan's tracks mirror the unflipped plan's exactly."""
    S, H, W, crop = 3, 240, 320, (128, 192)
    pts = np.array([[[5.0, 7.0], [100.5, 60.25], [300.0, 230.0]]] * S, np.float32)
    seen = set()
    for seed in range(12):
        flipped = augment.plan_spatial(S, H, W, crop, np.random.default_rng(seed), p=1.0, flips=True)
        plain = augment.plan_spatial(S, H, W, crop, np.random.default_rng(seed), p=1.0, flips=False)
        h, v = bool(flipped.affines[0, 0, 0] < 0), bool(flipped.affines[0, 1, 1] < 0)
        seen.add((h, v))
        a, b = augment.warp_tracks(pts, flipped), augment.warp_tracks(pts, plain)
        want_x = crop[1] - 1 - b[..., 0] if h else b[..., 0]
        want_y = crop[0] - 1 - b[..., 1] if v else b[..., 1]
        np.testing.assert_allclose(a[..., 0], want_x, atol=1e-4)
        np.testing.assert_allclose(a[..., 1], want_y, atol=1e-4)
    assert {h for h, _ in seen} == {True, False} and {v for _, v in seen} == {True, False}


def test_crop_visibility_on_a_wide_frame_and_invalid_points():
    """x is checked against the width and y against the height; a point inside but not valid is not visible."""
    trajs = np.array([[[150.0, 50.0], [50.0, 150.0], [60.0, 60.0]]], np.float32)
    vis = np.ones((1, 3), bool)
    val = np.array([[True, True, False]])
    v, va = augment.crop_visibility(trajs, vis, val, (100, 200))  # H=100, W=200
    assert v.tolist() == [[True, False, False]]
    assert va.tolist() == [[True, True, False]]
