"""Shared test helpers: the golden deterministic weights (docs/MODEL.md) and paths to shipped data."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from pips2.nets.plan import ExecPlan
from pips2.utils.golden import golden_state_dict as _recipe

DATA = Path(__file__).parent / "data"

# every execution plan the model has; each must give the reference's numbers (test_golden.py, test_diff_authors.py)
PLANS = {
    "default": ExecPlan.auto(),
    "reference": ExecPlan.reference(),
    "export": ExecPlan.export(),
    "training": ExecPlan.auto(training=True, checkpointing=True),
    "cuda": ExecPlan.auto("cuda"),  # conv1d delta block, channels-last encoder in chunks of 16 frames
    "local+winograd+plain-gather": ExecPlan(delta="winograd", gather="plain", corr_chunk=5000),
    "volume+winograd": replace(ExecPlan.reference(), delta="winograd"),
    "channels-last+chunks": ExecPlan(channels_last=True, encoder_chunk=3, delta="conv1d"),
}


def selected_plans() -> dict[str, ExecPlan]:
    """PLANS, or the ones named in GOLDEN_PLANS=name,name: `make golden-matrix` reruns the float tests under four
    more CPU settings and narrows the float64 sweeps there to a few plans (the whole sweep runs in the main suite)."""
    names = os.environ.get("GOLDEN_PLANS")
    return {k: v for k, v in PLANS.items() if k in names.split(",")} if names else dict(PLANS)


def state_dict_spec() -> list[dict]:
    """Entries of state_dict.json (name, shape, dtype) in file order."""
    return json.loads((DATA / "state_dict.json").read_text())


def golden_state_dict() -> dict[str, torch.Tensor]:
    """The golden weights (docs/MODEL.md) for the keys and shapes of state_dict.json, in its file order."""
    return _recipe([(e["name"], tuple(e["shape"])) for e in state_dict_spec()])


def golden_model(**kwargs):
    """A Pips with the golden weights, in eval mode."""
    from pips2.nets.pips2 import Pips

    model = Pips(**kwargs)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()


def run_main(main, capsys, **kwargs) -> SimpleNamespace:
    """A script's main(**kwargs) run in this process, reported as a subprocess run would be: returncode,
    stdout, stderr. Its flags map one to one to main's arguments; starting Python again proves nothing more."""
    capsys.readouterr()
    try:
        main(**kwargs)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def torch_bytes(obj) -> bytes:
    """What torch.save writes for obj."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tar_bytes(members: dict, gz: bool = True) -> bytes:
    """A tar (gzip unless gz=False) of name -> bytes (a regular file) or (type, linkname) (a link or special
    member)."""
    buf = io.BytesIO()
    # compresslevel 1: checkpoints barely compress and level 9 only costs time
    tf = tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) if gz else tarfile.open(fileobj=buf, mode="w")
    with tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sparse_tar_bytes(name: str, size: int, sparse: bool = True) -> bytes:
    """A tar.gz of one member `name` declaring `size` bytes in a few hundred bytes of archive: an old-GNU sparse
    file that is all hole (tarfile cannot write one, so the header is made here), or with sparse=False a regular
    file whose data is missing (the archive ends after its header)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE if sparse else tarfile.REGTYPE
    info.size = 0 if sparse else size  # a sparse member here has no data blocks: the whole file is a hole
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT)[:tarfile.BLOCKSIZE])
    if sparse:
        head[483:495] = b"%011o\0" % size  # the size it unpacks to
        head[148:156] = b" " * 8  # the checksum counts its own field as spaces
        head[148:156] = b"%06o\0 " % sum(head)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        gz.write(bytes(head) + bytes(2 * tarfile.BLOCKSIZE))
    return buf.getvalue()


def compressed_checkpoint(path: Path, obj, level: int = 1) -> None:
    """torch.save(obj) to path with its tensor data records deflated, as torch never writes them (its reader
    inflates a record whole before checking its size)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(torch_bytes(obj))) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            packed = "/data/" in info.filename
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED if packed else
                         zipfile.ZIP_STORED, compresslevel=level if packed else None)


def run_then_close_its_terminal(cmd: list[str], pattern: str, times: int = 1, timeout: float = 300,
                                **popen) -> tuple[int, str]:
    """Run cmd on a new pseudo-terminal (its controlling terminal, and its stdin, stdout and stderr), read until
    `pattern` appeared `times` times, then close the terminal as a closed window or ssh session does: the kernel
    sends SIGHUP, and every later write to the terminal fails (EIO), which `kill -HUP` does not show. Returns
    (exit code, what was read)."""
    import fcntl
    import select
    import subprocess
    import termios
    import time

    master, slave = os.openpty()

    def session_on_the_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, preexec_fn=session_on_the_terminal,
                            **popen)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while seen.count(pattern.encode()) < times and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: nothing holds the terminal any more (the command ended)
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen.count(pattern.encode()) >= times, seen.decode(errors="replace")[-2000:]
    return code, seen.decode(errors="replace")


def on_each_step(monkeypatch, action, after: bool = False) -> None:
    """Make the trainer call action(state) in every training step, before the step's work (or after it, with
    after=True): a test's way to act at a chosen step (a signal, a lock removed, weights broken)."""
    from pips2 import trainer

    real = trainer.train_step

    def step(state, data, cfg):
        if not after:
            action(state)
        res = real(state, data, cfg)
        if after:
            action(state)
        return res

    monkeypatch.setattr(trainer, "train_step", step)


def left_by_a_killed_owner(folder: Path) -> Path:
    """Make `folder` what `owned_tempdir` leaves when its process is killed: mode 0700, holding its OWNER_LOCK, no
    longer locked. Only such a folder is removed by a later clean-up."""
    from pips2.utils.procs import OWNER_LOCK

    folder.chmod(0o700)
    (folder / OWNER_LOCK).touch()
    return folder
