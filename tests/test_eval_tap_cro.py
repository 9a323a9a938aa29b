"""test_on_tap.py and test_on_cro.py on small data made in their layouts."""

import json
import os
import pickle
import shutil
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
from pips2.cli import eval_cro as test_on_cro
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


def test_tapvid_encoded_frames_are_read_as_stored_whatever_their_exif_orientation(tmp_path):
    """The points are positions in the stored pixels: a Kinetics frame with an EXIF Orientation tag of 3 was
    decoded turned 180 degrees at the same size, every point on the mirrored image."""
    from test_video import exif_oriented

    e = _entry()
    png = dict(e, video=[exif_oriented(fr, 3, ".png") for fr in e["video"]])
    with open(tmp_path / "k.pkl", "wb") as f:
        pickle.dump([png], f)
    (_, video, _, _), = list(tapvid.load_tapvid(tmp_path / "k.pkl"))
    np.testing.assert_array_equal(video, e["video"])


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


# --- LBM: full TAP-Vid metrics from the model's visibility ---------------------------------------------

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
    from pips2.hub import load_model

    net = load_model(tmp_path / "lbm.pt", "cpu", kind="lbm", memory_size=20)
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
    # and the mirror case: --memory_size with PIPs++ was ignored without a word ("memory_size": null in the results)
    res = run_main(test_on_tap.main, capsys, **{**kw, "model": "pips2", "memory_size": 4})
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: --memory_size is LBM's (--model=lbm); --model=pips2 has no memory to resample: leave the flag out"]


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


def _crohd(root: Path, T=20, H=128, W=192, seq="HT21-01"):
    img = root / "HT21" / "train" / seq / "img1"
    img.mkdir(parents=True)
    for t, fr in enumerate(_video(T, H, W)):
        cv2.imwrite(str(img / f"{t + 1:06d}.jpg"), fr[..., ::-1])
    gt = root / "HT21Labels" / "train" / seq / "gt"
    gt.mkdir(parents=True)
    rows = []
    for t in range(T):
        for hid, (x, y) in enumerate([(30, 40), (90, 60), (150, 90)], start=1):
            if hid == 3 and t >= 15:
                continue  # head 3 leaves
            rows.append(f"{t + 1},{hid},{x - 2 * t - 5},{y - t - 6},10,12,1,1,{0.0 if (hid == 2 and t == 3) else 1.0}")
    (gt / "gt.txt").write_text("\n".join(rows) + "\n")


def test_crohd_frame_that_is_a_fifo_is_refused_without_opening_it(tmp_path, make_fifo):
    _crohd(tmp_path)
    make_fifo(tmp_path / "HT21/train/HT21-01/img1/000005.jpg")
    with pytest.raises(crohd.CroHDError, match=r"img1/000005\.jpg: not a regular file$"):
        crohd.sequence_clips(tmp_path, "train", "HT21-01", clip_len=10)


def test_crohd_frames_are_matched_to_gt_by_the_number_in_their_name(tmp_path):
    _crohd(tmp_path)
    img = tmp_path / "HT21/train/HT21-01/img1"
    want = crohd.load_sequence(tmp_path, "train", "HT21-01")
    for p in img.iterdir():  # unpadded names sort 1, 10, 11, ..., 2
        p.rename(img / f"{int(p.stem)}.jpg")
    frames, trajs, vis, val = crohd.load_sequence(tmp_path, "train", "HT21-01")
    assert [p.name for p in frames] == [f"{t}.jpg" for t in range(1, 21)]
    np.testing.assert_array_equal(trajs, want[1])
    (img / "7.jpg").unlink()
    (img / "8.jpg").unlink()
    with pytest.raises(crohd.CroHDError, match=r"img1: frame 7\.jpg missing \(have 1\.\.6, 9\.\.20\)$"):
        crohd.load_sequence(tmp_path, "train", "HT21-01")
    (img / "x.jpg").touch()
    with pytest.raises(crohd.CroHDError, match=r"x\.jpg: not named by its frame number"):
        crohd.load_sequence(tmp_path, "train", "HT21-01")


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


CRO_SMALL = dict(clip_len=10, S=8, iters=1, image_size="128,192")

# HT21-02 spoilt in one way; HT21-01 and HT21-03 are good: (how, the skipped item, its reason)
CRO_DEFECTS = {
    "truncated frame": ("HT21-02_00000", "truncated frame (000006.jpg)"),
    "4-column gt.txt": ("HT21-02", "gt.txt: 4 columns, expected at least 6"),
    "no img1 folder": ("HT21-02", "img1: no frames"),
    "no gt.txt": ("HT21-02", "no gt.txt for train/HT21-02"),
    "text in gt.txt": ("HT21-02", "gt.txt: unreadable (could not convert"),
    "NaN track id": ("HT21-02", "gt.txt: frame and id columns must be finite integers"),
    "a frame missing": ("HT21-02", "img1: frame 000005.jpg missing (have 1..4, 6..10)"),
    "gt.txt beyond the last frame": ("HT21-02", "gt.txt: names frame 10, but img1/ holds frames 1..9"),
    # a sparse 4 GB file (4 KB on disk) was parsed whole: MemoryError, and no sequence scored
    "a 4 GB gt.txt": ("HT21-02", "gt.txt: 4294967296 bytes, more than the 67108864 an annotation file"),
    "gt.txt a FIFO": ("HT21-02", "gt.txt: not a regular file"),
    "a (frame, id) twice": ("HT21-02", "gt.txt: lines 8 and 31 both give frame 3, id 2: one box per head and frame"),
}


def _spoil_crohd(root: Path, how: str) -> None:
    seq = root / "HT21" / "train" / "HT21-02"
    gt = root / "HT21Labels" / "train" / "HT21-02" / "gt" / "gt.txt"
    if how == "truncated frame":
        f = seq / "img1" / "000006.jpg"
        f.write_bytes(f.read_bytes()[:1500])
    elif how == "4-column gt.txt":
        gt.write_text("".join(",".join(r.split(",")[:4]) + "\n" for r in gt.read_text().splitlines()))
    elif how == "no img1 folder":
        shutil.rmtree(seq / "img1")
    elif how == "no gt.txt":
        gt.unlink()
    elif how == "text in gt.txt":
        gt.write_text(gt.read_text().replace("1,1,", "1,one,", 1))
    elif how == "a frame missing":  # a partial copy: every later frame got the previous frame's boxes
        (seq / "img1" / "000005.jpg").unlink()
    elif how == "gt.txt beyond the last frame":  # its rows were dropped unseen
        (seq / "img1" / "000010.jpg").unlink()
    elif how == "a 4 GB gt.txt":
        os.truncate(gt, 4 << 30)
    elif how == "gt.txt a FIFO":
        gt.unlink()
        os.mkfifo(gt)
    elif how == "NaN track id":
        gt.write_text(gt.read_text().replace("1,1,", "1,nan,", 1))
    elif how == "a (frame, id) twice":  # the last box won, silently
        gt.write_text(gt.read_text() + "3,2,9999,9999,10,12,1,1,1\n")


@pytest.mark.parametrize("how", list(CRO_DEFECTS))
def test_test_on_cro_skips_a_bad_sequence_and_scores_the_others(tmp_path, ckpt, capsys, how):
    for seq in ("HT21-01", "HT21-02", "HT21-03"):
        _crohd(tmp_path / "cro", T=10, seq=seq)
    _spoil_crohd(tmp_path / "cro", how)
    out = tmp_path / "r.json"
    res = run_main(test_on_cro.main, capsys, dataset_location=str(tmp_path / "cro"), init_dir=str(ckpt),
                   out_json=str(out), **CRO_SMALL)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    name, reason = CRO_DEFECTS[how]
    js = json.loads(out.read_text())
    assert list(js["per_item"]) == ["HT21-01_00000", "HT21-03_00000"] and js["complete"]
    (skip,) = js["skipped"]
    assert skip["name"] == name and reason in skip["reason"] and "\n" not in skip["reason"]
    assert f"{name}: skipped ({skip['reason']})" in res.stdout
    assert "summary: 2 clips scored, 1 skipped" in res.stdout


def test_crohd_gt_sizes_are_bounded_before_allocation(tmp_path, monkeypatch):
    _crohd(tmp_path, T=10)  # 3 heads over 10 frames: 30 entries
    gt = tmp_path / "HT21Labels" / "train" / "HT21-01" / "gt" / "gt.txt"
    monkeypatch.setattr(crohd, "MAX_TRACK_ENTRIES", 29)
    with pytest.raises(crohd.CroHDError, match=r"gt\.txt: 3 head ids over 10 frames is more than 29 entries"):
        crohd.load_sequence(tmp_path, "train", "HT21-01")
    monkeypatch.setattr(crohd, "MAX_TRACK_ENTRIES", 30)
    assert crohd.load_sequence(tmp_path, "train", "HT21-01")[1].shape == (10, 3, 2)
    gt.write_text(gt.read_text() + "2,3000000000,5,5,10,12,1,1,1\n")
    with pytest.raises(crohd.CroHDError, match="frame and id columns must be finite integers below 2"):
        crohd.load_sequence(tmp_path, "train", "HT21-01")


def _edit_gt_line(gt: Path, number: int, column: int, value: str) -> None:
    """gt.txt with one value of line `number` (1-based) replaced."""
    lines = gt.read_text().splitlines()
    cells = lines[number - 1].split(",")
    cells[column] = value
    lines[number - 1] = ",".join(cells)
    gt.write_text("\n".join(lines) + "\n")


# rows that parse but are wrong: (how the 30-row gt.txt of _crohd(T=10) is changed, the line refusing it)
GT_ROW_DEFECTS = {
    # ids 1.2 and 1.7 both became head 1, the later row overwriting the earlier one
    "fractional id": (lambda gt: _edit_gt_line(gt, 5, 1, "1.5"), "line 5: frame 2, id 1.5: frame and id must be whole "
                                                                  "numbers"),
    "fractional frame": (lambda gt: _edit_gt_line(gt, 4, 0, "1.5"), "line 4: frame 1.5, id 1: frame and id must be "
                                                                     "whole numbers"),
    # a centre at -5e29, scored as a visible head
    "negative width": (lambda gt: _edit_gt_line(gt, 6, 4, "-1e30"), "line 6: box of width -1e+30 and height 12; both "
                                                                     "must be finite and not negative"),
    "NaN height": (lambda gt: _edit_gt_line(gt, 7, 5, "nan"), "line 7: box of width 10 and height nan; both must be "
                                                               "finite and not negative"),
    # the last box won: a head at (9999, 9999), valid; a comment and a blank line shift the lines by two
    "a (frame, id) twice": (lambda gt: gt.write_text("# frame,id,left,top,width,height,conf,class,vis\n\n"
                                                     + gt.read_text() + "3,2,9999,9999,10,12,1,1,1\n"),
                            "lines 10 and 33 both give frame 3, id 2: one box per head and frame"),
}


@pytest.mark.parametrize("how", list(GT_ROW_DEFECTS))
def test_crohd_gt_rows_that_parse_but_are_wrong_refuse_the_sequence_naming_the_line(tmp_path, how):
    _crohd(tmp_path, T=10)
    gt = tmp_path / "HT21Labels" / "train" / "HT21-01" / "gt" / "gt.txt"
    spoil, why = GT_ROW_DEFECTS[how]
    spoil(gt)
    with pytest.raises(crohd.CroHDError) as e:
        crohd.load_sequence(tmp_path, "train", "HT21-01")
    assert str(e.value) == f"{gt}: {why}"


@pytest.mark.parametrize("case", ["missing", "empty", "no sequences", "every sequence bad"])
def test_test_on_cro_without_usable_data_is_one_line(tmp_path, capsys, case):
    root = tmp_path / "cro"
    if case == "empty":
        root.mkdir()
    elif case == "no sequences":
        (root / "HT21" / "train").mkdir(parents=True)
    elif case == "every sequence bad":
        _crohd(root, T=10)
        (root / "HT21Labels" / "train" / "HT21-01" / "gt" / "gt.txt").write_text("1,2,3,4\n")
    out = tmp_path / "r.json"
    # no checkpoint exists: the data's problem must be said before the model is looked for
    res = run_main(test_on_cro.main, capsys, dataset_location=str(root), init_dir=str(tmp_path / "no_model"),
                   out_json=str(out), **CRO_SMALL)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(root / "HT21" / "train") in err[0], err
    assert not out.exists()


def _tap_entries() -> dict:
    """Good videos a, c and d around four damaged ones."""
    bad_jpeg = _entry(seed=1)
    bad_jpeg["video"] = [cv2.imencode(".jpg", f)[1].tobytes() for f in bad_jpeg["video"]]
    bad_jpeg["video"][5] = b"not a jpeg"
    odd = _entry(seed=2)
    odd["points"] = np.zeros((6, 10, 3), np.float32)
    nan_query = _entry(seed=3)
    nan_query["points"][2, 0] = np.nan  # point 2 is visible in frame 0: a query there
    short = _entry(seed=4)
    short["occluded"] = short["occluded"][:, :7]
    pixels = _entry(seed=7)  # converted without normalising: the run ended in track()'s refusal of its queries
    pixels["points"] = pixels["points"] * np.array([159, 127], np.float32)
    huge = _entry(seed=8)  # one flat 1080p JPEG referenced 400 times (pickled once): 2.5 GB when decoded
    flat = cv2.imencode(".jpg", np.zeros((1080, 1920, 3), np.uint8))[1].tobytes()
    huge["video"] = [flat] * 400
    huge["points"], huge["occluded"] = np.zeros((6, 400, 2), np.float32), np.zeros((6, 400), bool)
    # too small to track (track() ended the whole run), or one frame (scored as a perfect track)
    tiny = {"video": np.zeros((10, 1, 1, 3), np.uint8), "points": np.full((2, 10, 2), 0.5, np.float32),
            "occluded": np.zeros((2, 10), bool)}
    narrow = _entry(seed=9)
    narrow["video"] = [cv2.imencode(".png", np.zeros((128, 2, 3), np.uint8))[1].tobytes()] * 10
    one_frame = _entry(seed=10)
    one_frame["video"], one_frame["points"] = one_frame["video"][:1], one_frame["points"][:, :1]
    one_frame["occluded"] = one_frame["occluded"][:, :1]
    pts_short = _entry(seed=11)  # points of 5 frames for a 10-frame video: the line blamed occluded
    pts_short["points"] = pts_short["points"][:, :5]
    no_points = _entry(seed=12)  # was said as "no point visible in frame 0"
    no_points["points"], no_points["occluded"] = no_points["points"][:0], no_points["occluded"][:0]
    return {"a": _entry(seed=0), "bad_jpeg": bad_jpeg, "odd": odd, "nan_query": nan_query, "c": _entry(seed=5),
            "short": short, "pixels": pixels, "huge": huge, "tiny": tiny, "narrow": narrow, "one_frame": one_frame,
            "pts_short": pts_short, "no_points": no_points}


def test_test_on_tap_skips_damaged_videos_and_files_and_scores_the_others(tmp_path, ckpt, capsys):
    root = tmp_path / "kinetics"
    root.mkdir()
    with open(root / "part_0.pkl", "wb") as f:
        pickle.dump(_tap_entries(), f)
    (root / "part_1.pkl").write_bytes(pickle.dumps({"x": _entry()})[:200])  # a download cut short
    with open(root / "part_2.pkl", "wb") as f:
        pickle.dump([_entry(seed=6)], f)
    out = tmp_path / "r.json"
    res = run_main(test_on_tap.main, capsys, dataset_location=str(root), init_dir=str(ckpt), S=8, iters=1,
                   image_size="128,160", modes="first", out_json=str(out))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    js = json.loads(out.read_text())
    assert list(js["per_item"]) == ["a", "c", "part_2_0000"] and js["complete"]
    reasons = {s["name"]: s["reason"] for s in js["skipped"]}
    assert list(reasons) == ["bad_jpeg", "odd", "nan_query", "short", "pixels", "huge", "tiny", "narrow", "one_frame",
                             "pts_short", "no_points", "part_1.pkl"]
    assert reasons["pts_short"].endswith("entry pts_short: video has 10 frames but points have 5")
    assert reasons["no_points"].endswith("entry no_points: holds no points (points is (0, 10, 2)): nothing to track")
    assert reasons["tiny"].endswith("entry tiny: video is 1x1; tracking needs at least 8x8 pixels")
    assert reasons["narrow"].endswith("entry narrow: video is 2x128; tracking needs at least 8x8 pixels")
    assert reasons["one_frame"].endswith("entry one_frame: video has 1 frame: nothing to score beyond the query frame")
    assert "entry pixels: points are not normalised to [0, 1] where visible (x from" in reasons["pixels"]
    assert "entry huge: its 400 frames decode to more than 2147483648 bytes" in reasons["huge"]
    assert reasons["bad_jpeg"].endswith("entry bad_jpeg: frame 5: unreadable image")
    assert "entry odd: points is float32 (6, 10, 3)" in reasons["odd"]
    assert reasons["nan_query"].endswith(
        "entry nan_query: non-finite point position where it is visible (point 2, frame 0; 1 such entries)")
    assert "entry short: occluded is bool (6, 7)" in reasons["short"]
    assert str(root / "part_1.pkl") in reasons["part_1.pkl"] and "not a readable pickle" in reasons["part_1.pkl"]
    assert all("\n" not in r for r in reasons.values())
    assert "summary: 3 videos scored, 12 skipped" in res.stdout


def test_test_on_tap_folder_without_a_usable_video_is_one_line(tmp_path, capsys):
    root = tmp_path / "tapvid"
    root.mkdir()
    (root / "a.pkl").write_bytes(b"junk")
    with open(root / "b.pkl", "wb") as f:
        pickle.dump({"v": {"video": 1}}, f)
    res = run_main(test_on_tap.main, capsys, dataset_location=str(root), init_dir=str(tmp_path / "no_model"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (err,) = res.stderr.strip().splitlines()
    assert err.startswith(f"error: {root}: no usable TAP-Vid video (2 entries or files refused; first: "
                          f"{root / 'a.pkl'}: not a readable pickle")

