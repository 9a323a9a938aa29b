"""test_on_pod.py and pips2/evaluation.py: the authors' point choice and scores against an independent
computation, checkpoint forms, and a run that keeps going past bad sequences without losing its scores."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from helpers import golden_model, run_main

from pips2 import evaluation, tracking
from pips2.cli import eval_pod as test_on_pod
from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.nets.pips2 import Pips
from pips2.utils import checkpoint
from pips2.utils.video import VideoError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(S=8, N=32, iters=2, image_size="128,192")


@pytest.fixture(scope="module")
def pod_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("podtest")
    generate_dataset(root, {"test": 2}, seed=5, cfg=SceneConfig(W=320, H=192, T=20, n_points=300), progress=False)
    return root


@pytest.fixture(scope="module")
def pod_bad(tmp_path_factory):
    """synth_0000 good; synth_0001 with a zero-byte frame; synth_0002 with one frame of another size; synth_0003
    with a frame cut short (its header intact: decoders would fill the rest with grey and only warn)."""
    root = tmp_path_factory.mktemp("podbad")
    generate_dataset(root, {"test": 4}, seed=7, cfg=SceneConfig(W=320, H=192, T=12, n_points=300), progress=False)
    (root / "test" / "synth_0001" / "rgbs" / "rgb_00005.jpg").write_bytes(b"")
    f = root / "test" / "synth_0002" / "rgbs" / "rgb_00007.jpg"
    img = cv2.imread(str(f))
    assert img is not None
    cv2.imwrite(str(f), cv2.resize(img, (160, 96)))
    f = root / "test" / "synth_0003" / "rgbs" / "rgb_00003.jpg"
    f.write_bytes(f.read_bytes()[:2000])
    return root


def _run(capsys, root, tmp, **kw):
    """test_on_pod.main in this process with the small settings: (result, --out_json contents or None)."""
    out = tmp / "res.json"
    res = run_main(test_on_pod.main, capsys, **{**dict(dataset_location=str(root), out_json=str(out), **SMALL), **kw})
    return res, (json.loads(out.read_text()) if out.exists() else None)


def authors_choice(tr, vis, val, hw, N, K=8):
    """The authors' point choice, written out step by step from their evaluation (docs/EVALUATION.md)."""
    H, W = hw
    tr = tr.astype(np.float64).copy()
    vis, val = vis.astype(np.float32).copy(), val.astype(np.float32).copy()
    bad = ~np.isfinite(tr)
    tr[bad] = 0
    ok_xy = (~bad).sum(-1) == 2
    vis[~ok_xy], val[~ok_xy] = 0, 0
    for t in range(tr.shape[0]):
        oob = (tr[t, :, 0] < 1) | (tr[t, :, 0] > W - 2) | (tr[t, :, 1] < 1) | (tr[t, :, 1] > H - 2)
        vis[t, oob], val[t, oob] = 0, 0
    keep = (vis * val)[0] > 0
    tr, vis, val = tr[:, keep], vis[:, keep], val[:, keep]
    keep = (vis * val).sum(0) >= K
    tr, vis, val = tr[:, keep], vis[:, keep], val[:, keep]
    keep = np.linalg.norm(tr[1:] - tr[:-1], axis=-1).max(0) < 512
    tr, vis, val = tr[:, keep], vis[:, keep], val[:, keep]
    tr = np.minimum(np.maximum(tr, [-32, -32]), [W + 32, H + 32])
    inds = np.linspace(0, tr.shape[1] - 1, min(tr.shape[1], N)).astype(np.int32)
    return tr[:, inds], val[:, inds]


def zero_velocity_d_avg(g, m, hw, size=(128, 192)):
    """d_avg of the zero-velocity estimate for ground truth g (T,n,2) in source pixels, scored at `size`."""
    (H, W), (h, w) = hw, size
    g = g * [w / W, h / H]
    e = g[0:1].repeat(len(g), 0)
    d = np.linalg.norm((e - g) * [256 / w, 256 / h], axis=-1)[1:]
    m = m[1:]
    return np.mean([100 * ((d < t) * m).sum() / (1e-6 + m.sum()) for t in (1, 2, 4, 8, 16)])


def test_zero_velocity_matches_independent_computation(pod_test, tmp_path, capsys):
    res, js = _run(capsys, pod_test, tmp_path, zero_vel=True)
    assert res.returncode == 0 and js is not None, res.stderr
    assert "synth_0000: d_1" in res.stdout and "d_avg" in res.stdout and "summary: 2 sequences" in res.stdout
    z = np.load(pod_test / "test" / "synth_0000" / "anno.npz")
    g, m = authors_choice(z["trajs_2d"], z["visibs"], z["valids"], (192, 320), 32)
    assert g.shape[1] == 32
    assert js["per_item"]["synth_0000"]["d_avg"] == pytest.approx(zero_velocity_d_avg(g, m, (192, 320)),
                                                                      abs=1e-3)
    assert js["mean"]["d_avg"] < 60  # the synthetic motion makes zero-velocity a weak baseline


def test_non_finite_tracks_and_fewer_than_N_points_choose_the_authors_points(pod_test, tmp_path, capsys):
    root = tmp_path / "pod"
    shutil.copytree(pod_test / "test" / "synth_0000", root / "test" / "synth_0000")
    anno = root / "test" / "synth_0000" / "anno.npz"
    z = dict(np.load(anno))
    tr = z["trajs_2d"].astype(np.float32)
    vv = z["visibs"] & z["valids"]
    good = np.nonzero(vv[0] & (vv.sum(0) >= 8))[0]
    # NaN and inf in the middle of good tracks: the authors keep these points (the jump to (0,0) is < 512 px
    # in a 320x192 image) and only mark those frames invalid; the old rule dropped them
    tr[5, good[:40:2]] = np.nan
    tr[9, good[1:40:2], 0] = np.inf
    z["trajs_2d"] = tr
    np.savez(anno, **z)
    n_survive = authors_choice(tr, z["visibs"], z["valids"], (192, 320), 10**6)[0].shape[1]
    N = n_survive + 50  # fewer survivors than N: each is used once
    res, js = _run(capsys, root, tmp_path, zero_vel=True, N=N)
    assert res.returncode == 0 and js is not None, res.stderr
    g, m = authors_choice(tr, z["visibs"], z["valids"], (192, 320), N)
    assert g.shape[1] == n_survive and js["per_item"]["synth_0000"]["points"] == n_survive
    assert js["per_item"]["synth_0000"]["d_avg"] == pytest.approx(zero_velocity_d_avg(g, m, (192, 320)),
                                                                      abs=1e-3)


def test_command_line(pod_test, tmp_path):
    # the one run through the command line: fire's parsing of the flags, --max_iters as the authors spell it
    out = tmp_path / "cli.json"
    res = subprocess.run([sys.executable, str(ROOT / "test_on_pod.py"), f"--dataset_location={pod_test}", "--S=8",
                          "--N=32", "--iters=2", "--image_size=128,192", f"--out_json={out}", "--zero_vel=True",
                          "--max_iters=1"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert list(json.loads(out.read_text())["per_item"]) == ["synth_0000"] and "summary: 1 sequences" in res.stdout


def test_checkpoint_folder_and_file_forms(pod_test, tmp_path, capsys):
    ck = tmp_path / "ck"
    checkpoint.save(ck, 12, golden_model())
    r1, j1 = _run(capsys, pod_test, tmp_path, init_dir=str(ck), max_scenes=1, N=8, iters=1)
    assert r1.returncode == 0 and j1 is not None, r1.stderr
    r2, j2 = _run(capsys, pod_test, tmp_path, init_dir=str(ck / "model-000000012.pth"), max_scenes=1, N=8, iters=1)
    assert r2.returncode == 0 and j2 is not None, r2.stderr
    assert j1["mean"] == j2["mean"] and len(j1["per_item"]) == 1


def test_max_scenes_and_its_alias_must_agree(pod_test, tmp_path, capsys):
    res, js = _run(capsys, pod_test, tmp_path, zero_vel=True, max_scenes=1, max_iters=2)
    assert res.returncode == 2 and js is None
    assert res.stderr.strip() == "error: --max_scenes=1 and its alias --max_iters=2 disagree; give one of them"
    res, js = _run(capsys, pod_test, tmp_path, zero_vel=True, max_iters=1)
    assert res.returncode == 0 and js is not None and list(js["per_item"]) == ["synth_0000"]


def test_missing_checkpoint_names_the_download_script(pod_test, tmp_path, capsys):
    res, _ = _run(capsys, pod_test, tmp_path, init_dir=str(tmp_path / "nothing"))
    assert res.returncode == 2 and "get_reference_model.sh" in res.stderr
    assert "the hub name pips2 (--init_dir=pips2)" in res.stderr and "PIPS2_URL_PIPS2=file://" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_sequence_without_usable_points_is_skipped(pod_test, tmp_path, capsys):
    root = tmp_path / "pod"
    shutil.copytree(pod_test, root)
    scene = root / "test" / "synth_0001"
    z = dict(np.load(scene / "anno.npz"))
    z["visibs"][0] = False
    np.savez(scene / "anno.npz", **z)
    res, js = _run(capsys, root, tmp_path, zero_vel=True)
    assert res.returncode == 0 and js is not None and "synth_0001: skipped (no usable point)" in res.stdout
    assert list(js["per_item"]) == ["synth_0000"]


def test_eval_points_protocol_rules():
    T, N = 10, 7
    tr = np.full((T, N, 2), 50.0, np.float32)
    vis = np.ones((T, N), bool)
    val = np.ones((T, N), bool)
    tr[0, 0] = [0.5, 50]  # within 1 px of the border at frame 0 -> invisible there -> dropped
    vis[3:, 1] = False  # visible in only 3 frames -> dropped
    tr[5:, 2, 0] = 700  # a 650-px step inside the 800-px-wide image -> dropped by the motion rule
    tr[4, 3] = [-100, 50]  # far outside at frame 4: invalid there, kept, clamped (its steps are 150 px)
    tr[7, 5] = np.nan  # non-finite: becomes (0, 0) and invalid; the 71-px jump there passes the motion rule
    tr[:, 6] = [600, 500]
    tr[2, 6, 1] = np.inf  # -> (600, 0): a 500-px jump, which passes
    tr[3, 6] = [np.nan, 500]  # -> (0, 500): a 781-px jump from (600, 0) -> dropped
    t, v, va = evaluation.select_points(tr, vis, val, (600, 800), N=None)
    assert t.shape == (T, 3, 2)  # points 3, 4 and 5
    assert not va[4, 0] and t[4, 0, 0] == -32 and t[9, 0, 0] == 50
    assert not va[7, 2] and not v[7, 2] and tuple(t[7, 2]) == (0, 0) and va[6, 2]
    # clamped to W + 32, not W - 1 + 32
    tr2 = np.full((T, 1, 2), 50.0, np.float32)
    tr2[4, 0, 0] = 5000
    assert evaluation.select_points(tr2, np.ones((T, 1), bool), np.ones((T, 1), bool), (600, 800), N=None,
                                    max_motion=None)[0][4, 0, 0] == 832
    # fewer survivors than N: each is used once, in order, never repeated
    t4, _, _ = evaluation.select_points(tr, vis, val, (600, 800), N=4)
    assert t4.shape == (T, 3, 2) and t4[4, 0, 0] == -32 and t4[4, 1, 0] == 50 and t4[7, 2, 0] == 0
    # the motion rule can be left out (CroHD: heads leave the view)
    assert evaluation.select_points(tr, vis, val, (600, 800), N=None, max_motion=None)[0].shape[1] == 5


def test_eval_points_chosen_by_integer_linspace():
    T, n = 9, 10
    tr = np.full((T, n, 2), 40.0, np.float32) + np.arange(n, dtype=np.float32)[None, :, None]
    ones = np.ones((T, n), bool)
    pick = lambda N: evaluation.select_points(tr, ones, ones, (100, 100), N=N)[0][0, :, 0] - 40  # noqa: E731
    assert pick(256).tolist() == list(range(10))
    assert pick(4).tolist() == [0, 3, 6, 9]  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert pick(3).tolist() == [0, 4, 9]  # linspace(0, 9, 3) = 0, 4.5, 9 -> 0, 4, 9
    assert pick(10).tolist() == list(range(10))


def _check_bad_scenes_skipped(res, js):
    assert res.returncode == 0, res.stderr
    assert list(js["per_item"]) == ["synth_0000"] and js["complete"] and js["status"] == "done"
    assert js["skipped"] == [
        {"name": "synth_0001", "reason": "unreadable frame (rgb_00005.jpg)"},
        {"name": "synth_0002",
         "reason": "frames of different sizes (rgb_00007.jpg is 160x96, rgb_00000.jpg is 320x192)"},
        {"name": "synth_0003", "reason": "truncated frame (rgb_00003.jpg)"},
    ]
    assert "synth_0001: skipped (unreadable frame (rgb_00005.jpg))" in res.stdout
    assert ("summary: 1 sequences scored, 3 skipped (unreadable frame: 1, frames of different sizes: 1, "
            "truncated frame: 1)" in res.stdout)
    assert "Traceback" not in res.stderr


def test_bad_sequences_are_skipped_with_reasons_zero_velocity(pod_bad, tmp_path, capsys):
    _check_bad_scenes_skipped(*_run(capsys, pod_bad, tmp_path, zero_vel=True))


def test_bad_sequences_are_skipped_with_reasons_with_a_model(pod_bad, tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "ck", 1, Pips().eval())
    res, js = _run(capsys, pod_bad, tmp_path, init_dir=str(tmp_path / "ck"))
    _check_bad_scenes_skipped(res, js)
    assert js is not None and np.isfinite(js["per_item"]["synth_0000"]["d_avg"])


def test_frame_source_refuses_a_frame_of_another_size(pod_bad):
    paths = sorted((pod_bad / "test" / "synth_0002" / "rgbs").glob("*.jpg"))
    src = tracking.FileFrames(paths, (128, 192))
    assert src.get(0, 7).shape == (7, 128, 192, 3)
    with pytest.raises(VideoError, match=r"rgb_00007\.jpg: frame of 160x96, the first frame is 320x192"):
        src.get(4, 10)


def test_frame_source_reads_a_window_s_headers_before_decoding_any_of_it(pod_bad, monkeypatch):
    """A window was decoded whole and only then compared with the first frame's size: S frames of 8K behind a
    small first frame cost S x 100 MB before the line. Now the window's headers come first."""
    paths = sorted((pod_bad / "test" / "synth_0002" / "rgbs").glob("*.jpg"))
    src = tracking.FileFrames(paths, (128, 192))
    decoded = []
    real = tracking.read_rgb
    monkeypatch.setattr(tracking, "read_rgb", lambda p: decoded.append(Path(p).name) or real(p))
    with pytest.raises(VideoError, match=r"rgb_00007\.jpg: frame of 160x96, the first frame is 320x192$"):
        src.get(4, 10)
    assert decoded == []
    assert src.get(0, 3).shape == (3, 128, 192, 3) and decoded == ["rgb_00000.jpg", "rgb_00001.jpg", "rgb_00002.jpg"]


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_folder_or_empty_split_is_one_line(tmp_path, case, capsys):
    root = tmp_path / "pod"
    if case == "empty":
        (root / "test").mkdir(parents=True)
    res, js = _run(capsys, root, tmp_path, zero_vel=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert str(root / "test") in res.stderr
    assert js is None


def _interrupt_on_second(exc):
    real = test_on_pod.evaluate_scene
    calls = []

    def fake(model, scene, *a, **k):
        calls.append(scene.name)
        if len(calls) == 2:
            raise exc
        return real(model, scene, *a, **k)

    return fake


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (RuntimeError("a bug"), None)])
def test_partial_results_are_written_on_interrupt_and_on_errors(pod_test, tmp_path, monkeypatch, capsys, exc, code):
    root = pod_test
    monkeypatch.setattr(test_on_pod, "evaluate_scene", _interrupt_on_second(exc))
    out = tmp_path / "r.json"
    kw: dict[str, Any] = dict(dataset_location=str(root), zero_vel=True, out_json=str(out), **SMALL)
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            test_on_pod.main(**kw)
    else:
        with pytest.raises(SystemExit) as e:
            test_on_pod.main(**kw)
        assert e.value.code == code
    js = json.loads(out.read_text())
    assert list(js["per_item"]) == ["synth_0000"] and not js["complete"]
    assert js["status"] == ("interrupted" if code else "error: RuntimeError: a bug")
    stdout = capsys.readouterr().out
    assert "summary: 1 sequences scored, 0 skipped, 1 not done" in stdout and "(partial)" in stdout
    assert not list(tmp_path.glob(".r.json.*"))  # the temp file was renamed


def test_curves_png_beside_the_json(pod_test, tmp_path, capsys):
    from PIL import Image

    from pips2.utils import metrics

    ck = tmp_path / "ck"
    checkpoint.save(ck, 12, golden_model())
    res, js = _run(capsys, pod_test, tmp_path, init_dir=str(ck), N=8, iters=1)
    assert res.returncode == 0 and js is not None, res.stderr
    png = tmp_path / "res_curves.png"
    assert f"curves -> {png}" in res.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (900, 320)
    curves = js["curves"]
    assert list(curves) == ["ck", "zero-velocity"]
    # the plotted points are the table's figures: accuracy is the mean d_t, survival's mean is survival_16
    for label, want in (("ck", js["mean"]), ("zero-velocity", None)):
        assert len(curves[label]["survival"]) == 20 and curves[label]["survival"][0] == 1
        if want is not None:
            assert curves[label]["accuracy"] == pytest.approx([want[f"d_{t}"] for t in metrics.THRESHOLDS])
            assert 100 * np.mean(curves[label]["survival"]) == pytest.approx(want["survival_16"])
    _, zv = _run(capsys, pod_test, tmp_path, zero_vel=True, N=8)
    assert zv is not None and list(zv["curves"]) == ["zero-velocity"]
    assert zv["curves"]["zero-velocity"]["accuracy"] == pytest.approx(curves["zero-velocity"]["accuracy"])
    assert zv["curves"]["zero-velocity"]["accuracy"] == pytest.approx([zv["mean"][f"d_{t}"]
                                                                       for t in metrics.THRESHOLDS])


def test_a_scene_whose_valids_has_another_shape_is_skipped_and_later_scenes_scored(pod_test, tmp_path, capsys):
    # the first scene's valids has one point more than its trajs: the loader (or its checks) refuses it; the
    # run must go on to the next scene, not end there
    root = tmp_path / "pod"
    shutil.copytree(pod_test, root)
    anno = root / "test" / "synth_0000" / "anno.npz"
    z = dict(np.load(anno))
    z["valids"] = np.ones((z["valids"].shape[0], z["valids"].shape[1] + 1), bool)
    np.savez(anno, **z)
    res, js = _run(capsys, root, tmp_path, zero_vel=True)
    assert res.returncode == 0 and js is not None, res.stderr
    assert "Traceback" not in res.stderr and list(js["per_item"]) == ["synth_0001"] and js["complete"]
    (skip,) = js["skipped"]
    assert skip["name"] == "synth_0000" and skip["reason"] and "\n" not in skip["reason"]
    assert f"synth_0000: skipped ({skip['reason']})" in res.stdout and "summary: 1 sequences scored, 1 skipped" \
        in res.stdout


def test_nothing_scored_is_an_error_not_a_success(pod_bad, tmp_path, capsys):
    # every scene unusable: the summary and the JSON say why, and the exit code is not 0
    root = tmp_path / "pod"
    shutil.copytree(pod_bad, root)
    shutil.rmtree(root / "test" / "synth_0000" / "rgbs")
    res, js = _run(capsys, root, tmp_path, zero_vel=True)
    assert res.returncode == 2 and js is not None
    assert res.stderr.strip().splitlines()[-1] == "error: no sequences could be scored (4 skipped)"
    assert js["per_item"] == {} and js["mean"] is None and len(js["skipped"]) == 4 and js["complete"]
    assert "summary: 0 sequences scored, 4 skipped" in res.stdout



def test_an_out_json_folder_replaced_by_a_link_during_the_run_is_not_written_through(pod_test, tmp_path, capsys,
                                                                                     monkeypatch):
    """--out_json is checked before hours of scoring and written at the end: in a folder others may write to,
    another user could move its folder aside meanwhile and put a link at its name, and the results went through
    it, over a results file of that name in the link's target. The folder checked is now the one written to, and
    one replaced meanwhile leaves the results on stdout with one error line."""
    from pips2 import evaluation

    folder, precious = tmp_path / "team" / "res", tmp_path / "precious"
    folder.mkdir(parents=True)
    precious.mkdir()
    (precious / "res.json").write_text('{"the paper": 1}')
    real = evaluation.results_path

    def then_swapped(*args, **kwargs):
        folder.rename(folder.with_name("moved"))
        folder.symlink_to(precious)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "results_path", then_swapped)
    res = run_main(test_on_pod.main, capsys, dataset_location=str(pod_test), out_json=str(folder / "res.json"),
                   zero_vel=True, **SMALL)
    assert res.returncode == 1, res.stderr
    assert (precious / "res.json").read_text() == '{"the paper": 1}' and len(list(precious.iterdir())) == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: cannot write --out_json={folder / 'res.json'} (the folder was moved, removed or replaced during the "
        f"run; nothing written); the results are printed above")
    assert evaluation.RESULTS_MARKER in res.stdout
