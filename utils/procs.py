"""Processes and file systems: is a writer still alive, did a write fail for lack of space, a pool of worker
processes that survives the death of one."""

from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NoReturn

try:
    import fcntl
except ImportError:  # not a POSIX system: no owner locks, liveness falls back to pids
    fcntl = None

# Signals that ask a long job to stop: a scheduler's SIGTERM, a terminal's Ctrl-C (SIGINT), SIGHUP, which a
# closed terminal or ssh session sends (nohup ignores it; a signal ignored at start stays ignored), and the warnings
# some schedulers send instead of SIGTERM, SIGUSR1 (SLURM's --signal=USR1@60, as cluster templates use it) and
# SIGXCPU (a CPU-time limit): by default those two killed a run on the spot, unsaved. A reader of the job's output
# gone (`| head`, `less` quit) is a stop too, named SIGPIPE (`GuardedStream`); the signal itself stays ignored as
# Python sets it: a socket or an encoder's pipe that breaks is that write's error, not a stop
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP",
                                                                              "SIGUSR1", "SIGXCPU")
                                                 if hasattr(signal, n))


def exit_code(signame: str) -> int:
    """A run stopped by this signal exits as a shell reports it: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(getattr(signal, signame, signal.SIGINT))


# what torch's allocators and oneDNN say when an allocation fails (a ulimit -v, a cgroup, overcommit refused, a full
# GPU); ENOMEM's own text comes from a failed mmap of a checkpoint. oneDNN's "could not create a primitive
# descriptor" is an unsupported configuration, not memory
OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|Cannot allocate memory|CUDA out of memory|"
                           r"could not create a primitive(?! descriptor)")


def out_of_memory(e: BaseException) -> bool:
    """Whether e is this machine running out of memory rather than a bug or bad data."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    return isinstance(e, RuntimeError) and OUT_OF_MEMORY.search(str(e)) is not None


def error_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an error's text (its type's name when it has none), cut to `limit` characters: what a
    one-line message quotes of it (torch's allocator errors run over several lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def caught_stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS not ignored by whoever started this process (nohup's SIGHUP, a background job's SIGINT)."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


class GuardedStream:
    """stdout or stderr that outlives its reader: the first write or flush that fails (the pipe's reader gone, the
    log's disk full) points the stream's file descriptor at /dev/null, and that write and every later one succeed.
    Text the stream's encoding cannot write (a file name's undecodable byte, a lone surrogate from a data file) is
    written escaped: it ended evaluations and training runs in a UnicodeEncodeError.
    For a reader gone (BrokenPipeError) a long job's stop handler (the one its SIGTERM runs) is then called for
    SIGPIPE, in the main thread: it saves and stops as for SIGTERM, naming SIGPIPE; otherwise the program goes on
    without its output. Either raised in the print of a training step line before: every step since the last save
    was lost, in a traceback."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False
        self._stop_pending = False  # a reader gone, seen by another thread: the main thread asks at its next write

    def write(self, text: str) -> int:
        """The stream's write; the text's length once the reader is gone."""
        if self._stop_pending:
            self._ask_stop()
        if not self.broken:
            try:
                try:
                    return self._stream.write(text)
                except UnicodeEncodeError:  # a name from the data that this stream's encoding cannot write
                    enc = getattr(self._stream, "encoding", None) or "utf-8"
                    self._stream.write(text.encode(enc, "backslashreplace").decode(enc))
            except OSError as e:
                self._lost(e)
        return len(text)

    def flush(self) -> None:
        """The stream's flush; nothing once the reader is gone."""
        if self._stop_pending:
            self._ask_stop()
        if not self.broken:
            try:
                self._stream.flush()
            except OSError as e:
                self._lost(e)

    def _lost(self, e: OSError) -> None:
        # a reader gone from a pipe asks the job to stop; anything else that fails a write of the output (a full
        # or over-quota log disk, a descriptor closed under the program, a hung-up terminal whose SIGHUP is on its
        # way) only loses the output: a training whose log filled its disk died in a traceback, unsaved
        self._detach(stop=isinstance(e, BrokenPipeError))

    def _detach(self, stop: bool) -> None:
        self.broken = True
        try:
            point_at_devnull(self._stream.fileno())
        except (OSError, ValueError, AttributeError):  # no descriptor of its own (a test's capture): nothing to point
            pass
        if stop:
            self._stop_pending = True
            self._ask_stop()

    def _ask_stop(self) -> None:
        # signal handlers run in the main thread alone; a progress bar's thread leaves it to the next main write
        handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            self._stop_pending = False
            if callable(handler):
                handler(signal.SIGPIPE, None)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def guarded_output() -> Iterator[None]:
    """sys.stdout and sys.stderr as GuardedStream while the block runs (a script's whole run)."""
    old = sys.stdout, sys.stderr
    nulls = []  # opened here, closed below

    def guarded(stream):
        if stream is None:  # the descriptor was closed at start (`cmd >&-`): print() copes, tqdm fails on None
            nulls.append(open(os.devnull, "w"))
            return nulls[-1]
        return stream if isinstance(stream, GuardedStream) else GuardedStream(stream)

    sys.stdout, sys.stderr = guarded(old[0]), guarded(old[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
        for f in nulls:
            f.close()


def detach_from_closed_terminal(signum: int) -> None:
    """On SIGHUP, point stdout and stderr that are a terminal at /dev/null. SIGHUP means the terminal or ssh session
    closed, and every later write to it fails (EIO): the step line or the summary printed on the way to a clean
    stop then raised, and the save or the results file that was to follow never happened. Other signals, and
    output to files or pipes, are left as they are."""
    if signum != getattr(signal, "SIGHUP", None):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            # a character device: isatty() is already false on a hung-up terminal (its ioctls fail); /dev/null,
            # the only other character device output goes to, is harmless to replace by itself
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                continue
            point_at_devnull(fd)
        except (OSError, ValueError, AttributeError):  # no file descriptor (replaced, closed): nothing to point
            continue


def point_at_devnull(fd: int) -> None:
    """Make an output descriptor write to /dev/null from now on (its stream object stays as it is)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


# The stop a signal handler raised last, and its signal, until Python drops it (see raise_stop).
_raised: tuple[BaseException, int] | None = None


def _redeliver_dropped(unraisable: Any, previous: Callable[[Any], None]) -> None:
    """sys.unraisablehook: a stop exception Python dropped is raised again soon after, by a one-shot handler of
    its signal; anything else goes to `previous`."""
    global _raised
    held = _raised
    if held is None or unraisable.exc_value is not held[0] or threading.current_thread() is not threading.main_thread():
        previous(unraisable)
        return
    exc, signum = held
    _raised = None
    old = signal.getsignal(signum)

    def again(s: int, frame: Any) -> None:
        signal.signal(s, old)  # one shot: the handler of before (often SIG_IGN during a clean-up) comes back
        raise_stop(s, exc)

    signal.signal(signum, again)
    # fired from another thread a moment later: fired from here, the handler would run inside this hook or the
    # finalizer that called it, and be dropped again. interrupt_main runs the Python handler only, never a
    # signal's default action, so a job that has meanwhile put SIG_DFL back is not killed by it.
    threading.Thread(target=_interrupt_main_later, args=(signum,), daemon=True).start()


def _interrupt_main_later(signum: int) -> None:
    time.sleep(0.02)
    import _thread

    _thread.interrupt_main(signal.Signals(signum))


def raise_stop(signum: int, exc: BaseException) -> NoReturn:
    """Raise a signal handler's stop exception so that it is never lost. A handler runs at whatever instruction
    the main thread is at; inside a finalizer (__del__) or an at-fork hook (imageio-ffmpeg's Popen runs
    logging's), Python prints "Exception ignored in ..." and drops the exception, and the job went on as if no
    signal had come. The dropped stop is instead raised again, silently, at the next instruction outside."""
    global _raised
    detach_from_closed_terminal(signum)
    hook = sys.unraisablehook
    if getattr(hook, "__name__", "") != "_redeliver":
        def _redeliver(unraisable: Any, previous: Callable[[Any], None] = hook) -> None:
            _redeliver_dropped(unraisable, previous)

        sys.unraisablehook = _redeliver
    _raised = (exc, signum)
    raise exc


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs; a zombie (killed, parent gone, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> int | None:
    """When a process of this host started (clock ticks since boot, /proc/<pid>/stat), or None where that cannot
    be read: with its pid it names one process even after the pid is reused (a restarted container's pid 1)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters of glibc
KEEP_FREE_HEAP = 1 << 30  # free memory at the heap's top kept for later allocations instead of returned
MMAP_ABOVE = 32 << 20  # allocations above this are mapped on their own, and returned when freed (glibc's maximum)
_malloc_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for this process's next allocations (once per process; False where
    the C library is not glibc or refuses). Tracking allocates and frees feature maps of the same large sizes
    frame after frame; by default glibc returns them to the system, and every page of the next one is faulted
    in and zeroed again: 70,000 page faults a frame at 512x896, a fifth of the encoder's time
    (docs/BENCHMARKS.md). Allocations above 32 MiB still get their own mapping, and at most 1 GiB of free
    heap is kept."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    try:
        if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)
        _malloc_tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)
                             and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_HEAP))
    except (OSError, ValueError, AttributeError):  # no confstr name or no mallopt: another C library
        pass
    return _malloc_tuned


def release_freed_memory() -> None:
    """Return the free memory `reuse_freed_memory` had glibc keep to the system (at the end of a tracking job: a
    long-lived process such as the web demo does not keep the largest job's maps between jobs)."""
    if _malloc_tuned:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that forked it ends


def die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process when `parent` (the process that started it) ends, however it ends; exit now
    if it already has. A worker that holds nothing to save uses it: a parent stopped by SIGKILL, or stopped while
    it was still starting its workers, cannot shut them down itself, and they would live on as orphans."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the worker's own checks of its parent remain
        return
    # the parent ended before the request was in place (a forkserver's child has the forkserver as its parent,
    # which ends with the process that started it)
    if os.getppid() != parent and not pid_alive(parent):
        os._exit(1)


def is_space_error(exc: BaseException) -> bool:
    """Whether ENOSPC/EDQUOT (or ffmpeg's 'No space left') appears anywhere in the exception's chain."""
    e: BaseException | None = exc
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# how torch's zip writer reports a write that failed under it (the OSError is then its exception's context)
WRITE_FAILED = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed")


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: the exception itself, or the first OSError in the chain of a library's
    error that says a write failed (WRITE_FAILED); None for anything else (an error raised while some unrelated
    OSError was being handled is not a failed write)."""
    if isinstance(exc, OSError):
        return exc
    if not WRITE_FAILED.search(str(exc)):
        return None
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


# ---------------------------------------------------------------------------------------------------------
# A pool of worker processes that never waits on a dead one.


def _serve(conn: Connection, fn: Callable[[Any], Any], initializer: Callable[[], None] | None) -> None:
    """A worker's loop: run fn on each job received, send its result back; stop at None or when the parent is
    gone (its end of the pipe closed)."""
    if initializer is not None:
        initializer()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = fn(job)
        try:
            conn.send(result)
        except OSError:  # the parent is gone (killed): what the job wrote is on disk for its rerun to find
            return


def describe_exit(code: int | None) -> str:
    """A dead process's exit code in words: "killed by SIGKILL", "exit code 3" (128 + n is signal n, as a
    process that dies of a signal by its own handler reports it)."""
    if code is None:
        return "still running"
    n = -code if code < 0 else code - 128 if 128 < code <= 128 + 64 else 0
    try:
        return f"killed by {signal.Signals(n).name}" if n else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


@dataclass(eq=False)
class _Worker:
    proc: Any  # multiprocessing's Process of the chosen context
    conn: Connection
    job: Any = None
    busy: bool = False


class WorkerPool:
    """`n` processes running fn(job), one job each at a time, for `run`'s queue of jobs.

    Unlike multiprocessing.Pool, which replaces a killed worker but waits forever for the job it held, a
    worker's death is reported with its job (the caller decides whether to queue it again) and the worker is
    replaced; unlike concurrent.futures, one death does not fail every other job. Used as a context manager:
    leaving the block normally lets idle workers exit, leaving it with jobs still running (an exception, a
    break) terminates the workers (SIGTERM, then SIGKILL after `grace` seconds) and reaps them.

    Workers are started with SIGINT ignored: a terminal's Ctrl-C reaches the whole process group, and the
    parent alone should decide what it means. fn and initializer must be picklable (module-level functions);
    fn should return its errors as results: an exception ends its worker, which is then reported as dead.
    """

    def __init__(self, fn: Callable[[Any], Any], n: int, initializer: Callable[[], None] | None = None,
                 start_method: str = "spawn", grace: float = 10.0):
        self.fn, self.n, self.initializer, self.grace = fn, max(1, n), initializer, grace
        self.ctx = mp.get_context(start_method)
        self.workers: list[_Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and not self.busy:
            self.close()
        else:
            self.terminate()

    @property
    def busy(self) -> bool:
        """Whether a worker is running a job."""
        return any(w.busy for w in self.workers)

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        main = threading.current_thread() is threading.main_thread()  # where Python can set a handler
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # kept through a spawned worker's exec
        try:
            # typeshed gives get_context(str) the BaseContext type, which declares no Process; every context it
            # returns (spawn, fork, forkserver) has one
            proc = self.ctx.Process(  # pyright: ignore[reportAttributeAccessIssue]
                target=_serve, args=(child, self.fn, self.initializer), daemon=True)
            proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        child.close()
        w = _Worker(proc, parent)
        self.workers.append(w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.conn.close()
        w.proc.join(timeout=self.grace)
        self.workers.remove(w)

    def run(self, jobs: deque) -> Iterator[tuple[Any, Any, int | None]]:
        """(job, fn(job), None) for each finished job and (job, None, exit code) for a job whose worker died
        (a negative code: killed by that signal), in the order they end. Jobs are taken from the left of
        `jobs`; the caller may append to it while iterating (e.g. a job to retry)."""
        while jobs or self.busy:
            for w in list(self.workers):  # hand out jobs; a worker that died idle is replaced, its job kept
                if jobs and not w.busy:
                    try:
                        w.conn.send(jobs[0])
                    except OSError:
                        self._drop(w)
                        continue
                    w.job, w.busy = jobs.popleft(), True
            if jobs and len(self.workers) < self.n:
                self._start()
                continue
            busy = [w for w in self.workers if w.busy]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                if w.conn not in ready and w.proc.sentinel not in ready:
                    continue
                result, died = None, not w.conn.poll()  # a result sent just before the worker died still counts
                if not died:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):  # the worker's end closed: it died
                        died = True
                job, w.job, w.busy = w.job, None, False
                if died:
                    self._drop(w)
                    yield job, None, w.proc.exitcode
                else:
                    yield job, result, None

    def close(self) -> None:
        """Let every worker finish and exit; SIGKILL any that has not after `grace` seconds."""
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        self._reap()

    def terminate(self) -> None:
        """Stop every worker now (SIGTERM, then SIGKILL after `grace` seconds) and reap it."""
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.terminate()
        self._reap()

    def _reap(self) -> None:
        deadline = time.monotonic() + self.grace
        for w in self.workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self.workers = []


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid; 0 where there is none to read): pids are
    only comparable within one. A container shares the host's name under --network=host, and a TMPDIR mounted
    into it, while its pids are other processes' or none on the host."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_tag() -> str:
    """<host>.<pid>.<pid namespace>: the part of a temp file's or folder's name that says which process owns it, so
    a later process can remove it once its owner is gone (`remove_dead_owned`)."""
    return f"{socket.gethostname()}.{os.getpid()}.{pid_namespace()}"


OWNER_LOCK = ".owner"  # in an owned temp folder: a file its owner keeps locked (flock) while it lives
_OWNED: dict[str, int] = {}  # owned temp folders of this process -> the descriptor holding their lock


def close_inherited_locks(held: dict) -> None:
    """In a child forked without exec (a data-loader worker, a fork pool's process): close the lock descriptors
    `held` (path -> descriptor) that came from the parent. A lock lasts while any descriptor of it is open, so a
    child that outlived its dead parent kept the parent's folders and claims looking alive until it exited."""
    for fd in held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    held.clear()


if hasattr(os, "register_at_fork"):  # POSIX; exec (subprocess, spawn) already closes them: they are not inheritable
    os.register_at_fork(after_in_child=lambda: close_inherited_locks(_OWNED))


def owned_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new temp folder named <prefix>.<owner tag>.<random> in `parent` (TMPDIR by default), holding OWNER_LOCK
    locked while this process lives: a later process of this machine, in any PID namespace, can tell it from a live
    process's and remove it once its owner is gone (`remove_stale_tempdirs`). Remove it with `remove_owned`."""
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}.{owner_tag()}.", dir=parent))
    # locked under another name first: an OWNER_LOCK is never there unlocked, which a cleaner would take for a
    # dead owner's; without locks there is none, and the name's pid and namespace are what is left to judge by
    pending = d / f"{OWNER_LOCK}.new"
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return d
    if try_lock(fd) == "taken":
        try:
            os.rename(pending, d / OWNER_LOCK)
            _OWNED[str(d)] = fd
            return d
        except OSError:
            pass
    os.close(fd)
    pending.unlink(missing_ok=True)
    return d


def try_lock(fd: int) -> str:
    """Take an exclusive lock (flock) on an open file for as long as this process keeps it open: "taken", "held"
    (a live process holds it), or "unavailable" (no such locks on this system or file system)."""
    if fcntl is None:
        return "unavailable"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError:
        return "unavailable"
    return "taken"


def remove_owned(folder: str | os.PathLike) -> None:
    """Remove an owned_tempdir folder and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _OWNED.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


class NotARegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a symlink where this project writes only regular files."""


def open_lock_file(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """os.open of a lock, claim, record or manifest file this project keeps in a folder others may write to: a
    regular file, never blocking and never following a symlink (NotARegularFile otherwise), as one there may have
    been planted. (Data files are opened by utils/safe_load.open_regular, which follows links.)"""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise NotARegularFile(errno.ELOOP, "a symlink", str(path)) from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing without a reader
            raise NotARegularFile(errno.ENXIO, "not a regular file", str(path)) from None
        if e.errno == errno.EISDIR:  # a folder opened for writing
            raise NotARegularFile(errno.EISDIR, "a folder", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def probe_lock(path: str | os.PathLike, write: bool = False) -> tuple[str, int | None]:
    """Whether the owner of a lock file lives: ("free", its descriptor, locked now by this process and to be
    closed), ("held", None) for a live owner, ("gone", None) for no such file, ("unavailable", None) where locks
    cannot tell. A holder's lock goes with its process, whatever its pid or PID namespace: how this project tells
    a dead owner of a file from a live one on this machine. `write` opens it for writing (to take it over); a check
    needs only to read it, as another user's file allows. ("foreign", None): not a regular file (a FIFO, a device,
    a symlink), which no process of this project made: opening a FIFO waited for a writer for ever, so anyone who
    could plant one in a shared TMPDIR hung every later start."""
    try:
        fd = open_lock_file(path, os.O_RDWR if write else os.O_RDONLY)
    except FileNotFoundError:
        return "gone", None
    except NotARegularFile:
        return "foreign", None
    except OSError:
        return "unavailable", None
    state = try_lock(fd)
    if state == "taken":
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not replaced meanwhile by its remover
                return "free", fd
            state = "gone"
        except OSError:
            state = "gone"
    os.close(fd)
    return state, None


def _owner_gone(d: Path) -> bool | None:
    """Whether the owner of an owned folder is gone, from its OWNER_LOCK (None when that cannot tell)."""
    state, fd = probe_lock(d / OWNER_LOCK)
    if fd is not None:
        os.close(fd)
    return {"free": True, "held": False, "foreign": False}.get(state)  # a planted OWNER_LOCK: not ours, left


def remove_dead_owned(folder: str | os.PathLike, head: str, tail: str = r"[A-Za-z0-9_]+",
                      dirs: bool = True) -> list[Path]:
    """Remove the folders (`dirs`) or files of `folder` named <head>.<owner tag>.<tail> whose owner was a process
    of this host and PID namespace that is gone (SIGKILL, out of memory: no handler of its own could clean them);
    returns them. Another host's or namespace's are left: their pids say nothing here. A folder holding an
    OWNER_LOCK is judged by that lock instead, in any namespace of this machine (a restarted container's)."""
    # the namespace is absent from names made before it was recorded
    pattern = re.compile(rf"^{re.escape(head)}\.(?P<host>.+?)\.(?P<pid>\d+)\.(?:(?P<ns>\d+)\.)?(?:{tail})$")
    ns, host, removed = pid_namespace(), socket.gethostname(), []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for d in entries:
        m = pattern.match(d.name)
        if not m or m["host"] != host or d.is_dir() != dirs:
            continue
        try:
            st = d.lstat()
            if hasattr(os, "geteuid") and st.st_uid != os.geteuid():  # another user's (a shared TMPDIR):
                # never ours to judge or remove
                continue
        except OSError:
            continue
        gone = _owner_gone(d) if dirs else None  # this process's own folders too: its lock is held
        if dirs and (gone is None or stat.S_IMODE(st.st_mode) != 0o700):
            # without its OWNER_LOCK, or without mkdtemp's private mode, the folder is not evidently one this
            # program made: another user who may write where it is could have renamed a folder of this user's to
            # such a name (which they could not delete themselves) for this process to remove it
            continue
        if gone is None:
            gone = (m["ns"] is None or int(m["ns"]) == ns) and not pid_alive(int(m["pid"]))
        if gone:
            if dirs:
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            removed.append(d)
    return removed


def remove_stale_tempdirs(prefix: str, tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove the `owned_tempdir` folders of `prefix` that processes of this host left when they were killed
    (SIGKILL, out of memory, a closed terminal under an old version), which no handler can clean; returns them.
    A folder of a live process stays."""
    return remove_dead_owned(tmp or tempfile.gettempdir(), prefix)


@contextmanager
def ending_at_once_on_stop() -> Iterator[None]:
    """Inside, a stop signal (SIGTERM, SIGINT, SIGHUP) ends the process at once, by the signal's default action:
    for a wait inside C code that no Python handler can interrupt (a process group's rendezvous, whose other
    processes may never come), when nothing of the process's needs saving yet. Outside, the handlers are as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in before:
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) arrived inside stopping_on_signals(): the job unwinds, every
    `finally` on the way out runs, and its program exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_held: list[int] | None = None  # inside held_stops(): the stop signals that arrived, raised at its end


def stop_handler(signum: int, frame) -> None:
    """The handler stopping_on_signals() installs: later signals are ignored (the clean-up runs undisturbed), and
    this one raises Stopped (at the end of held_stops(), when inside it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _held is not None:
        _held.append(signum)
        return
    raise_stop(signum, Stopped(signum))


@contextmanager
def held_stops() -> Iterator[None]:
    """Inside stopping_on_signals(), a block that a stop must not cut in two (renames that belong together): a
    stop signal arriving within it raises Stopped once the block is done. Masking the signals would not do: the
    process's other threads (torch's pool) would take them."""
    global _held
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread alone
        yield
        return
    outer, _held = _held, []
    try:
        yield
    finally:
        arrived, _held = _held, outer
    if arrived and outer is not None:  # an enclosing block holds them too: it raises them at its end
        outer.extend(arrived)
    elif arrived:
        raise_stop(arrived[0], Stopped(arrived[0]))


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Inside, the stop signals not ignored by whoever started the process raise Stopped; the previous handlers
    come back afterwards. Outside the main thread (which alone may set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in caught_stop_signals()}
    for sig in old:
        signal.signal(sig, stop_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def usable_cpus(cgroup_cpu_max: str | os.PathLike = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may run on: its affinity mask (`taskset`, a scheduler's allocation), further cut by
    a cgroup v2 CPU quota (a container's `--cpus`); at least 1. os.cpu_count() counts the whole machine."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
