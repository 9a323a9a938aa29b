"""export_mp4_dataset.py on bad input and bad luck: Ctrl-C, missing data, odd frames, full disks, damaged clips."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import EXPORT_ARGS, run_export

from pips2.datasets import export
from pips2.datasets.clipmaker import enumerate_candidates
from pips2.datasets.clips import ClipSettings, list_clips, verify_clip

ROOT = Path(__file__).resolve().parents[1]
ST = ClipSettings(dset="train", S=8, N=32, crop_size=(128, 192))


def _version(out):
    return Path(out) / ST.version()


def _six_digit_dirs(vdir):
    return [p for p in Path(vdir).iterdir() if p.name.isdigit() and len(p.name) == 6]


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = export.child_pids(todo.pop())
        out += kids
        todo += kids
    return out


# --- Ctrl-C -------------------------------------------------------------------------------------------------

def _ctrl_c_as_in_a_terminal() -> None:
    # a test run started in the background (`cmd &` in a script) ignores SIGINT, and the export would inherit
    # that and rightly keep ignoring it: give it the default disposition a terminal's process has
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("target", ["process_group", "parent_only"])
def test_ctrl_c_stops_every_worker_and_keeps_only_verified_clips(synth_root, tmp_path, target):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={synth_root}", "--dset=train",
         f"--out_dir={tmp_path}", *EXPORT_ARGS, "--workers=2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal)
    vdir = _version(tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_clips(vdir) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and list_clips(vdir), "the export ended before it could be interrupted"
        family = _descendants(proc.pid)
        assert len(family) >= 2  # the two workers (and the resource tracker, and maybe encoders)
        if target == "process_group":  # what a terminal's Ctrl-C does
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "stopped (interrupted) after" in out and "summary: written" in out, out
    assert "Traceback" not in err, err
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in family):
        time.sleep(0.1)
    assert not [p for p in family if _alive(p)]
    clips = _six_digit_dirs(vdir)
    assert clips
    for c in clips:
        verify_clip(c, 8, 32, (128, 192))
    assert not list((vdir / ".tmp").iterdir()) if (vdir / ".tmp").exists() else True
    assert not list((vdir / ".claims").iterdir())


# --- bad data: one line, exit 2, nothing created --------------------------------------------------------------

def test_missing_dataset_folder_is_one_line_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    res = run_export(tmp_path / "nope", out, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nope" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["no_scenes", "scenes_too_short"])
def test_empty_split_is_one_line(synth_root, tmp_path, case):
    root = tmp_path / "pod"
    (root / "train").mkdir(parents=True)
    if case == "scenes_too_short":
        scene = root / "train" / "synth_0000"
        shutil.copytree(synth_root / "train" / "synth_0000", scene)
        for f in sorted((scene / "rgbs").iterdir())[5:]:
            f.unlink()
    res = run_export(root, tmp_path / "out", check=False)
    assert res.returncode == 2, res.stdout
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert ("no scene folders" if case == "no_scenes" else "0 candidate clips") in res.stderr
    assert not (tmp_path / "out").exists()


def test_bad_flag_is_one_line(synth_root, tmp_path):
    res = run_export(synth_root, tmp_path, "--shard=3", "--num_shards=2", check=False)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--shard" in res.stderr
    res = run_export(synth_root, tmp_path, "--max_clips=3", "--max_iters=4", check=False)
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: --max_clips=3 and its alias --max_iters=4 disagree; give one of them"
    assert not tmp_path.joinpath(ST.version()).exists()


# --- frames of different sizes, failures --------------------------------------------------------------------

def test_frames_of_different_sizes_are_rejected_once_not_failed(synth_root, tmp_path):
    root = tmp_path / "pod"
    scene = root / "train" / "synth_0000"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    for f in sorted((scene / "rgbs").iterdir())[12:]:  # later clips agree among themselves, not with the masks
        cv2.imwrite(str(f), cv2.resize(cv2.imread(str(f)), (480, 384)))
    first = run_export(root, tmp_path / "out", check=False)
    assert first.returncode == 0, first.stderr
    assert "failed 0" in first.stdout and "frames of different sizes" in first.stdout
    assert not list_clips(_version(tmp_path / "out"))
    again = run_export(root, tmp_path / "out", check=False)
    assert again.returncode == 0 and "failed 0" in again.stdout and "frames of different sizes" in again.stdout


def test_a_frame_cut_short_rejects_its_clips_with_the_reason(synth_root, tmp_path):
    """libjpeg decodes a truncated JPEG as an image grey below the cut and only warns: the clips reading it are
    rejected, naming the frame, and the others are written."""
    root = tmp_path / "pod"
    scene = root / "train" / "synth_0000"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    frame = sorted((scene / "rgbs").iterdir())[0]
    frame.write_bytes(frame.read_bytes()[:2000])
    res = run_export(root, tmp_path / "out", check=False)
    assert res.returncode == 0, res.stderr
    assert "failed 0" in res.stdout
    assert f"unreadable frame ({frame.name}: truncated JPEG (no end-of-image marker))" in res.stdout
    assert "Premature end of JPEG" not in res.stderr
    assert list_clips(_version(tmp_path / "out"))  # clips that start after that frame


def test_failed_clips_make_the_exit_code_1(synth_root, tmp_path):
    vdir = _version(tmp_path)
    vdir.mkdir(parents=True)
    (vdir / ".tmp").write_text("in the way")  # every clip's temp folder fails to be made
    res = run_export(synth_root, tmp_path, "--max_iters=3", check=False)
    assert res.returncode == 1
    assert "failed 3" in res.stdout and "3 clip(s) failed" in res.stderr


# --- a full disk --------------------------------------------------------------------------------------------

def _clip():
    rng = np.random.default_rng(0)
    return (rng.random((8, 128, 192, 3)) * 255).astype(np.uint8), np.zeros((8, 32, 4), np.float32)


def test_broken_pipe_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    def broken(*a, **k):  # what imageio-ffmpeg raises when ffmpeg dies of a full disk
        raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\nffmpeg ...")

    monkeypatch.setattr(export, "write_mp4", broken)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 4096))
    with pytest.raises(export.NoSpaceError) as e:
        export.write_clip(tmp_path, 3, *_clip(), meta={})
    assert str(e.value) == f"no space left on device ({tmp_path})"
    assert not list((tmp_path / ".tmp").iterdir()) and not list_clips(tmp_path)


def test_enospc_while_writing_says_no_space(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.np, "savez", full)
    with pytest.raises(export.NoSpaceError, match=r"^no space left on device \("):
        export.write_clip(tmp_path, 3, *_clip(), meta={})
    # a broken pipe with plenty of space stays what it is
    monkeypatch.setattr(export, "write_mp4", lambda *a, **k: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))
    with pytest.raises(BrokenPipeError):
        export.write_clip(tmp_path, 4, *_clip(), meta={})


def test_export_one_reports_no_space(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(export.np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    cands = enumerate_candidates(synth_root, ST)
    k, status, detail = export.export_one((str(synth_root), str(tmp_path), asdict(ST), 0, asdict(cands[0])))
    assert status == "failed" and detail == f"no space left on device ({tmp_path})"


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_stops_the_export_with_the_reason(synth_root, tiny_disk):
    res = run_export(synth_root, tiny_disk, "--workers=1", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"no space left on device ({_version(tiny_disk)})" in res.stderr
    assert "Broken pipe" not in res.stderr and "Traceback" not in res.stderr
    assert "stopped (no space left on device" in res.stdout
    for c in _six_digit_dirs(_version(tiny_disk)):
        verify_clip(c, 8, 32, (128, 192))


# --- damaged and partial clips ------------------------------------------------------------------------------

def test_partial_folders_are_rewritten_and_verify_rewrites_damaged_clips(exported, synth_root, tmp_path):
    out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    vdir = _version(copy)
    clips = list_clips(vdir)
    damaged, partial = clips[0], clips[1]
    rgb = damaged / "rgb.mp4"
    rgb.write_bytes(rgb.read_bytes()[:2000])
    (partial / "track.npz").unlink()
    empty = vdir / f"{max(int(c.name) for c in clips) + 100:06d}"  # beyond --max_iters: left alone
    empty.mkdir()

    plain = run_export(synth_root, copy, "--max_iters=16")
    assert "rewritten 1" in plain.stdout and f"already there {len(clips) - 1}" in plain.stdout, plain.stdout
    verify_clip(partial, 8, 32, (128, 192))
    with pytest.raises(Exception, match="rgb.mp4"):
        verify_clip(damaged, 8, 32, (128, 192))  # without --verify a finished clip is taken as it is

    checked = run_export(synth_root, copy, "--max_iters=16", "--verify=True")
    assert checked.returncode == 0 and "rewritten 1" in checked.stdout, checked.stdout
    for c in list_clips(vdir):
        verify_clip(c, 8, 32, (128, 192))
        ref = _version(out) / c.name
        assert np.array_equal(np.load(c / "track.npz")["track_g"], np.load(ref / "track.npz")["track_g"])
    assert len(list_clips(vdir)) == len(clips)
    again = run_export(synth_root, copy, "--max_iters=16", "--verify=True")
    assert "rewritten 0" in again.stdout and "written 0" in again.stdout
    assert empty.is_dir()  # not one of this run's clips: nobody's to remove
