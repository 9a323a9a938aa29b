"""Synthetic scenes, the PointOdyssey reader and filters, the parallel exporter and the clip reader."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import EXPORT_ARGS, run_export

from pips2.datasets import pointodyssey as pod
from pips2.datasets.clips import ClipSettings, list_clips, verify_clip
from pips2.datasets.synthetic import SceneConfig, generate_scene
from pips2.utils.video import VideoError, read_rgb

ROOT = Path(__file__).resolve().parents[1]
SMALL = SceneConfig(W=320, H=256, T=24, n_objects=3, n_points=400)


def _bilinear(img, x, y):
    return np.stack([cv2.getRectSubPix(img.astype(np.float32), (1, 1), (float(a), float(b)))[0, 0]
                     for a, b in zip(x, y, strict=True)])


# --- synthetic scenes ------------------------------------------------------------------------------------

def test_synthetic_layout_and_keys(synth_root):
    scene = synth_root / "train" / "synth_0000"
    for sub, pat in (("rgbs", "rgb_%05d.jpg"), ("masks", "mask_%05d.png"), ("depths", "depth_%05d.png"),
                     ("normals", "normal_%05d.png")):
        assert (scene / sub / (pat % 0)).is_file() and (scene / sub / (pat % 23)).is_file()
    z = np.load(scene / "anno.npz")
    T, N = 24, 400
    assert z["trajs_2d"].shape == (T, N, 2) and z["trajs_3d"].shape == (T, N, 3)
    assert z["visibs"].shape == (T, N) and z["valids"].shape == (T, N)
    assert z["intrinsics"].shape == (T, 3, 3) and z["extrinsics"].shape == (T, 4, 4)
    rgb = cv2.imread(str(scene / "rgbs" / "rgb_00000.jpg"))
    depth = cv2.imread(str(scene / "depths" / "depth_00000.png"), cv2.IMREAD_UNCHANGED)
    assert rgb is not None and rgb.shape == (256, 320, 3)
    assert depth is not None and depth.dtype == np.uint16
    from PIL import Image

    assert Image.open(scene / "masks" / "mask_00000.png").mode == "P"


def test_a_scene_under_two_names_is_listed_once(tmp_path, capsys):
    """A link beside a scene (`twin -> synth_0000`) made test_on_pod.py score that scene twice (weighted double in
    the mean) and the export cut its clips twice; a link loop stays out as before (not a scene folder)."""
    split = tmp_path / "train"
    for name in ("synth_0000", "synth_0001"):
        (split / name).mkdir(parents=True)
    (split / "twin").symlink_to("synth_0000")
    (split / "zz_loop").symlink_to("zz_loop")
    assert [p.name for p in pod.list_scenes(tmp_path, "train")] == ["synth_0000", "synth_0001"]
    assert capsys.readouterr().err.strip() == (f"note: {split / 'twin'} is {split / 'synth_0000'} under another name "
                                               f"(a link): listed once")


def test_synthetic_is_deterministic(tmp_path):
    a = generate_scene(tmp_path / "a", 7, SMALL)
    b = generate_scene(tmp_path / "b", 7, SMALL)
    c = generate_scene(tmp_path / "c", 8, SMALL)
    za, zb, zc = (np.load(p / "anno.npz") for p in (a, b, c))
    assert np.array_equal(za["trajs_2d"], zb["trajs_2d"]) and not np.array_equal(za["trajs_2d"], zc["trajs_2d"])
    assert (a / "rgbs" / "rgb_00005.jpg").read_bytes() == (b / "rgbs" / "rgb_00005.jpg").read_bytes()


def test_synthetic_tracks_are_exact_and_3d_reprojects(synth_root):
    scene = synth_root / "train" / "synth_0001"
    z = np.load(scene / "anno.npz")
    tr, vis = z["trajs_2d"], z["visibs"]
    # trajs_3d projects back onto trajs_2d through the cameras
    for t in (0, 11, 23):
        Xw = np.concatenate([z["trajs_3d"][t], np.ones((tr.shape[1], 1))], 1)
        cam = (z["extrinsics"][t] @ Xw.T).T[:, :3]
        uv = (z["intrinsics"][t] @ cam.T).T
        np.testing.assert_allclose(uv[:, :2] / uv[:, 2:], tr[t], atol=1e-2)
    # colour at a track is the same in every frame where it is visible (far from any occlusion edge)
    f0 = read_rgb(scene / "rgbs" / "rgb_00000.jpg").astype(np.float32)
    labels0 = pod.read_mask(scene / "masks" / "mask_00000.png")
    edges0 = pod.segmentation_edges(labels0, dilate=9)
    t = 12
    ft = read_rgb(scene / "rgbs" / f"rgb_{t:05d}.jpg").astype(np.float32)
    edgest = pod.segmentation_edges(pod.read_mask(scene / "masks" / f"mask_{t:05d}.png"), dilate=9)
    xi0, yi0 = tr[0].round().astype(int).T
    xit, yit = np.clip(tr[t].round(), 0, [319, 255]).astype(int).T
    ok = vis[0] & vis[t] & ~edges0[yi0.clip(0, 255), xi0.clip(0, 319)] & ~edgest[yit, xit]
    assert ok.sum() > 50
    c0 = _bilinear(f0, tr[0, ok, 0], tr[0, ok, 1])
    ct = _bilinear(ft, tr[t, ok, 0], tr[t, ok, 1])
    same = np.abs(c0 - ct).mean(1)
    shuffled = np.abs(c0 - np.roll(ct, 7, 0)).mean(1)
    assert np.median(same) < 10 and np.median(shuffled) > 3 * np.median(same) + 5
    # and the motion is large: zero-velocity would be a weak guess
    disp = np.linalg.norm(tr[t] - tr[0], axis=-1)[vis[0] & vis[t]]
    assert np.median(disp) > 15


def test_synthetic_visibility_matches_masks(synth_root):
    scene = synth_root / "train" / "synth_0002"
    z = np.load(scene / "anno.npz")
    tr, vis = z["trajs_2d"], z["visibs"]
    labels = pod.read_mask(scene / "masks" / "mask_00010.png")
    assert len(np.unique(labels)) >= 3  # background and at least two objects in view
    inside = (tr[10, :, 0] >= 0) & (tr[10, :, 0] <= 319) & (tr[10, :, 1] >= 0) & (tr[10, :, 1] <= 255)
    assert (~vis[10] & inside).sum() > 0  # some points are occluded, not only out of frame
    assert vis[10][~inside].sum() == 0


# --- reader and filters ----------------------------------------------------------------------------------

def _synth(capsys, out, **flags):
    """make_synthetic_pod.py's main in this process: (exit code, stdout, stderr)."""
    from helpers import run_main

    from pips2.cli import synthetic

    res = run_main(synthetic.main, capsys, out=str(out), **{**dict(train=1, test=0), **flags})
    return res.returncode, res.stdout, res.stderr


def test_synthetic_refuses_other_settings_into_the_same_folder(tmp_path, capsys):
    out = tmp_path / "syn"
    code, stdout, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20)
    assert code == 0, err
    assert "summary: 1 scenes (train 1) of 3 frames 64x48" in stdout
    before = sorted(p.name for p in (out / "train" / "synth_0000" / "rgbs").iterdir())
    assert len(before) == 3
    code, _, err = _synth(capsys, out, W=128, H=96, T=10, n_points=20, train=2)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out={out} holds scenes made with other settings (W=64 (now 128), "
                          "H=48 (now 96), T=3 (now 10)")
    assert sorted(p.name for p in (out / "train" / "synth_0000" / "rgbs").iterdir()) == before
    assert not (out / "train" / "synth_0001").exists()
    code, stdout, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)  # the same settings: more scenes
    assert code == 0 and (out / "train" / "synth_0001" / "anno.npz").is_file(), err
    # a folder of scenes without a record (an older version made it) is not added to either
    (out / "settings.json").unlink()
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=3)
    assert code == 2 and "holds scenes without a record of their settings" in err and err.count("\n") == 1
    # a real PointOdyssey folder: synth_* scenes and a settings.json were added to its splits, exit 0
    real = tmp_path / "pointodyssey"
    (real / "train" / "ani11_new_" / "rgbs").mkdir(parents=True)
    code, _, err = _synth(capsys, real, W=64, H=48, T=3, n_points=20)
    assert code == 2 and err.strip() == (f"error: --out={real} holds scenes this generator did not make "
                                         f"({real / 'train' / 'ani11_new_'}); give another --out"), err
    assert sorted(p.name for p in (real / "train").iterdir()) == ["ani11_new_"]
    assert not (real / "settings.json").exists()


@pytest.mark.parametrize("flags,msg", [
    (dict(T=0), "--T must be at least 2 frames, got 0"), (dict(T=1), "--T must be at least 2 frames, got 1"),
    (dict(W=-5), "--W and --H must be at least 8 pixels"), (dict(H=4), "--W and --H must be at least 8 pixels"),
    (dict(W=100000, H=100000), "W x H at most"),
    (dict(n_points=-1), "--n_points must be between 3 and 131072, got -1"),
    (dict(n_points=0), "--n_points must be between 3"), (dict(T=100000, n_points=100000), "--T x --n_points"),
    (dict(n_objects=-1), "--n_objects must be from 0 to 250"), (dict(train=0), "nothing to write"),
    (dict(val=-2), "--val must be from 0 to 10000 scenes, got -2"),
    # 10^8 scenes: a list of every job took 3.5 GB before the first scene was written
    (dict(train=100_000_000), "--train must be from 0 to 10000 scenes, got 100000000"),
    (dict(train=10000, test=10000, W=4096, H=4096, T=1000), "20000 scenes of 1000 frames 4096x4096 take at least "),
    # a 1e9-pixel shift hung in OpenCV's reflected border; n_objects 100000 and seed -1 were tracebacks
    (dict(cam_speed=1e9), "--cam_speed must be a number of pixels per frame from -512 to 512"),
    (dict(obj_speed=float("nan")), "--obj_speed must be a number of pixels per frame"),
    (dict(n_objects=100000), "--n_objects must be from 0 to 250, got 100000"),
    (dict(seed=-1), "--seed must be from 0 to 4294967295, got -1")])
def test_synthetic_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, msg):
    code, _, err = _synth(capsys, tmp_path / "syn", **flags)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert msg in err
    assert not (tmp_path / "syn").exists()


def test_a_stopped_synthetic_scene_leaves_nothing_under_its_name(tmp_path, capsys, monkeypatch):
    """The frames were written straight into the scene's folder: a stop mid-scene left synth_0001 with frames and
    no anno.npz, which a rerun asking for fewer scenes kept for good and every reader then skipped or rejected."""
    from pips2.datasets import synthetic as syn

    written = syn._write_frame
    calls = []

    def stop_in_the_second_scene(out, t, *args):
        calls.append(t)
        if len(calls) == 5:  # T=3: scene 0 has written its three frames, scene 1 two
            os.kill(os.getpid(), signal.SIGTERM)
        return written(out, t, *args)

    monkeypatch.setattr(syn, "_write_frame", stop_in_the_second_scene)
    out = tmp_path / "syn"
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=3)
    assert code == 143 and "stopped by SIGTERM" in err, err
    assert sorted(p.name for p in (out / "train").iterdir()) == ["synth_0000"]  # no half scene, no temp folder
    # a scene being made (or a killed run's, until the next run) is a hidden folder, never listed as a scene
    hidden = out / "train" / ".synth_tmp.host.1.2.abc" / "scene" / "rgbs"
    hidden.mkdir(parents=True)
    from pips2.datasets.pointodyssey import list_scenes

    assert [p.name for p in list_scenes(out, "train")] == ["synth_0000"]
    shutil.rmtree(hidden.parents[1])
    monkeypatch.undo()
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)
    assert code == 0, err
    assert sorted(p.name for p in (out / "train").iterdir()) == ["synth_0000", "synth_0001"]
    assert (out / "train" / "synth_0001" / "anno.npz").is_file()


def test_synthetic_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    code, _, err = _synth(capsys, tmp_path / "afile")
    assert code == 2 and err.strip() == f"error: --out={tmp_path / 'afile'} is not a folder"
    assert (tmp_path / "afile").read_text() == "mine"


def test_synthetic_smallest_scene_has_tracks(tmp_path, capsys):
    # the smallest sizes the flags allow give a scene the loader takes, with tracked points (a thin object of a
    # small frame has no inside after erosion: before, sampling its points raised)
    code, _, err = _synth(capsys, tmp_path / "syn", W=8, H=8, T=2, n_points=20, n_objects=4)
    assert code == 0, err
    scene = pod.load_scene(tmp_path / "syn" / "train" / "synth_0000")
    assert scene.trajs.shape[:2] == (2, 20) and len(scene.rgb_paths) == 2
    code, _, err = _synth(capsys, tmp_path / "syn3", W=8, H=8, T=2, n_points=3, n_objects=4)  # the fewest points
    assert code == 0, err
    assert pod.load_scene(tmp_path / "syn3" / "train" / "synth_0000").trajs.shape[1] >= 1


def test_load_scene_and_frame_numbers_not_from_zero(synth_root, tmp_path):
    scene = tmp_path / "s"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    for sub, pre, ext in (("rgbs", "rgb", "jpg"), ("masks", "mask", "png")):
        files = sorted((scene / sub).iterdir(), reverse=True)
        for f in files:
            n = int(f.stem.split("_")[1])
            f.rename(scene / sub / f"{pre}_{n + 100:05d}.{ext}")
    s = pod.load_scene(scene)
    assert s.num_frames == 24 and s.rgb_paths[0].name == "rgb_00100.jpg" and s.rgb_paths[-1].name == "rgb_00123.jpg"
    assert s.trajs.shape == (24, 400, 2)


def test_legacy_annotations(tmp_path, synth_root):
    scene = tmp_path / "legacy"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    z = dict(np.load(scene / "anno.npz"))
    (scene / "anno.npz").unlink()
    visibilities = np.where(z["visibs"], 1, 0)
    visibilities[3, :5] = 2
    np.savez(scene / "annotations.npz", trajs_2d=z["trajs_2d"], trajs_3d=z["trajs_3d"], visibilities=visibilities)
    s = pod.load_scene(scene)
    assert not s.valids[3, :5].any() and not s.visibs[3, :5].any()
    assert (s.visibs == (visibilities == 1)).all()


@pytest.mark.parametrize("defect,reason", [("no_masks", "missing masks"), ("none_3d", "trajs_3d is None"),
                                           ("no_anno", "no anno.npz"), ("short", "frames on disk")])
def test_bad_scenes_are_skipped_with_reason(tmp_path, synth_root, defect, reason):
    scene = tmp_path / defect
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    if defect == "no_masks":
        shutil.rmtree(scene / "masks")
    elif defect == "none_3d":
        z = dict(np.load(scene / "anno.npz"))
        z["trajs_3d"] = np.array(None, dtype=object)
        np.savez(scene / "anno.npz", **z)
    elif defect == "no_anno":
        (scene / "anno.npz").unlink()
    else:
        (scene / "rgbs" / "rgb_00023.jpg").unlink()
    if defect == "none_3d":  # unused by 2D training: only a loader that asks for trajs_3d refuses the scene
        assert pod.load_scene(scene).trajs.shape == (24, 400, 2)
        with pytest.raises(pod.SkipItem, match=reason):
            pod.load_scene(scene, require_3d=True)
        return
    with pytest.raises(pod.SkipItem, match=reason):
        pod.load_scene(scene)


@pytest.mark.parametrize("link", [False, True])
def test_a_frame_that_is_a_fifo_is_refused_without_opening_it(tmp_path, synth_root, make_fifo, link):
    # open() of a FIFO waits for a writer: test_on_pod.py and the export hung on such a scene forever
    scene = tmp_path / "s"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    frame = scene / "rgbs" / "rgb_00005.jpg"
    fifo = make_fifo(tmp_path / "pipe" if link else frame)
    if link:
        frame.unlink()
        frame.symlink_to(fifo)
    with pytest.raises(pod.SkipItem, match=r"^rgbs/rgb_00005\.jpg: not a regular file$"):
        pod.load_scene(scene, require_masks=False)
    with pytest.raises(VideoError, match=r"rgb_00005\.jpg: not a regular file$"):  # every other frame reader
        read_rgb(frame)


def test_nonfinite_coordinates_become_invalid(tmp_path, synth_root):
    scene = tmp_path / "nan"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    z = dict(np.load(scene / "anno.npz"))
    z["trajs_2d"][4, 0] = np.nan
    z["trajs_2d"][5, 1] = np.inf
    np.savez(scene / "anno.npz", **z)
    s = pod.load_scene(scene)
    assert not s.valids[4, 0] and not s.visibs[4, 0] and not s.valids[5, 1] and s.valids[6, 0] == z["valids"][6, 0]


def test_clip_starts():
    starts = pod.clip_starts(20, 8)
    assert [c for c in starts if c[1] == 1] == [(s, 1) for s in range(0, 13, 2)]
    assert [c for c in starts if c[1] == 2] == [(0, 2), (2, 2), (4, 2)]
    assert not [c for c in starts if c[1] == 4]
    # strides are exactly 1, 2 and 4: 29 frames hold one 8-frame clip at stride 4 ((8 - 1) * 4 + 1 = 29)
    assert sorted({c[1] for c in pod.clip_starts(29, 8)}) == [1, 2, 4] and (0, 4) in pod.clip_starts(29, 8)


def test_filter_tracks_closed_cases():
    S, H, W = 9, 100, 200
    base = np.tile(np.array([[50.0, 50.0]], np.float32), (S, 6, 1))
    base[:, :, 0] += np.arange(S)[:, None] * 2  # gentle motion
    vis = np.ones((S, 6), bool)
    val = np.ones((S, 6), bool)
    vis[1, 1] = False  # invisible at frame 1
    vis[2:, 2] = False  # visible in only 2 < sqrt(9) frames
    base[0, 3] = [-1, 50]  # outside the image at frame 0 (and jumps, but it is out already)
    base[5:, 4, 0] += 0.5 * W  # a jump of 0.5 * max(H, W)
    edges = np.zeros((H, W), bool)
    edges[50, 50] = True  # point 5 sits on an edge
    base[:, 5] = base[:, 0] + [0, 0]
    base[:, 0, 1] += 10
    keep = pod.filter_tracks(base, vis, val, (H, W), edges)
    assert keep.tolist() == [0]


def test_farthest_point_sampling_spreads():
    rng = np.random.default_rng(0)
    cluster = rng.normal(0, 0.01, (100, 2))
    far = np.array([[5.0, 5.0], [-5.0, 5.0]])
    idx = pod.farthest_point_sample(np.concatenate([cluster, far]), 3, rng)
    assert {100, 101} <= set(idx.tolist())


# --- exporter ----------------------------------------------------------------------------------------------

def _export(root, out, *extra, check=True, **kw):
    return run_export(root, out, *extra, check=check, **kw)


def _version(out):
    return Path(out) / ClipSettings(split="train", S=8, N=32, crop_hw=(128, 192)).version()


def test_export_writes_verified_clips_with_summary(exported):
    out, stdout = exported
    vdir = _version(out)
    clips = list_clips(vdir)
    assert len(clips) >= 8, stdout
    assert "summary: written" in stdout and "rejected" in stdout
    for c in clips:
        verify_clip(c, 8, 32, (128, 192))
        t = np.load(c / "track.npz")["track_g"]
        real = t[0, :, 3] == 1
        assert (t[0, real, 2] == 1).all() and t[..., 3].mean() >= 0.5 and real.sum() >= 16
        # fewer than N good tracks are padded with invalid ones at (0, 0), never repeated
        assert (t[:, ~real] == 0).all() and np.unique(t[:, real], axis=1).shape[1] == real.sum()
    lines = (vdir / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == len(clips)
    assert not list((vdir / ".tmp").iterdir()) if (vdir / ".tmp").exists() else True


def test_rerun_skips_finished_clips(exported, synth_root):
    out, _ = exported
    before = {c.name: (c / "rgb.mp4").stat().st_mtime_ns for c in list_clips(_version(out))}
    res = _export(synth_root, out, "--max_iters=16")
    assert "written 0" in res.stdout and f"already there {len(before)}" in res.stdout
    after = {c.name: (c / "rgb.mp4").stat().st_mtime_ns for c in list_clips(_version(out))}
    assert before == after


def test_clip_k_is_the_same_whoever_writes_it(exported, synth_root, tmp_path):
    out, _ = exported
    _export(synth_root, tmp_path, "--workers=1", "--max_iters=16", "--shard=1", "--num_shards=2")
    mine = list_clips(_version(tmp_path))
    assert mine and all(int(c.name) % 2 == 1 for c in mine)
    for c in mine:
        ref = _version(out) / c.name
        assert np.array_equal(np.load(c / "track.npz")["track_g"], np.load(ref / "track.npz")["track_g"])


def test_exported_tracks_follow_the_pixels(exported):
    from pips2.utils.video import read_clip

    out, _ = exported
    vdir = _version(out)
    errs, shuffled = [], []
    for c in list_clips(vdir):
        frames = read_clip(c / "rgb.mp4", 8, 128, 192).astype(np.float32)
        t = np.load(c / "track.npz")["track_g"]
        ok = (t[0, :, 2] > 0) & (t[3, :, 2] > 0)
        if ok.sum() < 5:
            continue
        c0 = _bilinear(frames[0], t[0, ok, 0], t[0, ok, 1])
        c3 = _bilinear(frames[3], t[3, ok, 0], t[3, ok, 1])
        errs.append(np.median(np.abs(c0 - c3).mean(1)))
        shuffled.append(np.median(np.abs(c0 - np.roll(c3, 3, 0)).mean(1)))
    assert errs and np.median(errs) < 0.5 * np.median(shuffled)


def test_kill_minus_9_then_rerun(synth_root, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={synth_root}", "--dset=train",
         f"--out_dir={tmp_path}", *EXPORT_ARGS, "--workers=2", "--max_iters=40"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    vdir = _version(tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_clips(vdir)) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    n_killed = len(list_clips(vdir))
    assert 3 <= n_killed
    res = _export(synth_root, tmp_path, "--workers=2", "--max_iters=40")
    clips = list_clips(vdir)
    assert len(clips) >= n_killed
    for c in clips:
        verify_clip(c, 8, 32, (128, 192))
    leftovers = list((vdir / ".tmp").iterdir()) if (vdir / ".tmp").exists() else []
    assert not leftovers
    assert "failed 0" in res.stdout


def test_two_exporters_at_once(synth_root, tmp_path):
    args = [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={synth_root}", "--dset=train",
            f"--out_dir={tmp_path}", *EXPORT_ARGS, "--max_iters=24"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    clips = list_clips(_version(tmp_path))
    for c in clips:
        verify_clip(c, 8, 32, (128, 192))
    solo = tmp_path / "solo"
    _export(synth_root, solo, "--max_iters=24")
    assert sorted(c.name for c in clips) == sorted(c.name for c in list_clips(_version(solo)))
    lines = (_version(tmp_path) / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == len(clips)


# --- clip reader -------------------------------------------------------------------------------------------

def test_export_dataset_reads_and_skips_corrupt(exported, tmp_path):
    import torch

    from pips2.datasets.exportdataset import CorruptClipWarning, ExportDataset

    out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    vdir = _version(copy)
    clips = list_clips(vdir)
    (clips[0] / "rgb.mp4").write_bytes((clips[0] / "rgb.mp4").read_bytes()[:2000])  # truncated
    ds = ExportDataset(str(copy), vdir.name, S=6, N=16, use_augs=True)
    assert len(ds) == len(clips)
    with pytest.warns(CorruptClipWarning, match=clips[0].name):
        item = ds[0]
    assert ds.skipped == 1 and 0 in ds.bad
    assert item.rgbs.shape == (6, 3, 128, 192) and item.trajs.shape == (6, 16, 2)
    assert item.rgbs.abs().sum() > 0 and (item.visibs[0] == 1).all()
    loader = torch.utils.data.DataLoader(ExportDataset(str(out), vdir.name, S=8, N=32), batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch.rgbs.shape == (2, 8, 3, 128, 192)


def test_version_names_every_setting_that_changes_the_clips():
    from dataclasses import fields, replace

    base = ClipSettings()
    changed = {"split": "val", "S": 8, "N": 64, "crop_hw": (384, 512), "use_augs": False, "shuffle": False,
               "seed": 3, "preset": "veryfast"}
    assert set(changed) == {f.name for f in fields(ClipSettings)}
    names = {base.version()} | {replace(base, **{k: v}).version() for k, v in changed.items()}
    assert len(names) == len(changed) + 1
    # existing exports keep their folder names
    assert base.version() == "train_S36_N128_256x384_aug_seed0"
    assert replace(base, crop_hw=(384, 512)).version() == "train_S36_N128_384x512_aug_seed0"
    assert ClipSettings(**changed).version() == "val_S8_N64_384x512_noaug_seed3_noshuffle_x264veryfast"


def test_settings_json_keeps_the_exporters_flag_names(tmp_path):
    """Inside, the clips' split and size are ClipSettings.split and .crop_hw; settings.json keeps the keys dset and
    crop_size (the exporter's flags, docs/FORMATS.md), so exports written before and after read alike."""
    from pips2.datasets.clips import read_settings, write_settings

    st = ClipSettings(split="val", S=8, N=32, crop_hw=(128, 192), use_augs=False)
    write_settings(tmp_path, st)
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert (saved["dset"], saved["crop_size"]) == ("val", [128, 192]) and not {"split", "crop_hw"} & set(saved)
    assert read_settings(tmp_path) == st


# --- the clip format (datasets/clips.py) ---------------------------------------------------------------------

def test_tracks_pack_unpack_round_trip_take_and_pad():
    from pips2.datasets.clips import Tracks

    rng = np.random.default_rng(0)
    tr = Tracks(rng.uniform(-50, 300, (5, 7, 2)).astype(np.float32), rng.random((5, 7)) < 0.5,
                rng.random((5, 7)) < 0.8)
    packed = tr.pack()
    assert packed.shape == (5, 7, 4) and packed.dtype == np.float32
    back = Tracks.unpack(packed)
    assert np.array_equal(back.trajs, tr.trajs) and back.trajs.dtype == np.float32
    assert np.array_equal(back.visibs, tr.visibs) and np.array_equal(back.valids, tr.valids)
    assert back.visibs.dtype == bool and np.array_equal(Tracks.unpack(packed).pack(), packed)
    nan = Tracks(np.array([[[np.nan, 1]], [[2, 3]]], np.float32), np.ones((2, 1), bool), np.ones((2, 1), bool))
    assert np.isnan(nan.pack()[0, 0, 0])  # pack keeps values; finite() is the export's rule for track.npz
    assert nan.finite().pack()[:, 0].tolist() == [[0, 0, 0, 0], [2, 3, 1, 1]]
    sub = tr.take(np.array([4, 1]))
    assert np.array_equal(sub.trajs, tr.trajs[:, [4, 1]]) and sub.N == 2
    padded = sub.pad(5)
    assert padded.N == 5 and np.array_equal(padded.take(np.arange(2)).pack(), sub.pack())
    assert (padded.pack()[:, 2:] == 0).all() and tr.pad(3) is tr


def test_choose_tracks_never_repeats():
    rng = np.random.default_rng(0)
    trajs = rng.uniform(0, 100, (6, 40, 2)).astype(np.float32)
    valids = np.ones((6, 40), bool)
    pick = pod.choose_tracks(trajs, valids, 64, rng, (100, 100))
    assert sorted(pick.tolist()) == list(range(40))  # fewer than N: each once (build_clip pads with invalid ones)
    assert len(set(pod.choose_tracks(trajs, valids, 16, rng, (100, 100)).tolist())) == 16
    with pytest.raises(pod.SkipItem, match="too few tracks"):
        pod.choose_tracks(trajs[:, :10], valids[:, :10], 64, rng, (100, 100))


def _settings_only(root, name, **kw):
    from pips2.datasets.clips import write_settings

    (root / name).mkdir(parents=True)
    write_settings(root / name, ClipSettings(**kw))


def test_find_version(tmp_path):
    from pips2.datasets.clips import find_version

    _settings_only(tmp_path, "big", S=64, N=128, crop_hw=(512, 896))
    _settings_only(tmp_path, "val", split="val", S=36, N=128, crop_hw=(256, 384))
    (tmp_path / "not_an_export").mkdir()
    # no exact match: the one export that is long, many and large enough
    assert find_version(tmp_path, 36, 128, (256, 384)) == "big"
    assert find_version(tmp_path, 36, 128, (256, 384), split="val") == "val"
    # an exact match comes first
    _settings_only(tmp_path, "exact", S=36, N=128, crop_hw=(256, 384), seed=1)
    assert find_version(tmp_path, 36, 128, (256, 384)) == "exact"
    # among exact matches, the folder the exporter's defaults name
    default = ClipSettings().version()
    _settings_only(tmp_path, default)
    assert find_version(tmp_path, 36, 128, (256, 384)) == default
    # several that fit and none exact: one error naming them all
    _settings_only(tmp_path, "big2", S=64, N=128, crop_hw=(384, 512))
    with pytest.raises(ValueError, match=r"several exports .*big \(S=64.*big2 \(S=64") as e:
        find_version(tmp_path, 40, 128, (256, 384))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    # nothing fits: the error lists what is there
    with pytest.raises(ValueError, match=r"no export holds train clips of at least S=100.*found: .*big \(S=64"):
        find_version(tmp_path, 100, 128, (256, 384))


def _dot_clip(vdir, k, hw, centers):
    """A clip whose only bright thing is a 3x3 dot at centers[t] (integer x, y), tracked by track 0."""
    from pips2.datasets.clips import Tracks, write_track
    from pips2.utils.video import write_mp4

    S = len(centers)
    frames = np.zeros((S, *hw, 3), np.uint8)
    for t, (x, y) in enumerate(centers):
        frames[t, y - 1:y + 2, x - 1:x + 2] = 255
    folder = vdir / f"{k:06d}"
    folder.mkdir(parents=True)
    write_mp4(folder / "rgb.mp4", frames)
    trajs = np.array(centers, np.float32)[:, None]
    write_track(folder / "track.npz", Tracks(trajs, np.ones((S, 1), bool), np.ones((S, 1), bool)).pack())


def test_random_crop_of_a_larger_clip_keeps_tracks_on_the_pixels(tmp_path):
    from pips2.datasets.clips import write_settings
    from pips2.datasets.exportdataset import ExportDataset

    vdir = tmp_path / "v"
    vdir.mkdir()
    write_settings(vdir, ClipSettings(S=4, N=1, crop_hw=(160, 224)))
    for k in range(3):
        _dot_clip(vdir, k, (160, 224), [(100 + 7 * t + k, 70 + 5 * t) for t in range(4)])
    ds = ExportDataset(str(tmp_path), "v", S=4, N=1, crop_hw=(128, 192))
    offsets = set()
    for i in range(len(ds)):
        for attempt in range(4):
            frames, track = ds.sample(i, ds._rng(i, attempt))
            assert frames.shape == (4, 128, 192, 3) and track.shape == (4, 1, 4)
            assert (track[..., 2:] == 1).all()
            for t in range(4):
                y, x = np.unravel_index(np.argmax(frames[t].astype(int).sum(-1)), frames.shape[1:3])
                assert abs(x - track[t, 0, 0]) <= 1 and abs(y - track[t, 0, 1]) <= 1
            offsets.add((100 + i - float(track[0, 0, 0]), 70 - float(track[0, 0, 1])))
    assert len(offsets) > 3  # the crop window really moves
    # the same clip at its own size is not cropped
    same = ExportDataset(str(tmp_path), "v", S=4, N=1)
    assert same.sample(0, same._rng(0, 0))[1][0, 0, :2].tolist() == [100, 70]


def test_clips_smaller_than_the_crop_are_one_clear_error(tmp_path):
    from pips2.datasets.clips import write_settings
    from pips2.datasets.exportdataset import ExportDataset

    vdir = tmp_path / "v"
    vdir.mkdir()
    write_settings(vdir, ClipSettings(S=4, N=1, crop_hw=(160, 224)))
    _dot_clip(vdir, 0, (160, 224), [(100, 70)] * 4)
    with pytest.raises(ValueError) as e:
        ExportDataset(str(tmp_path), "v", S=4, N=1, crop_hw=(192, 224))
    assert str(e.value) == (f"{vdir}: clips are 160x224, smaller than crop_size 192x224 "
                            "(export at the training crop size or larger)")


def test_readme_recipe_export_defaults_serve_stage_1_training(tmp_path):
    """export_mp4_dataset.py's defaults == STAGE_CLIPS[1] == stage-1 training's defaults, end to end."""
    import inspect

    from pips2.cli import export as export_mp4_dataset
    from pips2.cli import train
    from pips2.datasets.clips import JSON_KEYS, STAGE_CLIPS
    from pips2.datasets.exportdataset import ExportDataset
    from pips2.datasets.synthetic import generate_dataset

    defaults = {k: v.default for k, v in inspect.signature(export_mp4_dataset.main).parameters.items()}
    stage1 = STAGE_CLIPS[1]
    assert {k: defaults[JSON_KEYS.get(k) or k] for k in stage1} == stage1  # the flags: crop_size for crop_hw
    assert {k: getattr(ClipSettings(), k) for k in stage1} == stage1
    assert {k: train.STAGE_DEFAULTS[1][k] for k in stage1} == stage1
    assert {k: train.STAGE_DEFAULTS[2][k] for k in STAGE_CLIPS[2]} == STAGE_CLIPS[2]

    generate_dataset(tmp_path / "pod", {"train": 1}, cfg=SceneConfig(W=448, H=320, T=40, n_objects=2,
                                                                      n_points=600), progress=False)
    export_mp4_dataset.main(dataset_location=str(tmp_path / "pod"), out_dir=str(tmp_path / "exp"), max_clips=3,
                            quiet=True)
    ds = ExportDataset(str(tmp_path / "exp"), None, S=36, N=128, crop_hw=(256, 384))  # stage-1 defaults
    assert ds.dir.name == "train_S36_N128_256x384_aug_seed0" and len(ds) >= 1
    item = ds[0]
    assert item.rgbs.shape == (36, 3, 256, 384) and item.trajs.shape == (36, 128, 2)


def test_synthetic_stopped_by_sigterm_says_so_and_the_same_command_goes_on(tmp_path):
    """It exited 143 without a word."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "make_synthetic_pod.py"), f"--out={tmp_path / 'syn'}", "--train=40",
           "--test=0", "--W=64", "--H=64", "--T=6", "--n_points=16"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "syn").glob("train/*/anno.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("stopped by SIGTERM: the scenes written so far are kept; the same "
                                           "command writes the rest"), err
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and len(list((tmp_path / "syn").glob("train/*/anno.npz"))) == 40, res.stderr


def test_synthetic_scenes_on_a_full_disk_are_one_line_and_keep_the_finished(tmp_path, capsys, monkeypatch):
    """A disk filling while make_synthetic_pod.py wrote a frame ended in two chained tracebacks; cv2.imwrite's
    failure (a False it returns) went unnoticed. Now one line, exit 1; the finished scene stays, the half one
    goes, and the same command makes the rest."""
    from pips2.datasets import synthetic as syn

    real, calls = syn.cv2.imwrite, []

    def full_after_a_scene(path, image, params=()):
        calls.append(path)
        return False if len(calls) > 9 else real(path, image, params)  # 3 files a frame, 3 frames a scene

    monkeypatch.setattr(syn.cv2, "imwrite", full_after_a_scene)
    out = tmp_path / "syn"
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)
    assert code == 1 and err.strip().splitlines()[-1:] == [
        f"error: cannot write the scenes in {out} (the image could not be written (a full disk?)); the scenes "
        f"finished are kept, the same command writes the rest once there is room"], err
    assert sorted(p.name for p in (out / "train").iterdir()) == ["synth_0000"]
    monkeypatch.undo()
    code, stdout, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)
    assert code == 0 and "summary: 2 scenes" in stdout, err


def test_synthetic_scenes_refused_by_permissions_say_where_not_room(tmp_path, capsys, monkeypatch):
    """A folder that refused the scenes (another user's, read-only) was said as `cannot write the scenes in <out>
    (permission denied); ... once there is room`: no room cures it, and the folder that refused was not named."""
    import errno

    from pips2.datasets import synthetic as syn

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(syn, "generate_scene", refused)
    out = tmp_path / "syn"
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=1)
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith(f"error: cannot write the scenes in {out} ({out / 'train' / '.synth_tmp'}")
    assert line.endswith("): permission denied; the scenes finished are kept"), line


def test_synthetic_refuses_a_link_in_a_scenes_place_in_one_line(tmp_path, capsys, monkeypatch):
    """A symlink at a scene's name in --out (planted in a shared folder) was not followed, but the line blamed
    the disk's room and promised that a rerun would work, which failed the same way for ever. It is refused before
    the scene is made (that work was thrown away)."""
    from pips2.datasets import synthetic

    out = tmp_path / "syn"
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "train" / "synth_0001").symlink_to(elsewhere)
    made, real = [], synthetic.generate_scene
    monkeypatch.setattr(synthetic, "generate_scene", lambda *a, **k: made.append(1) or real(*a, **k))
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)
    assert code == 2 and err.strip().splitlines()[-1].split("\r")[-1] == (
        f"error: {out / 'train' / 'synth_0001'} is a symlink, not a scene folder this generator made: remove it"), err
    assert elsewhere.is_dir() and not list(elsewhere.iterdir()) and not made
    (out / "train" / "synth_0001").unlink()
    os.mkfifo(out / "train" / "synth_0001")
    code, _, err = _synth(capsys, out, W=64, H=48, T=3, n_points=20, train=2)
    assert code == 2 and err.strip().splitlines()[-1].split("\r")[-1] == (
        f"error: {out / 'train' / 'synth_0001'} is not a folder, not a scene folder this generator made: remove "
        f"it"), err
