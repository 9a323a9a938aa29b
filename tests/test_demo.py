"""demo.py: point files, outputs people can use, and the missing-checkpoint message."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from helpers import golden_model, run_main
from test_lbm_track import small_lbm

from pips2.cli import demo
from pips2.utils import checkpoint
from pips2.utils.video import read_video, write_mp4
from pips2.utils.vis import draw_frame, output_fps, write_outputs

ROOT = Path(__file__).resolve().parents[1]


def test_read_points_formats(tmp_path):
    (tmp_path / "a.csv").write_text("t,x,y\n3,10.5,20\n0,1,2\n")
    (tmp_path / "b.csv").write_text("10,20\n30,40\n")
    (tmp_path / "c.json").write_text(json.dumps([[1, 2, 3], {"x": 5, "y": 6}, [7, 8]]))
    assert demo.read_points(tmp_path / "a.csv").tolist() == [[3, 10.5, 20], [0, 1, 2]]
    assert demo.read_points(tmp_path / "b.csv", query_frame=4).tolist() == [[4, 10, 20], [4, 30, 40]]
    assert demo.read_points(tmp_path / "c.json", query_frame=2).tolist() == [[1, 2, 3], [2, 5, 6], [2, 7, 8]]
    (tmp_path / "d.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match="no points"):
        demo.read_points(tmp_path / "d.csv")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    checkpoint.save(d, 5, golden_model())
    return d


def test_demo_end_to_end(tmp_path, ckpt):
    rng = np.random.default_rng(0)
    base = (rng.random((180, 260, 3)) * 255).astype(np.uint8)
    write_mp4(tmp_path / "in.mp4", (base[t:t + 130, 2 * t:2 * t + 150] for t in range(14)))
    (tmp_path / "pts.csv").write_text("t,x,y\n5,40,50\n0,100,60\n")
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), f"--video={tmp_path / 'in.mp4'}", f"--init_dir={ckpt}",
                          f"--points={tmp_path / 'pts.csv'}", "--backward=True", "--S=8", "--iters=1",
                          f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "summary: 2 points x 14 frames" in res.stdout
    z = np.load(tmp_path / "out" / "tracks.npz")
    assert z["tracks"].shape == (14, 2, 2) and z["estimated"].all()
    np.testing.assert_allclose(z["tracks"][5, 0], [40, 50], atol=1e-3)
    with open(tmp_path / "out" / "tracks.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 28 and float(rows[10]["x"]) == pytest.approx(z["tracks"][5, 0, 0], abs=1e-3)
    # PIPs++ predicts no visibility: the files keep their columns and arrays
    assert list(rows[0]) == ["frame", "point", "x", "y", "estimated"] and "visibility" not in z.files
    video = read_video(tmp_path / "out" / "tracks.mp4")
    assert video.shape == (14, 130, 150, 3)


def test_demo_grid_on_a_synthetic_video(tmp_path, ckpt, capsys, monkeypatch):
    real = demo.synthetic_video
    monkeypatch.setattr(demo, "synthetic_video", lambda path: real(path, frames=12))  # 48 by default: slow
    res = run_main(demo.main, capsys, init_dir=str(ckpt), grid_size=3, S=8, iters=1, out_dir=str(tmp_path),
                   numbers=True)  # point numbers work for PIPs++ too
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "synthetic.mp4").is_file() and np.load(tmp_path / "tracks.npz")["tracks"].shape == (12, 9, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.mp4", "tracks.csv", "tracks.mp4", "tracks.npz"]


def test_the_synthetic_video_replaces_nothing_until_the_run_succeeds(tmp_path, ckpt, capsys, monkeypatch):
    """The synthetic video was written in place before the checkpoint was loaded: a run that then failed had
    replaced <out_dir>/synthetic.mp4 anyway, and through a link of that name the file the link names."""
    real = demo.synthetic_video
    monkeypatch.setattr(demo, "synthetic_video", lambda path: real(path, frames=12))
    precious = tmp_path / "precious.mp4"
    precious.write_bytes(b"the user's own video")
    out = tmp_path / "out"
    out.mkdir()
    (out / "synthetic.mp4").symlink_to(precious)
    res = run_main(demo.main, capsys, init_dir=str(tmp_path / "missing.pth"), grid_size=2, S=8, iters=1,
                   out_dir=str(out))
    assert res.returncode == 2 and "missing.pth" in res.stderr, res.stderr
    assert precious.read_bytes() == b"the user's own video"
    assert [p.name for p in out.iterdir()] == ["synthetic.mp4"] and (out / "synthetic.mp4").is_symlink()
    res = run_main(demo.main, capsys, init_dir=str(ckpt), grid_size=2, S=8, iters=1, out_dir=str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert precious.read_bytes() == b"the user's own video"  # the link was replaced, not what it names
    assert not (out / "synthetic.mp4").is_symlink() and read_video(out / "synthetic.mp4").shape[0] == 12
    assert f"through {out / 'synthetic.mp4'} (12 frames" in res.stdout


def test_progress_and_summary_say_what_a_person_needs(tmp_path, clip, ckpt, capsys):
    """The bar read 'windows: 0%| 0/1' for a whole short clip, and with --backward stopped at 83 % before an
    unlabelled one; the summary gave frames/s but not the size the model ran at, which the time grows with."""
    res = run_main(demo.main, capsys, video=str(clip), init_dir=str(ckpt), points=None, grid_size=2, query_frame=5,
                   backward=True, S=8, iters=2, out_dir=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    bars = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert bars and all(ln.startswith(("forward:", "backward:")) for ln in bars), bars
    for label in ("forward:", "backward:"):
        assert "100%" in [ln for ln in bars if ln.startswith(label)][-1]
    assert "(14 frames, 150x130; the model runs at 152x128)" in res.stdout  # 150x130 rounded to multiples of 8
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: 4 points x 14 frames in ") and " s per frame, forward and backward) at " \
        "152x128, the model's input size (the video is 150x130); wrote " in summary, summary


def test_missing_checkpoint_message(tmp_path, clip, capsys):
    res = run_main(demo.main, capsys, video=str(clip), init_dir=str(tmp_path / "none"), out_dir=str(tmp_path / "o"))
    assert res.returncode != 0 and "get_reference_model.sh" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# --- every bad input is one line (exit 2), found before the model is loaded or anything is tracked --------

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 14-frame 150x130 (WxH) mp4."""
    d = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    base = (rng.random((180, 260, 3)) * 255).astype(np.uint8)
    write_mp4(d / "in.mp4", (base[t:t + 130, 2 * t:2 * t + 150] for t in range(14)))
    return d / "in.mp4"


def _demo(capsys, init_dir=None, **kw):
    """demo.main in this process; no checkpoint unless asked: the inputs must be refused before the model is needed."""
    kw = {"S": 8, "iters": 1, **kw}
    return run_main(demo.main, capsys, init_dir=str(init_dir or ROOT / "no_such_checkpoint"),
                    **{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})


def _one_error_line(res, *parts):
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for p in parts:
        assert str(p) in lines[0], (p, lines[0])
    assert "tracking" not in res.stdout
    return lines[0]


@pytest.mark.parametrize("content,parts", [
    ("t,x,y\n0,10,20\n1,abc,5\n", ["row 3", "not numbers"]),
    ("x,y\nx,y\n1,2\n", ["row 2", "not numbers"]),
    ("0,10,20\n1,2,3,4\n", ["row 2", "got 4 values"]),
    ("t,x,y\n0,10,20\n\n13,5,5\n99,1,1\n", ["row 5", "query frame 99", "0..13"]),
    ("t,x,y\n-1,1,1\n", ["row 2", "query frame -1", "0..13"]),
    ("t,x,y\n2.5,1,1\n", ["row 2", "query frame 2.5 is not a whole frame number"]),
    ("t,x,y\n0,nan,5\n", ["row 2", "non-finite"]),
    ("0,1,inf\n", ["row 1", "non-finite"]),
    ("0,1e39,5\n", ["row 1", "non-finite"]),
    ("t,x,y\n0,10,20\n0,1e30,5\n", ["row 3", "point x=1e+30, y=5 lies more than 4 image widths outside the 150x130"]),
    ("0,1,1\n" * 10_001, ["more than 10000 points; at most 10000 are tracked at once"]),
])
def test_bad_points_csv(tmp_path, clip, content, parts, capsys):
    (tmp_path / "pts.csv").write_text(content)
    _one_error_line(_demo(capsys, video=clip, points=tmp_path / 'pts.csv', out_dir=tmp_path / "o"),
                    tmp_path / "pts.csv", *parts)


def test_memory_size_without_lbm_is_refused_not_ignored(tmp_path, clip, capsys):
    """--memory_size resamples LBM's memory; with the default --model=pips2 it was ignored without a word."""
    _one_error_line(_demo(capsys, video=clip, memory_size=5, out_dir=tmp_path / "o"),
                    "--memory_size is LBM's (--model=lbm); --model=pips2 has no memory to resample")
    assert not (tmp_path / "o").exists()


def test_query_frame_flag_out_of_range(tmp_path, clip, capsys):
    _one_error_line(_demo(capsys, video=clip, query_frame=14, out_dir=tmp_path), "--query_frame 14",
                    "0..13")


@pytest.mark.parametrize("case", ["wrong_size", "huge", "all_zero", "unreadable", "missing", "fifo"])
def test_bad_mask(tmp_path, clip, case, capsys, monkeypatch):
    path = tmp_path / "mask.png"
    if case == "huge":  # a small PNG declaring 20000x20000 pixels: refused from its header, never decoded
        import zlib
        row = b"\0" + bytes(20000)
        data = zlib.compress(row * 20000, 9)
        chunk = lambda kind, body: (len(body).to_bytes(4, "big") + kind + body  # noqa: E731
                                    + zlib.crc32(kind + body).to_bytes(4, "big"))
        ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
        monkeypatch.setattr(cv2, "imread", lambda *a, **k: pytest.fail("the mask was decoded"))
        parts = ["larger than"]
    elif case == "wrong_size":
        cv2.imwrite(str(path), np.full((65, 75), 255, np.uint8))
        parts = ["75x65", "150x130"]
    elif case == "all_zero":
        cv2.imwrite(str(path), np.zeros((130, 150), np.uint8))
        parts = ["no grid point falls inside the mask"]
    elif case == "unreadable":
        path.write_bytes(b"not an image")
        parts = ["unreadable image"]
    elif case == "fifo":  # it exists: "no such file" sent the user looking for a file that is there
        os.mkfifo(path)
        parts = ["not a regular file (a FIFO)"]
    else:
        parts = ["no such file"]
    _one_error_line(_demo(capsys, video=clip, mask=path, out_dir=tmp_path / "o"), path, *parts)


def test_a_mask_is_read_as_stored_whatever_its_exif_orientation(tmp_path):
    """A mask PNG with EXIF Orientation 3 was decoded turned 180 degrees (6: 90 degrees, then refused as
    unreadable), while its size was checked as stored: it is now read as stored, as every frame is."""
    from test_video import exif_oriented

    from pips2.cli.demo import read_mask

    stored = np.zeros((130, 150, 3), np.uint8)
    stored[:20, :30] = 255  # the top-left corner
    for tag in (3, 6):
        (tmp_path / f"m{tag}.png").write_bytes(exif_oriented(stored, tag, ".png"))
        m = read_mask(str(tmp_path / f"m{tag}.png"), (130, 150))
        assert m.shape == (130, 150) and m[:20, :30].min() == 255 and int(m.sum()) == 255 * 20 * 30


def test_outputs_never_replace_inputs(tmp_path, clip, capsys):
    """--video=<dir>/tracks.mp4 --out_dir=<dir> replaced the user's video with the drawn one (a rerun on the last
    result), and --points=<dir>/tracks.csv the user's points, exit 0: refused before anything is read or made."""
    shutil.copy(clip, tmp_path / "tracks.mp4")
    before = (tmp_path / "tracks.mp4").read_bytes()
    line = _one_error_line(_demo(capsys, video=tmp_path / "tracks.mp4", out_dir=tmp_path), "--out_dir=")
    assert line == (f"error: --out_dir={tmp_path} would overwrite the input --video={tmp_path / 'tracks.mp4'} (its "
                    f"tracks.mp4); give another --out_dir")
    assert (tmp_path / "tracks.mp4").read_bytes() == before
    (tmp_path / "tracks.csv").write_text("0,10,10\n")
    _one_error_line(_demo(capsys, video=clip, points=tmp_path / "tracks.csv", out_dir=tmp_path),
                    f"would overwrite the input --points={tmp_path / 'tracks.csv'} (its tracks.csv)")
    (tmp_path / "o").mkdir()  # the same file under two names: the input, and the out_dir's tracks.mp4
    os.link(clip, tmp_path / "hard.mp4")
    os.link(clip, tmp_path / "o" / "tracks.mp4")
    _one_error_line(_demo(capsys, video=tmp_path / "hard.mp4", out_dir=tmp_path / "o"), "(its tracks.mp4)")
    assert (tmp_path / "tracks.csv").read_text() == "0,10,10\n"


def test_temp_outputs_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """SIGKILL (the OOM killer) while the outputs were written left .tracks.tmp.<pid>.* in --out_dir for ever; the
    next write removes those of dead writers of this host and PID namespace, and leaves a live one's, another
    host's and another namespace's (a container sharing the host's name: its pid says nothing here)."""
    import socket

    from pips2.utils.procs import owner_tag, pid_namespace
    from pips2.utils.vis import remove_dead_temps

    host, ns = socket.gethostname(), pid_namespace()
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    gone = [tmp_path / f".tracks.tmp.{host}.{pid}.{ns}.{ext}" for ext in ("npz", "csv", "mp4")]
    gone.append(tmp_path / f".tracks.tmp.{host}.{pid}.mp4")  # named before the namespace was
    kept = [tmp_path / f".tracks.tmp.{owner_tag()}.mp4", tmp_path / f".tracks.tmp.elsewhere.{pid}.{ns}.csv",
            tmp_path / f".tracks.tmp.{host}.{pid}.{ns + 1}.npz", tmp_path / "tracks.mp4"]
    for p in gone + kept:
        p.write_bytes(b"x")
    assert sorted(remove_dead_temps(tmp_path)) == sorted(gone)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_bad_video(tmp_path, capsys):
    _one_error_line(_demo(capsys, video=tmp_path / 'none.mp4', out_dir=tmp_path / "o"), tmp_path / "none.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 5000)
    _one_error_line(_demo(capsys, video=tmp_path / "junk.mp4", out_dir=tmp_path / 'o'), tmp_path / "junk.mp4")
    assert not (tmp_path / "o").exists()  # a refused run leaves no empty --out_dir


def test_a_video_beyond_tmpdirs_free_space_is_one_line(tmp_path, clip, ckpt, capsys, monkeypatch):
    """demo.py knows the frame count and the model's size before decoding: a video whose frames would not fit in
    TMPDIR less a margin is refused then (it filled TMPDIR to 90 % before 'no space'), before the model loads."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=2**40, used=2**40 - 3 * 2**29,
                                                                        free=3 * 2**29))
    line = _one_error_line(_demo(capsys, ckpt, video=clip, image_size="4096,4096", out_dir=tmp_path / "o"),
                           clip, "its 14 frames needs 0.66 GB at the model's size", f"{tmp} has 1.50 GB free",
                           "set TMPDIR or cut the video")
    assert line.endswith("set TMPDIR or cut the video") and list(tmp.iterdir()) == []
    assert not (tmp_path / "o").exists()


def test_uncreatable_or_read_only_out_dir(tmp_path, clip, capsys):
    (tmp_path / "file").write_text("")
    _one_error_line(_demo(capsys, video=clip, out_dir=tmp_path / "file" / "out"),
                    f"--out_dir {tmp_path / 'file' / 'out'}", "not writable")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / "ro").mkdir(mode=0o500)
        _one_error_line(_demo(capsys, video=clip, out_dir=tmp_path / "ro"), f"--out_dir {tmp_path / 'ro'}")


def test_points_outside_the_image_warn_and_are_tracked(tmp_path, clip, ckpt, capsys):
    (tmp_path / "pts.csv").write_text("t,x,y\n0,40,50\n2,400,10\n")
    res = _demo(capsys, video=clip, points=tmp_path / "pts.csv", out_dir=tmp_path / 'o', init_dir=ckpt)
    assert res.returncode == 0, res.stderr[-2000:]
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and f"{tmp_path / 'pts.csv'}: row 3: 1 of 2 points lie outside the 150x130 image" in warn[0]
    assert "summary: 2 points x 14 frames" in res.stdout


def test_read_points_names_bad_json_items(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([[1, 2, 3], {"x": 5}]))
    with pytest.raises(ValueError, match=r"p\.json: item 2"):
        demo.read_points(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("[[1, 2, 3], [1,")
    with pytest.raises(ValueError, match=r"q\.json: cannot read points \(invalid JSON"):
        demo.read_points(tmp_path / "q.json")


# --- LBM and point numbers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lbm_ckpt(tmp_path_factory):
    """A small LBM saved as the authors do under DDP: {'model': state_dict} with `module.` keys."""
    m = small_lbm(torch.float32)
    path = tmp_path_factory.mktemp("lbm") / "lbm.pt"
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}}, path)
    return path


def test_demo_lbm_writes_visibility(tmp_path, clip, lbm_ckpt, capsys):
    (tmp_path / "pts.csv").write_text("t,x,y\n0,40,50\n5,100,60\n0,120,20\n")
    res = run_main(demo.main, capsys, video=str(clip), model="lbm", init_dir=str(lbm_ckpt.parent), numbers=True,
                   points=str(tmp_path / "pts.csv"), memory_size=6, out_dir=str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "summary: 3 points x 14 frames" in res.stdout
    z = np.load(tmp_path / "out" / "tracks.npz", allow_pickle=False)
    assert z["tracks"].shape == (14, 3, 2) and z["visibility"].shape == (14, 3) and z["visibility"].dtype == bool
    assert not z["estimated"][:5, 1].any() and z["estimated"][5:].all() and not z["visibility"][:5, 1].any()
    with open(tmp_path / "out" / "tracks.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["frame", "point", "x", "y", "estimated", "visibility"] and len(rows) == 42
    vis = np.array([int(r["visibility"]) for r in rows]).reshape(14, 3)
    assert set(vis.ravel().tolist()) <= {0, 1}
    np.testing.assert_array_equal(vis, z["visibility"])
    assert read_video(tmp_path / "out" / "tracks.mp4").shape == (14, 130, 150, 3)


def test_demo_lbm_needs_a_checkpoint(tmp_path, clip, capsys):
    _one_error_line(run_main(demo.main, capsys, video=str(clip), model="lbm", out_dir=str(tmp_path)),
                    "--model=lbm needs --init_dir")
    _one_error_line(_demo(capsys, video=clip, model="lbm", out_dir=tmp_path), "no_such_checkpoint")
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"junk")
    _one_error_line(_demo(capsys, video=clip, model="lbm", init_dir=bad, out_dir=tmp_path), str(bad))
    _one_error_line(_demo(capsys, video=clip, model="cotracker", out_dir=tmp_path), "--model must be pips2 or lbm")


def test_hollow_and_filled_markers_and_numbers():
    frame = np.full((40, 60, 3), 90, np.uint8)
    pts = np.array([[[15.0, 20.0], [45.0, 20.0]]])
    colors = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    out = draw_frame(frame, pts, colors, visible=np.array([True, False]))
    assert (out[20, 15] != 90).any()  # filled: the centre takes the colour
    assert (out[20, 45] == 90).all() and (out[20, 48] != 90).any()  # hollow: a ring around an untouched centre
    assert (draw_frame(frame, pts, colors) == draw_frame(frame, pts, colors, visible=np.ones(2, bool))).all()
    # numbers go to the right of each marker
    plain = draw_frame(frame, pts, colors, visible=np.array([True, False]))
    labelled = draw_frame(frame, pts, colors, visible=np.array([True, False]), labels=["0", "1"])
    changed = np.nonzero((plain != labelled).any(-1))
    assert len(changed[1]) and changed[1].min() > 15 + 3 and changed[0].max() <= 20


# --- flags and inputs refused before anything is made or loaded; signals; outputs whole or not at all -----------

@pytest.mark.parametrize("flags,parts", [
    (dict(iters=0), ["--iters must be at least 1 (0 would return every query as its track), got 0"]),
    (dict(iters=100000), ["--iters must be at most 64 (each step is one more pass of the update network", "100000"]),
    (dict(S=1), ["--S must be at least 2 (windows overlap by one frame), got 1"]),
    (dict(S=-3), ["--S must be at least 2", "got -3"]),
    (dict(point_batch=0), ["--point_batch must be at least 1, got 0"]),
    (dict(device="foo"), ["--device 'foo': expected auto, cpu, cuda, cuda:N or mps"]),
    (dict(image_size=(16, 16)), ["--image_size must be H,W each from 128 (the smallest PIPs++ accepts) to 4096"]),
    (dict(image_size="abc"), ["--image_size must be H,W (two whole numbers), got 'abc'"]),
    (dict(grid_size=3000), ["--grid_size must be a whole number from 1 to 100 (at most 10000 points"]),
    (dict(model="lbm", memory_size=100_000), ["--memory_size must be a whole number from 1 to 256"]),
    (dict(amp="fp8"), ["--amp must be one of"]),
])
def test_bad_flags_are_refused_before_anything_is_made(tmp_path, clip, flags, parts, capsys):
    """They failed with a traceback after the model was loaded (iters=0 exited 0 with every track its query),
    leaving an empty --out_dir; the checkpoint here does not exist, so the refusal comes before it is needed."""
    out = tmp_path / "a" / "out"
    _one_error_line(_demo(capsys, video=clip, out_dir=out, **flags), *parts)
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_that_is_not_here_is_one_line(tmp_path, clip, capsys):
    _one_error_line(_demo(capsys, video=clip, out_dir=tmp_path / "o", device="cuda:0"),
                    "--device cuda:0: no such CUDA device here (0 found)")
    assert not (tmp_path / "o").exists()


def _ffmpeg(*args):
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    """Videos that decode to nothing or to less than they declare, by name."""
    import imageio_ffmpeg

    d = tmp_path_factory.mktemp("bad_videos")
    tiny = d / "tiny.mp4"  # 1x1 needs 4:4:4 chroma: write_mp4 refuses it (yuv420p)
    w = imageio_ffmpeg.write_frames(str(tiny), (1, 1), pix_fmt_out="yuv444p", macro_block_size=1,
                                    ffmpeg_log_level="error")
    w.send(None)
    for _ in range(5):
        w.send(np.full((1, 1, 3), 200, np.uint8))
    w.close()
    rng = np.random.default_rng(0)
    base = (rng.random((130, 400, 3)) * 255).astype(np.uint8)
    write_mp4(d / "whole.mp4", (np.roll(base, t, 1)[:, :150] for t in range(48)))
    _ffmpeg("-i", d / "whole.mp4", "-c", "copy", "-movflags", "+faststart", d / "first.mp4")
    (d / "cut.mp4").write_bytes((d / "first.mp4").read_bytes()[:(d / "first.mp4").stat().st_size // 2])
    _ffmpeg("-i", d / "whole.mp4", "-frames:v", "0", "-c", "copy", d / "empty.mp4")
    _ffmpeg("-f", "lavfi", "-i", "sine=d=0.5", d / "sound.m4a")
    (d / "folder.mp4").mkdir()
    write_mp4(d / "tall.mp4", np.zeros((2, 4104, 16, 3), np.uint8))
    return d


@pytest.mark.parametrize("name,parts", [
    ("tiny.mp4", ["the video is 1x1; tracking needs at least 8x8 pixels"]),
    ("cut.mp4", ["cut short (the file ends at byte", "of the 48 frames its header declares decode"]),
    ("empty.mp4", ["no video stream in it (no streams at all: an empty video)"]),
    ("sound.m4a", ["no video stream in it (only audio)"]),
    ("folder.mp4", ["is a folder, not a video file"]),
    ("tall.mp4", ["the video is 16x4104, beyond the 4096 pixels a side", "(model_hw, the scripts' --image_size=H,W)"]),
])
def test_bad_videos_are_one_line_and_leave_nothing(tmp_path, ckpt, bad_videos, name, parts, capsys):
    """A 1x1 video exited 0 saying it wrote a tracks.mp4 that did not exist; a faststart mp4 cut in half tracked
    the frames that decode without a word; a zero-frame video or an audio file said "Error opening output files:
    Invalid argument"; a folder was "no such video file"."""
    video = bad_videos / name
    _one_error_line(_demo(capsys, video=video, out_dir=tmp_path / "o", init_dir=ckpt, grid_size=2), video, *parts)
    assert not (tmp_path / "o").exists()


def test_a_text_file_as_init_dir_is_named(tmp_path, clip, capsys):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    _one_error_line(_demo(capsys, video=clip, out_dir=tmp_path / "o", init_dir=tmp_path / "passwd"),
                    f"{tmp_path / 'passwd'}: not a checkpoint (a text file; torch.save writes a zip archive)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "decoding"), (signal.SIGINT, "tracking")])
def test_a_signal_stops_the_demo_in_one_line_removing_its_temp_file(tmp_path, ckpt, sig, when):
    """SIGTERM (a scheduler) killed demo.py without a word, leaving its decoded-frame temp file (GBs for a long
    video); Ctrl-C printed a traceback. Sent as the frames are decoded, or while windows are tracked."""
    write_mp4(tmp_path / "long.mp4", (np.roll((np.random.default_rng(0).random((128, 400, 3)) * 255).astype(
        np.uint8), t, 1)[:, :160] for t in range(300)))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    with open(err, "w") as ferr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), f"--video={tmp_path / 'long.mp4'}",
                                 f"--init_dir={ckpt}", "--grid_size=4", "--S=8", "--iters=2",
                                 f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=ferr)
        try:
            for _ in range(1200):  # up to 2 minutes on a loaded machine
                if proc.poll() is not None:
                    break
                if (list(tmp.glob("*/frames.u8")) if when == "decoding" else "forward:" in err.read_text()):
                    break
                time.sleep(0.1)
            assert proc.poll() is None, "the demo ended before the signal: " + err.read_text()[-2000:]
            assert list(tmp.glob("*/frames.u8"))  # the temp file is there to be removed
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err.read_text()
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "forward:" not in ln]
    name = signal.Signals(sig).name
    assert code == 128 + sig and lines == [f"error: stopped by {name}: no outputs written, temp files removed"], text
    assert list(tmp.iterdir()) == [] and not (tmp_path / "out").exists()


def test_drawing_skips_points_it_cannot_place():
    """A track at x=1e30 or NaN made cv2 fail after the whole run ("Can't parse 'center'")."""
    frame = np.full((40, 60, 3), 90, np.uint8)
    history = np.array([[[10.0, 10.0], [1e30, 5.0], [np.nan, 3.0]],
                        [[12.0, 11.0], [-1e30, np.inf], [20.0, 20.0]]])
    out = draw_frame(frame, history, np.array([[255, 0, 0]] * 3, np.uint8), labels=["0", "1", "2"])
    assert out.shape == frame.shape and (out[11, 12] != 90).any() and (out[20, 20] != 90).any()


def _rate(path) -> Fraction:
    """The frame rate an mp4 declares, read by OpenCV (not by the code under test) as the fraction it is."""
    cap = cv2.VideoCapture(str(path))
    try:
        return Fraction(cap.get(cv2.CAP_PROP_FPS)).limit_denominator(100_000)
    finally:
        cap.release()


@pytest.mark.parametrize("rate,given", [
    (Fraction(30000, 1001), 29.97),  # the web page passes the rate ffmpeg prints, rounded
    (Fraction(25, 2), 12.5),
    (Fraction(24000, 1001), None),
])
def test_tracks_mp4_keeps_the_source_frame_rate(tmp_path, rate, given):
    """tracks.mp4 was written at the rate rounded to a whole number: a 29.97 fps clip came out at 30 (drifting
    from its source by a frame every 33 s), a 12.5 fps one at 12."""
    src = tmp_path / "src.mp4"
    write_mp4(src, (np.full((32, 48, 3), 10 * t, np.uint8) for t in range(7)), fps=rate)
    assert _rate(src) == rate
    write_outputs(tmp_path, src, np.zeros((1, 3), np.float32), np.zeros((7, 1, 2), np.float32),
                  np.ones((7, 1), bool), given)
    assert _rate(tmp_path / "tracks.mp4") == rate and len(read_video(tmp_path / "tracks.mp4")) == 7


def test_demo_keeps_the_frame_rate(tmp_path, ckpt, capsys):
    src = tmp_path / "in.mp4"
    base = (np.random.default_rng(0).random((140, 200, 3)) * 255).astype(np.uint8)
    write_mp4(src, (base[:128, 2 * t:2 * t + 128] for t in range(6)), fps=Fraction(25, 2))
    res = run_main(demo.main, capsys, video=str(src), init_dir=str(ckpt), grid_size=1, S=8, iters=1,
                   out_dir=str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert _rate(tmp_path / "out" / "tracks.mp4") == Fraction(25, 2)


def test_output_fps_bounds_and_defaults():
    assert output_fps(float("nan")) == 24 and output_fps(0) == 24 and output_fps(None) == 24
    assert output_fps(Fraction(30000, 1001)) == Fraction(30000, 1001) and output_fps(12.5) == Fraction(25, 2)
    assert output_fps(0.01) == 1 and output_fps(1e6) == 1000


def test_outputs_are_written_whole_or_not_at_all(tmp_path, clip):
    """tracks.npz and tracks.csv were written in place before the video was drawn: a failure (or a signal) while
    drawing left a set from two runs, or a half-written file."""
    for f in ("tracks.npz", "tracks.csv", "tracks.mp4"):
        (tmp_path / f).write_text("an earlier run")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 5000)
    tracks = np.zeros((14, 2, 2), np.float32)
    with pytest.raises(Exception):  # the video cannot be read for drawing
        write_outputs(tmp_path, junk, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mp4", "tracks.csv", "tracks.mp4", "tracks.npz"]
    assert all((tmp_path / f).read_text() == "an earlier run" for f in ("tracks.npz", "tracks.csv", "tracks.mp4"))
    files = write_outputs(tmp_path, clip, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0)
    assert [f.name for f in files] == ["tracks.npz", "tracks.csv", "tracks.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mp4", "tracks.csv", "tracks.mp4", "tracks.npz"]
    assert np.load(tmp_path / "tracks.npz")["tracks"].shape == (14, 2, 2)


def test_a_stop_between_the_renames_waits_for_the_last(tmp_path, clip, monkeypatch):
    """The outputs (and the demo's synthetic video) were renamed one after another: a SIGTERM between two left a
    new tracks.npz beside the old tracks.csv and tracks.mp4, under a line saying nothing was written."""
    from pips2.utils import vis
    from pips2.utils.procs import Stopped, stopping_on_signals

    for f in ("tracks.npz", "tracks.csv", "tracks.mp4", "synthetic.mp4"):
        (tmp_path / f).write_text("an earlier run")
    video = tmp_path / ".synthetic.tmp.mp4"
    shutil.copy(clip, video)
    renames = []

    def replace_then_stop(src, dst):
        renames.append(Path(dst).name)
        os.rename(src, dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vis.os, "replace", replace_then_stop)
    tracks = np.zeros((14, 2, 2), np.float32)
    with pytest.raises(Stopped), stopping_on_signals():
        write_outputs(tmp_path, video, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0,
                      with_them=[(video, tmp_path / "synthetic.mp4")])
    assert renames == ["tracks.npz", "tracks.csv", "tracks.mp4", "synthetic.mp4"]
    assert not any((tmp_path / f).read_bytes() == b"an earlier run" for f in renames)


def test_points_files_that_cannot_be_read_as_points_are_one_line(tmp_path, monkeypatch):
    """A CSV field over the csv module's limit, deeply nested JSON and true/false as coordinates ended in a
    traceback or were taken as numbers; /dev/zero (or a FIFO) would be read forever, a huge file whole."""
    (tmp_path / "long_field.csv").write_text("0," + "1" * 200_000 + ",5\n")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "bools.json").write_text("[[0, true, 2]]")
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "big.csv").write_text("0,1,2\n" * 20)
    for name, why in (("long_field.csv", "cannot read points (CSV: field larger than field limit"),
                      ("deep.json", "cannot read points (JSON nested too deeply)"),
                      ("bools.json", "item 1: expected [t,x,y], [x,y] or {x,y[,t]} (true/false is not a coordinate)"),
                      ("fifo.csv", "cannot read points (not a regular file)"),
                      ("big.csv", "cannot read points (a file of 120 bytes; a points file is read whole, at most "
                                  "100 bytes)")):
        if name == "big.csv":
            monkeypatch.setattr(demo, "MAX_POINTS_FILE_BYTES", 100)  # the bound (4 MB), shown on a small file
        with pytest.raises(ValueError) as e:
            demo.read_points(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {why}"), str(e.value)



def test_a_points_file_is_read_no_further_than_the_points_tracked(tmp_path):
    """A points file within the byte bound (then 64 MB) was parsed whole before the count was checked: 11 M rows
    cost 3 GB of memory and 20 s to say "too many points". Reading stops at the first row past MAX_POINTS (what
    follows it is never parsed), a JSON list is counted before its items are, and the bound is 4 MB."""
    from pips2.tracking import MAX_POINTS

    (tmp_path / "p.csv").write_text("0,1,1\n" * (MAX_POINTS + 1) + "never,parsed\n")
    (tmp_path / "p.json").write_text("[" + "[0, 1, 1], " * (MAX_POINTS + 1) + "\"never parsed\"]")
    for name in ("p.csv", "p.json"):
        with pytest.raises(ValueError) as e:
            demo.read_points(tmp_path / name)
        assert str(e.value) == (f"{tmp_path / name}: more than {MAX_POINTS} points; at most {MAX_POINTS} are tracked "
                                f"at once (split them into several runs)")
    assert demo.MAX_POINTS_FILE_BYTES == 4 << 20


def test_a_number_of_thousands_of_digits_is_a_coordinate_named_by_file_and_row(tmp_path):
    """Python's int() refuses over 4300 digits with advice about sys.set_int_max_str_digits and no file name: a
    points file's integers are read as floats, so such a number is an infinite coordinate, refused by its row."""
    from pips2.tracking import check_queries

    path = tmp_path / "big.json"
    path.write_text("[[0, 3, 4], [0, " + "1" * 5000 + ", 5]]")
    queries, rows = demo.read_point_rows(path)
    assert queries[0].tolist() == [0, 3, 4] and np.isinf(queries[1, 1])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: row 2: non-finite point \[inf, 5\.0\]"):
        check_queries(queries, 10, (64, 64), source=str(path), rows=rows)

def test_a_signal_ignored_by_the_caller_stays_ignored():
    """A script's `demo.py ... &` starts with SIGINT ignored (so does nohup with SIGHUP): the demo must not catch
    it, or a Ctrl-C meant for the script's foreground job stops the demo too."""
    import signal

    from pips2.utils.procs import stop_handler, stopping_on_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is stop_handler
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])


def test_a_stop_held_through_the_renames_says_the_outputs_are_written(tmp_path, ckpt, capsys, monkeypatch):
    """A SIGTERM held until the last rename found every output new, and the demo said "no outputs written"."""
    from pips2.utils import vis

    real = demo.synthetic_video
    monkeypatch.setattr(demo, "synthetic_video", lambda path: real(path, frames=12))
    (tmp_path / "tracks.csv").write_text("an earlier run")
    renamed = vis.os.replace

    def replace_then_stop(src, dst):
        renamed(src, dst)
        if Path(dst).name == "tracks.npz":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vis.os, "replace", replace_then_stop)
    res = run_main(demo.main, capsys, init_dir=str(ckpt), grid_size=2, S=8, iters=1, out_dir=str(tmp_path))
    assert res.returncode == 143, res.stderr[-2000:]
    files = ", ".join(str(tmp_path / n) for n in ("tracks.npz", "tracks.csv", "tracks.mp4", "synthetic.mp4"))
    assert res.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM as the outputs were written; they are complete: {files}")
    assert (tmp_path / "tracks.csv").read_text() != "an earlier run" and (tmp_path / "synthetic.mp4").is_file()


def test_an_output_name_taken_by_a_folder_replaces_nothing(tmp_path, ckpt, capsys, monkeypatch):
    """<out_dir>/synthetic.mp4 a folder: the tracks were renamed into place first, then the video's rename failed,
    exit 2, leaving new tracks of a video that no longer existed beside the old files."""
    real = demo.synthetic_video
    monkeypatch.setattr(demo, "synthetic_video", lambda path: real(path, frames=12))
    (tmp_path / "synthetic.mp4").mkdir()
    (tmp_path / "tracks.csv").write_text("an earlier run")
    res = run_main(demo.main, capsys, init_dir=str(ckpt), grid_size=2, S=8, iters=1, out_dir=str(tmp_path))
    assert res.returncode == 2 and f"{tmp_path / 'synthetic.mp4'} is a folder" in res.stderr, res.stderr[-2000:]
    assert (tmp_path / "tracks.csv").read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.mp4", "tracks.csv"]


@pytest.mark.parametrize("closed", [">&-", "2>&-"])
def test_a_script_started_with_its_output_closed_runs(tmp_path, closed):
    """A launcher that closes descriptor 1 or 2 (`cmd >&-`): Python gives sys.stdout (sys.stderr) None, and
    print() to it writes nowhere; the guard around every script's output wrapped None and failed at the first
    line."""
    root = Path(demo.__file__).resolve().parents[2]
    cmd = (f"{sys.executable} make_synthetic_pod.py --out={tmp_path / 'syn'} --train=1 --test=0 --W=16 --H=16 --T=2 "
           f"--n_points=3 {closed}")
    res = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "syn" / "train" / "synth_0000" / "anno.npz").is_file()


def test_outputs_are_written_where_no_planted_link_can_redirect_them(tmp_path):
    """In a folder others may write to, the temp outputs had predictable names (`.tracks.tmp.<host>.<pid>.<ns>.csv`,
    `.<name>.<pid>.tmp` for every JSON written whole): links planted there made the run write over the files they
    point to. The outputs are now written in a private folder of a random name, and JSON under a random name."""
    from pips2.utils.paths import write_json
    from pips2.utils.procs import owner_tag

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    for ext in ("npz", "csv", "mp4"):
        (out / f".tracks.tmp.{owner_tag()}.{ext}").symlink_to(victim)
    (out / f".r.json.{os.getpid()}.tmp").symlink_to(victim)
    src = tmp_path / "src.mp4"
    write_mp4(src, (np.full((32, 48, 3), 10 * t, np.uint8) for t in range(4)))
    write_outputs(out, src, np.zeros((1, 3), np.float32), np.zeros((4, 1, 2), np.float32), np.ones((4, 1), bool),
                  24.0)
    write_json(out / "r.json", {"a": 1})
    assert victim.read_text() == "the user's"
    assert len(read_video(out / "tracks.mp4")) == 4 and json.loads((out / "r.json").read_text()) == {"a": 1}
    assert not [p for p in out.iterdir() if p.name.startswith(".tracks.tmp") and not p.is_symlink()]


def test_the_synthetic_video_is_made_where_no_planted_link_can_redirect_it(tmp_path, ckpt, capsys):
    """demo.py without --video made its synthetic video at `.synthetic.tmp.<host>.<pid>.<ns>.mp4` in --out_dir,
    written by ffmpeg through any link planted at that name (the next pids are easy to guess). It is now made in a
    private folder of a random name and renamed out."""
    from pips2.cli.demo import SYNTHETIC_TEMP_HEAD
    from pips2.utils.procs import pid_namespace

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    host, ns = socket.gethostname(), pid_namespace()
    for pid in range(os.getpid(), os.getpid() + 50):
        (out / f"{SYNTHETIC_TEMP_HEAD}.{host}.{pid}.{ns}.mp4").symlink_to(victim)
    res = run_main(demo.main, capsys, init_dir=str(ckpt), grid_size=1, S=8, iters=1, out_dir=str(out))
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "the user's" and not (out / "synthetic.mp4").is_symlink()
    assert len(read_video(out / "synthetic.mp4")) > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a link another user's uid")
def test_an_out_dir_or_out_json_through_another_user_s_link_is_refused(tmp_path, clip, capsys):
    """In a team's checkout (a folder others may write to), another user could plant a link at ./demo_out, or at
    the folder of an evaluation's --out_json, to a folder of the user's results: the rerun replaced them there
    without a word. A link on the way made by another user (not root) is refused in one line, exit 2."""
    from pips2.evaluation import check_out_json

    papers = tmp_path / "paper"
    papers.mkdir()
    (papers / "tracks.csv").write_text("the figure's data")
    team = tmp_path / "team"
    team.mkdir()
    (team / "demo_out").symlink_to(papers)
    os.lchown(team / "demo_out", 2002, 2002)
    line = _one_error_line(_demo(capsys, video=clip, out_dir=team / "demo_out" / "track"))
    assert line == (f"error: --out_dir: {team / 'demo_out'} is a link of uid 2002's (to {papers}), not this user's: "
                    f"its maker chose where this program's files would go; remove it, or give another --out_dir")
    assert sorted(p.name for p in papers.iterdir()) == ["tracks.csv"]
    with pytest.raises(ValueError, match=rf"^--out_json: {team / 'demo_out'} is a link of uid 2002's"):
        check_out_json(str(team / "demo_out" / "pod.json"))
    # reached through a link of the user's own (a symlinked scratch folder into the team's area), and after a `..`
    (tmp_path / "scratch").symlink_to(team)
    (team / "sub").mkdir()
    for given in (tmp_path / "scratch" / "demo_out" / "track", tmp_path / "scratch" / "sub" / ".." / "demo_out"):
        with pytest.raises(ValueError, match=rf"^--out_json: {team / 'demo_out'} is a link of uid 2002's"):
            check_out_json(str(given / "pod.json"))
    os.lchown(team / "demo_out", os.geteuid(), os.getegid())  # this user's own link: theirs to make
    check_out_json(str(team / "demo_out" / "pod.json"))


def test_an_out_dir_replaced_by_a_link_while_tracking_is_not_written_through(tmp_path, clip):
    """--out_dir is checked before minutes of tracking; in a folder others may write to, another user could then
    move it aside and put a link at its name: the outputs were written through it, over the user's earlier
    tracks.csv elsewhere. The folder is now held from the check on, and one replaced meanwhile is an error."""
    out, precious = tmp_path / "team" / "out", tmp_path / "precious"
    precious.mkdir()
    (precious / "tracks.csv").write_text("the figure's data")
    demo.check_out_dir(out)
    out.rename(out.with_name("moved"))
    out.symlink_to(precious)
    tracks = np.zeros((14, 2, 2), np.float32)
    with pytest.raises(OSError, match=r"^the folder was moved, removed or replaced during the run; nothing written$"):
        write_outputs(out, clip, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0)
    assert sorted(p.name for p in precious.iterdir()) == ["tracks.csv"]
    assert (precious / "tracks.csv").read_text() == "the figure's data"
    # held since the check, and not replaced: written there, whatever way the folder is named
    demo.check_out_dir(tmp_path / "fresh")
    files = write_outputs(tmp_path / "fresh", clip, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0)
    assert files == [tmp_path / "fresh" / n for n in ("tracks.npz", "tracks.csv", "tracks.mp4")]
    assert all(f.is_file() for f in files)


def test_a_failed_rename_of_the_outputs_names_the_out_dir_not_its_descriptor(tmp_path, clip, monkeypatch):
    """A rename refused at the end (a file of another user planted at an output's name in /tmp meanwhile) was said
    with `/proc/self/fd/3/tracks.csv`, the held folder's descriptor, instead of the --out_dir the user gave."""
    from pips2.utils import vis

    out = tmp_path / "out"
    demo.check_out_dir(out)

    def refused(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(vis.os, "replace", refused)
    tracks = np.zeros((14, 2, 2), np.float32)
    with pytest.raises(PermissionError) as e:
        write_outputs(out, clip, np.zeros((2, 3), np.float32), tracks, np.ones((14, 2), bool), 24.0)
    assert e.value.filename2 == str(out / "tracks.npz") and "/proc/self/fd" not in str(e.value), str(e.value)


def test_an_out_dir_with_dot_dot_goes_where_the_kernel_resolves_it_and_leaves_no_stray_folder(tmp_path, clip, ckpt,
                                                                                               capsys):
    """`<own link>/../x` (x beside the link's target, as the kernel resolves it) was refused as "not writable (No
    such file or directory)": its writes judged the path by its text. `new/../x` left a stray empty `new`."""
    (tmp_path / "target" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "target" / "deep")
    res = _demo(capsys, ckpt, video=clip, out_dir=f"{tmp_path}/link/../r2", grid_size=2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "target" / "r2").iterdir()) == ["tracks.csv", "tracks.mp4",
                                                                              "tracks.npz"]
    assert read_video(tmp_path / "target" / "r2" / "tracks.mp4").shape[0] == 14
    # without --video: the synthetic clip ffmpeg writes there too
    res = _demo(capsys, ckpt, out_dir=f"{tmp_path}/link/../r4", grid_size=1, S=8)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "target" / "r4" / "synthetic.mp4").is_file()
    line = _one_error_line(_demo(capsys, ckpt, video=clip, out_dir=f"{tmp_path}/new/../r3"))
    assert line == (f"error: --out_dir {tmp_path}/new/../r3: not writable (`..` after a folder that does not exist; "
                    f"give the path without it)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
