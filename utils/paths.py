"""Files and folders a job writes: JSON written whole or not at all, and output folders taken back when a job
stops before writing anything into them."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path


def make_dirs(path: str | os.PathLike) -> list[Path]:
    """mkdir -p path; returns the folders this call created, outermost first (empty if path existed). On an
    OSError the folders it made are removed again, and a umask that leaves new folders unusable to their owner
    (0377: the next folder inside cannot be made) is named in the error."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if any(m.name == ".." for m in missing[:-1]):
        # `new/../out` resolves only through a `new` that exists: made for it, it would be left behind as a stray
        raise OSError(errno.ENOENT, "`..` after a folder that does not exist; give the path without it", str(path))
    missing.reverse()  # outermost first
    made: list[Path] = []
    try:
        for p in missing:
            try:
                p.mkdir()
            except FileExistsError:  # made meanwhile by another process: theirs, not to remove
                if not p.is_dir():
                    raise
                continue
            made.append(p)
    except OSError as e:
        remove_empty_dirs(made)
        if made and (problem := umask_problem()):
            raise OSError(e.errno, f"{(e.strerror or 'cannot be made').lower()}: {problem}", e.filename) from None
        raise
    return made


def umask_problem() -> str | None:
    """What is wrong with this process's umask for a program that makes folders and writes in them (it takes the
    owner's write or search permission from new folders), or None."""
    mask = current_umask()
    if not mask & 0o300:
        return None
    return f"the umask {mask:04o} makes new folders unwritable to their owner; set one such as 0022 (umask 022)"


def remove_empty_dirs(made: list[Path]) -> None:
    """Remove the folders of make_dirs that are still empty, innermost first: a job that stopped early leaves
    no empty output folders behind (a folder something was written into stays)."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:  # not empty, or gone: leave it and its parents
            return


def current_umask() -> int:
    """This process's umask, read from /proc where Linux shows it; elsewhere reading it means setting it for an
    instant, during which another thread's new file would get 022."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(base: int, keep_from_others: bool = False) -> int:
    """The mode a new file (`base` 0o666) or folder (0o777) gets under this process's umask; with
    `keep_from_others`, also without write for group and others whatever the umask (cached weights and
    checkpoints: a file others may rewrite in place is never loaded)."""
    return base & ~(current_umask() | (0o022 if keep_from_others else 0))


def new_temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """mkstemp in `folder` (a random name, created exclusively: a predictable one in a folder others may write to
    could be a link planted there), given the mode a file opened in place would get (mkstemp's is 0600, which hid
    results and checkpoints from the colleagues a shared folder's umask lets read them): (descriptor, path)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, umask_mode(0o666))
    except OSError:  # a file system without modes: it keeps the one it gives
        pass
    return fd, name


_PINNED: dict[str, int] = {}  # absolute path -> a descriptor of the folder or file first found there


def proc_fds() -> bool:
    """Whether this process's descriptors can be named as paths (/proc/self/fd, Linux with /proc mounted)."""
    return os.path.isdir("/proc/self/fd")


def _pin(path: str | os.PathLike, flags: int, make: bool = False, follow: bool = False) -> Path:
    """The /proc/self/fd path of a descriptor of `path` opened with `flags` (following a link at its name only with
    `follow`), kept for the process's life and opened again only once what it holds has been removed; without
    /proc, `path`."""
    key = os.path.abspath(path)
    fd = _PINNED.get(key)
    if fd is not None:
        try:
            gone = os.fstat(fd).st_nlink == 0  # removed since (by its user, to start afresh): found again
        except OSError:  # a stale network handle: found again too
            gone = True
        if gone:
            os.close(_PINNED.pop(key))
            fd = None
    if fd is None:
        if make:
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
        fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW) | os.O_CLOEXEC)
        if not proc_fds():
            os.close(fd)
            return Path(path)
        _PINNED[key] = fd
    return Path(f"/proc/self/fd/{fd}")


def pinned_folder(path: str | os.PathLike, make: bool = False, follow: bool = False) -> Path:
    """`path`, a folder (made first with `make`), as this process first found it: on Linux the /proc/self/fd path of
    a descriptor opened without following a link, through which every later name resolves inside that very
    folder. By name, another user who renamed the folder in a folder they may write to and put a link at its
    name turned this process's later creations and deletions there onto the files of any folder the link named.
    OSError (ENOENT, ELOOP, ENOTDIR) if nothing, a link or a file has the name now. Without /proc (other systems,
    a container without it), `path` itself, checked the same way. With `follow`, a link at its name (this user's
    own: the caller has judged it) is followed, and the folder it leads to is held."""
    return _pin(path, os.O_RDONLY | os.O_DIRECTORY, make, follow)


def pinned_file(path: str | os.PathLike, follow: bool = False) -> Path:
    """`path`, a regular file, as this process first found it (`pinned_folder`'s rules): reading the returned path
    reads that very file, whatever is put at its name later. OSError if nothing, a link (unless `follow`: one the
    caller has judged) or no regular file has the name (a FIFO is opened without waiting for a writer, then
    refused)."""
    pinned = _pin(path, os.O_RDONLY | os.O_NONBLOCK, follow=follow)
    if not stat.S_ISREG(os.stat(pinned).st_mode):
        fd = _PINNED.pop(os.path.abspath(path), None)
        if fd is not None:
            os.close(fd)
        raise OSError(errno.EISDIR if os.path.isdir(path) else errno.EINVAL, "not a regular file", os.fspath(path))
    return pinned


class FolderReplaced(OSError):
    """A folder is not the one that was checked any more (`held_folder`); its message is the whole line."""

    def __str__(self) -> str:
        return str(self.args[0])


def held_folder(folder: str | os.PathLike) -> Path:
    """`folder` as this process first found it (`pinned_folder(folder, follow=True)`: the caller pins it when it
    checks it, before long work), to write in; FolderReplaced if something else is at its name now. In a folder
    others may write to, another user could move it aside meanwhile and put a link at its name, and the writes by
    name would go through it, over files of the link's target."""
    here = pinned_folder(folder, follow=True)  # the caller judged the links on the way (`foreign_link`)
    try:
        now = os.stat(folder)
    except OSError:
        now = None
    if now is None or not os.path.samestat(now, os.stat(here)):
        unpin(folder)
        raise FolderReplaced("the folder was moved, removed or replaced during the run; nothing written")
    return here


def unpin(path: str | os.PathLike) -> None:
    """Let go of the descriptor `pinned_folder` or `pinned_file` keeps for `path`, if any."""
    fd = _PINNED.pop(os.path.abspath(path), None)
    if fd is not None:
        os.close(fd)


def unpinned_text(text: str) -> str:
    """`text` (a message) with every pinned path in it (`pinned_folder`, `pinned_file`) named as given."""
    for key, fd in _PINNED.items():
        text = re.sub(rf"/proc/self/fd/{fd}(?![0-9])", lambda _m, k=key: k, text)
    return text


def own_uids(folder: str | os.PathLike) -> set[int]:
    """The owners this user's files have in `folder`: this user, and whoever a file made there now gets (root on
    NFS with root_squash gets `nobody`, a FAT drive gives every file one owner)."""
    uids = {os.geteuid()}
    try:
        fd, probe = tempfile.mkstemp(prefix=".owner-probe.", dir=folder)
    except OSError:  # not writable by this user: only its own uid counts
        return uids
    try:
        uids.add(os.fstat(fd).st_uid)
    finally:
        os.close(fd)
        os.unlink(probe)
    return uids


def made_by_this_user(st: os.stat_result, folder: str | os.PathLike) -> bool:
    """Whether a file with stat `st`, in `folder`, belongs to this user as that file system sees it."""
    return st.st_uid == os.geteuid() or st.st_uid in own_uids(folder)


def foreign_link(path: str | os.PathLike) -> tuple[Path, int] | None:
    """(link, its owner's uid) of the first link met on the way to `path`, itself included, made by a user other
    than this one or root, or None. Whoever made such a link chose where the path leads: in a folder others may
    write to (a team's checkout, a shared scratch disk) another user could plant one at `./checkpoints` or an
    output folder's name, and this program's files would go into a folder of their choice. The path is resolved
    as the kernel does, a component at a time: a link inside the target of the user's own link (a symlinked
    scratch folder into a team's area) is judged too, and `..` after a link leaves its target."""
    text = os.fspath(path)
    pending = [c for c in (text if os.path.isabs(text) else os.path.join(os.getcwd(), text)).split("/") if c]
    here, hops = Path("/"), 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            here = here.parent
            continue
        step = here / name
        try:
            st = os.lstat(step)
        except OSError:  # nothing there (yet): nothing below it either
            return None
        if not stat.S_ISLNK(st.st_mode):
            here = step
            continue
        if st.st_uid not in (os.geteuid(), 0):
            return step, st.st_uid
        hops += 1
        try:
            target = os.readlink(step)
        except OSError:
            return None
        if hops > 40:  # a loop of links: opening the path fails by itself
            return None
        if target.startswith("/"):
            here = Path("/")
        pending = [c for c in target.split("/") if c] + pending
    return None


def foreign_link_problem(path: str | os.PathLike, flag: str) -> str | None:
    """`foreign_link`'s finding as the one line a program says for its flag, or None."""
    found = foreign_link(path)
    if found is None:
        return None
    link, uid = found
    return (f"{flag}: {link} is a link of uid {uid}'s (to {os.path.realpath(link)}), not this user's: its maker chose "
            f"where this program's files would go; remove it, or give another {flag}")


def holding_folder(path: str | os.PathLike) -> Path:
    """The folder a program writing to `path` writes in, links resolved: `path` if it is a folder, else the nearest
    folder on its way that exists (the one its missing folders are made in, or a file's own folder)."""
    here = Path(os.path.realpath(path))
    while not here.is_dir() and here != here.parent:
        here = here.parent
    return here


def placed_by_trusted(folder: str | os.PathLike) -> bool:
    """Whether `folder` is this user's or root's (as its file system records this user's files), or was put where
    it is by one of them: its parent is theirs and nobody else may write to it (a container's mount of its host
    user's folder, a home folder made by the administrator)."""
    folder = Path(os.path.realpath(folder))
    st = os.stat(folder)
    if st.st_uid in (os.geteuid(), 0) or st.st_uid in own_uids(folder):
        return True
    above = os.stat(folder.parent)
    return above.st_uid in (os.geteuid(), 0) and not above.st_mode & 0o022


def foreign_owner(path: str | os.PathLike) -> int | None:
    """The owner of `path` (itself, not a link's target) when it is neither this user (as the file system records
    this user's files) nor root, else None (also when nothing is there)."""
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return None
    if uid in (os.geteuid(), 0) or uid in own_uids(Path(path).parent):
        return None
    return uid


def output_folder_problem(path: str | os.PathLike, flag: str, names: tuple[str, ...] = ()) -> str | None:
    """Why this program may not write to `path` (an output file or folder given as `flag`, or its default; `names`:
    the files it writes in that folder), as one line, or None. Refused: a link another user made on the way
    (`foreign_link`); a folder the output would go into that is another user's (`placed_by_trusted`): its owner
    could move the results away and put others in their place, or choose where they go, as with a link; and a file
    of another user's at an output's name, which a sticky folder (/tmp) would keep from being replaced after all
    the work (docs/BAD_INPUTS.md)."""
    if problem := foreign_link_problem(path, flag):
        return problem
    folder = holding_folder(path)
    try:
        if not placed_by_trusted(folder):
            inside = "" if os.path.realpath(path) == str(folder) else " (the folder it would be made or written in)"
            root = " (this program runs as root: run it as that user, or give a folder of root's)" \
                if os.geteuid() == 0 else ""
            return (f"{flag}: {folder}{inside} is a folder of uid {os.stat(folder).st_uid}, not this user's: its "
                    f"owner could move what this program writes there and put other files in its place; give "
                    f"another {flag}{root}")
    except OSError:  # gone meanwhile, or not searchable: the write itself says so
        return None
    files = [Path(path)] if not os.path.isdir(path) else []
    for p in files + [Path(path) / n for n in names]:
        if (uid := foreign_owner(p)) is not None:
            return (f"{flag}: {p} is a file of uid {uid}, not this user's, at the name of an output: it may not be "
                    f"replaceable here, and its owner chose what it holds; remove it, or give another {flag}")
    return None


def code_folder_problem(folder: str | os.PathLike, flag: str) -> str | None:
    """Why Python code in `folder` (a checkout given as `flag`, imported and run) is not to be run as this user, or
    None: it, a file or folder in it, or a folder on the way to it is another user's, or others may change it (a
    folder on the way may be open to others only with the sticky bit, as /tmp is). Whoever may change the code
    runs their own as the user."""
    top = Path(os.path.realpath(folder))
    trusted = {os.geteuid(), 0}
    for above in reversed(top.parents):
        st = os.stat(above)
        if st.st_uid not in trusted or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            who = f"uid {st.st_uid}'s" if st.st_uid not in trusted else f"open to others (mode {st.st_mode & 0o7777:o})"
            return (f"{flag}: {above}, a folder on the way to {top}, is {who}: whoever may change it could put "
                    f"their own code where this program imports it; keep the checkout in a folder of your own")
    for here, dirs, files in os.walk(top, followlinks=True):
        dirs[:] = [d for d in dirs if d != ".git"]  # git's own files are not imported
        for p in [here, *(os.path.join(here, f) for f in files if f.endswith(".py"))]:
            real = os.path.realpath(p)
            if real != str(top) and not real.startswith(str(top) + os.sep):  # imported from where the link leads
                return (f"{flag}: {p} is a link out of the checkout (to {real}): the code imported there is not the "
                        f"checkout's; keep the checkout whole in a folder of your own")
            st = os.stat(p)  # links inside the checkout: what they lead to is what is imported
            if st.st_uid not in trusted or st.st_mode & 0o022:
                why = f"uid {st.st_uid}'s" if st.st_uid not in trusted else \
                    f"writable by others (mode {st.st_mode & 0o777:o})"
                return (f"{flag}: {p} is {why}: whoever may change it could put their own code where this program "
                        f"imports it; keep the checkout in a folder of your own (chmod -R go-w for your own)")
    return None


def unpinned(path: str | os.PathLike) -> Path:
    """A path under a pinned folder (pinned_folder) as the folder's own path: what messages show."""
    text = os.fspath(path)
    for key, fd in _PINNED.items():
        pin = f"/proc/self/fd/{fd}"
        if text == pin or text.startswith(pin + "/"):
            return Path(key + text[len(pin):])
    return Path(text)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON via a temp file and a rename: a reader never sees half a file (the temp goes on failure)."""
    path = Path(path)
    fd, name = new_temp_file(path.parent, f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_beside(path: Path) -> Path:
    """A new empty file of a random name (created exclusively) beside `path`, to be written and renamed over it: a
    predictable temp name in a folder others may write to could be a link planted to redirect the write."""
    fd, name = new_temp_file(path.parent, f".{path.name}.")
    os.close(fd)
    return Path(name)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether writing `a` would replace the file `b`: the same path once links are resolved, or another hard link
    of it."""
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_writable(folder: str | os.PathLike) -> None:
    """OSError unless a file can be created in `folder` (a read-only file system, permissions, /sys): asked before
    long work whose first write would otherwise fail after it."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
    os.close(fd)
    os.unlink(probe)


def printable(text: str) -> str:
    """`text` (a name from a data file or a folder) as a line on a terminal shows it: control characters and
    undecodable bytes backslash-escaped, so a hostile name cannot move the cursor, clear the screen or retitle the
    terminal (docs/BAD_INPUTS.md)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
