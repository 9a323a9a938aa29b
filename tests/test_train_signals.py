"""train.py under the signals clusters send: SIGTERM or Ctrl-C saves at the next step boundary and exits 0 (a
resume is exact), a second Ctrl-C stops at once, every DDP rank stops at the same step, and a run whose data
disappears saves what it trained before it fails."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import on_each_step
from test_train import STEP_RE, TINY, _losses, _running_means, _start, _train, _train_cmd, _version

from pips2 import trainer
from pips2.cli import train
from pips2.datasets.export import list_clips
from pips2.datasets.training import DataGoneError
from pips2.utils import checkpoint as ck
from pips2.utils.procs import die_with_parent, pid_alive

ROOT = Path(__file__).resolve().parents[1]
# four short steps, each far shorter than the wait below; a step-1 save does not exist, so the checkpoint a stop
# writes is the only one before the end
ARGS = ["--max_steps=4", "--save_freq=100", "--S=4", "--N=4", "--iters=1", "--log_freq=10"]


def _cfg(out, tmp, **kw) -> train.Config:
    return train.make_config(1, {"dataset_location": str(out), "dataset_version": _version(out), "B": 1, "S": 4,
                                 "N": 4, "crop_size": "128,192", "iters": 1, "workers": 0, "device": "cpu",
                                 "log_dir": str(tmp / "logs"), "ckpt_dir": str(tmp / "ck"), **kw})


def _group_gone(pgid: int, timeout: float = 20) -> bool:
    """Whether every process of the group (the loader workers too) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _interrupt_after(proc: subprocess.Popen, marker: str, send) -> str:
    """Read the run's output until `marker`, call send(), then return everything it printed."""
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if marker in line:
            send()
            break
    rest, _ = proc.communicate(timeout=300)
    return seen + rest


def _ctrl_c_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run would hand SIGINT over ignored


@pytest.fixture(scope="module")
def uninterrupted(exported, tmp_path_factory):
    """The reference: the same run, never stopped: (its stdout, its final checkpoint)."""
    out, _ = exported
    tmp = tmp_path_factory.mktemp("ref")
    res = _train(out, tmp, *ARGS, "--workers=2")
    return res.stdout, ck.read_checkpoint(ck.find_checkpoint(next((tmp / "ck").iterdir())))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])  # USR1: killed it, unsaved
def test_a_signal_saves_at_the_step_boundary_and_the_resume_is_exact(exported, tmp_path, uninterrupted, sig):
    """SIGTERM (a scheduler's, to the whole process group: the loader workers get it too) or Ctrl-C (a terminal's,
    to the group as well): the step in progress finishes, its checkpoint is written, one line, exit 0; the same
    command then ends with the weights, optimiser state and printed figures of a run that was never stopped."""
    out, _ = exported
    ref_out, ref_ckpt = uninterrupted
    proc = _start(out, tmp_path, *ARGS, "--workers=2", start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        seen = _interrupt_after(proc, "step 000001/4", lambda: os.killpg(proc.pid, sig))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, seen[-3000:]
    assert "Traceback" not in seen and "KeyboardInterrupt" not in seen, seen[-3000:]
    assert _group_gone(proc.pid), "a loader worker outlived the run"
    ckdir = next((tmp_path / "ck").iterdir())
    saved = [s for s, _ in ck.list_checkpoints(ckdir)]
    assert len(saved) == 1 and 1 <= saved[0] < 4, seen
    last = seen.strip().splitlines()[-1]
    assert last == (f"{ckdir.name}: stopped by {sig.name} at step {saved[0]:06d}/4; saved "
                    f"{ckdir / ck.ckpt_name(saved[0])}; the same command resumes from there")
    assert max(_losses(seen)) == saved[0]  # no step beyond the saved one was started... or at least printed
    assert not (ckdir / ck.LOCK_NAME).exists()

    resumed = _train(out, tmp_path, *ARGS, "--workers=2")
    assert f"resuming at step {saved[0]}" in resumed.stdout and "warning" not in resumed.stderr
    assert sorted(_losses(resumed.stdout)) == list(range(saved[0] + 1, 5))
    ref_means, got_means = _running_means(ref_out), _running_means(resumed.stdout)
    assert all(got_means[s] == ref_means[s] for s in got_means)
    got = ck.read_checkpoint(ck.find_checkpoint(ckdir))
    for part in ("model_state_dict",):
        assert all(torch.equal(ref_ckpt[part][k], got[part][k]) for k in ref_ckpt[part])
    ref_opt, got_opt = ref_ckpt["optimizer_state_dict"]["state"], got["optimizer_state_dict"]["state"]
    assert all(torch.equal(ref_opt[i][k], got_opt[i][k]) for i in ref_opt for k in ref_opt[i])
    assert ref_ckpt["scheduler_state_dict"] == got["scheduler_state_dict"]


def test_stop_request_rules(monkeypatch):
    """The first SIGTERM or SIGINT asks for a stop at the next boundary; a second SIGTERM or a copy of the
    first within SAME_REQUEST_S (torchrun passes a terminal's Ctrl-C on to ranks that got it already) changes
    nothing; a later Ctrl-C stops at once, except while a checkpoint is written."""
    clock = [100.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])
    stop = trainer.StopRequest()
    stop._handle(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM
    stop._handle(signal.SIGINT, None)  # the same moment: one request
    clock[0] += 5
    stop._handle(signal.SIGTERM, None)  # a scheduler repeating itself
    with stop.saving():
        stop._handle(signal.SIGINT, None)  # never while writing a checkpoint
    with pytest.raises(trainer.StoppedAtOnce) as e:
        stop._handle(signal.SIGINT, None)
    assert e.value.signum == signal.SIGINT and stop.signum == signal.SIGTERM


def test_a_second_ctrl_c_stops_at_once_without_saving(exported, tmp_path, monkeypatch, capsys):
    out, _ = exported
    monkeypatch.setattr(trainer, "SAME_REQUEST_S", 0.0)

    def two_ctrl_c_in_step_4(state):  # step 3 is trained and not saved: the first asks for a save
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    on_each_step(monkeypatch, two_ctrl_c_in_step_4)
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=2)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 130
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().err.strip() == (f"{cfg.name()}: stopped at once by a second SIGINT, without saving; "
                                               f"the same command resumes from {ckdir / ck.ckpt_name(2)}")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2] and not (ckdir / ck.LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


@pytest.mark.parametrize("at_step", [1, 3])
def test_a_stop_in_the_first_step_since_a_save_ends_that_step_at_once(exported, tmp_path, monkeypatch, capsys,
                                                                       at_step):
    """Nothing trained since the last save (or the start) is lost by abandoning the step in progress: the first
    SIGTERM stops at once, exit 0, one line. A first step that never ends (a batch as large as the machine's
    memory) is stopped too; before, the request waited for a boundary that never came."""
    out, _ = exported
    done = []

    def sigterm_in_step(state):
        if state.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, mid-step
        done.append(state.step)

    on_each_step(monkeypatch, sigterm_in_step)
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=2)
    with pytest.raises(trainer.TrainingStopped) as e:
        train.run_stage(cfg)
    assert e.value.code == 0 and done == list(range(1, at_step))
    ckdir = tmp_path / "ck" / cfg.name()
    since = f"the same command resumes from {ckdir / ck.ckpt_name(2)}" if at_step == 3 else \
        "nothing trained; the same command starts it"
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{cfg.name()}: stopped by SIGTERM during the first step since the last save, which is redone; {since}")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == ([2] if at_step == 3 else [])
    assert not (ckdir / ck.LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_during_a_step_saves_before_that_steps_validation(exported, tmp_path, monkeypatch, capsys):
    """A scheduler's lead time is for the save: a SIGTERM during step 2 skips step 2's validation (TAP-Vid's can
    take minutes), saves step 2 and stops; one during a TAP-Vid validation ends it between videos."""
    out, _ = exported
    validated = []

    def sigterm_in_step_2(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    on_each_step(monkeypatch, sigterm_in_step_2)
    monkeypatch.setattr(trainer.Validator, "run", lambda self, step, model, stop=None: validated.append(step) or {})
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=100, val_freq=1)
    with pytest.raises(trainer.TrainingStopped):
        train.run_stage(cfg)
    ckdir = tmp_path / "ck" / cfg.name()
    assert validated == [1] and [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{cfg.name()}: stopped by SIGTERM at step "
                                                                       f"000002/5; saved")

    # between TAP-Vid videos: the stop request is looked at before each video
    videos = []
    monkeypatch.setattr(trainer, "load_tapvid", lambda root: iter([("a", 1, 2, 3), ("b", 1, 2, 3)]))
    stop = trainer.StopRequest()
    monkeypatch.setattr(trainer.evaluation, "evaluate_tapvid_video",
                        lambda *a, **k: videos.append(1) or setattr(stop, "signum", signal.SIGTERM))
    vcfg = _cfg(out, tmp_path, tapvid_root="x.pkl", eval_dataset="davis", eval_videos=5)
    net = torch.nn.Linear(1, 1)
    assert trainer.Validator(vcfg, trainer.Ranks.setup("cpu"), None).tapvid(net, stop) is None  # type: ignore[arg-type]
    assert videos == [1] and net.training


def test_a_signal_while_setting_up_stops_before_the_first_step(exported, tmp_path, monkeypatch, capsys):
    out, _ = exported
    real = trainer.Logger.start

    def start_then_sigterm(self, n_items):
        real(self, n_items)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.Logger, "start", start_then_sigterm)
    cfg = _cfg(out, tmp_path, max_steps=3)
    with pytest.raises(trainer.TrainingStopped) as e:
        train.run_stage(cfg)
    assert e.value.code == 0
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1] == (f"{cfg.name()}: stopped by SIGTERM before step 1, nothing trained; "
                                                f"the same command starts it")
    assert not _losses(cap.out) and not ck.list_checkpoints(tmp_path / "ck" / cfg.name())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_in_stage_1_does_not_start_stage_2(exported, tmp_path, monkeypatch, capsys):
    out, _ = exported
    started = []

    def stopped(cfg):
        started.append(cfg.stage)
        raise trainer.TrainingStopped()

    monkeypatch.setattr(train, "run_stage", stopped)
    with pytest.raises(SystemExit) as e:
        train.main(stages="1,2", dataset_location=str(out), ckpt_dir=str(tmp_path / "ck"))
    assert e.value.code == 0 and started == [1]


def _rank_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker of `rank` (from its environment)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0") if ppid == launcher else []
            except (OSError, IndexError, ValueError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under {launcher}")


def test_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(exported, tmp_path):
    """Two gloo ranks under torchrun; SIGTERM reaches rank 1 only: both agree on the step to stop after, rank 0
    saves it, every rank exits 0 (so does torchrun), and the run resumes from it."""
    out, _ = exported
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29537", str(ROOT / "train.py"),
           f"--dataset_location={out}", f"--dataset_version={_version(out)}", f"--log_dir={tmp_path / 'logs'}",
           f"--ckpt_dir={tmp_path / 'ck'}", *TINY, "--max_steps=30", "--save_freq=100", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        seen = _interrupt_after(proc, "step 000001/30", lambda: os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, seen[-3000:]
    assert "Traceback" not in seen
    ckdir = next((tmp_path / "ck").iterdir())
    saved = [s for s, _ in ck.list_checkpoints(ckdir)]
    assert len(saved) == 1 and saved[0] < 30
    stops = [ln for ln in seen.splitlines() if ": stopped by SIGTERM at step" in ln]
    assert stops == [f"{ckdir.name}: stopped by SIGTERM at step {saved[0]:06d}/30; saved "
                     f"{ckdir / ck.ckpt_name(saved[0])}; the same command resumes from there"]
    assert max(int(m.group(2)) for ln in seen.splitlines() if (m := STEP_RE.match(ln))) == saved[0]
    assert ck.read_checkpoint(ckdir / ck.ckpt_name(saved[0]))["world"] == 2


def test_data_deleted_underneath_saves_what_was_trained(exported, tmp_path):
    """The clips vanish while the run trains: the steps done are saved before the one error line (exit 2), and
    the same command resumes from them once the data is back."""
    out, _ = exported
    data = tmp_path / "data"
    shutil.copytree(out, data)
    clips = list_clips(data / _version(data))
    proc = _start(data, tmp_path, "--max_steps=50", "--save_freq=100", "--workers=0", start_new_session=True)
    try:
        seen = _interrupt_after(proc, "step 000002/50", lambda: [shutil.rmtree(c) for c in clips])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, seen[-3000:]
    assert "Traceback" not in seen
    ckdir = next((tmp_path / "ck").iterdir())
    done = max(_losses(seen))
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [done]
    errors = [ln for ln in seen.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {data / _version(data)}: 20 clips in a row were corrupt; saved "
                      f"{ckdir / ck.ckpt_name(done)} (step {done}); the same command resumes from there once the "
                      f"data is readable"], seen[-2000:]


class _Gone(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataGoneError("/data/v1: 20 clips in a row were corrupt")


def test_data_gone_in_a_loader_worker_comes_back_as_one_line():
    """A DataLoader worker's exception reaches the training process as the same type with the worker's whole
    traceback as its message; the error keeps its own line."""
    loader = torch.utils.data.DataLoader(_Gone(), num_workers=1)
    with pytest.raises(DataGoneError) as e:
        next(iter(loader))
    assert str(e.value) == "/data/v1: 20 clips in a row were corrupt"


def test_validation_data_gone_saves_the_step_just_trained(exported, tmp_path, monkeypatch, capsys):
    out, _ = exported
    real, calls = trainer.TrainData.next_val, []

    def gone_at_step_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise DataGoneError("/data/val: 20 clips in a row were corrupt")
        return real(self)

    monkeypatch.setattr(trainer.TrainData, "next_val", gone_at_step_2)
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=100, val_dataset_version=_version(out), val_freq=1)
    with pytest.raises(SystemExit) as e:
        train.run_stage(cfg)
    assert e.value.code == 2
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: /data/val: 20 clips in a row were corrupt; saved {ckdir / ck.ckpt_name(2)} (step 2); the same "
        f"command resumes from there once the data is readable")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2] and not (ckdir / ck.LOCK_NAME).exists()


def test_a_signal_ignored_by_the_caller_stays_ignored(monkeypatch):
    """A shell's background job ignores SIGINT: the run must not make itself stoppable by it."""
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL)
    installed = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.append(sig))
    trainer.StopRequest().install()
    assert installed == [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGXCPU]  # not SIGINT


def test_a_closed_terminal_is_a_stop_request_unless_nohup_ignores_it():
    """SIGHUP (a closed terminal or ssh session) asks for the same stop at a step boundary as SIGTERM: before, it
    killed the run at once, losing every step since the last save. Under nohup (SIGHUP ignored) it stays ignored,
    and loader workers ignore it as they ignore the other stop signals."""
    old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        stop = trainer.StopRequest()
        stop.install()
        try:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.signum == signal.SIGHUP  # noted; the loop saves at the next boundary
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        stop = trainer.StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        stop.restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        trainer.loader_worker_init(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        signal.signal(signal.SIGHUP, old)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the loader workers through /proc")
def test_a_loader_worker_killed_saves_the_last_step_and_ends_in_one_line(exported, tmp_path):
    """A DataLoader worker killed (SIGKILL: the OOM killer's usual pick): torch raises that from its SIGCHLD handler
    wherever the training process is, usually in the forward or backward pass. Before, a 40-line traceback, exit
    1, nothing saved, and the empty run folder removed. Now the last completed step is saved, one line, exit 2,
    and the same command resumes from it."""
    out, _ = exported
    proc = _start(out, tmp_path, *ARGS, "--workers=2", start_new_session=True)
    try:
        seen = _interrupt_after(proc, "step 000001/4", lambda: os.kill(_children(proc.pid)[0], signal.SIGKILL))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, seen[-3000:]
    assert "Traceback" not in seen, seen[-3000:]
    ckdir = next((tmp_path / "ck").iterdir())
    saved = [s for s, _ in ck.list_checkpoints(ckdir)]
    assert len(saved) == 1 and 1 <= saved[0] < 4, seen
    err = [ln for ln in seen.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and re.fullmatch(
        rf"error: DataLoader worker \(pid(?:\(s\))? \d+\) (?:is killed by signal: Killed|exited unexpectedly) \(out of "
        rf"memory\?\); saved "
        rf"{re.escape(str(ckdir / ck.ckpt_name(saved[0])))} \(step {saved[0]}\); the same command resumes from "
        r"there once the data is readable", err[0]), seen[-2000:]
    resumed = _train(out, tmp_path, *ARGS, "--workers=2")
    assert f"resuming at step {saved[0]}" in resumed.stdout and resumed.returncode == 0


# --- a stop raised where Python drops exceptions -----------------------------------------------------------------

_DROPPED_STOP = r'''
import functools, math, os, signal, sys, threading, time
kind = sys.argv[1]
sig = signal.SIGINT if kind == "trainer" else signal.SIGTERM
if kind == "export":
    from pips2.cli.export import Terminated as Stop, _Signals
    _Signals()
elif kind == "eval":
    from pips2.evaluation import Interrupted as Stop, _on_signal
    signal.signal(sig, _on_signal)
elif kind == "demo":
    from pips2.utils.procs import Stopped as Stop, stop_handler
    signal.signal(sig, stop_handler)
elif kind == "webapp":
    from pips2.webapp import _interrupt
    Stop = KeyboardInterrupt
    signal.signal(sig, functools.partial(_interrupt, []))
else:  # the trainer stops at once on a second Ctrl-C
    from pips2.trainer import StopRequest, StoppedAtOnce as Stop
    req = StopRequest()
    req.install()
    req.signum, req.first_at = signal.SIGINT, -math.inf

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs here, inside __del__, whose exceptions Python drops
            pass

try:
    Finalized()
    t0 = time.monotonic()
    while time.monotonic() < t0 + 10:  # the job goes on
        pass
    print("went on")
except Stop:
    print("stopped")
'''


@pytest.mark.parametrize("kind", ["export", "eval", "demo", "webapp", "trainer"])
def test_a_stop_raised_inside_a_finalizer_still_stops_the_job(kind):
    """A signal handled while a __del__ or an at-fork hook runs (imageio-ffmpeg starts ffmpeg with one): Python
    printed "Exception ignored in ..." with a traceback and dropped the stop, and the job went on."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", _DROPPED_STOP, kind], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.stdout.strip() == "stopped", (r.stdout, r.stderr)
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_that_really_closes_saves_at_the_step_boundary(exported, tmp_path):
    """The terminal (a window, an ssh session) closes: SIGHUP, then every write to it fails (EIO). The next step
    line raised, the run ended with exit 1 and every step since the last save was lost. Now the output goes to
    /dev/null and the run stops at the step boundary with its checkpoint, as for `kill -HUP`."""
    from helpers import run_then_close_its_terminal

    out, _ = exported
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = _train_cmd(out, tmp_path, "--max_steps=200", "--save_freq=100")
    code, seen = run_then_close_its_terminal(cmd, "; step 0", times=3, cwd=ROOT, env=env)
    assert code == 0, seen[-2000:]
    saved = ck.list_checkpoints(next((tmp_path / "ck").iterdir()))
    assert len(saved) == 1 and 3 <= saved[0][0] < 200, saved


def test_a_run_ending_on_a_dead_worker_exits_even_if_its_shutdown_hangs():
    """A loader worker killed while it held a lock of the loader's queues can leave their shutdown waiting for
    ever (once in hundreds of runs the run printed its line, saved, and never exited): after the save, a timer ends
    the process whatever the shutdown does."""
    code = "from pips2 import trainer; import time; trainer._exit_within(0.3); time.sleep(60)"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30)
    assert res.returncode == 2 and time.monotonic() - t0 < 20


def test_a_reader_of_the_output_gone_saves_at_the_step_boundary(exported, tmp_path):
    """`train.py | grep -m1 ...`, `| head`, `less` quit: the next step line raised BrokenPipeError, a traceback,
    and every step since the last save was lost. Now the output goes to /dev/null and the run stops at the step
    boundary with its checkpoint, as for a signal."""
    out, _ = exported
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = _train_cmd(out, tmp_path, "--max_steps=200", "--save_freq=100", "--log_freq=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stdout:
            if "; step 000002/" in line:
                break
        proc.stdout.close()  # the reader goes away
        err = proc.stderr.read()
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and "Traceback" not in err, err[-3000:]  # a stopped run exits 0, as for SIGTERM
    assert "stopped by SIGPIPE at step" in err.strip().splitlines()[-1], err[-2000:]
    saved = ck.list_checkpoints(next((tmp_path / "ck").iterdir()))
    assert len(saved) == 1 and 2 <= saved[0][0] < 200, saved


def test_a_stream_whose_reader_is_gone_takes_every_write():
    """The guard every script's output goes through: a pipe whose reader went away raised BrokenPipeError in
    the next print; now that write and the later ones succeed, into /dev/null."""
    from pips2.utils.procs import GuardedStream

    r, w = os.pipe()
    os.close(r)
    asked = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))  # a long job's stop handler
    try:
        raw = os.fdopen(w, "w", buffering=1)
        with pytest.raises(BrokenPipeError):
            raw.write("a line\n")
        guarded = GuardedStream(raw)
        assert guarded.write("a line\n") == 7 and guarded.broken
        guarded.write("another\n")
        guarded.flush()
        assert os.path.samefile(f"/proc/self/fd/{raw.fileno()}", os.devnull)
        raw.close()
        assert asked == [signal.SIGPIPE]  # the job is asked to stop once, for SIGPIPE
        # seen first by another thread (a progress bar's), where no handler may run: asked at the main thread's
        # next write
        import threading

        r3, w3 = os.pipe()
        os.close(r3)
        from_thread = GuardedStream(os.fdopen(w3, "w", buffering=1))
        worker = threading.Thread(target=from_thread.write, args=("bar\n",))
        worker.start()
        worker.join()
        assert from_thread.broken and asked == [signal.SIGPIPE]
        from_thread.write("step line\n")
        assert asked == [signal.SIGPIPE, signal.SIGPIPE]
        asked.clear()
        # a descriptor closed under the program: its output is lost, and that is all
        r2, w2 = os.pipe()
        closed = os.fdopen(w2, "w", buffering=1)
        os.close(w2)
        guarded = GuardedStream(closed)
        assert guarded.write("a line\n") == 7 and guarded.broken and asked == []
        os.close(r2)

        class FullDisk:  # a log on a full or over-quota disk
            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

            def fileno(self):
                raise ValueError("no descriptor")

        guarded = GuardedStream(FullDisk())
        assert guarded.write("step 000023/1000\n") == 17 and guarded.broken and asked == []
        # a name from a data file that the stream's encoding cannot write (a lone surrogate, a Latin-1 byte) is
        # written escaped: it ended evaluations in a UnicodeEncodeError
        import io

        raw = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        guarded = GuardedStream(raw)
        guarded.write("video b\ud800x: scored\n")
        raw.flush()
        assert raw.buffer.getvalue() == b"video b\\ud800x: scored\n" and not guarded.broken
        # the signal itself stays ignored, as Python sets it: a socket's broken write is that write's error
        assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_resumed_run_validates_on_what_the_run_uninterrupted_would(exported, tmp_path):
    """The validation stream restarted at batch `step` after a resume, not after the batches the run had
    validated on (one at step 1 and every --val_freq steps): its validation figures were another run's."""
    out, _ = exported
    flags = dict(val_dataset_version=_version(out), val_freq=2, save_freq=2, keep_latest=0)
    whole = _cfg(out, tmp_path / "whole", max_steps=6, **flags)
    train.run_stage(whole)
    resumed = tmp_path / "resumed"
    (resumed / "ck" / whole.name()).mkdir(parents=True)  # the run stopped after its step-4 save, resumed
    shutil.copy(tmp_path / "whole" / "ck" / whole.name() / ck.ckpt_name(4), resumed / "ck" / whole.name())
    train.run_stage(_cfg(out, resumed, max_steps=6, **flags))

    def figures(run: Path) -> list[float]:
        return ck.read_checkpoint(ck.find_checkpoint(run / "ck" / whole.name()))["d_v"]

    assert len(figures(tmp_path / "whole")) == 4  # steps 1, 2, 4 and 6
    assert figures(resumed) == figures(tmp_path / "whole")
    assert [trainer.validations_before(s, 1000) for s in (0, 1, 999, 1000, 2500)] == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("stopped_at", [1, 4])  # the cache half filled, and full
def test_a_resumed_run_with_a_batch_cache_trains_as_the_run_uninterrupted(exported, tmp_path, stopped_at):
    """--cache_len's cache was filled again from the resumed step's batches, not the stream's first ones the run
    had cached: a resumed run trained on other batches, every weight differed."""
    out, _ = exported
    flags = dict(cache_len=3, save_freq=1, keep_latest=0)
    whole = _cfg(out, tmp_path / "whole", max_steps=6, **flags)
    train.run_stage(whole)
    resumed = tmp_path / "resumed"
    (resumed / "ck" / whole.name()).mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "ck" / whole.name() / ck.ckpt_name(stopped_at), resumed / "ck" / whole.name())
    train.run_stage(_cfg(out, resumed, max_steps=6, **flags))
    a, b = (ck.read_checkpoint(run / "ck" / whole.name() / ck.ckpt_name(6))["model_state_dict"]
            for run in (tmp_path / "whole", resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_during_a_save_stops_at_that_save(exported, tmp_path, monkeypatch, capsys):
    """A stop signal while a checkpoint was written was taken only after one more step and one more save of the
    scheduler's lead time; now at the boundary of the save it interrupted."""
    out, _ = exported
    real_save = trainer.TrainState._save

    def save_while_signalled(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(self)

    monkeypatch.setattr(trainer.TrainState, "_save", save_while_signalled)
    cfg = _cfg(out, tmp_path, max_steps=5, save_freq=2)
    with pytest.raises(trainer.TrainingStopped):
        train.run_stage(cfg)
    ckdir = tmp_path / "ck" / cfg.name()
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{cfg.name()}: stopped by SIGTERM at step "
                                                                       f"000002/5; saved")


def test_a_signal_in_the_last_step_says_the_run_is_complete(exported, tmp_path, monkeypatch, capsys):
    """A stop in the last step said "the same command resumes from there" of a run with nothing left to train."""
    out, _ = exported

    def sigterm_in_the_last_step(state):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    on_each_step(monkeypatch, sigterm_in_the_last_step)
    cfg = _cfg(out, tmp_path, max_steps=3, save_freq=100)
    with pytest.raises(trainer.TrainingStopped):
        train.run_stage(cfg)
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{cfg.name()}: stopped by SIGTERM after its last step, 000003/3; saved {ckdir / ck.ckpt_name(3)}; the run "
        f"is complete (the same command goes on with any stage after it)")


_SLOW_LOADER = """
import sys, time, types
from pips2 import trainer

class Slow:  # a base whose clips take long to load: the workers are busy inside a sample when the parent dies
    def __len__(self):
        return 4

    def sample(self, i, rng):
        time.sleep(120)

cfg = types.SimpleNamespace(seed=0, shuffle=False, B=1, workers=2)
it = iter(trainer.make_loader(Slow(), cfg, 0, types.SimpleNamespace(rank=0, world=1)))
print("started", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_loader_workers_end_with_a_killed_training_process():
    """A training process killed (SIGKILL), or stopped while it still starts its loader workers, cannot shut them
    down. Before, workers busy loading a clip lived on as orphans (torch's own check of their parent runs only
    between clips), each holding the training process's memory; now Linux kills them with their parent."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_LOADER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = _children(proc.pid)
            time.sleep(0.1)
        assert len(workers) == 2, workers
        time.sleep(1)  # both inside their first sample
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(w) for w in workers), "loader workers outlived their killed parent"
    finally:
        proc.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the loader workers through /proc")
def test_a_stop_while_waiting_for_data_from_workers_that_no_longer_answer_saves_and_ends(exported, tmp_path):
    """Loader workers that stop answering without dying (stopped by an admin's SIGSTOP, stuck on a data disk that
    hangs): training waited for the batch for ever, deaf to SIGTERM, so the scheduler's SIGKILL lost every step
    since the last save. A stop request while a step waits for its first batch now stops the run there: the
    last completed step is saved, one line, exit 0, and no process is left."""
    out, _ = exported
    proc = _start(out, tmp_path, "--max_steps=1000", "--save_freq=1000", "--S=4", "--N=4", "--iters=1",
                  "--log_freq=1", "--workers=2", start_new_session=True)
    stdout = proc.stdout
    assert stdout is not None
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in stdout), daemon=True)
    workers: list[int] = []
    try:
        reader.start()
        deadline = time.monotonic() + 120
        while not any("step 000001/1000" in ln for _, ln in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers.extend(_children(proc.pid))
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        # the batches they had made are used up once no step has ended for a while: the run now waits for the next
        while time.monotonic() < deadline and time.monotonic() - max(t for t, _ in lines) < 4:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        seen = "".join(ln for _, ln in lines)
        assert proc.returncode == 0, seen[-3000:]
        assert _group_gone(proc.pid), "a loader worker was left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(workers) == 2
    ckdir = next((tmp_path / "ck").iterdir())
    (step,) = [s for s, _ in ck.list_checkpoints(ckdir)]
    line = [ln for ln in seen.splitlines() if "stopped by SIGTERM" in ln]
    assert line == [f"{ckdir.name}: stopped by SIGTERM at step {step:06d}/1000; saved {ckdir / ck.ckpt_name(step)}; "
                    f"the same command resumes from there (it came while step {step + 1} waited for its data)"], seen


def _stops_at_step_2(cfg: train.Config, tmp_path: Path, capsys, waited: str) -> None:
    """Run cfg, which a stop request ends while `waited` waits for its data: step 2 saved, one line, exit 0."""
    with pytest.raises(trainer.TrainingStopped) as e:
        train.run_stage(cfg)
    assert e.value.code == 0
    ckdir = tmp_path / "ck" / cfg.name()
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{cfg.name()}: stopped by SIGTERM at step 000002/5; saved {ckdir / ck.ckpt_name(2)}; the same command "
        f"resumes from there (it came while {waited} waited for its data)")
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2] and not (ckdir / ck.LOCK_NAME).exists()


def _hang_after_sigterm() -> None:
    """A batch that never comes: the stop request arrives while the run waits for it."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # a loader that no longer answers; the handler cuts this short, or the test fails slowly


@pytest.mark.parametrize("came", ["while waiting", "in the micro-batch before"])
def test_a_stop_while_a_later_micro_batch_waits_for_data_saves_the_step_before(exported, tmp_path, monkeypatch,
                                                                                capsys, came):
    """With --grad_acc, a step waits for a batch once per micro-batch; only the first wait heard a stop request, so
    a loader that hung at a later one kept the run deaf to SIGTERM, whether the request came during that wait or
    during the step's first micro-batch. The step is abandoned there (its optimiser update has not run) and the
    step before is saved."""
    out, _ = exported
    real, real_loss, losses = trainer.TrainData.next, trainer.forward_loss, []

    def hang_in_step_3(self, step, micro):
        if (step, micro) == (3, 1):
            if came == "while waiting":
                _hang_after_sigterm()
            else:
                time.sleep(30)
        return real(self, step, micro)

    def sigterm_in_step_3(*a, **k):
        losses.append(1)
        if came != "while waiting" and len(losses) == 5:  # step 3's first micro-batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, **k)

    monkeypatch.setattr(trainer.TrainData, "next", hang_in_step_3)
    monkeypatch.setattr(trainer, "forward_loss", sigterm_in_step_3)
    _stops_at_step_2(_cfg(out, tmp_path, max_steps=5, save_freq=100, grad_acc=2), tmp_path, capsys, "step 3")


def test_a_stop_while_validation_waits_for_data_saves_the_step_just_trained(exported, tmp_path, monkeypatch,
                                                                             capsys):
    """The validation batch is awaited after the step's update: a loader that hung there kept the run deaf to
    SIGTERM. The trained step is saved and the run ends in one line, exit 0."""
    out, _ = exported
    real, calls = trainer.TrainData.next_val, []

    def hang_at_step_2(self):
        calls.append(1)
        if len(calls) == 2:
            _hang_after_sigterm()
        return real(self)

    monkeypatch.setattr(trainer.TrainData, "next_val", hang_at_step_2)
    _stops_at_step_2(_cfg(out, tmp_path, max_steps=5, save_freq=100, val_dataset_version=_version(out), val_freq=1),
                     tmp_path, capsys, "step 2's validation")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_worker_of_a_live_parent_lives_whatever_the_start_method(method):
    """A forkserver's child has the forkserver as its parent, not the process that asked for it (the default start
    method from Python 3.14): the worker took that for its parent's death and exited at once."""
    import multiprocessing as mp

    proc = mp.get_context(method).Process(target=die_with_parent, args=(os.getpid(),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def test_torchs_words_for_a_dead_loader_worker_are_known():
    """torch says a worker died in two ways: from its SIGCHLD handler, and when the iterator awaiting a batch finds
    it gone ('pid(s) N ... exited unexpectedly'). The second was missed: the run ended in a traceback, exit 1."""
    import torch.utils.data.dataloader as dl

    source = Path(dl.__file__).read_text()
    assert 'DataLoader worker (pid(s) {pids_str}) exited unexpectedly' in source  # the words this pattern is for
    for said in ("DataLoader worker (pid 12) is killed by signal: Killed.",
                 "DataLoader worker (pid(s) 11388) exited unexpectedly",
                 "DataLoader worker (pid(s) 11388, 11390) exited unexpectedly"):
        assert trainer.LOADER_WORKER_DIED.search(said), said
