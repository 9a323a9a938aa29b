"""export_mp4_dataset.py on bad input and bad luck: Ctrl-C, missing data, odd frames, full disks, damaged clips."""

import contextlib
import errno
import functools
import json
import os
import re
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
from pips2.datasets import pointodyssey as pod
from pips2.datasets.clipmaker import enumerate_candidates
from pips2.datasets.clips import ClipSettings, append_manifest, list_clips, verify_clip
from pips2.utils.procs import usable_cpus
from pips2.utils.video import VideoError

ROOT = Path(__file__).resolve().parents[1]
ST = ClipSettings(split="train", S=8, N=32, crop_hw=(128, 192))


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


@pytest.mark.parametrize("flags,expect", [
    (["--S=1"], "--S must be at least 2, got 1"),  # was: every clip "bad data" (an IndexError in the clip code)
    (["--N=0"], "--N must be at least 1, got 0"),
    (["--max_clips=-1"], "--max_clips must be at least 1, got -1"),
    (["--max_clips=0"], "--max_clips must be at least 1, got 0"),  # was: exit 0, an empty version folder left
    (["--max_iters=-5"], "--max_iters must be at least 1, got -5"),  # the authors' name, said as given
    (["--workers=-3"], "--workers must be at least 1, got -3"),
    (["--num_shards=0"], "--num_shards must be at least 1, got 0"),
    (["--seed=-1"], "--seed must be at least 0, got -1"),  # was: a numpy traceback
    (["--preset=fastest"], "--preset must be one of ultrafast, superfast, veryfast, faster, fast, medium, slow, "
                           "slower, veryslow, placebo, got 'fastest'"),  # was: every clip failed
    # a path component: the version folder was written outside --out_dir
    (["--dset=../test"], "--dset must be a split's plain name (train, val, test, ...), got '../test'"),
    # one process (and its ffmpeg) per worker: 1000 started one per queued clip
    (["--workers=1000"], f"--workers must be at most {4 * usable_cpus()} (4 per CPU core this process may use), "
                         f"got 1000"),
    # was: every clip "failed: MemoryError: Unable to allocate 224 GiB", "rerun to retry them"
    (["--crop_size=100000,100000"], "--crop_size must be at most 4096 per side, got 100000x100000"),
    (["--crop_size=128,4098", "--max_clips=1"], "--crop_size must be at most 4096 per side, got 128x4098"),
])
def test_numeric_flags_out_of_range_are_one_line(synth_root, tmp_path, flags, expect):
    res = run_export(synth_root, tmp_path / "out", *flags, check=False)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {expect}", res.stdout + res.stderr
    assert not (tmp_path / "out").exists()


def test_workers_are_bounded_by_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """The bound counted the machine's CPUs: under `taskset -c 0`, or in a container given 2 CPUs of a 128-CPU
    host, it allowed 4 or 256 times too many workers."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cpus(tmp_path / "none") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # docker --cpus=2
    assert usable_cpus(tmp_path / "cpu.max") == 2
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # --cpus=1.5: two CPUs run it, each part of the time
    assert usable_cpus(tmp_path / "cpu.max") == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == 128


# --- frames of different sizes, failures --------------------------------------------------------------------

def test_frames_of_different_sizes_are_rejected_once_not_failed(synth_root, tmp_path):
    root = tmp_path / "pod"
    scene = root / "train" / "synth_0000"
    shutil.copytree(synth_root / "train" / "synth_0000", scene)
    for f in sorted((scene / "rgbs").iterdir())[12:]:  # later clips agree among themselves, not with the masks
        img = cv2.imread(str(f))
        assert img is not None
        cv2.imwrite(str(f), cv2.resize(img, (480, 384)))
    first = run_export(root, tmp_path / "out", check=False)
    # every clip rejected, none written: no success (exit 2), the data named as the likely cause
    assert first.returncode == 2, first.stderr
    assert "failed 0" in first.stdout and "frames of different sizes" in first.stdout
    assert re.fullmatch(r"error: all \d+ clips were rejected, none written: the data is the likely cause \(scene "
                        r"synth_0000 unusable: frames of different sizes: \d+; see the summary\)\n", first.stderr)
    assert not list_clips(_version(tmp_path / "out"))
    again = run_export(root, tmp_path / "out", check=False)
    assert again.returncode == 2 and "failed 0" in again.stdout and "frames of different sizes" in again.stdout


def test_an_export_that_rejects_every_clip_is_an_error_naming_the_flag(synth_root, tmp_path):
    """--N above the tracks the data holds rejected every clip and exited 0 ("rejected 28 (too few tracks: 28)
    ... 0 clips"): a success with nothing written."""
    res = run_export(synth_root, tmp_path / "out", "--N=100000", "--max_clips=3", check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "rejected 3 (too few tracks: 3)" in res.stdout  # the summary first
    assert res.stderr == ("error: all 3 clips were rejected, none written: --N=100000 asks for more tracks than these "
                          "clips hold (too few tracks: 3); give a lower --N\n")
    written = run_export(synth_root, tmp_path / "out", "--max_clips=3")  # clips written: a success
    assert written.returncode == 0 and "written 3" in written.stdout


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
    hook = tmp_path / "hook"  # every clip's writer fails, in the exporter and in its workers
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import pips2.datasets.export as e\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('a writer failed')\n"
        "e.write_mp4 = broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    res = run_export(synth_root, tmp_path, "--max_iters=3", check=False, env=env)
    assert res.returncode == 1
    assert "failed 3" in res.stdout and "3 clip(s) failed" in res.stderr


@pytest.mark.parametrize("name", [".tmp", ".claims", ".rejected"])
def test_a_temp_folder_of_another_user_or_a_file_in_its_place_is_one_line(synth_root, tmp_path, name):
    """Clips are written in the version's .tmp/ first, which must be this user's own folder (0700): in a folder
    other users may write to, one of theirs (or a link) there would let them plant links the clip's writers follow.
    Where something else has the name, this user's own .tmp.<uid>/ serves; where that is taken too, and where a
    file is in the claims folder's place, the run is refused before any clip (before, every clip failed with its
    own line, and every rerun the same way)."""
    vdir = _version(tmp_path)
    vdir.mkdir(parents=True)
    (vdir / name).write_text("in the way")
    if name == ".tmp":
        res = run_export(synth_root, tmp_path, "--max_iters=2", check=False)
        assert res.returncode == 0 and len(list_clips(vdir)) == 2, res.stderr[-2000:]
        assert (vdir / f".tmp.{os.geteuid()}").is_dir() and (vdir / ".tmp").read_text() == "in the way"
        shutil.rmtree(vdir / f".tmp.{os.geteuid()}")
        name = f".tmp.{os.geteuid()}"
        (vdir / name).write_text("in the way")
    res = run_export(synth_root, tmp_path, "--max_iters=3", check=False)
    assert res.returncode == 2
    why = {".claims": "is not a folder; the export keeps its claims of clips there",
           ".rejected": "is not a folder; the export keeps its records of rejected clips there"}.get(
        name, "is not a folder of this user's; the export writes its clips there first")
    assert res.stderr.strip() == f"error: --out_dir: {vdir / name} {why}: remove it", res.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_claims_folder_this_user_may_not_write_to_is_one_line(synth_root, tmp_path):
    """A claims folder another group member made first without group write: every clip failed, each with a line
    naming a /proc/self/fd path. The run is refused before any clip."""
    vdir = _version(tmp_path)
    (vdir / ".claims").mkdir(parents=True)
    (vdir / ".claims").chmod(0o555)
    try:
        res = run_export(synth_root, tmp_path, "--max_iters=2", check=False)
    finally:
        (vdir / ".claims").chmod(0o755)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: --out_dir: {vdir / '.claims'} is a folder this user may not write to (Permission denied); the "
        f"export keeps its claims of clips there: ask its owner to let the group write to it, or give another "
        f"--out_dir"), res.stderr


def test_a_claims_or_rejections_folder_refusing_writes_is_found_before_any_clip(tmp_path, monkeypatch):
    """What the test above shows as another user, shown as root too (whom permissions do not stop)."""
    for name in (".claims", ".rejected"):
        vdir = tmp_path / name
        (vdir / name).mkdir(parents=True)

        def refused(folder, name=name):
            if Path(folder).name == name:
                raise PermissionError(13, "Permission denied", str(folder))

        monkeypatch.setattr(export, "check_writable", refused)
        with pytest.raises(export.ClaimsInTheWay) as e:
            export.check_claims_dir(vdir)
        assert (e.value.errno, e.value.filename) == (13, str(vdir / name))
        assert e.value.strerror == "a folder this user may not write to (Permission denied)"


def test_claims_without_proc_work_by_name(tmp_path, monkeypatch):
    """Without /proc (a container without it, another system) the claims folder is used by its name: a fresh
    export, whose claims folder did not exist yet, crashed in its start-up clean-up (a traceback, exit 1, on
    every run)."""
    from pips2.utils import paths

    monkeypatch.setattr(paths, "proc_fds", lambda: False)
    vdir = tmp_path / "v"
    vdir.mkdir()
    assert export.clean_stale_claims(vdir) == 0
    assert export.claim(vdir, 4) and (vdir / ".claims" / "000004").is_file()
    export.release(vdir, 4)
    assert not (vdir / ".claims" / "000004").exists()
    (vdir / ".rejected").symlink_to(tmp_path)  # still never through a link
    with pytest.raises(OSError):
        export.mark_rejected(vdir, 5, "no valid tracks")


def test_errors_through_a_pinned_folder_name_the_folder(tmp_path):
    """Claims and rejection records are written through /proc/self/fd/N (the folder as first found): an error there
    named that path instead of the version folder's."""
    from pips2.utils.paths import pinned_folder, unpinned

    folder = tmp_path / "v" / ".claims"
    (tmp_path / "v").mkdir()
    pin = pinned_folder(folder, make=True)
    assert unpinned(pin / "000003") == folder / "000003" and unpinned(tmp_path) == tmp_path
    e = PermissionError(13, "Permission denied", str(pin / "000003"))
    assert export.not_writable(e, tmp_path / "v") == f"{export.NOT_WRITABLE} {tmp_path / 'v'} (Permission denied)"
    assert export._one_line(OSError(5, f"cannot read {pin}/000003"), tmp_path / "v") == \
        f"OSError: [Errno 5] cannot read {folder}/000003"


def test_a_worker_whose_parent_is_gone_ends_quietly():
    """An export worker finishing its clip after its parent was killed printed a 14-line BrokenPipeError traceback
    as it sent the result; the clip is on disk for the rerun, so it now just ends."""
    from multiprocessing import Pipe

    from pips2.utils.procs import _serve

    parent, child = Pipe()
    parent.send("clip 3")

    def job(j):
        parent.close()  # the parent dies while the clip is written
        return "written"

    _serve(child, job, None)  # returns: no error


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
    k, status, detail = export.export_one((str(synth_root), str(tmp_path), ST.to_dict(), 0, asdict(cands[0])))
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


# --- signals: a dead worker, SIGTERM to the exporter ------------------------------------------------------------

def _export_proc(root, out, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={root}", "--dset=train",
         f"--out_dir={out}", *EXPORT_ARGS, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _busy_worker(vdir, proc, timeout=120):
    """(clip, pid) of a clip being written right now, read from its claim file."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for claim in sorted((vdir / ".claims").glob("[0-9]*")) if (vdir / ".claims").is_dir() else []:
            try:
                host, pid, _ns = claim.read_text().split()
            except (OSError, ValueError):
                continue
            if int(pid) != proc.pid:
                return int(claim.name), int(pid)
        time.sleep(0.02)
    raise AssertionError("no clip in progress seen")


def test_sigterm_to_a_busy_worker_retries_its_clip_and_the_run_ends(synth_root, tmp_path):
    """The pool used to replace the killed worker but wait forever for its clip (0 % CPU, 23 of 24 done); now
    the clip is tried once more in a new worker, and the run ends with its summary and every clip."""
    proc = _export_proc(synth_root, tmp_path, "--workers=2", "--max_clips=12")
    vdir = _version(tmp_path)
    try:
        k, pid = _busy_worker(vdir, proc)
        os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (out, err)
    assert f"clip {k:06d}: its worker died (killed by SIGTERM); trying it once more" in err, err
    assert "Traceback" not in err
    assert "summary: written" in out and "1 clip(s) tried again after their worker died" in out and "failed 0" in out
    assert (vdir / f"{k:06d}").is_dir()
    rejected = len(list((vdir / ".rejected").iterdir())) if (vdir / ".rejected").is_dir() else 0
    assert len(list_clips(vdir)) + rejected == 12
    assert not list((vdir / ".claims").iterdir()) and not list((vdir / ".tmp").iterdir())


def _dies_on_clip_2(job):
    """export_one, except that the process exporting clip 2 dies (as one killed by the OOM killer)."""
    if job[3] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return export.export_one(job)


def test_a_clip_whose_worker_dies_twice_is_reported_and_the_others_written(synth_root, tmp_path, monkeypatch, capsys):
    from pips2.cli import export as export_cli

    monkeypatch.setattr(export_cli, "export_one", _dies_on_clip_2)  # spawned workers import it from this module
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, workers=2, max_clips=6)
    cap = capsys.readouterr()
    assert e.value.code == 1, cap
    assert "clip 000002: its worker died (killed by SIGKILL); trying it once more" in cap.err
    assert "clip 000002 failed: its worker died twice (killed by SIGKILL)" in cap.err
    assert "failed 1" in cap.out and "1 clip(s) tried again after their worker died" in cap.out
    vdir = _version(tmp_path)
    assert not (vdir / "000002").exists() and (vdir / "000001").is_dir()
    assert not list((vdir / ".claims").iterdir()) and not list((vdir / ".tmp").iterdir())


def test_worker_pool_reports_a_dead_worker_with_its_job_and_goes_on():
    from collections import deque

    from pips2.utils.procs import WorkerPool

    jobs = deque([(0, "x", 0, 0, {}), (0, "x", {}, 2, {}), (0, "x", {}, 3, {})])
    with WorkerPool(_pool_job, 2) as pool:
        got = {job[3]: (result, code) for job, result, code in pool.run(jobs)}
    assert got == {0: ("done 0", None), 2: (None, -signal.SIGKILL), 3: ("done 3", None)}


def _pool_job(job):
    if job[3] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"done {job[3]}"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_to_the_exporter_stops_it_with_the_summary(synth_root, tmp_path, workers):
    proc = _export_proc(synth_root, tmp_path, f"--workers={workers}")
    vdir = _version(tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_clips(vdir) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and list_clips(vdir), "the export ended before it could be stopped"
        family = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, (out, err)
    assert "stopped (terminated by SIGTERM) after" in out and "summary: written" in out, out
    assert "Traceback" not in err, err
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in family):
        time.sleep(0.1)
    assert not [p for p in family if _alive(p)]
    for c in _six_digit_dirs(vdir):
        verify_clip(c, 8, 32, (128, 192))
    assert not list((vdir / ".tmp").iterdir()) and not list((vdir / ".claims").iterdir())


# --- the source of a version folder -----------------------------------------------------------------------------

def _settings(vdir):
    import json

    return json.loads((vdir / "settings.json").read_text())


def test_another_data_set_into_the_same_folder_is_refused(synth_root, tmp_path):
    """It used to report "already there 3, written 3": clips of two data sets in one folder."""
    from pips2.datasets.synthetic import SceneConfig, generate_dataset

    other = tmp_path / "other"
    generate_dataset(other, {"train": 3}, seed=5, cfg=SceneConfig(W=320, H=256, T=24, n_objects=3, n_points=400),
                     progress=False)
    first = run_export(synth_root, tmp_path / "out", "--max_clips=2")
    vdir = _version(tmp_path / "out")
    src = _settings(vdir)["source"]
    assert src["dataset_location"] == str(Path(synth_root).resolve()), first.stdout
    assert src["scenes"] == {"synth_0000": 24, "synth_0001": 24, "synth_0002": 24}
    assert sorted(src["content"]) == sorted(src["scenes"])
    assert all(re.fullmatch(r"v2-[0-9a-f]{16}", v) for v in src["content"].values()), src["content"]
    before = sorted(p.name for p in vdir.iterdir())
    second = run_export(other, tmp_path / "out", "--max_clips=4", check=False)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: {vdir}: its clips come from {Path(synth_root).resolve()}, not "
                                     f"{other.resolve()}: clips of two data sets would mix; give another --out_dir")
    assert sorted(p.name for p in vdir.iterdir()) == before
    again = run_export(synth_root, tmp_path / "out", "--max_clips=3")  # the same source goes on
    assert "already there 2" in again.stdout and "written 1" in again.stdout


def test_a_version_folder_holding_clips_of_other_settings_is_refused(synth_root, tmp_path):
    """A version folder renamed by hand (or a link to another export) was taken as it is: 128x192 clips in a folder
    named for 160x192 were "already there 2", exit 0. Its settings.json is compared with this run's settings."""
    run_export(synth_root, tmp_path / "out", "--max_clips=2")
    ours = ST.version()
    theirs = ours.replace("128x192", "160x192")
    (tmp_path / "out" / ours).rename(tmp_path / "out" / theirs)
    res = run_export(synth_root, tmp_path / "out", "--max_clips=2", "--crop_size=160,192", check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {tmp_path / 'out' / theirs / 'settings.json'}: its clips were exported with "
                                  f"other settings (--crop_size=128,192 (this run 160,192)): clips of two settings "
                                  f"would mix; give another --out_dir")


def test_a_data_set_regenerated_at_the_same_path_is_refused(tmp_path):
    """Names and frame counts were all the source recorded: a data set regenerated (or re-released with fixed
    annotations) at the same path resumed into the old export, "already there 2, written 2", two data sets
    mixed. Each scene's content fingerprint (its anno.npz members' CRCs, its frames' sizes) is recorded too."""
    import json
    import shutil

    from pips2.datasets.synthetic import SceneConfig, generate_dataset

    cfg = SceneConfig(W=320, H=256, T=24, n_objects=3, n_points=400)
    data = tmp_path / "pod"
    generate_dataset(data, {"train": 2}, seed=5, cfg=cfg, progress=False)
    run_export(data, tmp_path / "out", "--max_clips=2")
    vdir = _version(tmp_path / "out")
    before = sorted(p.name for p in vdir.iterdir())
    shutil.rmtree(data)
    generate_dataset(data, {"train": 2}, seed=6, cfg=cfg, progress=False)  # the same names and frame counts
    again = run_export(data, tmp_path / "out", "--max_clips=4", check=False)
    assert again.returncode == 2, again.stdout
    assert again.stderr.strip() == (f"error: {vdir}: the annotations, frames or masks of synth_0000, synth_0001 in "
                                    f"{data.resolve() / 'train'} changed since its clips were exported (a regenerated "
                                    f"or re-released data set at the same path, or files rewritten, or copied without "
                                    f"their modification times): clips of two data sets would mix; give another "
                                    f"--out_dir")
    assert sorted(p.name for p in vdir.iterdir()) == before
    # a folder exported before the fingerprints were recorded adopts them, with a note
    settings = json.loads((vdir / "settings.json").read_text())
    del settings["source"]["content"]
    (vdir / "settings.json").write_text(json.dumps(settings))
    adopted = run_export(data, tmp_path / "out", "--max_clips=2")
    assert "recorded no content fingerprints" in adopted.stdout
    assert "content" in json.loads((vdir / "settings.json").read_text())["source"]
    # the frames alone rewritten (the annotations kept): their sizes change the fingerprint
    frame = pod.frame_files(data / "train" / "synth_0001")[3]
    pixels = cv2.imread(str(frame))
    assert pixels is not None
    cv2.imwrite(str(frame), 255 - pixels, [cv2.IMWRITE_JPEG_QUALITY, 60])
    again = run_export(data, tmp_path / "out", "--max_clips=4", check=False)
    assert again.returncode == 2 and "the annotations, frames or masks of synth_0001 in" in again.stderr, again.stderr


def _rewrite_in_place(path: Path, change) -> None:
    """path's bytes changed by change(bytes) -> bytes of the same length, written over the file (its size kept)."""
    data = path.read_bytes()
    new = change(data)
    assert len(new) == len(data) and new != data
    path.write_bytes(new)


def _double_first_quantisation_table(jpeg: bytes) -> bytes:
    """A JPEG whose first quantisation table is doubled, at the same byte count: what bit rot or an in-place
    metadata or colour tool looks like (the decoded pixels change, the file's size does not)."""
    i = jpeg.index(b"\xff\xdb") + 5  # marker, length, precision and table id, then 64 one-byte values
    table = bytes(min(255, 2 * v) for v in jpeg[i:i + 64])
    return jpeg[:i] + table + jpeg[i + 64:]


@pytest.mark.parametrize("what", ["masks regenerated", "a frame rewritten at its size"])
def test_masks_regenerated_or_a_frame_rewritten_at_its_size_are_refused(synth_root, tmp_path, what):
    """The fingerprint listed the annotations and each frame's name and size: masks regenerated under unchanged
    frames (they change the clips: the export drops tracks on segmentation edges), or a frame rewritten in place
    at the same byte count, resumed into the old folder ("written 4, already there 4"), clips of two data sets
    mixed. Masks are listed too, and each file's modification time."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    run_export(root, tmp_path / "out", "--max_clips=2")
    vdir = _version(tmp_path / "out")
    before = sorted(p.name for p in vdir.iterdir())
    scene = root / "train" / "synth_0001"
    if what == "masks regenerated":
        for mask in sorted((scene / "masks").glob("mask_*.png")):
            labels = pod.read_mask(mask)
            cv2.imwrite(str(mask), np.roll(labels, 37, axis=1))
    else:
        frame = pod.frame_files(scene)[5]
        pixels = pod.read_frames([frame])
        _rewrite_in_place(frame, _double_first_quantisation_table)
        assert not np.array_equal(pod.read_frames([frame]), pixels)  # the content changed, its size did not
    again = run_export(root, tmp_path / "out", "--max_clips=4", check=False)
    assert again.returncode == 2, again.stdout
    assert again.stderr.startswith(f"error: {vdir}: the annotations, frames or masks of synth_0001 in "), again.stderr
    assert sorted(p.name for p in vdir.iterdir()) == before


def test_a_folder_of_earlier_fingerprints_is_checked_in_their_form_then_given_the_new_ones(synth_root, tmp_path):
    """A folder an earlier exporter made records fingerprints without masks or times: they are compared in their
    own form (a change they cover is refused), and when they match, the new ones are recorded with a note."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    run_export(root, tmp_path / "out", "--max_clips=2")
    vdir = _version(tmp_path / "out")
    settings = _settings(vdir)
    new = dict(settings["source"]["content"])
    settings["source"]["content"] = {n: pod.legacy_fingerprint(root / "train" / n) for n in new}
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in settings["source"]["content"].values())
    (vdir / "settings.json").write_text(json.dumps(settings))
    res = run_export(root, tmp_path / "out", "--max_clips=3")
    assert (f"note: {vdir / 'settings.json'} recorded content fingerprints of an earlier exporter (annotations and "
            f"frame sizes only), which match {root.resolve() / 'train'}: recorded the new ones") in res.stdout
    assert _settings(vdir)["source"]["content"] == new and "already there 2" in res.stdout
    # an earlier fingerprint that no longer matches: refused, as a changed scene is
    settings["source"]["content"]["synth_0002"] = "0123456789abcdef"
    (vdir / "settings.json").write_text(json.dumps(settings))
    res = run_export(root, tmp_path / "out", "--max_clips=4", check=False)
    assert res.returncode == 2 and "the annotations, frames or masks of synth_0002 in" in res.stderr, res.stderr


def test_a_scene_added_between_runs_is_refused(synth_root, tmp_path):
    """A new scene renumbers the shuffled candidates: it used to duplicate clips under new numbers."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    run_export(root, tmp_path / "out", "--max_clips=2")
    shutil.copytree(root / "train" / "synth_0002", root / "train" / "synth_0003")
    for f in sorted((root / "train" / "synth_0001" / "rgbs").iterdir())[20:]:
        f.unlink()
    res = run_export(root, tmp_path / "out", "--max_clips=4", check=False)
    vdir = _version(tmp_path / "out")
    assert res.returncode == 2 and len(list_clips(vdir)) == 2
    assert res.stderr.strip() == (f"error: {vdir}: the scenes of {root.resolve() / 'train'} changed since its clips "
                                  f"were exported (added synth_0003; frame count changed in synth_0001): clip numbers "
                                  f"would name other clips; give another --out_dir")


def test_a_folder_exported_before_the_source_was_recorded_is_adopted(synth_root, tmp_path):
    import json

    run_export(synth_root, tmp_path, "--max_clips=2")
    vdir = _version(tmp_path)
    settings = _settings(vdir)
    del settings["source"]
    (vdir / "settings.json").write_text(json.dumps(settings))  # as the exporter wrote it before
    res = run_export(synth_root, tmp_path, "--max_clips=3")
    assert (f"note: {vdir / 'settings.json'} recorded no source: recorded {Path(synth_root).resolve()} (3 scenes); "
            f"the clips already there are taken to come from it") in res.stdout
    assert _settings(vdir)["source"]["dataset_location"] == str(Path(synth_root).resolve())
    assert "already there 2" in res.stdout
    from pips2.datasets.clips import read_settings

    assert read_settings(vdir) == ST  # the training reader reads the settings beside the source


# --- scenes whose data is broken, read-only folders -----------------------------------------------------------------

def test_a_scene_with_broken_annotations_is_recorded_once_and_named_in_every_summary(synth_root, tmp_path):
    """valids of another shape than trajs: its clips failed (exit 1) and were tried again on every run; now they
    are rejected with a reason naming the scene, remembered, and a rerun does not build them again."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    anno = root / "train" / "synth_0001" / "anno.npz"
    with np.load(anno) as z:
        arrays = dict(z)
    arrays["valids"] = arrays["valids"][:, :300]
    np.savez(anno, **arrays)
    first = run_export(root, tmp_path / "out", check=False)
    assert first.returncode == 0 and "failed 0" in first.stdout, first.stdout + first.stderr
    # the loader names the disagreement (datasets/pointodyssey.py checks every member's shape)
    m = re.search(r"scene synth_0001 unusable: anno\.npz: member valids has shape \(24, 300\), "
                  r"trajs_2d \(24, 400, 2\): (\d+)", first.stdout)
    assert m, first.stdout
    anno.unlink()  # were its clips built again, they would now be rejected for another reason
    # ...but a changed scene is refused (the content fingerprint): the record is brought to the data's new state
    vdir = _version(tmp_path / "out")
    settings = json.loads((vdir / "settings.json").read_text())
    settings["source"]["content"]["synth_0001"] = pod.content_fingerprint(root / "train" / "synth_0001")
    (vdir / "settings.json").write_text(json.dumps(settings))
    again = run_export(root, tmp_path / "out", check=False)
    assert again.returncode == 0 and m.group(0) in again.stdout and "no anno.npz" not in again.stdout, again.stdout
    vdir = _version(tmp_path / "out")
    assert len(list((vdir / ".rejected").iterdir())) >= int(m.group(1))


def test_data_the_loader_does_not_expect_rejects_the_clip_naming_the_scene(synth_root, tmp_path, monkeypatch):
    """An error the loader does not name (data it does not expect) is the same on every run: the clip is rejected
    and remembered with a reason naming the scene, not failed and tried again."""
    vdir = tmp_path / ST.version()
    vdir.mkdir()
    cand = enumerate_candidates(synth_root, ST)[0]

    def broken(*a, **k):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(export, "build_clip", broken)
    monkeypatch.setattr(export, "_CACHE", None)
    k, status, reason = export.export_one((str(synth_root), str(vdir), ST.to_dict(), 3, asdict(cand)))
    assert (k, status) == (3, "rejected")
    assert reason == f"bad data in scene {cand.scene} (ValueError: operands could not be broadcast together)"
    assert export.rejected_reason(vdir, 3) == reason
    monkeypatch.setattr(export, "build_clip", lambda *a, **k: pytest.fail("built again"))
    assert export.export_one((str(synth_root), str(vdir), ST.to_dict(), 3, asdict(cand))) == (3, "rejected", reason)


@pytest.fixture
def read_only_version(synth_root, tmp_path):
    """A version folder with two clips, then made read-only (a read-only bind mount as root, whom permissions
    do not stop)."""
    out = tmp_path / "out"
    run_export(synth_root, out, "--max_clips=2")
    vdir = _version(out)
    if os.geteuid() != 0:
        vdir.chmod(0o555)
        yield out
        vdir.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(vdir), str(vdir)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(vdir)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield out
    finally:
        subprocess.run(["umount", "-l", str(vdir)], check=False)


def test_a_read_only_version_folder_stops_once_before_any_clip(synth_root, read_only_version):
    res = run_export(synth_root, read_only_version, "--max_clips=6", check=False)
    vdir = _version(read_only_version)
    assert res.returncode == 2, res.stdout + res.stderr
    assert re.fullmatch(rf"error: --out_dir: cannot write {re.escape(str(vdir))} \((Read-only file system|Permission "
                        rf"denied)\)", res.stderr.strip()), res.stderr
    assert "failed" not in res.stdout


def test_writes_refused_mid_run_stop_the_export_once(synth_root, tmp_path, monkeypatch, capsys):
    from pips2.cli import export as export_cli

    vdir = _version(tmp_path)

    def refused(version_dir, k, *a, **kw):
        raise PermissionError(errno.EROFS, "Read-only file system", str(vdir / ".tmp" / f"{k:06d}"))

    monkeypatch.setattr(export, "write_clip", refused)
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, max_clips=6)
    cap = capsys.readouterr()
    assert e.value.code == 1
    failed = [ln for ln in cap.err.splitlines() if " failed: " in ln]
    assert len(failed) == 1 and failed[0].endswith(f"failed: cannot write {vdir} (Read-only file system)")
    assert f"stopped (cannot write {vdir} (Read-only file system)) after 1 of 6 clips" in cap.out


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, on purpose
def test_a_stop_signal_lost_in_a_finalizer_still_stops_the_export(monkeypatch):
    """Python prints and drops an exception raised while it runs a __del__: the signal is remembered, and the
    loop stops at the next clip; a second signal never interrupts the clean-up."""
    from pips2.cli import export as export_cli

    monkeypatch.setattr(export_cli.signal, "signal", lambda *a: None)  # leave pytest's handlers alone

    def plain_raise(signum, exc):  # without utils/procs.raise_stop's redelivery, which would reach pytest itself
        raise exc

    monkeypatch.setattr(export_cli, "raise_stop", plain_raise)
    signals = export_cli._Signals()

    class Finalized:
        def __del__(self):
            signals._handle(signal.SIGTERM, None)

    Finalized()  # the Terminated raised in __del__ is dropped ("Exception ignored in ...")
    assert signals.got == signal.SIGTERM
    with pytest.raises(export_cli.Terminated):
        signals.check()
    signals._handle(signal.SIGINT, None)  # a second signal: no exception
    assert signals.got == signal.SIGTERM


@pytest.mark.parametrize("damage", ["garbage", "cut in half"])
def test_a_damaged_mask_rejects_its_clips_once_naming_the_file(synth_root, tmp_path, damage):
    """Pillow's errors are OSErrors: a mask of garbage bytes or cut in half failed its clips as this machine's
    failure, "rerun to retry them", exit 1 on every run (the truncated one's line named no file). Now its clips are
    rejected once with the file and the problem, and a rerun does not build them again."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    masks = sorted((root / "train" / "synth_0001" / "masks").glob("mask_*.png"))
    for mask in masks:
        mask.write_bytes(b"hello" if damage == "garbage" else mask.read_bytes()[: mask.stat().st_size // 2])
    first = run_export(root, tmp_path / "out", check=False)
    assert first.returncode == 0 and "failed 0" in first.stdout, first.stdout + first.stderr
    assert "unreadable mask (" in first.stdout and str(masks[0].parent) in first.stdout, first.stdout
    again = run_export(root, tmp_path / "out", check=False)
    assert again.returncode == 0 and "failed 0" in again.stdout and "written 0" in again.stdout, again.stdout


def test_a_folder_without_frames_appearing_in_the_split_does_not_block_the_resume(synth_root, tmp_path):
    """An empty `.ipynb_checkpoints` (Jupyter makes one in every folder it browses), a `notes/`, or the export's own
    version folder when --out_dir is the split refused every later run as "scenes changed ... added": a folder
    without frames gives no clip and renumbers none, so it is not a scene of the record."""
    root = tmp_path / "pod"
    shutil.copytree(synth_root / "train", root / "train")
    first = run_export(root, tmp_path / "out", "--max_clips=2", check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "notes").mkdir()
    again = run_export(root, tmp_path / "out", "--max_clips=4", check=False)
    assert again.returncode == 0 and "already there 2" in again.stdout, again.stdout + again.stderr
    inside = run_export(root, root / "train", "--max_clips=2", check=False)  # --out_dir: the split itself
    assert inside.returncode == 0, inside.stdout + inside.stderr
    rerun = run_export(root, root / "train", "--max_clips=3", check=False)
    assert rerun.returncode == 0 and "already there 2" in rerun.stdout, rerun.stdout + rerun.stderr


def test_a_stop_after_the_last_clip_still_prints_the_summary(synth_root, tmp_path, monkeypatch, capsys):
    """A SIGTERM while the workers were reaped or the summary counted the folder's clips (a second per 60,000)
    ended in a traceback, exit 1, without the summary; every clip was already in place."""
    from pips2.cli import export as export_cli

    counted = export_cli.list_clips

    def count_then_stopped(folder):
        os.kill(os.getpid(), signal.SIGTERM)
        return counted(folder)

    monkeypatch.setattr(export_cli, "list_clips", count_then_stopped)
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, max_clips=2)
    cap = capsys.readouterr()
    assert e.value.code == 143, cap.err
    assert "summary: written 2" in cap.out and "Traceback" not in cap.err
    assert cap.err.strip().splitlines()[-1] == "stopped by SIGTERM after the last clip: nothing was left to export"


@contextlib.contextmanager
def _claim_holder(vdir: Path, k: int):
    """Another process holding clip k's claim (an exporter at work) until the block ends, or until killed in it."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from pips2.datasets import export as ex; assert ex.claim(Path({str(vdir)!r}), {k}); print('held', "
            f"flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_claim_of_a_dead_exporter_is_taken_over_even_when_its_pid_lives(tmp_path):
    """An exporter killed mid-clip as a container's pid 1, restarted in the same container (pid 1 again): its claim
    named a live pid, so the clip stayed "held by other exporters" on every rerun, exit 0, its temp folder kept. A
    claim is now held by a lock its owner keeps while it lives; a live holder still keeps its clip."""
    import socket

    from pips2.datasets import export as ex

    vdir = tmp_path / "v"
    (vdir / ".claims").mkdir(parents=True)
    host = socket.gethostname()
    # left by a dead owner whose pid is now this (live) process's
    (vdir / ".claims" / ex.clip_name(3)).write_text(f"{host} {os.getpid()}")
    (vdir / ".tmp" / f"{ex.clip_name(3)}__{host}__{os.getpid()}").mkdir(parents=True)
    (vdir / ".claims" / ex.clip_name(4)).write_text(f"{host} 1")
    assert not ex.claim_held(vdir, 3)
    assert ex.clean_stale_temps(vdir) == 1 and not list((vdir / ".tmp").iterdir())
    assert ex.claim(vdir, 3) and ex.claim_held(vdir, 3)
    ex.release(vdir, 3)
    assert ex.clean_stale_claims(vdir) == 1 and not list((vdir / ".claims").iterdir())
    # a live holder in another process keeps its clip, and its temp folder
    with _claim_holder(vdir, 5) as holder:
        (vdir / ".tmp" / f"{ex.clip_name(5)}__{host}__{holder.pid}").mkdir()
        assert ex.claim_held(vdir, 5) and not ex.claim(vdir, 5)
        assert ex.clean_stale_claims(vdir) == 0 and ex.clean_stale_temps(vdir) == 0
    assert not ex.claim_held(vdir, 5) and ex.claim(vdir, 5)  # its owner gone: taken over
    ex.release(vdir, 5)


def test_every_clip_folder_has_its_manifest_line_whenever_a_writer_dies(tmp_path, monkeypatch):
    """The line was appended after the rename: a worker stopped between the two left a clip the manifest never
    listed, on that run or any rerun."""
    import json as json_

    from pips2.datasets import export as ex
    from pips2.datasets.clips import MANIFEST

    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 96, 3), dtype=np.uint8)
    track = np.zeros((8, 4, 4), np.float32)
    track[..., 2:] = 1
    vdir = tmp_path / "v"
    vdir.mkdir()
    real_rename = os.rename

    def killed(src, dst, after: bool):
        if after:
            real_rename(src, dst)
        raise SystemExit("killed")  # as SIGKILL would leave it: nothing after this line runs

    for k, after in ((7, True), (8, False)):  # killed just after its rename, and just before
        monkeypatch.setattr(ex.os, "rename", functools.partial(killed, after=after))
        with pytest.raises(SystemExit):
            ex.write_clip(vdir, k, frames, track, {"scene": "s"})
    monkeypatch.setattr(ex.os, "rename", real_rename)
    assert ex.is_clip_dir(ex.clip_dir(vdir, 7)) and not ex.clip_dir(vdir, 8).exists()
    assert ex.write_clip(vdir, 8, frames, track, {"scene": "s"})  # the rerun writes the missing one
    lines = [json_.loads(ln) for ln in (vdir / MANIFEST).read_text().splitlines()]
    assert lines == [{"clip": 7, "scene": "s"}] + [{"clip": 8, "scene": "s"}] * 2


def test_a_clip_whose_holder_died_meanwhile_is_no_success(synth_root, tmp_path, monkeypatch, capsys):
    """Another exporter held a clip, then was killed with its workers while this one ran: this one ended "held by
    other exporters 1", exit 0, the clip missing until someone reran."""
    from pips2.cli import export as export_cli
    from pips2.datasets import export as ex

    vdir = _version(tmp_path)
    vdir.mkdir(parents=True, exist_ok=True)
    with _claim_holder(vdir, 0) as holder:
        counted = export_cli.list_clips

        def holder_killed_meanwhile(folder):
            holder.kill()
            holder.wait()
            return counted(folder)

        monkeypatch.setattr(export_cli, "list_clips", holder_killed_meanwhile)
        with pytest.raises(SystemExit) as e:
            export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32,
                            crop_size=(128, 192), quiet=True, max_clips=2)
    cap = capsys.readouterr()
    assert e.value.code == 1 and "held by other exporters 1" in cap.out
    assert cap.err.strip().splitlines()[-1] == (
        "error: 1 clip(s) held by another exporter are not written and no process holds them now (its exporter "
        "stopped); rerun to export them")
    assert not ex.claim_held(vdir, 0)


def test_claims_where_locks_cannot_tell_and_rejected_clips(tmp_path, monkeypatch):
    """Without working locks a dead writer's claim read as "held" forever; a clip a peer rejected (no folder, no
    claim) read as abandoned by a stopped exporter, failing a correct export."""
    import socket

    from pips2.datasets import export as ex
    from pips2.utils import procs

    vdir = tmp_path / "v"
    (vdir / ".claims").mkdir(parents=True)
    ex.mark_rejected(vdir, 9, "too few tracks")
    assert not ex.claim_abandoned(vdir, 9)
    assert ex.claim_abandoned(vdir, 8)  # neither written, rejected nor held
    monkeypatch.setattr(procs, "fcntl", None)  # a system (or file system) without flock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (vdir / ".claims" / ex.clip_name(3)).write_text(f"{socket.gethostname()} {dead}")
    (vdir / ".claims" / ex.clip_name(4)).write_text(f"{socket.gethostname()} {os.getppid()}")  # alive
    assert not ex.claim_held(vdir, 3) and ex.claim_held(vdir, 4)  # the pids decide
    assert ex.claim(vdir, 3) and not ex.claim(vdir, 4)
    ex.release(vdir, 3)
    folder = procs.owned_tempdir("pips2_t", tmp_path)
    assert not (folder / procs.OWNER_LOCK).exists()  # no lock file that would read as held forever
    procs.remove_owned(folder)


def test_a_reader_gone_at_the_first_progress_line_stops_with_the_summary(synth_root, tmp_path, monkeypatch,
                                                                         capsys):
    """`export_mp4_dataset.py 2>&1 | head -1`: the stop came from the progress bar's first write, made before the
    code that takes stops, and ended in a traceback, exit 1."""
    from pips2.cli import export as export_cli

    real = export_cli.tqdm

    def bar_whose_reader_is_gone(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGPIPE, None)  # what the output guard does on a broken pipe
        return real(*args, **kwargs)

    monkeypatch.setattr(export_cli, "tqdm", bar_whose_reader_is_gone)
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, max_clips=2)
    cap = capsys.readouterr()
    assert e.value.code == 141 and "stopped (terminated by SIGPIPE) after 0 of 2 clips" in cap.out, cap


def test_a_forked_child_does_not_keep_its_parents_claims_and_folders_alive(tmp_path):
    """A child forked without exec (a data-loader worker) inherited the lock descriptors of its parent's claims and
    owned temp folders: a lock lasts while any descriptor of it is open, so a child that outlived its dead parent
    kept them looking alive. The child now closes them at the fork."""
    code = f"""if True:
        import os, sys, time
        from pathlib import Path
        from pips2.datasets import export as ex
        from pips2.utils import procs
        vdir = Path({str(tmp_path / 'v')!r})
        (vdir / ".claims").mkdir(parents=True)
        assert ex.claim(vdir, 5)
        folder = procs.owned_tempdir("pips2_t", {str(tmp_path)!r})
        child = os.fork()
        if child == 0:  # the child outlives the parent
            os.close(1)
            time.sleep(60)
            os._exit(0)
        print(folder, child, flush=True)
        os._exit(0)  # the parent dies (no cleanup, as under SIGKILL)
    """
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder, child = proc.communicate(timeout=60)[0].split()
    from pips2.datasets import export as ex
    from pips2.utils import procs

    try:
        state, fd = procs.probe_lock(Path(folder) / procs.OWNER_LOCK)
        if fd is not None:
            os.close(fd)
        assert state == "free"
        assert not ex.claim_held(tmp_path / "v", 5)
    finally:
        os.kill(int(child), signal.SIGKILL)


def test_a_planted_fifo_or_link_as_a_lock_file_neither_hangs_nor_is_followed(tmp_path):
    """Anyone who can write to a shared TMPDIR planted a folder named like a dead process's temp folder with a FIFO
    as its `.owner`: opening it for reading waited for a writer for ever, and every later demo.py and app.py hung at
    start. A claim file that is a FIFO hung the export the same way. Such files are now opened without blocking or
    following links, and judged not ours: the folder is left, the clip taken as held."""
    code = f"""if True:
        import os, socket
        from pathlib import Path
        from pips2.datasets import export as ex
        from pips2.utils import procs
        tmp = Path({str(tmp_path)!r})
        dead = tmp / f"pips2_t.{{socket.gethostname()}}.999999999.{{procs.pid_namespace()}}.abc"
        linked = tmp / f"pips2_t.{{socket.gethostname()}}.999999998.{{procs.pid_namespace()}}.abc"
        for d in (dead, linked):
            d.mkdir()
        os.mkfifo(dead / procs.OWNER_LOCK)
        (linked / procs.OWNER_LOCK).symlink_to("/dev/zero")
        assert procs.probe_lock(dead / procs.OWNER_LOCK) == ("foreign", None)
        assert procs.probe_lock(linked / procs.OWNER_LOCK) == ("foreign", None)
        assert procs.remove_stale_tempdirs("pips2_t", tmp) == [] and dead.is_dir() and linked.is_dir()
        vdir = tmp / "v"
        (vdir / ".claims").mkdir(parents=True)
        os.mkfifo(vdir / ".claims" / ex.clip_name(2))
        assert ex.claim_held(vdir, 2) and not ex.claim(vdir, 2)
        assert ex.claim_unjudged(vdir, 2).startswith("a claim file that is not a regular file")  # said at the end
        assert ex._claim_owner(vdir / ".claims" / ex.clip_name(2))[0] == ""
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_without_file_locks_a_dead_claimer_of_another_namespace_is_never_silent(tmp_path, monkeypatch):
    """On a file system without flock (NFS mounted nolock) a claim names a pid. An exporter killed in a container
    and restarted there (pid 1 again, or a new PID namespace) found its dead claim "held" on every rerun, which
    ended exit 0 with the clip missing. A claim naming this very process, which does not hold it, is now a dead
    predecessor's; one of another namespace, young, is reported at the end (exit 1), old, taken over."""
    import socket
    import time

    from pips2.datasets import export as ex
    from pips2.utils import procs

    monkeypatch.setattr(procs, "fcntl", None)  # no flock here
    vdir = tmp_path / "v"
    (vdir / ".claims").mkdir(parents=True)
    host, ns = socket.gethostname(), procs.pid_namespace()
    own = vdir / ".claims" / ex.clip_name(1)
    own.write_text(f"{host} {os.getpid()} {ns}")  # this pid, a predecessor's claim: not held by this process
    assert not ex.claim_held(vdir, 1) and not ex.claim_unjudged(vdir, 1) and ex.claim_abandoned(vdir, 1)
    assert ex.claim(vdir, 1)
    ex.release(vdir, 1)
    other = vdir / ".claims" / ex.clip_name(2)
    other.write_text(f"{host} 1 {ns + 1}")  # pid 1 of another namespace: alive or not, nothing here can tell
    assert ex.claim_held(vdir, 2) and ex.claim_unjudged(vdir, 2) and not ex.claim(vdir, 2)
    old = time.time() - ex.STALE_CLAIM_S - 60
    os.utime(other, (old, old))
    assert not ex.claim_held(vdir, 2) and ex.claim(vdir, 2)  # older than any clip takes to export
    ex.release(vdir, 2)
    legacy = vdir / ".claims" / ex.clip_name(3)
    legacy.write_text(f"{host} {os.getppid()}")  # an earlier version's claim: its pid, alive, decides
    assert ex.claim_held(vdir, 3) and not ex.claim(vdir, 3) and not ex.claim_unjudged(vdir, 3)
    legacy.write_text(f"{host} {os.getppid()} {ns}")  # a live exporter of this namespace: its clip comes, no error
    assert ex.claim_held(vdir, 3) and not ex.claim_unjudged(vdir, 3)
    # another host's claim dated two days ahead (its clock, or an NFS server's): its age is unknown, so the clip
    # is reported at the end rather than skipped for two days without a word
    ahead = vdir / ".claims" / ex.clip_name(4)
    ahead.write_text("node7 4242 1")
    future = time.time() + 2 * 86400
    os.utime(ahead, (future, future))
    assert not ex.claim(vdir, 4)
    assert ex.claim_unjudged(vdir, 4) == "a claim of node7 dated 48.0 h ahead of this clock"


def test_a_manifest_line_cut_short_by_a_full_disk_is_taken_back_and_fails_the_clip(tmp_path, monkeypatch):
    """On a full disk one write of a manifest line can land only in part: the half line stayed without a word, the
    clip was renamed into place, and the next line appended was glued to it (manifest.jsonl no longer JSON Lines).
    The half line is now taken back and the clip fails with the full disk."""
    import errno

    from pips2.datasets import clips

    clips.append_manifest(tmp_path, 1, {"scene": "a"})
    before = (tmp_path / clips.MANIFEST).read_bytes()
    real = os.write

    def half(fd, data):
        return real(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(clips.os, "write", half)
    with pytest.raises(OSError) as e:
        clips.append_manifest(tmp_path, 2, {"scene": "b"})
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / clips.MANIFEST).read_bytes() == before


def test_out_of_file_descriptors_is_one_line_naming_the_limit(synth_root, tmp_path, monkeypatch, capsys):
    """Under `ulimit -n 13` the export's workers could not get their pipes: a 30-line traceback from os.pipe().
    Now the summary, then one line naming this process's limit, exit 1; nothing half-written is left."""
    import errno

    from pips2.cli import export as export_cli
    from pips2.utils import procs

    def no_descriptors(self, *args, **kwargs):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(procs.WorkerPool, "run", no_descriptors)
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, max_clips=2, workers=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: too many open files: this process may open "), err
    assert "Traceback" not in "\n".join(err)


def test_a_rejection_record_is_written_and_read_where_no_planted_link_can_redirect_it(tmp_path):
    """A rejected clip's record went through `.rejected/.<k>.<pid>`, a predictable name written following links:
    in a group-shared export folder a member made the exporter write the reason over any file it could write, and
    the link was renamed into place, its target read back as a reason. The record now gets a random name created
    exclusively, and a link in its place is never read."""
    from pips2.datasets import export as ex

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    vdir = tmp_path / "v"
    rdir = vdir / ".rejected"
    rdir.mkdir(parents=True)
    for pid in range(os.getpid(), os.getpid() + 20):
        (rdir / f".7.{pid}").symlink_to(victim)
    ex.mark_rejected(vdir, 7, "too few tracks")
    assert victim.read_text() == "the user's" and ex.rejected_reason(vdir, 7) == "too few tracks"
    (rdir / ex.clip_name(8)).symlink_to(victim)  # planted as a record: not read, not taken as a rejection
    assert ex.rejected_reason(vdir, 8) is None


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_a_link_or_fifo_at_the_manifests_name_is_never_written_through(synth_root, tmp_path, planted):
    """manifest.jsonl was opened following links and blocking: a link planted there in a shared export folder
    made every export append its lines (scene names verbatim) to any file the user could write (a ~/.bashrc),
    and a FIFO hung the exporter at its first clip. Both are now refused: before any clip, in one line, and at
    each append."""
    vdir = _version(tmp_path)
    vdir.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    manifest = vdir / "manifest.jsonl"
    if planted == "link":
        manifest.symlink_to(victim)
    else:
        os.mkfifo(manifest)
    res = run_export(synth_root, tmp_path, "--max_iters=2", check=False, timeout=120)
    what = "a symlink" if planted == "link" else "not a regular file"
    assert res.returncode == 2 and not list_clips(vdir)
    assert res.stderr.strip() == (f"error: --out_dir: {manifest} is {what}, where the export keeps its manifest of "
                                  "clips; remove it"), res.stderr
    assert victim.read_text() == "keep me\n"
    with pytest.raises(OSError, match=what):  # planted after that check: the clip fails, nothing written through
        append_manifest(vdir, 0, {"scene": "s"})
    assert victim.read_text() == "keep me\n"


def test_a_clip_is_written_in_a_private_folder_and_verified_as_regular_files(tmp_path, monkeypatch):
    """Each clip's temp folder had a predictable name and the umask's mode: in a group-writable export folder
    another user could plant links at rgb.mp4 and track.npz, which ffmpeg and numpy wrote through, and the
    clips were verified through them and renamed into place. Now the folder is this user's own (0700, a random
    name, in a 0700 .tmp/), the clip's files must be regular files, and the clip gets the umask's mode once in
    place."""
    seen, renamed = [], []
    real_write, real_rename = export.write_mp4, os.rename

    def spy(path, *a, **k):
        folder = Path(path).parent
        seen.append((folder.name, stat_mode(folder), stat_mode(folder.parent)))
        return real_write(path, *a, **k)

    def rename_spy(src, dst):  # the mode a reader of the clip's name finds from its first instant
        renamed.append(stat_mode(Path(src)))
        return real_rename(src, dst)

    monkeypatch.setattr(export, "write_mp4", spy)
    monkeypatch.setattr(export.os, "rename", rename_spy)
    if Path("/proc/self/status").is_file():  # where Linux shows it
        monkeypatch.setattr(export.os, "umask", lambda *a: pytest.fail("the umask is read, never set for an instant"))
    assert export.write_clip(tmp_path, 3, *_clip(), meta={})
    assert export.write_clip(tmp_path, 4, *_clip(), meta={})
    (name3, mode3, parent3), (name4, _, _) = seen
    assert mode3 == parent3 == 0o700
    random3, random4 = name3.split("__", 3)[3], name4.split("__", 3)[3]
    assert name3.startswith("000003__") and random3 and random3 != random4
    monkeypatch.undo()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat_mode(tmp_path / "000003") == 0o777 & ~mask and renamed == [0o777 & ~mask] * 2
    clip = tmp_path / "000004"
    (clip / "track.npz").rename(tmp_path / "elsewhere.npz")
    (clip / "track.npz").symlink_to(tmp_path / "elsewhere.npz")
    with pytest.raises(VideoError, match="not a regular file"):
        verify_clip(clip, 8, 32, (128, 192))


_REPLACED_AFTER_RENAME = """
import os, runpy, sys
real, target = os.rename, sys.argv.pop()

def rename(src, dst, *a, **k):  # a group member moves each clip aside as it arrives and leaves a link in its place
    real(src, dst, *a, **k)
    if os.path.basename(str(dst)).isdigit():
        real(dst, str(dst) + ".aside")
        os.symlink(target, dst)

os.rename = rename
runpy.run_path("export_mp4_dataset.py", run_name="__main__")
"""


def test_a_clip_replaced_by_a_link_after_its_rename_changes_nothing_it_points_at(synth_root, tmp_path):
    """The clip's mode was set by name after its rename: a group member who replaced the clip by a link to a file of
    the exporting user's at that moment got that file made group-writable (with umask 002). The mode is now set
    before the rename, and clips found replaced at the end are an error, not 'written 2', exit 0."""
    victim = tmp_path / "secret"
    victim.write_text("keep me\n")
    victim.chmod(0o600)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", _REPLACED_AFTER_RENAME, f"--dataset_location={synth_root}",
                          "--dset=train", f"--out_dir={out}", *EXPORT_ARGS, "--workers=1", "--max_iters=2",
                          str(victim)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert stat_mode(victim) == 0o600 and victim.read_text() == "keep me\n"
    vdir = _version(out)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: 2 clip(s) this run wrote are no longer clips ({vdir / '000000'} is a link now): something "
        f"else changed {vdir} meanwhile; rerun to write them"), res.stderr
    assert "written 2" in res.stdout and "; 0 clips in" in res.stdout


def test_tmp_swapped_for_a_link_while_its_mode_is_fixed_changes_nothing_it_points_at(tmp_path, monkeypatch):
    """An earlier version's .tmp/ (the umask's mode) is made 0700: by name, a link put in its place between the
    check and the chmod gave the mode to the folder it points at. Now through a descriptor of the folder checked,
    and a folder swapped meanwhile is not taken."""
    vdir, victim = tmp_path / "v", tmp_path / "victim"
    vdir.mkdir()
    victim.mkdir(mode=0o755)
    (vdir / ".tmp").mkdir(mode=0o755)
    real = os.lstat

    def lstat_then_swap(path, *a, **k):
        st = real(path, *a, **k)
        if Path(path) == vdir / ".tmp" and not Path(path).is_symlink():
            (vdir / ".tmp").rename(vdir / ".tmp-aside")
            (vdir / ".tmp").symlink_to(victim)
        return st

    monkeypatch.setattr(export.os, "lstat", lstat_then_swap)
    got = export.private_tmp(vdir)
    monkeypatch.undo()
    assert stat_mode(victim) == 0o755
    assert got == vdir / f".tmp.{os.geteuid()}" and stat_mode(got) == 0o700


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_claims_and_rejections_swapped_for_links_mid_run_touch_nothing_elsewhere(tmp_path):
    """The claims folder was checked once, at the start; each claim was then made, taken over and removed by name
    through `.claims`: a group member who swapped it for a link to a folder of the user's 0.5 s into the export had
    the user's files named like clips overwritten as claims and deleted. Claims (and rejection records) now go
    through the folder as first found, and a file at a claim's name that holds no claim is never taken over."""
    vdir, victim = tmp_path / "v", tmp_path / "victim"
    vdir.mkdir()
    victim.mkdir()
    for name in ("000001", "000002", "000003"):
        (victim / name).write_text(f"the user's {name}\n")
    assert export.claim(vdir, 0)
    export.mark_rejected(vdir, 9, "first")
    for folder in (".claims", ".rejected"):
        (vdir / folder).rename(vdir / f"{folder}-aside")
        (vdir / folder).symlink_to(victim)
    assert export.claim(vdir, 1)
    export.release(vdir, 1)
    export.release(vdir, 0)
    export.mark_rejected(vdir, 2, "no valid tracks")
    assert export.rejected_reason(vdir, 2) == "no valid tracks"
    assert (vdir / ".rejected-aside" / "000002").read_text() == "no valid tracks"
    assert sorted(p.read_text() for p in victim.iterdir()) == [f"the user's 00000{i}\n" for i in (1, 2, 3)]
    assert not list((vdir / ".claims-aside").iterdir())

    # a file holding something no exporter writes, at a claim's name: never taken over, and said at the end
    other = tmp_path / "w"
    (other / ".claims").mkdir(parents=True)
    (other / ".claims" / "000003").write_text("the user's notes\n")
    assert not export.claim(other, 3)
    assert (other / ".claims" / "000003").read_text() == "the user's notes\n"
    assert export.claim_unjudged(other, 3) == "a claim file that holds no claim (not written by an exporter)"
    # a folder there: before, IsADirectoryError for the clip on every run
    (other / ".claims" / "000004").mkdir()
    assert not export.claim(other, 4)
    assert (export.claim_unjudged(other, 4) or "").startswith("a claim file that is not a regular file (a folder")


def test_a_host_name_with_white_space_makes_claims_this_host_can_judge(tmp_path, monkeypatch):
    """A claim is "host pid namespace": a host name with a space made this host's own leftover claims unreadable,
    judged "not written by an exporter", never taken over: every rerun ended in an error."""
    monkeypatch.setattr(export.socket, "gethostname", lambda: "lab pc")
    vdir = tmp_path / "v"
    vdir.mkdir()
    assert export.claim(vdir, 1)
    claim = vdir / ".claims" / "000001"
    assert claim.read_text().split()[0] == "lab_pc"
    os.close(export._HELD.pop(next(p for p in export._HELD if p.name == "000001")))  # as if its process had died
    assert export.claim_unjudged(vdir, 1) is None and export.claim(vdir, 1)
    export.release(vdir, 1)


def test_a_version_folder_moved_during_the_export_stops_it_in_one_line(synth_root, tmp_path, monkeypatch, capsys):
    """Renamed or removed mid-run (a user tidying up, a group member in a shared folder), the version folder made
    every later clip fail, each in its own line (25 lines for 25 clips), then "rerun to retry them". The export
    now stops at the first such failure in one line saying what happened."""
    from pips2.cli import export as export_cli

    vdir = _version(tmp_path)
    real, n = export.write_clip, []

    def then_moved(version_dir, k, *a, **kw):
        out = real(version_dir, k, *a, **kw)
        n.append(k)
        if len(n) == 2:
            vdir.rename(vdir.with_name(vdir.name + ".kept"))
        return out

    monkeypatch.setattr(export, "write_clip", then_moved)
    with pytest.raises(SystemExit) as e:
        export_cli.main(dataset_location=str(synth_root), out_dir=str(tmp_path), S=8, N=32, crop_size=(128, 192),
                        quiet=True, max_clips=8)
    cap = capsys.readouterr()
    assert e.value.code == 1
    err = cap.err.strip().splitlines()
    assert len([ln for ln in err if " failed: " in ln]) == 1, cap.err
    assert err[-1] == (f"error: {vdir} was moved or removed during the export; the clips written before are where it "
                       f"went, and the same command writes the others")
    assert "after 3 of 8 clips" in cap.out
    assert len(list(vdir.with_name(vdir.name + ".kept").glob("0000*"))) == 2
