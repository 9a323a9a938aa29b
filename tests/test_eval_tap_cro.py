"""test_on_tap.py and test_on_cro.py on small data made in their layouts."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import golden_model, run_main
from test_lbm_track import small_lbm

from pips2 import evaluation
from pips2.cli import eval_tap as test_on_tap
from pips2.datasets import crohd, tapvid
from pips2.utils import checkpoint, metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    checkpoint.save(d, 1, golden_model())
    return d


def _video(T=10, H=128, W=160, seed=0):
    rng = np.random.default_rng(seed)
    base = (rng.random((H + 40, W + 40, 3)) * 255).astype(np.uint8)
    return np.stack([base[t:t + H, 2 * t:2 * t + W] for t in range(T)])


def _entry(T=10, H=128, W=160, seed=0):
    video = _video(T, H, W, seed)
    N = 6
    rng = np.random.default_rng(seed + 1)
    start = rng.uniform([10, 10], [W - 30, H - 30], (N, 2))
    pts = start[:, None] + np.arange(T)[None, :, None] * np.array([-2.0, -1.0])  # the content moves by (-2,-1)
    occ = np.zeros((N, T), bool)
    occ[0, 4:7] = True
    occ[1, 0] = True  # not visible in frame 0
    return {"video": video, "points": (pts / [W - 1, H - 1]).astype(np.float32), "occluded": occ}


def test_pickle_forms_load_the_same(tmp_path):
    e = _entry()
    with open(tmp_path / "d.pkl", "wb") as f:
        pickle.dump({"clipA": e}, f)
    jpeg = dict(e, video=[cv2.imencode(".png", fr[..., ::-1])[1].tobytes() for fr in e["video"]])
    with open(tmp_path / "k.pkl", "wb") as f:
        pickle.dump([jpeg], f)
    (name_a, va, pa, oa), = list(tapvid.load_tapvid(tmp_path / "d.pkl"))
    (name_b, vb, pb, ob), = list(tapvid.load_tapvid(tmp_path / "k.pkl"))
    assert name_a == "clipA" and name_b == "k_0000"
    assert np.array_equal(va, vb) and np.allclose(pa, pb) and np.array_equal(oa, ob)
    assert pa[2, 0] == pytest.approx(e["points"][2, 0] * [159, 127])
    with pytest.raises(ValueError, match="not a readable"):
        (tmp_path / "bad.pkl").write_bytes(b"nope")
        list(tapvid.load_tapvid(tmp_path / "bad.pkl"))


def test_query_modes():
    occ = np.array([[False, True, False, False, False, False], [True, True, True, True, True, False]])
    idx, qf = tapvid.first_queries(occ)
    assert idx.tolist() == [0, 1] and qf.tolist() == [0, 5]
    idx, qf = tapvid.strided_queries(occ, stride=5)
    assert list(zip(idx.tolist(), qf.tolist(), strict=True)) == [(0, 0), (0, 5), (1, 5)]


def test_strided_mode_scores_frames_before_the_query():
    gt = np.zeros((1, 3, 2))
    pred = gt.copy()
    pred[0, 0] = [10, 0]  # wrong only before the query frame
    occ = np.zeros((1, 3), bool)
    first = metrics.tapvid_metrics(pred, gt, occ, [1], (256, 256))
    strided = metrics.tapvid_metrics(pred, gt, occ, [1], (256, 256), evaluate_before_query=True)
    # frame 0 (10 px off) passes only the 16-px threshold; frame 2 passes all
    assert first["delta_avg"] == 100.0 and strided["delta_avg"] == pytest.approx(100 * (0.5 * 4 + 1) / 5)


def test_test_on_tap_runs(tmp_path, ckpt, capsys):
    with open(tmp_path / "davis.pkl", "wb") as f:
        pickle.dump({"a": _entry(seed=0), "b": _entry(seed=3)}, f)
    out = tmp_path / "r.json"
    kw = dict(dataset_location=str(tmp_path / "davis.pkl"), init_dir=str(ckpt), S=8, iters=1, image_size="128,160")
    res = run_main(test_on_tap.main, capsys, out_json=str(out), **kw)
    assert res.returncode == 0, res.stderr
    assert "a: d_1" in res.stdout and "delta_avg (strided)" in res.stdout and "summary: 2 videos" in res.stdout
    js = json.loads(out.read_text())
    assert f"results -> {out}" in res.stdout and [p.name for p in tmp_path.glob(".r.json*")] == []  # no temp left
    assert set(js["tapvid"]) == {"first", "strided"} and js["per_item"]["a"]["points"] == 5  # 1 not visible at 0
    assert 0 <= js["tapvid"]["first"]["delta_avg"] <= 100
    png = tmp_path / "r_curves.png"  # accuracy vs threshold and survival, beside the json
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"curves -> {png}" in res.stdout
    # --max_videos, and --max_iters as the authors call it
    res = run_main(test_on_tap.main, capsys, max_videos=1, modes="", **kw)
    assert res.returncode == 0 and "summary: 1 videos" in res.stdout
    assert run_main(test_on_tap.main, capsys, max_iters=1, modes="", **kw).stdout.count("summary: 1 videos") == 1
    res = run_main(test_on_tap.main, capsys, max_videos=1, max_iters=2, **kw)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: --max_videos=1 and its alias --max_iters=2 disagree; give one of them"]


# --- LBM (issue 13): full TAP-Vid metrics from the model's visibility ---------------------------------------------

@pytest.fixture(scope="module")
def lbm():
    return small_lbm(torch.float32)


def test_test_on_tap_lbm_runs(tmp_path, lbm, capsys):
    torch.save({"model": lbm.state_dict()}, tmp_path / "lbm.pt")
    with open(tmp_path / "tapvid_davis.pkl", "wb") as f:
        pickle.dump({"a": _entry(seed=0), "b": _entry(seed=3)}, f)
    out = tmp_path / "r.json"
    kw = dict(dataset_location=str(tmp_path / "tapvid_davis.pkl"), model="lbm", init_dir=str(tmp_path / "lbm.pt"))
    res = run_main(test_on_tap.main, capsys, out_json=str(out), **kw)
    assert res.returncode == 0, res.stderr
    assert "LBM: memory of 20 frames, input size 96x64" in res.stdout  # DAVIS's memory
    assert "AJ (strided)" in res.stdout and "summary: 2 videos scored" in res.stdout
    js = json.loads(out.read_text())
    assert js["mean"] is None and set(js["tapvid"]) == {"first", "strided"}
    for m in ("first", "strided"):
        for k in ("average_jaccard", "delta_avg", "occlusion_accuracy"):
            assert 0 <= js["tapvid"][m][k] <= 100, (m, k)
    # each video is resized to 256x256 first, as the authors evaluate: the figures are those of the resized video
    from pips2.tracking import load_tracker

    net = load_tracker("lbm", str(tmp_path / "lbm.pt"), "cpu", "none", 20)
    _, video, points, occ = next(iter(tapvid.load_tapvid(tmp_path / "tapvid_davis.pkl")))
    v256, p256 = evaluation.resize_tapvid(video, points, (256, 256))
    assert js["per_item"]["a"]["tapvid"]["first"] == evaluation.tapvid_query_mode(net, v256, p256, occ, "first")
    res = run_main(test_on_tap.main, capsys, memory_size=7, modes="first", out_json=str(out), resize_to_256=False,
                   **kw)
    assert res.returncode == 0 and "memory of 7 frames" in res.stdout
    net.set_memory_size(7)
    assert json.loads(out.read_text())["per_item"]["a"]["tapvid"]["first"] == \
        evaluation.tapvid_query_mode(net, video, points, occ, "first")
    res = run_main(test_on_tap.main, capsys, image_size="128,160", **kw)
    assert res.returncode == 2 and "--image_size is PIPs++'s" in res.stderr


def test_resize_tapvid_moves_points_with_the_pixels():
    T, H, W = 2, 384, 512
    rng = np.random.default_rng(0)
    norm = rng.uniform(0.1, 0.9, (5, T, 2)).astype(np.float32)
    points = norm * [W - 1, H - 1]
    yy, xx = np.mgrid[0:H, 0:W]
    video = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        for x, y in points[:, t]:
            video[t][(xx - x) ** 2 + (yy - y) ** 2 <= 36] = 255  # a disc of radius 6 px
    v, p = evaluation.resize_tapvid(video, points, (256, 256))
    assert v.shape == (T, 256, 256, 3)
    np.testing.assert_allclose(p, norm * 255, rtol=1e-6)  # as load_tapvid places a file stored at 256x256
    g = v[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0:256, 0:256]
    for t in range(T):
        for x, y in p[:, t]:
            win = ((xx - x) ** 2 + (yy - y) ** 2 <= 25) * g[t]  # the disc is now ~3x4 px: its centroid
            assert abs((win * xx).sum() / win.sum() - x) < 0.5 and abs((win * yy).sum() / win.sum() - y) < 0.5
    same, q = evaluation.resize_tapvid(v, p, (256, 256))
    assert same is v and q is p


def test_lbm_memory_sizes_by_data_set():
    sizes = [evaluation.lbm_memory_size(p) for p in
             ("/d/tapvid_davis.pkl", "/d/kinetics/", "/d/TAPVID_ROBOTAP", "/d/tapvid_rgb_stacking.pkl")]
    assert sizes == [20, 36, 60, 48]


@pytest.mark.parametrize("mode", ["first", "strided"])
def test_occlusion_accuracy_comes_from_the_model(lbm, mode):
    e = _entry(T=10, seed=5)
    H, W = e["video"].shape[1:3]
    points, occ = e["points"] * [W - 1, H - 1], e["occluded"]
    idx, qf = tapvid.first_queries(occ) if mode == "first" else tapvid.strided_queries(occ)
    t = np.arange(occ.shape[1])[None]
    evaluated = (t != qf[:, None]) if mode == "strided" else (t > qf[:, None])
    visible_share = 100 * (~occ[idx] & evaluated).sum() / evaluated.sum()
    assert 0 < visible_share < 100
    bias = lbm.transformer.vis_head.net[3].bias
    kept = bias.detach().clone()
    for shift, oa in ((1e4, visible_share), (-1e4, 100 - visible_share)):  # the model says: all visible / none
        with torch.no_grad():
            bias[0] += shift
        try:
            res = evaluation.tapvid_query_mode(lbm, e["video"], points, occ, mode)
        finally:
            with torch.no_grad():
                bias.copy_(kept)
        assert res["occlusion_accuracy"] == pytest.approx(oa)
        assert np.isfinite(list(res.values())).all()
        if shift < 0:
            assert res["average_jaccard"] == 0  # nothing predicted visible: no true positive


def _crohd(root: Path, T=20, H=128, W=192):
    img = root / "HT21" / "train" / "HT21-01" / "img1"
    img.mkdir(parents=True)
    for t, fr in enumerate(_video(T, H, W)):
        cv2.imwrite(str(img / f"{t + 1:06d}.jpg"), fr[..., ::-1])
    gt = root / "HT21Labels" / "train" / "HT21-01" / "gt"
    gt.mkdir(parents=True)
    rows = []
    for t in range(T):
        for hid, (x, y) in enumerate([(30, 40), (90, 60), (150, 90)], start=1):
            if hid == 3 and t >= 15:
                continue  # head 3 leaves
            rows.append(f"{t + 1},{hid},{x - 2 * t - 5},{y - t - 6},10,12,1,1,{0.0 if (hid == 2 and t == 3) else 1.0}")
    (gt / "gt.txt").write_text("\n".join(rows) + "\n")


def test_crohd_layout_and_head_centres(tmp_path):
    _crohd(tmp_path)
    frames, trajs, vis, val = crohd.load_sequence(tmp_path, "train", "HT21-01")
    assert len(frames) == 20 and trajs.shape == (20, 3, 2)
    np.testing.assert_allclose(trajs[4, 0], [30 - 8, 40 - 4])  # left + w/2, top + h/2
    assert not vis[3, 1] and val[3, 1] and not val[16, 2]
    clips = crohd.list_clips(tmp_path, "train", clip_len=10)
    assert [c.name for c in clips] == ["HT21-01_00000", "HT21-01_00010"] and len(clips[1].frame_paths) == 10


def test_test_on_cro_runs(tmp_path, ckpt):
    _crohd(tmp_path)
    res = subprocess.run([sys.executable, str(ROOT / "test_on_cro.py"), f"--dataset_location={tmp_path}",
                          f"--init_dir={ckpt}", "--clip_len=10", "--S=8", "--iters=1", "--image_size=128,192"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "HT21-01_00000: d_1" in res.stdout and "summary: 2 clips scored" in res.stdout
