"""The exporter's job protocol: claims, temp folder + rename, rejections, manifest, liveness, stale clean-up.

What a clip holds comes from datasets/clipmaker.py (a pure function of scene, candidate, settings and RNG)
and the format from datasets/clips.py. Here a clip is built in a private temp folder, verified by decoding,
then renamed into place in one atomic step; a folder named with six digits is therefore always complete and
verified. Claim files keep concurrent exporters off each other's clips; claims of dead processes are taken
over; a deterministic rejection is remembered so reruns skip it at once.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pips2.datasets import pointodyssey as pod
from pips2.datasets.clipmaker import Candidate, build_clip
from pips2.datasets.clips import (
    SETTINGS,
    ClipSettings,
    append_manifest,
    clip_dir,
    clip_name,
    is_clip_dir,
    read_settings,
    read_source,
    record_source,
    verify_clip,
    write_settings,
    write_track,
)
from pips2.datasets.clips import list_clips as list_clips  # re-exported: callers that list what an export wrote
from pips2.utils.paths import check_writable, made_by_this_user, pinned_folder, umask_mode, unpinned
from pips2.utils.procs import (
    close_inherited_locks,
    is_space_error,
    open_lock_file,
    pid_alive,
    pid_namespace,
    probe_lock,
    try_lock,
)
from pips2.utils.video import VideoError, write_mp4

STALE_CLAIM_S = 2 * 3600  # a claim from another host older than this is taken over
NO_SPACE = "no space left on device"
NOT_WRITABLE = "cannot write"  # the version folder refuses writes (read-only, permissions): no clip can be written
LOW_SPACE_BYTES = 1 << 20  # a failed write with less free space than this is put down to a full disk


class NoSpaceError(OSError):
    """Writing failed because the disk is full; str(e) is "no space left on device (<path>)"."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"{NO_SPACE} ({path})")

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # strerror is always set (__init__)


class SceneCache:
    """The last few scenes loaded by this process (real annotations are large; clips come grouped by scene)."""

    def __init__(self, root: Path, size: int = 2):
        self.root, self.size, self.items = root, size, {}

    def get(self, name: str) -> pod.Scene:
        """The scene `name` (loaded once); SkipItem("scene <name> unusable: ...") for a scene that cannot be used
        (named: the summary counts clips by reason, so each broken scene gets its own line)."""
        if name not in self.items:
            try:
                scene = pod.load_scene(self.root / name)
                pod.check_frame_sizes(scene)
            except pod.SkipItem as e:
                scene = e
            except (OSError, MemoryError):  # this machine, not the data: tried again for the next clip
                raise
            except Exception as e:  # data the loader does not expect: the same on every run
                scene = pod.SkipItem(bad_data(name, e))
            if len(self.items) >= self.size:
                self.items.pop(next(iter(self.items)))
            self.items[name] = scene
        got = self.items[name]
        if isinstance(got, pod.SkipItem):
            raise pod.SkipItem(str(got) if str(got).startswith(BAD_DATA) else f"scene {name} unusable: {got}")
        return got


BAD_DATA = "bad data in scene"


def bad_data(scene: str, e: Exception) -> str:
    """The rejection reason of a clip whose scene's data raised an error the loader does not name (e.g. arrays
    of disagreeing shapes): it names the scene, so the summary of every later run says which one to look at."""
    msg = str(e).strip()
    return f"{BAD_DATA} {scene} ({type(e).__name__}: {msg.splitlines()[0] if msg else ''})"


# ---------------------------------------------------------------------------------------------------------
# The version folder: one source, writable.


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def source_of(dataset_location: str | Path, frames: dict[str, int], fingerprints: dict[str, str] | None = None
              ) -> dict:
    """What settings.json records of a run's data: the split's resolved path, its scenes' frame counts and
    (when given) their content fingerprints."""
    src: dict = {"dataset_location": str(Path(dataset_location).resolve()), "scenes": dict(frames)}
    if fingerprints is not None:
        src["content"] = dict(fingerprints)
    return src


def check_source(version_dir: Path, st: ClipSettings, source: dict) -> str | None:
    """Create the folder's settings.json with `source`, or check that it records the same source: the same
    resolved dataset_location and the same scenes with the same frame counts (a scene added, removed or
    changed renumbers the candidates, so clip k would become another clip). ValueError in one line if not.
    A settings.json from before the source was recorded is adopted: the source is added and a note returned."""
    if write_settings(version_dir, st, source):
        return None
    # a folder renamed or copied by hand, or a link to another export: its name says one thing, its clips another
    if (held := read_settings(version_dir)) is not None and held != st:
        shown = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)  # noqa: E731 (as a flag)
        diff = ", ".join(f"--{k}={shown(a)} (this run {shown(b)})" for k, a, b in
                         ((k, v, st.to_dict()[k]) for k, v in held.to_dict().items()) if a != b)
        raise ValueError(f"{version_dir / SETTINGS}: its clips were exported with other settings ({diff}): clips of "
                         f"two settings would mix; give another --out_dir")
    recorded = read_source(version_dir)
    if recorded is None:
        record_source(version_dir, source)
        return (f"{version_dir / SETTINGS} recorded no source: recorded {source['dataset_location']} "
                f"({len(source['scenes'])} scenes); the clips already there are taken to come from it")
    if recorded["dataset_location"] != source["dataset_location"]:
        raise ValueError(f"{version_dir}: its clips come from {recorded['dataset_location']}, not "
                         f"{source['dataset_location']}: clips of two data sets would mix; give another --out_dir")
    # folders without frames give no clips: an export that recorded them (count 0) is compared without them
    old = {n: c for n, c in recorded["scenes"].items() if c}
    new = {n: c for n, c in source["scenes"].items() if c}
    if old != new:
        changes = [f"{what} {_names(names)}" for what, names in (
            ("added", [n for n in new if n not in old]), ("removed", [n for n in old if n not in new]),
            ("frame count changed in", [n for n in new if n in old and old[n] != new[n]])) if names]
        raise ValueError(f"{version_dir}: the scenes of {Path(source['dataset_location']) / st.split} changed since "
                         f"its clips were exported ({'; '.join(changes)}): clip numbers would name other clips; "
                         f"give another --out_dir")
    if "content" in source:
        before, now = recorded.get("content"), source["content"]
        if not isinstance(before, dict):  # recorded before the fingerprints were: adopted, as the source was
            record_source(version_dir, {**recorded, "content": now})
            return (f"{version_dir / SETTINGS} recorded no content fingerprints: recorded those of "
                    f"{source['dataset_location']}; the clips already there are taken to match them")
        split_dir = Path(source["dataset_location"]) / st.split
        # a fingerprint of the earlier form (no masks, no times) is compared with that form computed now
        legacy = [n for n in now if isinstance(before.get(n), str) and not before[n].startswith(pod.FINGERPRINT_FORM)]
        changed = [n for n in now if before.get(n) != (pod.legacy_fingerprint(split_dir / n) if n in legacy
                                                       else now[n])]
        if changed:
            raise ValueError(f"{version_dir}: the annotations, frames or masks of {_names(changed)} in {split_dir} "
                             f"changed since its clips were exported (a regenerated or re-released data set at the "
                             f"same path, or files rewritten, or copied without their modification times): clips of "
                             f"two data sets would mix; give another --out_dir")
        if legacy:
            record_source(version_dir, {**recorded, "content": now})
            return (f"{version_dir / SETTINGS} recorded content fingerprints of an earlier exporter (annotations and "
                    f"frame sizes only), which match {split_dir}: recorded the new ones, which also cover the masks "
                    f"and each file's modification time (a mask regenerated since that export cannot be told)")
    return None


def not_writable(e: BaseException, version_dir: Path) -> str | None:
    """"cannot write <folder> (<why>)" if a write into the version folder was refused (read-only file system,
    permissions): every further clip would fail the same way; None otherwise."""
    cur: BaseException | None = e
    while cur is not None:
        name = getattr(cur, "filename", None)
        if getattr(cur, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) and name is not None \
                and unpinned(os.fsdecode(name)).is_relative_to(version_dir):
            return f"{NOT_WRITABLE} {version_dir} ({getattr(cur, 'strerror', None) or cur})"
        cur = cur.__cause__ or cur.__context__
    return None


# ---------------------------------------------------------------------------------------------------------
# Writing, verifying, claiming.


def _tmp_name(k: int, tag: str = "") -> str:
    """The start of a private folder's name under .tmp/ that clean_stale_temps removes once this process is dead."""
    return f"{clip_name(k)}{tag}__{_host()}__{os.getpid()}"


class ForeignTempFolder(OSError):
    """A version's .tmp/ is not this user's own folder."""


def _own_folder(tdir: Path, version_dir: Path) -> bool:
    """Make `tdir` (mode 0700), or keep it if it is this user's folder (made 0700 if it can be); False if something
    else (another user's folder, a link, a file) has the name."""
    try:
        tdir.mkdir(mode=0o700)
        return True
    except FileExistsError:
        pass
    st = os.lstat(tdir)
    if not stat.S_ISDIR(st.st_mode) or not made_by_this_user(st, version_dir):
        return False
    if stat.S_IMODE(st.st_mode) != 0o700:  # an earlier version's, made with the umask's mode
        # through a descriptor of the folder just judged: by name, a link put there meanwhile would get the mode
        try:
            fd = os.open(tdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return False
            os.fchmod(fd, 0o700)
        except OSError:  # a file system without modes (FAT, some network drives): nobody else can write there
            pass
        finally:
            os.close(fd)
    return True


def _tmp_folders(version_dir: Path) -> tuple[Path, Path]:
    """Where this user's clip temp folders go: .tmp/, or .tmp.<this user's id>/ where another user has .tmp/."""
    return Path(version_dir) / ".tmp", Path(version_dir) / f".tmp.{os.geteuid()}"


def private_tmp(version_dir: Path) -> Path:
    """The version's .tmp/ (or, where another user has it, .tmp.<this user's id>/), made or kept this user's own,
    mode 0700. Clips are written there before they are renamed into place: in a folder other users may write to
    (a lab's shared data folder), a clip's folder made there with the umask's mode let them plant links at rgb.mp4
    and track.npz, which ffmpeg and numpy wrote through. ForeignTempFolder if neither name is this user's."""
    for tdir in _tmp_folders(version_dir):
        if _own_folder(tdir, Path(version_dir)):
            return tdir
    raise ForeignTempFolder(errno.EPERM, "not a folder of this user's (the export writes its clips there first)",
                            str(tdir))


def is_no_space(exc: BaseException, path: Path) -> bool:
    """Whether a failed write is down to a full disk: ENOSPC/EDQUOT anywhere in the exception chain, ffmpeg's
    message, or (when the pipe to ffmpeg just broke) hardly any free space left where we were writing."""
    if is_space_error(exc):
        return True
    try:
        return shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return False


def write_clip(version_dir: Path, k: int, frames: np.ndarray, track: np.ndarray, meta: dict,
               preset: str = "medium") -> bool:
    """Write clip k via a private temp folder, verify, rename into place; False if another writer won.

    A full disk raises NoSpaceError naming the folder (a broken pipe to ffmpeg says nothing about why).
    """
    final = clip_dir(version_dir, k)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(k) + "__", dir=private_tmp(version_dir)))  # 0700, its own
    try:
        write_mp4(tmp / "rgb.mp4", frames, fps=24, crf=20, preset=preset)
        write_track(tmp / "track.npz", track)
        verify_clip(tmp, track.shape[0], track.shape[1], frames.shape[1:3])
        # the line before the rename: a process killed between the two leaves a line and no clip (the next run
        # writes it, and the same line again), never a clip the manifest does not list
        append_manifest(version_dir, k, meta)
        # the mode a folder made in place would have had (the temp's is 0700), given inside the private .tmp/, so
        # the clip never shows under its name with a mode its readers cannot open
        os.chmod(tmp, umask_mode(0o777))
        try:
            os.rename(tmp, final)
        except OSError:
            if is_clip_dir(final):  # someone else finished it first: theirs is identical
                return False
            raise
    except Exception as e:
        if is_no_space(e, version_dir):
            raise NoSpaceError(version_dir) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def remove_clip(version_dir: Path, k: int) -> None:
    """Take a (partial or damaged) clip folder out of the way: renamed aside first, so that no half-removed
    folder ever carries a clip's name."""
    final = clip_dir(version_dir, k)
    trash = private_tmp(version_dir) / _tmp_name(k, "-old")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# the claim files this process holds, each open with an exclusive flock: the kernel drops the lock when its holder
# dies, whatever its PID namespace, so a restarted container whose exporter is pid 1 again (the pid the dead claim
# names, alive) takes its claims over; the pid alone kept such a clip "held by other exporters" on every rerun
_HELD: dict[Path, int] = {}
if hasattr(os, "register_at_fork"):  # a forked child must not keep this process's claims alive after it
    os.register_at_fork(after_in_child=lambda: close_inherited_locks(_HELD))


def _claim_owner(path: Path) -> tuple[str, int, float, int | None]:
    """(host, pid, age in seconds, PID namespace or None) a claim file names; a half-written one (its writer died,
    or is writing it now) names no host. Claims of earlier versions name no namespace."""
    try:
        fd = open_lock_file(path)  # not a FIFO planted in its place: reading one waited for a writer for ever
        try:
            host, pid, *ns = os.read(fd, 512).decode().split()
            if len(ns) > 1:
                raise ValueError("not a claim")
            return host, int(pid), time.time() - os.fstat(fd).st_mtime, int(ns[0]) if ns else None
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return "", 0, STALE_CLAIM_S + 1, None


def _not_a_claim(path: Path) -> bool:
    """Whether the file at a claim's name holds something no exporter writes (an exporter's claim is "host pid
    namespace", or empty for the instant between its making and its writing)."""
    try:
        fd = open_lock_file(path)
    except OSError:
        return False  # gone, or not a regular file: judged as such elsewhere
    try:
        words = os.read(fd, 512).decode().split()
    except (OSError, UnicodeDecodeError):
        return True
    finally:
        os.close(fd)
    return bool(words) and not (len(words) in (2, 3) and all(w.isdigit() for w in words[1:]))


def _claimer_may_live(path: Path) -> bool:
    """Where locks cannot tell (a file system without them: NFS mounted nolock, some FUSE and SMB mounts): whether
    the process a claim of this host names may still be alive, judged by its pid in its own PID namespace."""
    _, pid, age, ns = _claim_owner(path)
    if not pid:
        return False
    if ns is not None and ns != pid_namespace():  # another namespace (a restarted container): its pid says nothing
        return age <= STALE_CLAIM_S
    if pid == os.getpid():  # names this process: held if in _HELD, else a dead predecessor of the same pid (a
        return path in _HELD  # container's exporter is pid 1 again after a restart)
    return pid_alive(pid)


def _claim_state(path: Path, write: bool = False) -> tuple[str, int | None]:
    """("free", descriptor) when no process holds the claim (it is then locked by this one), ("held", None),
    ("gone", None); where locks cannot tell, the pid it names, on this host and in its namespace, decides."""
    state, fd = probe_lock(path, write)
    if state == "foreign":  # not a claim this project wrote (a FIFO, a link): not taken, and never read
        return "held", None
    if state == "unavailable":
        state = "held" if _claimer_may_live(path) else "free"
    return state, fd


CLAIMS = ".claims"  # <version>/.claims/<clip>: which process writes which clip


def _host() -> str:
    """This machine's name as claims and temp folder names carry it: white space (which separates a claim's
    fields) as underscores."""
    return "".join("_" if c.isspace() else c for c in socket.gethostname())


def claims_dir(version_dir: Path) -> Path:
    """The folder of a version's claims of clips."""
    return Path(version_dir) / CLAIMS


REJECTED = ".rejected"  # <version>/.rejected/<clip>: why an earlier run rejected the clip


class ClaimsInTheWay(OSError):
    """The claims or rejections folder's name holds something else than a folder this user may write to."""


def _claims(version_dir: Path) -> Path:
    """The claims folder as this process first found it (made if missing): every claim is made, read and removed
    through it, never through a link another user put at its name since (utils/paths.pinned_folder)."""
    return pinned_folder(claims_dir(version_dir), make=True)


def _claim_path(version_dir: Path, k: int) -> Path:
    """Where clip k's claim is read: through the claims folder as first found; by name while this process has not
    found it (missing, or a link: refused at the export's start), where only reading and probing happen."""
    try:
        return pinned_folder(claims_dir(version_dir)) / clip_name(k)
    except OSError:
        return claims_dir(version_dir) / clip_name(k)


def check_claims_dir(version_dir: Path) -> None:
    """ClaimsInTheWay if the claims or rejections folder's name is a link or anything but a folder, or a folder
    this user may not write to (another group member's, made first): every clip would fail to claim (or every
    rejected clip to be recorded), each with its own line, on every run."""
    for cdir in (claims_dir(version_dir), Path(version_dir) / REJECTED):
        if not os.path.lexists(cdir):
            continue
        if cdir.is_symlink() or not cdir.is_dir():
            raise ClaimsInTheWay(errno.ENOTDIR, "not a folder", str(cdir))
        try:
            check_writable(cdir)
        except OSError as e:
            raise ClaimsInTheWay(e.errno, f"a folder this user may not write to ({e.strerror})", str(cdir)) from None


def claim(version_dir: Path, k: int) -> bool:
    """Take clip k for this process (held while it lives: `_HELD`); False if a live process holds it. Dead
    holders' claims are taken over: on this machine when no process holds its lock, from another host after
    STALE_CLAIM_S."""
    path = _claims(version_dir) / clip_name(k)
    me = f"{_host()} {os.getpid()} {pid_namespace()}".encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _not_a_claim(path):  # a file some other program wrote: never taken over, overwritten or removed
                return False
            host, _, age, _ = _claim_owner(path)
            if host and host != _host():
                if age > STALE_CLAIM_S:
                    path.unlink(missing_ok=True)
                    continue
                return False
            state, fd = _claim_state(path, write=True)
            if state == "gone":
                continue
            if state == "held":
                return False
            if fd is None:  # free without locks (its pid is dead): made again
                path.unlink(missing_ok=True)
                continue
            os.ftruncate(fd, 0)  # taken over in place: no window where the file is gone
            os.write(fd, me)
            _HELD[path] = fd
            return True
        if try_lock(fd) == "held":  # taken over in the instant between its making and its lock: the other's now
            os.close(fd)
            return False
        os.write(fd, me)
        _HELD[path] = fd
        return True
    return False


def release(version_dir: Path, k: int) -> None:
    """Give up this process's claim on clip k."""
    path = _claim_path(version_dir, k)
    fd = _HELD.pop(path, None)
    if fd is None:  # not held: whatever has the name now is someone else's
        return
    path.unlink(missing_ok=True)
    os.close(fd)


def claim_abandoned(version_dir: Path, k: int) -> bool:
    """Whether clip k is unwritten and nobody will write it: not rejected (a peer that rejects a clip writes no
    folder), and its claim gone or of this host and held by no process. Another host's claim is its writer's to
    judge (a lock there may not reach this machine)."""
    if is_clip_dir(clip_dir(version_dir, k)) or rejected_reason(version_dir, k) is not None:
        return False
    path = _claim_path(version_dir, k)
    if not path.exists():  # released: written (looked at once more, after the release) or rejected meanwhile
        return not is_clip_dir(clip_dir(version_dir, k)) and rejected_reason(version_dir, k) is None
    return _claim_owner(path)[0] == _host() and not claim_held(version_dir, k)


CLOCK_SKEW_S = 60  # a claim dated further ahead of this clock than this has no age this machine can judge


def claim_unjudged(version_dir: Path, k: int) -> str | None:
    """Why clip k is unwritten under a claim nothing here can judge, or None: a claim file that is no claim, a
    claim of this host's other PID namespace on a file system without flock (its pid says nothing here), or
    another host's dated ahead of this clock (its age, and so when it goes stale, is unknown)."""
    if is_clip_dir(clip_dir(version_dir, k)) or rejected_reason(version_dir, k) is not None:
        return None
    path = _claim_path(version_dir, k)
    state, fd = probe_lock(path)
    if fd is not None:
        os.close(fd)
    if state == "foreign":
        return "a claim file that is not a regular file (a folder, a FIFO, a device or a link: not written by an " \
            "exporter)"
    if _not_a_claim(path):
        return "a claim file that holds no claim (not written by an exporter)"
    host, pid, age, ns = _claim_owner(path)
    if host and host != _host():
        return f"a claim of {host} dated {-age / 3600:.1f} h ahead of this clock" if age < -CLOCK_SKEW_S else None
    if host != _host():
        return None
    # a live pid of this namespace is a running exporter (its clip comes); one of another namespace may be anything
    if state == "unavailable" and ns is not None and ns != pid_namespace() and _claimer_may_live(path):
        return "a claim of this machine that no file lock can judge (this file system has none)"
    return None


def claim_held(version_dir: Path, k: int) -> bool:
    """Whether a live process of this machine holds clip k's claim."""
    path = _claim_path(version_dir, k)
    if path in _HELD:
        return True
    state, fd = _claim_state(path)
    if fd is not None:
        os.close(fd)
    return state == "held"


def mark_rejected(version_dir: Path, k: int, reason: str) -> None:
    """Remember a deterministic rejection so reruns skip it at once."""
    rdir = pinned_folder(Path(version_dir) / REJECTED, make=True)  # never through a link put at its name since
    # a random name created exclusively: a predictable one in a shared export folder could be a planted link
    fd, tmp = tempfile.mkstemp(prefix=f".{k}.", dir=rdir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(reason)
        os.replace(tmp, rdir / clip_name(k))
    finally:
        Path(tmp).unlink(missing_ok=True)


MAX_REASON_BYTES = 4096  # a rejection's reason is one line


def rejected_reason(version_dir: Path, k: int) -> str | None:
    """Why clip k was rejected by an earlier run, or None (also for anything there this program did not write: a
    link, a FIFO, which are never followed or opened)."""
    try:
        p = pinned_folder(Path(version_dir) / REJECTED) / clip_name(k)
        fd = open_lock_file(p)
    except OSError:
        return None
    try:
        return os.read(fd, MAX_REASON_BYTES).decode(errors="replace")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# One clip, start to finish, in a worker process.

_CACHE: SceneCache | None = None


def _check_existing(version_dir: Path, k: int, st: ClipSettings, verify: bool) -> str | None:
    """With the claim held: "exists" for a good finished clip; None (to write it) after removing a partial
    folder or, with verify, a clip that fails verification ("rewrite")."""
    final = clip_dir(version_dir, k)
    if is_clip_dir(final):
        if not verify:
            return "exists"
        try:
            verify_clip(final, st.S, st.N, st.crop_hw)
            return "exists"
        except VideoError:
            remove_clip(version_dir, k)
            return "rewrite"
    if final.exists():  # a six-digit folder without rgb.mp4 or track.npz (older versions, or by hand)
        remove_clip(version_dir, k)
        return "rewrite"
    return None


def export_one(args: tuple) -> tuple[int, str, str]:
    """Build and write clip k; returns (k, status, detail) with status written/rewritten/exists/rejected/busy/
    failed. args = (dataset_location, version_dir, settings dict, k, candidate dict[, verify])."""
    try:
        return _export_one(args)
    except Exception as e:  # e.g. a full disk while claiming: a failed clip, never a crashed export
        return args[3], "failed", _one_line(e, Path(args[1]))


def _one_line(e: BaseException, version_dir: Path) -> str:
    if isinstance(e, NoSpaceError):
        return str(e)
    if isinstance(e, OSError) and is_no_space(e, version_dir):
        return str(NoSpaceError(version_dir))
    refused = not_writable(e, version_dir)
    if refused:
        return refused
    msg = str(e).strip()
    for fd_path in set(re.findall(r"/proc/self/fd/\d+", msg)):  # a pinned folder, as its own path
        msg = msg.replace(fd_path, str(unpinned(fd_path)))
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def _export_one(args: tuple) -> tuple[int, str, str]:
    global _CACHE
    dataset_location, version_dir, st_dict, k, cand, *rest = args
    verify = bool(rest and rest[0])
    st = ClipSettings.from_dict(st_dict)
    version_dir = Path(version_dir)
    final = clip_dir(version_dir, k)
    if is_clip_dir(final) and not verify:
        return k, "exists", ""
    reason = rejected_reason(version_dir, k)
    if reason is not None and not final.exists():
        return k, "rejected", reason
    if not claim(version_dir, k):
        return k, "busy", ""
    try:
        existing = _check_existing(version_dir, k, st, verify)
        if existing == "exists":
            return k, "exists", ""
        if reason is not None:
            return k, "rejected", reason
        root = Path(dataset_location) / st.split
        if _CACHE is None or _CACHE.root != root:
            _CACHE = SceneCache(root)
        cand = Candidate(**cand)
        rng = np.random.default_rng([st.seed, k])
        try:
            frames, track = build_clip(_CACHE.get(cand.scene), cand, st, rng)
        except pod.SkipItem as e:
            mark_rejected(version_dir, k, str(e))
            return k, "rejected", str(e)
        except (OSError, MemoryError):  # this machine, not the data: a failure, tried again by the next run
            raise
        except Exception as e:  # the scene's data as the loader does not expect it: the same on every run
            mark_rejected(version_dir, k, bad_data(cand.scene, e))
            return k, "rejected", bad_data(cand.scene, e)
        meta = dict(asdict(cand), n_valid=int(track[..., 3].sum()), n_visible=int(track[..., 2].sum()))
        wrote = write_clip(version_dir, k, frames, track, meta, st.preset)
        return k, ("rewritten" if existing == "rewrite" else "written") if wrote else "exists", ""
    except Exception as e:  # report and go on: one bad clip must not stop a day-long export
        return k, "failed", _one_line(e, version_dir)
    finally:
        release(version_dir, k)


def clean_stale_temps(version_dir: Path) -> int:
    """Remove temp folders left by dead processes of this machine (their clip's claim no longer held); returns how
    many. Another host's are left: their writers cannot be judged from here."""
    n, host = 0, _host()
    for tdir in _tmp_folders(version_dir):
        if not tdir.is_dir() or tdir.is_symlink() or tdir.stat().st_uid != os.geteuid():  # not this user's to clean
            continue
        for p in tdir.iterdir():
            parts = p.name.split("__", 3)  # <clip>__<host>__<pid>, and __<random> for a clip's own folder
            clip = parts[0].split("-")[0]
            if len(parts) in (3, 4) and parts[1] == host and clip.isdigit() and not claim_held(version_dir, int(clip)):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def clean_stale_claims(version_dir: Path) -> int:
    """Remove the claims of this host that no live process holds (e.g. workers stopped mid-clip); returns how
    many."""
    try:
        cdir = pinned_folder(claims_dir(version_dir))
    except OSError:  # none yet (or a link, refused at the export's start): nothing of this run's to clean
        return 0
    n, host = 0, _host()
    for p in cdir.iterdir():
        if _claim_owner(p)[0] != host or p in _HELD:
            continue
        state, fd = _claim_state(p)
        if state == "free":
            p.unlink(missing_ok=True)
            n += 1
        if fd is not None:
            os.close(fd)
    return n


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _die_with_children(signum, frame) -> None:
    """A worker told to stop: kill (and reap) its ffmpeg encoders first, so that nothing writes on after it."""
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    os._exit(128 + signum)


def worker_init() -> None:
    """Export workers leave Ctrl-C to the parent (which stops them all) and die with their children on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _die_with_children)
