"""Bad input in training: bad checkpoints, stale temps, the run lock, a full disk, corrupt clips, missing data."""

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import on_each_step

from pips2 import trainer
from pips2.cli import train
from pips2.datasets.export import list_clips
from pips2.utils import checkpoint as ck
from pips2.utils.procs import STOP_SIGNALS, guarded_output, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(B=1, S=6, N=8, crop_size="128,192", iters=2, workers=0, log_freq=1, device="cpu")


def _version(out) -> str:
    return next(p.name for p in Path(out).iterdir() if (p / "settings.json").is_file())


def _cfg(out, tmp, **kw) -> train.Config:
    return train.make_config(1, {"dataset_location": str(out), "dataset_version": _version(out),
                                 "log_dir": str(tmp / "logs"), "ckpt_dir": str(tmp / "ck"), **TINY, **kw})


def _run_cli(out, tmp, *args, dataset_location=None):
    version = [] if dataset_location else [f"--dataset_version={_version(out)}"]  # a later flag overrides it
    cmd = [sys.executable, str(ROOT / "train.py"), f"--dataset_location={dataset_location or out}", *version,
           f"--log_dir={tmp / 'logs'}", f"--ckpt_dir={tmp / 'ck'}", *(f"--{k}={v}" for k, v in TINY.items()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- checkpoints -------------------------------------------------------------------------------------------

def test_truncated_latest_checkpoint_falls_back_to_the_previous(exported, tmp_path, capsys):
    out, _ = exported
    train.run_stage(_cfg(out, tmp_path, max_steps=2, save_freq=1))
    ckdir = next((tmp_path / "ck").iterdir())
    latest = ckdir / ck.ckpt_name(2)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capsys.readouterr()
    train.run_stage(_cfg(out, tmp_path, max_steps=3, save_freq=1))
    cap = capsys.readouterr()
    warn = [ln for ln in cap.err.splitlines() if "unreadable" in ln]
    assert len(warn) == 1 and warn[0].startswith(f"{latest}: unreadable (")
    assert warn[0].endswith(f"resuming from {ckdir / ck.ckpt_name(1)} (kept it as {latest.name}.bad)")
    assert "resuming at step 1" in cap.out
    assert (ckdir / f"{latest.name}.bad").is_file()  # kept for inspection, never picked again
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [1, 2, 3]
    assert "step 000002/3" in cap.out and "step 000001/3" not in cap.out


def test_no_readable_checkpoint_is_one_line_exit_2(exported, tmp_path, capsys):
    out, _ = exported
    ckdir = tmp_path / "ck" / _cfg(out, tmp_path).name()
    ckdir.mkdir(parents=True)
    for s in (1, 2):
        (ckdir / ck.ckpt_name(s)).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=3))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {ckdir}: no readable checkpoint to resume from (2 unreadable, kept as *.bad)"
    assert len([ln for ln in err if ln.startswith("error:")]) == 1
    assert not (ckdir / ck.LOCK_NAME).exists()


def test_unreadable_init_dir_file_is_one_line_exit_2(exported, tmp_path):
    out, _ = exported
    bad = tmp_path / "init.pth"
    bad.write_bytes(b"not a checkpoint")
    res = _run_cli(out, tmp_path, "--max_steps=1", f"--init_dir={bad}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and str(bad) in res.stderr
    assert res.stderr.startswith("error: ") and "init.pth: not a checkpoint" in res.stderr


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".model-000000002.pth.{host}.{_dead_pid()}.abc12345.tmp"
    live = tmp_path / f".model-000000003.pth.{host}.{os.getpid()}.abc12345.tmp"
    foreign = tmp_path / f".model-000000004.pth.other-host.example.{_dead_pid()}.abc12345.tmp"
    old_legacy, new_legacy = tmp_path / ".model-000000005.pth.abc12345.tmp", tmp_path / ".model-000000006.pth.x1.tmp"
    for p in (dead, live, foreign, old_legacy, new_legacy):
        p.write_bytes(b"partial")
    os.utime(old_legacy, (1, 1))
    assert sorted(ck.clean_stale_temps(tmp_path)) == sorted([dead, old_legacy])
    assert live.exists() and foreign.exists() and new_legacy.exists()
    # a run holding the folder's lock, about to train: only it writes there, so every temp is stale (another
    # node's after a requeue, or its own pid's after a container restart, were kept for good)
    assert sorted(ck.clean_stale_temps(tmp_path, lock_held=True)) == sorted([live, foreign])
    assert new_legacy.exists()


def test_save_temp_names_the_writer(tmp_path, monkeypatch):
    seen = []

    def spy(obj, f):
        seen.extend(p.name for p in tmp_path.iterdir())
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(torch, "save", spy)
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path, 7, torch.nn.Linear(1, 1))
    assert len(seen) == 1 and not list(tmp_path.iterdir())  # and removed after the kill
    m = ck.TEMP_RE.match(seen[0])
    assert m and m.group("host") == socket.gethostname() and int(m.group("pid")) == os.getpid()


def test_training_start_removes_a_killed_save_temp(exported, tmp_path, capsys):
    out, _ = exported
    ckdir = tmp_path / "ck" / _cfg(out, tmp_path).name()
    ckdir.mkdir(parents=True)
    temp = ckdir / f".model-000000001.pth.{socket.gethostname()}.{_dead_pid()}.zz9zz9zz.tmp"
    temp.write_bytes(b"\0" * 1000)
    train.run_stage(_cfg(out, tmp_path, max_steps=1))
    assert not temp.exists() and f"removed {temp}" in capsys.readouterr().out
    assert sorted(p.name for p in ckdir.iterdir()) == [ck.ckpt_name(1)]  # lock released too


# --- the run lock ------------------------------------------------------------------------------------------

def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    with ck.RunLock(tmp_path) as lock:
        assert (tmp_path / ck.LOCK_NAME).is_file()
        with pytest.raises(ck.LockError, match=rf"{tmp_path}: another training \(pid {os.getpid()} on "):
            ck.RunLock(tmp_path).acquire()
        assert lock.held
    assert not (tmp_path / ck.LOCK_NAME).exists()
    (tmp_path / ck.LOCK_NAME).write_text(f'{{"host": "{socket.gethostname()}", "pid": {_dead_pid()}}}')
    lock = ck.RunLock(tmp_path).acquire()
    assert f'"pid": {os.getpid()}' in (tmp_path / ck.LOCK_NAME).read_text()
    lock.release()
    assert sorted(tmp_path.iterdir()) == []


def test_a_lock_that_cannot_be_removed_is_left_without_a_traceback(tmp_path, monkeypatch):
    """The checkpoint folder turned read-only mid-run (remounted after an I/O error): the trainer's one line
    `cannot save ...: Read-only file system` was followed by a traceback from the lock's removal, exit 1 instead
    of 2. The lock is now left (the next run takes a dead process's lock over) without a word."""
    import errno
    from pathlib import Path

    lock = ck.RunLock(tmp_path).acquire()
    real = Path.unlink

    def read_only(self, missing_ok=False):
        if self.name == ck.LOCK_NAME:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    lock.release()
    assert not lock.held and (tmp_path / ck.LOCK_NAME).is_file()
    monkeypatch.undo()
    ck.RunLock(tmp_path).acquire().release()  # taken over: its process is this one, which holds no lock now
    assert not (tmp_path / ck.LOCK_NAME).exists()


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    """A container restarted after SIGKILL or the OOM killer runs the training as pid 1 again, with the same
    hostname: the lock {host, pid 1} looked alive (it is the caller itself) and every restart failed with
    exit 2. A pid reused by another process looked alive as well."""
    host = socket.gethostname()
    lock_file = tmp_path / ck.LOCK_NAME
    for owner in ({"host": host, "pid": os.getpid()},  # this process's pid, but this process holds no lock
                  {"host": host, "pid": 1, "start": 0}):  # a live pid that started at another time
        lock_file.write_text(json.dumps(owner))
        lock = ck.RunLock(tmp_path).acquire()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        lock.release()
    lock_file.write_text(json.dumps({"host": host, "pid": 1}))  # alive, start unknown: kept, with the way out
    with pytest.raises(ck.LockError, match=r"another training \(pid 1 on .*; if none does, remove that file\)"):
        ck.RunLock(tmp_path).acquire()


def test_a_lock_of_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """A training in a container that shares the host's name (another PID namespace): its pid means another
    process, or none, here, and a run on the host took its live lock over. The owner now touches the lock every
    LOCK_BEAT_S; a lock of another namespace is taken over only after LOCK_SILENT_S without a touch."""
    import time

    from pips2.utils.procs import pid_namespace

    lock_file = tmp_path / ck.LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "ns": pid_namespace() + 1}))
    with pytest.raises(ck.LockError, match=r"in another PID namespace: its last heartbeat was \d+ s ago; the lock is "
                                           r"taken over after 5 minutes without one\) writes checkpoints here"):
        ck.RunLock(tmp_path).acquire()
    old = time.time() - ck.LOCK_SILENT_S - 10
    os.utime(lock_file, (old, old))
    monkeypatch.setattr(ck, "LOCK_BEAT_S", 0.05)
    lock = ck.RunLock(tmp_path).acquire()  # silent for longer than LOCK_SILENT_S: taken over
    os.utime(lock_file, (old, old))
    time.sleep(0.5)
    assert time.time() - lock_file.stat().st_mtime < 5  # the holder's heartbeat
    lock.release()
    assert not lock_file.exists()


def test_a_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """A training restarted under another host name (docker's container id, a Kubernetes pod's suffix, a SLURM
    requeue onto another node) never took over its dead predecessor's lock, and the refusal promised a takeover
    after 5 minutes that never came. Another host's lock with a heartbeat is now stale after
    LOCK_FOREIGN_SILENT_S without one; one from before heartbeats is kept, and the line says why."""
    import time

    monkeypatch.setattr(ck, "LOCK_BEAT_S", 0.1)  # a silent lock is watched for 1.5 beats before it is taken over
    lock_file = tmp_path / ck.LOCK_NAME
    lock_file.write_text(json.dumps({"host": "podA-x1", "pid": 1, "start": 5, "ns": 7, "beat": 60.0}))
    with pytest.raises(ck.LockError, match=r"another training \(pid 1 on podA-x1: its last "
                                           r"heartbeat was \d+ s ago; the lock is taken over after 15 minutes without "
                                           r"one\)"):
        ck.RunLock(tmp_path).acquire()
    old = time.time() - ck.LOCK_SILENT_S - 10  # silent long enough for another namespace, not another host
    os.utime(lock_file, (old, old))
    with pytest.raises(ck.LockError):
        ck.RunLock(tmp_path).acquire()
    old = time.time() - ck.LOCK_FOREIGN_SILENT_S - 10
    os.utime(lock_file, (old, old))
    lock = ck.RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    lock.release()
    lock_file.write_text(json.dumps({"host": "podA-x1", "pid": 1}))  # no heartbeat: silence proves nothing
    os.utime(lock_file, (old, old))
    with pytest.raises(ck.LockError, match=r"\(pid 1 on podA-x1, another host, by a version without a heartbeat: "
                                           r"this machine cannot tell if it runs\)"):
        ck.RunLock(tmp_path).acquire()


def test_a_live_lock_that_looks_silent_by_a_skewed_clock_is_not_taken_over(tmp_path, monkeypatch):
    """Without file locks a lock of another PID namespace or host is judged by its heartbeat's age, this clock
    against the file's stamp: a clock ahead by more than the silence (a VM resumed from suspend) took over a live
    run's lock, and two runs trained into one folder. A lock that looks silent is now watched for 1.5 beats by this
    process's own clock: touched meanwhile, it is alive."""
    import threading
    import time

    monkeypatch.setattr(ck, "LOCK_BEAT_S", 0.4)
    lock_file = tmp_path / ck.LOCK_NAME
    lock_file.write_text(json.dumps({"host": "podA-x1", "pid": 1, "start": 5, "ns": 7, "beat": 0.4}))
    stamp = time.time() - ck.LOCK_FOREIGN_SILENT_S - 400  # what the skewed reader sees
    os.utime(lock_file, (stamp, stamp))
    stop = threading.Event()

    def beating():  # the live owner's heartbeat, stamped by the same skewed server clock
        while not stop.wait(0.2):
            os.utime(lock_file, (stamp + time.time() % 1, stamp + time.time() % 1))

    owner = threading.Thread(target=beating)
    owner.start()
    try:
        with pytest.raises(ck.LockError, match="another training"):
            ck.RunLock(tmp_path).acquire()
    finally:
        stop.set()
        owner.join()
    assert json.loads(lock_file.read_text())["host"] == "podA-x1"  # left to its owner
    lock = ck.RunLock(tmp_path).acquire()  # silent for real now: taken over
    lock.release()


@pytest.mark.parametrize("pid", ['"abc"', "1.5e30", "[1]", "0", "-5", "true"])
def test_a_lock_whose_pid_is_not_a_pid_is_unreadable(tmp_path, pid):
    """A lock naming a pid that is not a positive whole number ended train.py in a traceback (int("abc") in the
    liveness check), or (0, -5) was taken over at once: it is not what this program writes, so it is refused as
    unreadable, in one line, until it has been left unchanged for LOCK_FOREIGN_SILENT_S."""
    import time

    lock_file = tmp_path / ck.LOCK_NAME
    lock_file.write_text(f'{{"host": "{socket.gethostname()}", "pid": {pid}}}')
    with pytest.raises(ck.LockError, match=r"lock file \.train\.lock is unreadable; it is taken over once unchanged "
                                           r"for 15 minutes; remove it now if no training writes into this folder"):
        ck.RunLock(tmp_path).acquire()
    old = time.time() - ck.LOCK_FOREIGN_SILENT_S - 10
    os.utime(lock_file, (old, old))
    lock = ck.RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse", "deep_json", "folder", "future"])
def test_a_lock_file_that_is_no_lock_is_unreadable_at_once(tmp_path, kind):
    """A FIFO as .train.lock blocked train.py forever; a link to /dev/zero or a 3 GB sparse file was read whole;
    JSON nested 200,000 deep ended in a RecursionError traceback. Each is now an unreadable lock, at once (a folder,
    or one dated in the future, said as such)."""
    import threading
    import time

    lock_file = tmp_path / ck.LOCK_NAME
    if kind == "fifo":
        os.mkfifo(lock_file)
    elif kind == "dev_zero":
        lock_file.symlink_to("/dev/zero")
    elif kind == "sparse":
        with open(lock_file, "wb") as f:
            f.truncate(3 << 30)
    elif kind == "deep_json":
        lock_file.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "folder":  # an old one: before, moved aside, then its unlink failed ("Is a directory")
        lock_file.mkdir()
        os.utime(lock_file, (1, 1))
    else:  # unreadable and dated a year ahead: "taken over once unchanged for 15 minutes" was not true
        lock_file.write_text("")
        os.utime(lock_file, (time.time() + 3e7, time.time() + 3e7))
    got: list = []
    t = threading.Thread(target=lambda: got.append(_refusal(tmp_path)), daemon=True)
    t.start()
    t.join(20)
    said = {"folder": ".train.lock is a folder, not a lock file; remove it",
            "future": "is unreadable and dated 30000000 s in the future (the clocks disagree)"}.get(
        kind, "lock file .train.lock is unreadable")
    assert got and said in got[0], got


def _refusal(folder) -> str:
    try:
        ck.RunLock(folder).acquire().release()
    except ck.LockError as e:
        return str(e)
    return "taken"


def test_a_lock_is_never_left_empty_by_a_failed_write(tmp_path, monkeypatch):
    """A full disk while the lock was taken left an empty .train.lock (created, then written), which refused every
    later run, also after the disk was freed. The lock is now written to a temp file and linked into place: a
    failed write leaves nothing, and the next run takes the lock."""
    real_dumps = json.dumps

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ck.RunLock(tmp_path / "run").acquire()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no lock, no temp
    monkeypatch.setattr(ck.json, "dumps", real_dumps)
    lock = ck.RunLock(tmp_path / "run").acquire()
    assert json.loads((tmp_path / "run" / ck.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # an empty lock an earlier version left (created, then its write failed): taken over after a long silence only
    import time

    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / ck.LOCK_NAME).write_bytes(b"")
    with pytest.raises(ck.LockError, match="is unreadable; it is taken over once unchanged for 15 minutes"):
        ck.RunLock(tmp_path / "run").acquire()
    old = time.time() - ck.LOCK_FOREIGN_SILENT_S - 10
    os.utime(tmp_path / "run" / ck.LOCK_NAME, (old, old))
    ck.RunLock(tmp_path / "run").acquire().release()


def test_a_lock_removed_by_hand_is_taken_again_at_the_next_save(exported, tmp_path, monkeypatch):
    """The lock's refusal says "if none does, remove that file": removed while the run was live, its next save
    stopped the run without saving ("another training took this folder over"), losing every step since the last
    save. A missing lock names no other run: the run takes it again, saves, and beats again."""
    out, _ = exported
    beats = []
    monkeypatch.setattr(ck, "LOCK_BEAT_S", 0.05)

    def removed_in_step_3(state):
        lock = state.ckpt_dir / ck.LOCK_NAME
        if state.step == 3:
            lock.unlink()
            time.sleep(0.3)  # the heartbeat finds the file gone and stops
        if state.step == 5:  # taken again at step 4's save: it must beat again, or another host takes it over
            os.utime(lock, (1, 1))
            time.sleep(0.5)
            beats.append(time.time() - lock.stat().st_mtime)

    on_each_step(monkeypatch, removed_in_step_3)
    cfg = _cfg(out, tmp_path, max_steps=6, save_freq=2)
    train.run_stage(cfg)
    ckdir = tmp_path / "ck" / cfg.name()
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2, 4, 6] and not (ckdir / ck.LOCK_NAME).exists()
    assert beats and beats[0] < 5, beats


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_save(exported, tmp_path, monkeypatch, capsys):
    """Three runs taking over one stale lock at once could leave two believing they held it (the takeover deleted
    the live lock it had moved aside when putting it back failed): both then saved into one folder. A run now
    checks before each save that the lock file still names it, and stops without saving if not; its heartbeat
    stops touching a lock that is not its own."""
    out, _ = exported

    def taken_over_in_step_3(state):
        if state.step == 3:
            (state.ckpt_dir / ck.LOCK_NAME).write_text(json.dumps({"host": "other", "pid": 4242}))

    on_each_step(monkeypatch, taken_over_in_step_3)
    cfg = _cfg(out, tmp_path, max_steps=4, save_freq=2)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ckdir}: this run's lock file {ck.LOCK_NAME} names pid 4242 on other: another training took this "
        f"folder over; stopping without saving")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    assert json.loads((ckdir / ck.LOCK_NAME).read_text())["pid"] == 4242  # the other run's lock is left alone


def test_lock_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "ck").mkdir()
    run = tmp_path / "ck" / "runs" / "stage1"
    with ck.RunLock(run):
        assert run.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and not (tmp_path / "ck" / "runs").exists()
    with ck.RunLock(run):
        (run / "model-000000001.pth").write_bytes(b"x")
    assert [p.name for p in run.iterdir()] == ["model-000000001.pth"]  # a folder written into stays
    with ck.RunLock(tmp_path / "ck"):  # a folder that was there before stays, empty or not
        pass
    assert (tmp_path / "ck").is_dir()


def test_second_training_into_the_same_folder_refuses(exported, tmp_path):
    out, _ = exported
    ckdir = tmp_path / "ck" / _cfg(out, tmp_path).name()
    ckdir.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (ckdir / ck.LOCK_NAME).write_text(f'{{"host": "{socket.gethostname()}", "pid": {owner.pid}}}')
        res = _run_cli(out, tmp_path, "--max_steps=1")
    finally:
        owner.kill()
        owner.wait()
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {ckdir}: another training (pid {owner.pid} on {socket.gethostname()}) "
                                  f"writes checkpoints here (lock {ck.LOCK_NAME}; if none does, remove that file)")
    assert not ck.list_checkpoints(ckdir)


def test_lock_is_released_when_the_run_fails(exported, tmp_path, monkeypatch):
    out, _ = exported

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run_stage(_cfg(out, tmp_path, max_steps=1))
    assert not (tmp_path / "ck" / _cfg(out, tmp_path).name() / ck.LOCK_NAME).exists()


# --- a full disk -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapped", [False, True])
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous(exported, tmp_path, monkeypatch, capsys, wrapped):
    """wrapped: as torch's zip writer reports a full disk met inside it, a RuntimeError ("unexpected pos") with
    the OSError in its chain; it ended the run in that two-part traceback."""
    out, _ = exported
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            f.write(b"\0" * 4096)  # a partial temp file, as a real full disk leaves it
            if not wrapped:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")  # noqa: B904 (torch chains it so)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=3, save_freq=1))
    assert e.value.code == 2
    ckdir = tmp_path / "ck" / _cfg(out, tmp_path).name()
    assert capsys.readouterr().err.strip() == f"error: cannot save {ckdir / ck.ckpt_name(2)}: no space left on device"
    assert sorted(p.name for p in ckdir.iterdir()) == [ck.ckpt_name(1)]  # no temp, no lock, step 1 intact
    assert ck.read_checkpoint(ckdir / ck.ckpt_name(1))["loss_t"]


# --- data --------------------------------------------------------------------------------------------------

def _corrupt_copy(out, dst, value=1e9, field=0):
    shutil.copytree(out, dst)
    clip = list_clips(dst / _version(dst))[0]
    with np.load(clip / "track.npz") as z:
        arrays = dict(z)
    arrays["track_g"][2, 3, field] = value
    np.savez(clip / "track.npz", **arrays)
    return clip


@pytest.mark.parametrize("value,field,why", [(1e9, 0, "far outside"), (-1e9, 1, "far outside"),
                                             (0.5, 2, "flags must be 0 or 1"), (7.0, 3, "flags must be 0 or 1")])
def test_absurd_track_values_make_a_clip_corrupt(exported, tmp_path, value, field, why):
    from pips2.datasets.exportdataset import CorruptClipWarning, ExportDataset

    out, _ = exported
    clip = _corrupt_copy(out, tmp_path / "copy", value, field)
    if field < 2:  # the point must be valid for its position to matter
        with np.load(clip / "track.npz") as z:
            arrays = dict(z)
        arrays["track_g"][2, 3, 3] = 1.0
        np.savez(clip / "track.npz", **arrays)
    ds = ExportDataset(str(tmp_path / "copy"), _version(out), S=6, N=8)
    with pytest.warns(CorruptClipWarning, match=why):
        item = ds[0]
    assert ds.skipped == 1 and ds.bad == {0}
    assert item.corrupt_ids.tolist()[:1] == [0] and (item.corrupt_ids[1:] == -1).all()
    assert item.trajs.abs().max() < 1e4
    assert ds[1].corrupt_ids.max() == -1  # nothing skipped for this one


def test_legitimate_exports_are_never_rejected(exported):
    from pips2.datasets.exportdataset import track_problem

    out, _ = exported
    clips = list_clips(out / _version(out))
    for clip in clips:
        with np.load(clip / "track.npz") as z:
            assert track_problem(z["track_g"], (128, 192)) is None, clip
    # the export's own bound: valid points at most 64 px outside the crop
    edge = np.zeros((1, 2, 4), np.float32)
    edge[0, :, 3] = 1
    edge[0, 0, :2], edge[0, 1, :2] = (-64, -64), (191 + 64, 127 + 64)
    assert track_problem(edge, (128, 192)) is None
    invalid_far = np.zeros((1, 1, 4), np.float32)
    invalid_far[0, 0, :2] = 1e9  # an invalid point carries no position worth checking
    assert track_problem(invalid_far, (128, 192)) is None


def test_training_reports_corrupt_clips_skipped(exported, tmp_path):
    out, _ = exported
    _corrupt_copy(out, tmp_path / "copy")
    res = _run_cli(tmp_path / "copy", tmp_path, "--max_steps=2", "--save_freq=2", "--shuffle=False", "--workers=2")
    assert res.returncode == 0, res.stderr[-3000:]
    done = next(ln for ln in res.stdout.splitlines() if ": done, " in ln)
    assert "1 corrupt clips skipped" in done
    # one line for the clip, said once by the main process although both loader workers may meet it
    warned = [ln for ln in res.stderr.splitlines() if "corrupt clip" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: skipping corrupt clip: ") and "far outside" in warned[0]
    assert "warnings.warn" not in res.stderr and "CorruptClipWarning" not in res.stderr
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"data/corrupt_clips_skipped" in blob
    ckpt = ck.read_checkpoint(ck.find_checkpoint(next((tmp_path / "ck").iterdir())))
    assert ckpt["corrupt_clips"] == [0]


@pytest.mark.parametrize("where", ["location", "version"])
def test_missing_dataset_folder_is_one_line_exit_2(exported, tmp_path, where):
    out, _ = exported
    if where == "location":
        res = _run_cli(out, tmp_path, "--max_steps=1", dataset_location=tmp_path / "nope")
        expect = f"error: {tmp_path / 'nope'}: no such dataset folder (--dataset_location)"
    else:
        res = _run_cli(out, tmp_path, "--max_steps=1", "--dataset_version=nope")
        expect = f"error: {out / 'nope'}: no exported clips (run export_mp4_dataset.py first)"
    assert res.returncode == 2 and res.stderr.strip() == expect
    # said before the model's parameter table, and no empty run or log folder is left behind
    assert "total params" not in res.stdout
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_unknown_amp_is_one_line(exported, tmp_path):
    out, _ = exported
    res = _run_cli(out, tmp_path, "--max_steps=1", "--amp=fp8")
    assert res.returncode == 2 and res.stderr.strip() == "error: --amp must be one of none, bf16, fp16, got 'fp8'"


# --- flags -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,expect", [
    ({"save_freq": 0}, "--save_freq must be at least 1, got 0"),
    ({"max_steps": 0}, "--max_steps must be at least 1, got 0"),
    ({"max_iters": -5}, "--max_steps must be at least 1, got -5"),
    ({"lr": "abc"}, "--lr must be a finite number, got 'abc'"),
    ({"lr": "nan"}, "--lr must be a finite number, got 'nan'"),  # fire hands nan and inf over as strings
    ({"lr": "inf"}, "--lr must be a finite number, got 'inf'"),
    ({"lr": float("inf")}, "--lr must be a finite number, got inf"),  # --lr=1e999
    ({"lr": 0}, "--lr must be positive, got 0"),
    ({"lr": 1e39}, "--lr must be at most 1 (the authors train with 5e-4), got 1e+39"),  # overflowed inside Adam
    ({"exp_name": "../.."}, "--exp_name must be a plain name (letters, digits and _ . - = , +), got '../..'"),
    ({"model": "lbm", "embed_dim": 3}, "--embed_dim must be a multiple of 4 (LBM's attention heads), got 3"),
    ({"wd": -1e-3}, "--wd must be at least 0, got -0.001"),
    ({"grad_clip": float("nan")}, "--grad_clip must be a finite number, got nan"),
    ({"B": -1}, "--B must be at least 1, got -1"),
    ({"B": 1.5}, "--B must be an integer, got 1.5"),
    ({"S": 1}, "--S must be at least 2, got 1"),
    ({"N": 0}, "--N must be at least 1, got 0"),
    ({"iters": 0}, "--iters must be at least 1, got 0"),
    ({"iters": 65}, "--iters must be at most 64, got 65"),
    ({"grad_acc": 0}, "--grad_acc must be at least 1, got 0"),
    ({"grad_acc": 10**9}, "--grad_acc must be at most 256, got 1000000000"),  # one step never ended
    ({"lr": 1e-320}, "--lr must be at least 1e-37, got 9.99989e-321"),  # trained nothing, exit 0
    ({"wd": 1e308}, "--wd=1e+308 with --lr=0.0005: AdamW scales the weights by 1 - lr x wd each step, which must "
                    "stay above 0; give a smaller --wd"),
    ({"log_freq": 0}, "--log_freq must be at least 1, got 0"),
    ({"val_freq": 0}, "--val_freq must be at least 1, got 0"),
    ({"max_nan_steps": 0}, "--max_nan_steps must be at least 1, got 0"),
    ({"keep_latest": -1}, "--keep_latest must be at least 0, got -1"),
    ({"workers": -2}, "--workers must be at least 0, got -2"),
    ({"workers": 100000}, f"--workers must be at most {4 * usable_cpus()} (4 per CPU core this process may use), "
                          f"got 100000"),  # ~780 processes and 5.2 GB in 24 s
    ({"seed": -1}, "--seed must be at least 0, got -1"),
    ({"seed": 2**40}, f"--seed must be at most {2**32 - 1}, got {2**40}"),
    ({"use_augs": "yes"}, "--use_augs must be True or False, got 'yes'"),
    ({"model": "lbm", "memory_size": 0}, "--memory_size must be at least 1, got 0"),
    # LBM's buffers grow with them: --memory_size=100000 took the machine's memory before the first step
    ({"model": "lbm", "memory_size": 100000}, "--memory_size must be at most 256 (LBM's bound, as its checkpoints "
                                              "are checked), got 100000"),
    ({"model": "lbm", "embed_dim": 4096}, "--embed_dim must be at most 1024 (LBM's bound, as its checkpoints are "
                                          "checked), got 4096"),
    ({"backbone_init": "/nonexistent.pth"}, "--backbone_init is for --model=lbm (its ResNet trunk); PIPs++ has no "
                                            "such trunk"),  # it was ignored without a word
    ({"exp_name": "x" * 300}, "--exp_name must be at most 100 characters, got 300"),  # an errno line after the model
    ({"stage": 3}, "--stage must be 1 or 2 (or --stages=1,2), got 3"),
    ({"stages": "1,x"}, "--stages must be 1 or 2 (or --stages=1,2), got '1,x'"),
    # a bare "Not a directory" line naming no flag, and TensorBoard's traceback after the model was built
    ({"ckpt_dir": "/dev/null"}, "--ckpt_dir=/dev/null is not a folder"),
    ({"log_dir": "/dev/null/logs"}, "--log_dir=/dev/null/logs cannot be made: /dev/null is not a folder"),
])
def test_bad_numeric_flags_are_one_line_before_any_work(tmp_path, capsys, flags, expect):
    """Each was a traceback (ZeroDivisionError after a step, "Unknown format code 'g'", a reshape error) or a run
    that trained nothing and exited 0; now one line and exit 2 before anything is read or created."""
    with pytest.raises(SystemExit) as e:
        train.main(**{"dataset_location": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ck"),
                      "log_dir": str(tmp_path / "logs"), **flags})
    assert e.value.code == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == f"error: {expect}" and cap.out == ""
    assert list(tmp_path.iterdir()) == []


def test_good_flags_pass_the_checks():
    cfg = train.make_config(1, {"lr": 1, "use_augs": 0, "recompute_cheap": None, "B": 2, "wd": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.use_augs is False and cfg.recompute_cheap is None
    assert train.make_config(1, {"model": "lbm", "crop_size": "128,128"}).iters == 0  # LBM has no iterations


@pytest.fixture(scope="module")
def two_steps(exported, tmp_path_factory):
    """A run folder holding the checkpoint of step 2 (of a 3-step run): (its config, its checkpoint file)."""
    out, _ = exported
    tmp = tmp_path_factory.mktemp("two")
    cfg = _cfg(out, tmp, max_steps=2)
    train.run_stage(cfg)
    return out, ck.find_checkpoint(tmp / "ck" / cfg.name())


def _opt_wrong_shape(c: dict) -> None:
    state = c["optimizer_state_dict"]["state"]
    state[0]["exp_avg"] = torch.zeros(3)


def _saved_with_wd(ckpt: dict, wd: float, groups: bool = True) -> None:
    config = json.loads(ckpt["config"])
    config["wd"] = wd
    ckpt["config"] = json.dumps(config)
    for group in ckpt["optimizer_state_dict"]["param_groups"] if groups else ():
        group["weight_decay"] = wd


@pytest.mark.parametrize("what,change,said", [
    ("rng.python", lambda c: c["rng"].__setitem__("python", [1, 2, 3]), "its 'rng' is not what this program saves"),
    ("rng.numpy", lambda c: c["rng"].__setitem__("numpy", ["MT19937", [1, 2], 0, 0, 0.0]), "its 'rng'"),
    ("rng.torch", lambda c: c["rng"].__setitem__("torch", torch.zeros(3)), "its 'rng'"),
    ("loss_t", lambda c: c.__setitem__("loss_t", ["abc"]), "its 'loss_t' is not what this program saves"),
    ("nan_steps", lambda c: c.__setitem__("nan_steps", "x"), "its 'nan_steps'"),
    ("corrupt_clips", lambda c: c.__setitem__("corrupt_clips", [1e30, -5]), "its 'corrupt_clips'"),
    ("optimizer empty", lambda c: c.__setitem__("optimizer_state_dict", {}),
     "'optimizer_state_dict' is not one this program saves (KeyError: 'param_groups')"),
    ("optimizer shape", _opt_wrong_shape, "'optimizer_state_dict' holds a exp_avg of shape (3,) for a parameter"),
    ("scheduler", lambda c: c["scheduler_state_dict"].__setitem__("last_epoch", -10**9),
     "its learning-rate schedule is at step -1000000000, not one of steps 0 to 2"),
    ("schedule end text", lambda c: c["scheduler_state_dict"].__setitem__("total_steps", "x"),
     "its learning-rate schedule ends at step x, not a whole number from its step, 2, to 1000000000"),
    ("schedule end huge", lambda c: c["scheduler_state_dict"].__setitem__("total_steps", 10**30),
     "its learning-rate schedule ends at step 1000000000000000000000000000000, not a whole number"),
    ("schedule phase", lambda c: c["scheduler_state_dict"]["_schedule_phases"][0].__setitem__("start_lr", "nokey"),
     "its learning-rate schedule is not the one this program builds for its run (_schedule_phases differ)"),
    # phases that end early: a division by zero two steps after the resume, or a rate below zero (gradient ascent)
    ("schedule phase ends", lambda c: [ph.__setitem__("end_step", 3) for ph in
                                       c["scheduler_state_dict"]["_schedule_phases"]], "(_schedule_phases differ)"),
    ("optimizer 0-dim moment",
     lambda c: c["optimizer_state_dict"]["state"][0].__setitem__("exp_avg", torch.tensor(0.0)),
     "holds a exp_avg of shape () for a parameter"),
    ("optimizer lr 1e30", lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("lr", 1e30),
     "its optimizer's param_groups[0] holds lr 1e+30 (above the schedule's peak, 0.0005)"),
    ("optimizer wd", lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("weight_decay", 2000.0),
     "its optimizer's param_groups[0] holds weight_decay 2000.0 (this program's: 1e-06)"),
    ("optimizer eps", lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("eps", 1e30),
     "holds eps 1e+30 (this program's: 1e-08)"),
    ("optimizer maximize", lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("maximize", True),
     "holds maximize True (this program's: False)"),  # gradient ascent, exit 0
    ("optimizer capturable",
     lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("capturable", True),
     "holds capturable True (this program's: False)"),
    # a weight decay the file says it was saved with, and its groups the same: AdamW's 1 - lr x wd went below 0
    ("config wd huge", lambda c: _saved_with_wd(c, 1e4),
     "the run was saved with wd=10000; with the schedule's peak rate 0.0005, AdamW would scale the weights by "
     "1 - lr x wd = -4 a step"),
    ("config wd nan", lambda c: _saved_with_wd(c, float("nan"), groups=False), "the run was saved with wd=nan"),
    ("schedule max_lr", lambda c: c["optimizer_state_dict"]["param_groups"][0].__setitem__("max_lr", 1e6),
     "its learning-rate schedule is not the one this program builds for its run (max_lr differ)"),
])
def test_a_resume_checkpoint_with_malformed_extras_is_one_line(two_steps, tmp_path, capsys, what, change, said):
    """Each of these ended train.py in a traceback after "resuming at step 2" (a scheduler at step -1e9 trained on
    with whatever learning rate that gave): now one line naming the file and the part, exit 2."""
    out, src = two_steps
    cfg = _cfg(out, tmp_path, max_steps=3)
    folder = tmp_path / "ck" / cfg.name()
    folder.mkdir(parents=True)
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, folder / src.name)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith(f"error: {folder / src.name}: ") and said in err[0], err


def test_weights_that_are_not_finite_are_never_saved(exported, tmp_path, monkeypatch, capsys):
    """An update with a finite loss but a non-finite learning rate or optimizer state made every weight NaN; the
    run then skipped its non-finite steps and ended "done", exit 0, its newest checkpoint all NaN (which the next
    resume refused). Such weights are not saved: one line, exit 2, the last good checkpoint kept."""
    out, _ = exported

    def nan_after_step_3(state):
        if state.step == 3:
            with torch.no_grad():
                state.net.fnet.conv1.weight.fill_(float("nan"))

    on_each_step(monkeypatch, nan_after_step_3, after=True)
    cfg = _cfg(out, tmp_path, max_steps=4, save_freq=2)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ckdir}: the weights are not finite at step 4 (fnet.conv1.weight, after an update with a finite "
        f"loss: a non-finite learning rate or optimizer state); not saved, the last checkpoint, "
        f"{ckdir / ck.ckpt_name(2)}, is kept")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]


def test_init_dir_with_load_optimizer_checks_the_schedule_it_brings(two_steps, tmp_path, capsys):
    """Continuing a finished 2-step run with --init_dir --load_optimizer=True trained 100 steps and then failed
    in a traceback ("Tried to step 103 times"), nothing saved: the schedule it brings is now checked as a resume's,
    and a run that would go past its end is refused before training, in one line."""
    out, src = two_steps
    cfg = _cfg(out, tmp_path, max_steps=100, init_dir=str(src.parent), load_optimizer=True, exp_name="more")
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {src}: its learning-rate schedule (--load_optimizer) is at step 2 and ends at step 102: "
                   f"the 100 steps of this run go past its end; give --max_steps=99 or less, or "
                   f"--load_optimizer=False for a new schedule")
    cfg = _cfg(out, tmp_path, max_steps=3, init_dir=str(src.parent), load_optimizer=True, exp_name="few")
    train.run_stage(cfg)  # within the schedule: trains
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ck" / cfg.name())] == [3]


def test_init_dir_is_never_ignored_by_a_resume(two_steps, tmp_path, capsys):
    """--init_dir into a run folder that already held checkpoints resumed that run and never opened the checkpoint
    given, "done", exit 0: refused in one line unless the run started from that same --init_dir (a requeued job's
    command), which a resume without --init_dir keeps recording."""
    out, src = two_steps
    fresh = _cfg(out, tmp_path, max_steps=1)
    train.run_stage(fresh)  # a run started from no checkpoint
    folder = tmp_path / "ck" / fresh.name()
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=2, init_dir=str(src)))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder} holds a run at step 1 that started from --init_dir=None; --init_dir={src} would be ignored "
        f"by resuming it: give --exp_name=<a new name> for a new run from {src}, or leave --init_dir out to resume")
    assert [s for s, _ in ck.list_checkpoints(folder)] == [1]
    # a run from --init_dir, stopped and resumed with and without it: the same command resumes
    cfg = _cfg(out, tmp_path, max_steps=1, init_dir=str(src), exp_name="tuned")
    train.run_stage(cfg)
    train.run_stage(_cfg(out, tmp_path, max_steps=2, exp_name="tuned"))
    train.run_stage(_cfg(out, tmp_path, max_steps=3, init_dir=str(src), exp_name="tuned"))
    tuned = tmp_path / "ck" / cfg.name()
    assert [s for s, _ in ck.list_checkpoints(tuned)][-1] == 3
    saved = json.loads(torch.load(ck.find_checkpoint(tuned), weights_only=True)["config"])
    assert saved["init_dir"] == str(src)
    # a checkpoint of the run itself, given as --init_dir, is that run
    train.run_stage(_cfg(out, tmp_path, max_steps=4, init_dir=str(ck.find_checkpoint(tuned)), exp_name="tuned"))
    assert [s for s, _ in ck.list_checkpoints(tuned)][-1] == 4


def test_resume_false_never_mixes_a_new_run_into_an_old_one(two_steps, tmp_path, capsys):
    """--resume=False into a folder of an earlier run overwrote its checkpoints of the same steps and left its
    later ones newest: the next plain rerun resumed the old run, the new run's steps dropped. Refused now."""
    out, src = two_steps
    cfg = _cfg(out, tmp_path, max_steps=1)
    folder = tmp_path / "ck" / cfg.name()
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    before = (folder / src.name).read_bytes()
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=1, resume=False))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder} holds an earlier run's checkpoints (the newest {src.name}); --resume=False would mix a new "
        f"run into them: give --exp_name=<a new name> for a separate run, or move that folder aside")
    assert [p.name for p in folder.iterdir() if p.suffix == ".pth"] == [src.name]
    assert (folder / src.name).read_bytes() == before


def test_a_run_folder_named_in_no_utf8_resumes_and_a_local_read_error_sets_nothing_aside(two_steps, tmp_path,
                                                                                         monkeypatch, capsys):
    """A folder name with a Latin-1 byte: torch hands a mapped file's name to C++ as UTF-8, so every good
    checkpoint there was "unreadable", renamed *.bad by the resume, and the next run trained from step 0. An error
    of this machine (permissions, I/O) set checkpoints aside the same way."""
    out, src = two_steps
    ckpt_dir = tmp_path / os.fsdecode(b"ck_\xff")
    cfg = _cfg(out, tmp_path, max_steps=3, ckpt_dir=str(ckpt_dir))
    folder = ckpt_dir / cfg.name()
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    with guarded_output():  # as train.py runs: the folder's name is printed, escaped
        train.run_stage(cfg)  # resumes at step 2
    assert [s for s, _ in ck.list_checkpoints(folder)] == [2, 3] and not list(folder.glob("*.bad"))
    assert "ck_\\udcff" in capsys.readouterr().out

    shown = str(folder / ck.ckpt_name(3)).encode("utf-8", "backslashreplace").decode()
    for error, why in ((PermissionError(13, "Permission denied"), "Permission denied"),
                       (MemoryError(), "out of memory"),  # a ulimit, or overcommit under load
                       (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 210 MB"),
                        "out of memory")):
        def unreadable(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(ck.torch, "load", unreadable)
        with pytest.raises(SystemExit) as e, guarded_output():
            train.run_stage(_cfg(out, tmp_path, max_steps=4, ckpt_dir=str(ckpt_dir)))
        assert e.value.code == 1  # this machine, not the input
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {shown}: cannot be read here ({why}); nothing was set aside, rerun once it can be read")
        assert [s for s, _ in ck.list_checkpoints(folder)] == [2, 3] and not list(folder.glob("*.bad"))


def test_a_link_planted_at_the_event_files_name_is_never_written_through(exported, tmp_path):
    """tensorboardX names its event file after the second and the host and opens it following links: in a shared
    --log_dir another user could plant links at the names of the coming seconds, and training wrote its events
    into whatever file they named (and two runs of one name started in one second shared one file). The name
    now carries the process and a random part."""
    out, _ = exported
    first = _run_cli(out, tmp_path, "--max_steps=1", "--save_freq=1")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_logs,) = (tmp_path / "logs").iterdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    now = int(time.time())
    for t in range(now - 5, now + 300):  # every name tensorboardX could pick in the next minutes
        os.symlink(victim, run_logs / f"events.out.tfevents.{t}.{socket.gethostname()}")
    more = _run_cli(out, tmp_path, "--max_steps=2", "--save_freq=1")
    assert more.returncode == 0, more.stderr[-3000:]
    assert victim.read_text() == "keep me\n"
    written = [p for p in run_logs.iterdir() if not p.is_symlink()]
    assert len(written) == 2 and all(p.stat().st_size > 0 for p in written), written


def test_a_log_run_folder_that_is_not_a_folder_is_one_line(exported, tmp_path):
    """A file (or a FIFO) where the run's TensorBoard folder goes ended in tensorboardX's 25-line traceback after
    the model was built; now one line, exit 2."""
    out, _ = exported
    name = train.make_config(1, {"B": 1, **{k: v for k, v in TINY.items() if k != "workers"}}).name()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / name).write_text("in the way")
    res = _run_cli(out, tmp_path, "--max_steps=1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == (f"error: --log_dir: {tmp_path / 'logs' / name} is not a folder (the run's "
                                  "TensorBoard log goes there); remove it or give another --log_dir"), res.stderr


def test_a_log_run_folder_in_the_way_ends_every_rank_before_its_model(exported, tmp_path, monkeypatch, capsys):
    """Only rank 0 looked at the log folder: under DDP the other ranks went on building their models until
    torchrun tore them down. Every rank now ends there together, exit 2; only rank 0 says why."""
    out, _ = exported
    cfg = train.make_config(1, {**TINY, "dataset_location": str(out), "log_dir": str(tmp_path / "logs"),
                                "ckpt_dir": str(tmp_path / "ck")})
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / cfg.name()).write_text("in the way")

    class Rank1(trainer.Ranks):
        def any(self, flag: bool) -> bool:  # what the all-reduce gives rank 1: rank 0 found the file
            return True

    monkeypatch.setattr(trainer, "TrainState", lambda *a, **k: pytest.fail("rank 1 built its model"))
    with pytest.raises(SystemExit) as e:
        trainer.train_stage(cfg, Rank1(1, 2, torch.device("cpu")), tmp_path / "ck")
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_after_a_stop_train_py_ignores_further_stop_signals(monkeypatch):
    """A second Ctrl-C pressed while train.py exits after a stop landed in the interpreter's exit as a traceback,
    and changed the exit code by its timing. Once the stop is said, the stop signals are ignored."""
    import signal as sig

    def stopped(cfg):
        raise trainer.TrainingStopped()

    monkeypatch.setattr(train, "run_stage", stopped)
    monkeypatch.setattr(sys, "argv", ["train.py", "--dataset_location=x"])
    old = {s: sig.getsignal(s) for s in STOP_SIGNALS}
    try:
        with pytest.raises(trainer.TrainingStopped):
            train.main(stage=1, dataset_location="x")
        assert all(sig.getsignal(s) == h for s, h in old.items())  # main, a function others call, leaves them
        with pytest.raises(trainer.TrainingStopped):
            train.cli()  # the program, which ends now
        assert all(sig.getsignal(s) is sig.SIG_IGN for s in old)
    finally:
        for s, h in old.items():
            sig.signal(s, h)


@pytest.mark.parametrize("how", ["moved away", "a link to another run"])
def test_a_run_folder_moved_or_replaced_during_the_run_stops_it_before_the_next_save(exported, tmp_path, monkeypatch,
                                                                                     capsys, how):
    """A run's folder renamed during the run (a copy kept by hand: a traceback at the next save, its steps lost), or
    replaced by a link to another run's folder (a group member in a team folder: the run wrote its checkpoints
    there and pruned that run's own). The next save now stops the run in one line, writing nowhere else."""
    out, _ = exported
    other = tmp_path / "other_run"
    other.mkdir()
    (other / ck.ckpt_name(1)).write_bytes(b"the other run's")
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=1)
    folder = tmp_path / "ck" / cfg.name()

    def swap_in_step_3(state):
        if state.step == 3:
            folder.rename(tmp_path / "kept")
            if how != "moved away":
                folder.symlink_to(other)

    on_each_step(monkeypatch, swap_in_step_3)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    now = "is gone" if how == "moved away" else f"is a link to {other}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder}: the run folder was moved or replaced during the run (its name {now} now); stopping "
        f"without saving")
    assert sorted(p.name for p in other.iterdir()) == [ck.ckpt_name(1)]
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "kept")] == [1, 2]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="gives files another user's uid")
def test_a_run_folder_or_checkpoint_of_another_user_is_never_resumed(exported, tmp_path, capsys, monkeypatch):
    """The run folder's name follows from the flags: on a disk every user may write to (/tmp, a scratch disk)
    another user made it first and put a checkpoint in it, and the run resumed from that checkpoint without a word
    (its owner could also replace every later one). A run folder, or a checkpoint in the run's folder, owned by
    neither this user nor the owner of the folder it is in is refused in one line, exit 2, before anything is read;
    the owner of the --ckpt_dir the user chose is trusted (root in a container resuming its host user's run)."""
    out, _ = exported
    cfg = _cfg(out, tmp_path, max_steps=1, save_freq=1)
    ckpt_dir = tmp_path / "ck"
    theirs = ckpt_dir / cfg.name()
    theirs.mkdir(parents=True)
    os.chown(theirs, 2002, 2002)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {theirs}: a folder of uid 2002, not this user's: its owner could put or replace checkpoints in it; "
        f"give another --ckpt_dir (or --exp_name)")
    assert not list(theirs.iterdir())

    os.chown(ckpt_dir, 2002, 2002)  # the --ckpt_dir is theirs too: the user chose it (a host user's mount)
    train.run_stage(cfg)
    (step, planted), = ck.list_checkpoints(theirs)
    os.chown(planted, 2002, 2002)
    train.run_stage(_cfg(out, tmp_path, max_steps=2, save_freq=1))  # resumes: the folder's owner's checkpoint
    assert [s for s, _ in ck.list_checkpoints(theirs)] == [1, 2]

    for p in (ckpt_dir, theirs, planted):
        os.chown(p, os.geteuid(), os.getegid())
    newest = ck.list_checkpoints(theirs)[-1][1]
    os.chown(newest, 2002, 2002)  # as if another user had renamed their file over it
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=3, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {newest}: a checkpoint of uid 2002, not this user's: a run never resumes from a file another user "
        f"put in its folder; move it aside (or give another --ckpt_dir)")

    # a link whose target is gone is the reader's to set aside, as before
    newest.unlink()
    (theirs / ck.ckpt_name(9)).symlink_to(tmp_path / "gone.pth")
    train.run_stage(_cfg(out, tmp_path, max_steps=3, save_freq=1))
    assert [s for s, _ in ck.list_checkpoints(theirs)][-1] == 3

    # on a disk everybody may write to, the other user makes the --ckpt_dir too: its owner is not trusted, and
    # stage 2 does not start from a stage-1 run folder of theirs
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o1777)
    scratch.chmod(0o1777)
    shutil.copytree(ckpt_dir, scratch / "ck", symlinks=True)
    for p in [scratch / "ck", *(scratch / "ck").rglob("*")]:
        os.chown(p, 2002, 2002, follow_symlinks=False)
    planted_cfg = train.make_config(1, {**TINY, "dataset_location": str(out), "dataset_version": _version(out),
                                        "log_dir": str(tmp_path / "logs"), "ckpt_dir": str(scratch / "ck"),
                                        "max_steps": 4})
    with pytest.raises(SystemExit) as e:
        train.run_stage(planted_cfg)
    assert e.value.code == 2 and "a folder of uid 2002, not this user's" in capsys.readouterr().err
    assert train._latest_stage1(str(scratch / "ck")) is None
    assert train._latest_stage1(str(ckpt_dir)) == str(theirs)

    # `--ckpt_dir=..` from the user's own folder inside theirs: the real parent is judged, not the text's
    mine = scratch / "ck" / "mine"
    mine.mkdir()
    monkeypatch.chdir(mine)
    dotdot = train.make_config(1, {**TINY, "dataset_location": str(out), "dataset_version": _version(out),
                                   "log_dir": str(tmp_path / "logs"), "ckpt_dir": "..", "max_steps": 4})
    with pytest.raises(SystemExit) as e:
        train.run_stage(dotdot)
    assert e.value.code == 2 and "a folder of uid 2002, not this user's" in capsys.readouterr().err

    # a link at the --ckpt_dir's name, made by a group member, to their own folder in a folder of root's
    homes = tmp_path / "homes"
    (homes / "u2002" / cfg.name()).mkdir(parents=True)
    shutil.copy(ck.list_checkpoints(theirs)[-1][1], homes / "u2002" / cfg.name() / ck.ckpt_name(5))
    for p in [homes / "u2002", *(homes / "u2002").rglob("*")]:
        os.chown(p, 2002, 2002)
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "proj").symlink_to(homes / "u2002")
    os.lchown(tmp_path / "team" / "proj", 2002, 2002)
    with pytest.raises(SystemExit) as e:
        train.run_stage(train.make_config(1, {**TINY, "dataset_location": str(out), "dataset_version": _version(out),
                                              "log_dir": str(tmp_path / "logs"), "max_steps": 6,
                                              "ckpt_dir": str(tmp_path / "team" / "proj")}))
    assert e.value.code == 2 and (f"--ckpt_dir: {tmp_path / 'team' / 'proj'} is a link of uid 2002's"
                                  in capsys.readouterr().err)

    # a link at a run folder's name, made by another user, steering a new run into the user's other run
    link = ckpt_dir / _cfg(out, tmp_path, exp_name="x").name()
    link.symlink_to(theirs)
    os.lchown(link, 2002, 2002)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="x", max_steps=4))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {link}: a link of uid 2002's (to {theirs}), not this user's: it could steer this run's checkpoints "
        f"into another folder; remove it, or give another --ckpt_dir (or --exp_name)")
    assert [s for s, _ in ck.list_checkpoints(theirs)][-1] == 3  # nothing written there


def test_a_checkpoint_of_another_run_moved_into_the_run_folder_is_not_resumed(exported, tmp_path, capsys):
    """In a run folder others may write to (umask 002), a group member could move in the user's own checkpoint
    of another run, under a later step's name or under its own: it was resumed and the steps in between skipped
    without a word. Every checkpoint records its step and its run's id; a resume whose file's step is not its
    name's, or whose run is not that of the checkpoint before it, ends in one line, exit 2."""
    out, _ = exported
    train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=1, save_freq=1))
    train.run_stage(_cfg(out, tmp_path, exp_name="b", max_steps=3, save_freq=1))
    a, b = (tmp_path / "ck" / _cfg(out, tmp_path, exp_name=x).name() for x in "ab")
    renamed = a / ck.ckpt_name(5)
    shutil.copy(b / ck.ckpt_name(2), renamed)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=6, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {renamed}: it records step 2, its name step 5: renamed, or moved in from another run's folder; "
        f"move it aside to resume from the checkpoint before it")
    renamed.unlink()
    # under its own name: its settings name another run, also in a checkpoint older than run ids, and also when the
    # run's own checkpoints were moved aside first
    moved = a / ck.ckpt_name(3)
    shutil.copy(b / ck.ckpt_name(3), moved)
    older = torch.load(moved, weights_only=True)
    del older["run"], older["step"]
    torch.save(older, moved)
    (a / ck.ckpt_name(1)).rename(tmp_path / "aside.pth")
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=6, save_freq=1))
    assert e.value.code == 2
    # with no checkpoint of its own left the folder holds only the other run's: moving that aside too would start
    # the run afresh without a word, so the line says how to go on instead
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {a}: its checkpoints were saved by a run of other settings (exp_name='b'): this folder was renamed, "
        f"or filled from that run's; rename it back, or train on from it in a new run: --exp_name=<a new name> "
        f"--init_dir={a} --load_optimizer=True --load_step=True")
    assert [s for s, _ in ck.list_checkpoints(a)] == [3]  # nothing written
    (tmp_path / "aside.pth").rename(a / ck.ckpt_name(1))
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=6, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {moved}: saved by another run (exp_name='b'; this run's folder is {a.name}): moved in from that "
        f"run's folder; move it aside to resume from the checkpoint before it")
    # a run of the very same settings in another --ckpt_dir: its run id is not that of the checkpoint before
    train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=3, save_freq=1, ckpt_dir=str(tmp_path / "ck2")))
    shutil.copy(tmp_path / "ck2" / a.name / ck.ckpt_name(3), moved)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=6, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {moved} and {ck.ckpt_name(1)} beside it are of two runs (their run ids differ): one was moved "
        f"in from another run's folder; move the other run's checkpoint aside")
    # nor may a checkpoint without one follow one with one
    older = torch.load(moved, weights_only=True)
    del older["run"]
    torch.save(older, moved)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=6, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {moved} records no run id, and {ck.ckpt_name(1)} before it does: saved by a version of this program "
        f"older than the one before it, or moved in from another run's folder; move it aside to resume from the "
        f"checkpoint before it")
    assert [s for s, _ in ck.list_checkpoints(a)] == [1, 3]  # nothing written
    moved.unlink()
    train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=2, save_freq=1))  # its own run resumes, and on
    train.run_stage(_cfg(out, tmp_path, exp_name="a", max_steps=3, save_freq=1))
    assert [s for s, _ in ck.list_checkpoints(a)] == [1, 2, 3]


def test_a_umask_that_leaves_new_folders_unwritable_is_named_and_nothing_is_left(exported, tmp_path, capsys,
                                                                                monkeypatch):
    """Under umask 0377 the --ckpt_dir made first takes no run folder inside: train.py said a raw "[Errno 13]
    Permission denied" and left the folder it had made. Now one line names the umask, and the folders made are
    removed again. (This user may be root, whom no mode stops: mkdir here refuses as the kernel does others.)"""
    out, _ = exported
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent.exists() and not self.parent.stat().st_mode & 0o200:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    cfg = _cfg(out, tmp_path, max_steps=1)
    old = os.umask(0o377)
    try:
        with pytest.raises(SystemExit) as e:
            train.run_stage(cfg)
    finally:
        os.umask(old)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot make or lock the run folder {tmp_path / 'ck' / cfg.name()} (permission denied: the umask 0377 "
        f"makes new folders unwritable to their owner; set one such as 0022 (umask 022))")
    assert not (tmp_path / "ck").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="gives files another user's uid")
def test_a_log_folder_of_another_user_or_their_link_at_its_name_is_refused(exported, tmp_path, capsys):
    """The run's TensorBoard folder is --log_dir/<run name>, a name that follows from the flags: in a --log_dir
    others may write to, a link planted at it steered the run's logs into a folder of the planter's choice, and a
    folder made there first by another user took them. Both are refused in one line, exit 2, as for --ckpt_dir."""
    out, _ = exported
    cfg = _cfg(out, tmp_path, max_steps=1)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o1777)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 2002, 2002)
    (logs / cfg.name()).symlink_to(theirs)
    os.lchown(logs / cfg.name(), 2002, 2002)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {logs / cfg.name()}: a link of uid 2002's (to {theirs}), not this user's: it could steer this run's "
        f"logs into another folder; remove it, or give another --log_dir (or --exp_name)")
    (logs / cfg.name()).unlink()
    (logs / cfg.name()).mkdir()
    os.chown(logs / cfg.name(), 2002, 2002)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2 and "a folder of uid 2002, not this user's: its owner could put or replace logs" in \
        capsys.readouterr().err
    assert not list(theirs.iterdir()) and not list((logs / cfg.name()).iterdir())
    os.chown(logs / cfg.name(), os.geteuid(), os.getegid())
    train.run_stage(cfg)
    assert list((logs / cfg.name()).glob("events.out.tfevents.*"))
    # one level up: --ckpt_dir or --log_dir itself (./checkpoints, ./logs_train in a team's checkout) a link of theirs
    for flag in ("ckpt_dir", "log_dir"):
        planted = tmp_path / f"planted_{flag}"
        planted.symlink_to(theirs)
        os.lchown(planted, 2002, 2002)
        with pytest.raises(SystemExit) as e:
            train.run_stage(_cfg(out, tmp_path, max_steps=1, **{flag: str(planted)}))
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --{flag}: {planted} is a link of uid 2002's (to {theirs}), not this user's: its maker chose where "
            f"this program's files would go; remove it, or give another --{flag}")
    # or a folder of theirs (not a link) at --ckpt_dir's or --log_dir's name, made first in a folder all may write to
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o1777)
    made_first = tmp_path / "open" / "made_first"
    made_first.mkdir()
    os.chown(made_first, 2002, 2002)
    for flag in ("ckpt_dir", "log_dir"):
        with pytest.raises(SystemExit) as e:
            train.run_stage(_cfg(out, tmp_path, max_steps=1, **{flag: str(made_first)}))
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --{flag}: {made_first} is a folder of uid 2002, not this user's: its owner could move what this "
            f"program writes there and put other files in its place; give another --{flag} (this program runs as root: "
            f"run it as that user, or give a folder of root's)")
    assert not list(theirs.iterdir()) and not list(made_first.iterdir())


@pytest.mark.parametrize("env, said", [
    ({"RANK": "5"}, "the environment's RANK=5, LOCAL_RANK=0 and WORLD_SIZE=1 do not fit"),
    ({"WORLD_SIZE": "abc"}, "the environment's WORLD_SIZE='abc' is not a whole number"),
    ({"RANK": "-1"}, "the environment's RANK='-1' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set: start several"),
])
def test_a_launch_environment_left_from_elsewhere_is_one_line(exported, tmp_path, capsys, monkeypatch, env, said):
    """A RANK left in the shell by an earlier torchrun launch made a lone process a non-main rank: it trained to the
    end without a line, saved nothing and exited 0. A value that is no number, or a world without its rendezvous,
    ended in a traceback. Each is now one line, exit 2, before anything is made."""
    out, _ = exported
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=1))
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {said}"), line
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_checkpoints_are_never_writable_by_others_and_such_a_one_is_not_resumed(exported, tmp_path, capsys):
    """Under umask 002 (a team folder's) checkpoints were written group-writable: a group member could rewrite the
    newest in place, keeping its name, step, run id and owner, and the resume took it. They are now written without
    write for others whatever the umask, and a resume refuses one others may write to, in one line, exit 2."""
    out, _ = exported
    old = os.umask(0o002)
    try:
        train.run_stage(_cfg(out, tmp_path, max_steps=1, save_freq=1))
    finally:
        os.umask(old)
    (_, ckpt), = ck.list_checkpoints(tmp_path / "ck" / _cfg(out, tmp_path).name())
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o664 & ~0o022
    ckpt.chmod(0o664)  # as an older version wrote it, or a group member's chmod
    with pytest.raises(SystemExit) as e:
        train.run_stage(_cfg(out, tmp_path, max_steps=2, save_freq=1))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ckpt}: others may write to it (mode 664): whoever may could have rewritten it in place, and a run "
        f"never resumes from such a file; if nobody did, `chmod go-w {ckpt.parent}/model-*.pth` and rerun (this "
        f"program writes none such now)")
    ckpt.chmod(0o644)
    train.run_stage(_cfg(out, tmp_path, max_steps=2, save_freq=1))
    assert [s for s, _ in ck.list_checkpoints(ckpt.parent)] == [1, 2]


def test_a_lone_process_of_a_launch_waits_for_the_others_in_a_line_and_stops_on_sigterm(exported, tmp_path):
    """WORLD_SIZE=2 with MASTER_ADDR and MASTER_PORT set, but no second process (variables exported for a manual
    launch, a second process that failed to start): train.py waited in the process group's rendezvous for up to
    its 3-hour timeout without a word, deaf to SIGTERM and Ctrl-C (the wait is inside C++). It now says what it
    waits for, and a stop signal ends it at once."""
    import select
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, _ = exported
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    cmd = [sys.executable, str(ROOT / "train.py"), f"--dataset_location={out}", f"--dataset_version={_version(out)}",
           f"--log_dir={tmp_path / 'logs'}", f"--ckpt_dir={tmp_path / 'ck'}", *(f"--{k}={v}" for k, v in TINY.items()),
           "--max_steps=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        assert ready, "no line within 120 s"
        line = proc.stderr.readline()
        assert line.strip() == (f"waiting for the 2 processes of this run to meet at 127.0.0.1:{port} (WORLD_SIZE=2); "
                                f"a stop signal ends the wait"), line
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "ck").exists()


def test_a_dangling_link_at_the_run_or_log_folder_s_name_is_said_as_such(exported, tmp_path, capsys):
    """A link whose target does not exist at the run folder's name gave "cannot make or lock the run folder …
    (File exists)", and at the log folder's "… is not a folder": neither said that a link was there."""
    out, _ = exported
    cfg = _cfg(out, tmp_path, max_steps=1)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / cfg.name()).symlink_to(tmp_path / "not_yet")
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'ck' / cfg.name()}: a link to {tmp_path / 'not_yet'}, which does not exist; remove it, "
        f"or give another --ckpt_dir (or --exp_name)")
    (tmp_path / "ck" / cfg.name()).unlink()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / cfg.name()).symlink_to(tmp_path / "not_yet")
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --log_dir: {tmp_path / 'logs' / cfg.name()} is a link to {tmp_path / 'not_yet'}, which does not "
        f"exist (the run's TensorBoard log goes there); remove it or give another --log_dir")
