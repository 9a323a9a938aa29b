"""The one model loader: every script, the web demo, torch.hub (hubconf.py) and training's --init_dir call it.

`load_model(name_or_path, device, kind=...)` returns a PIPs++ or LBM in eval mode; `load_into(model, ...)` puts
a checkpoint's weights (and optimizer state) into a model being trained. Both find the file the same way
(docs/MODELS.md, "Where a checkpoint is looked for"):

- a hub name, "pips2" or "lbm": the authors' released weights, fetched once into a cache;
- a file;
- a folder holding model-*.pth files: the newest, or the one of a given step;
- a folder holding exactly one *.pt or *.pth file.

The model's kind is read from the file's layout: {'model_state_dict': ...} is PIPs++ (the authors' saverloader),
{'model': ...} or a bare state_dict is LBM (the authors' lbm.pt). A caller that expects one kind (the scripts'
--model) passes it and a file of the other kind is refused: the kind is checked, never guessed. Every file is
read weights-only with its declared sizes bounded (utils/checkpoint.py) and loaded strictly; an LBM is built at
the sizes its weights fix (nets/lbm.py). Every problem is one line naming what was looked for and how to get it.

The caches: "pips2" is the authors' reference_model.tar.gz, unpacked (utils/download.py, every header bounded)
into $PIPS2_CACHE (default ~/.cache/pips2). "lbm" lives on the Hugging Face Hub (ZhengGuangze/LBM, lbm.pt) and is
fetched by its own client into its standard cache, so a copy fetched with `hf download ZhengGuangze/LBM lbm.pt`
(the authors' instructions) is the same file, and HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT (a mirror) work as for
any model there. PIPS2_URL_<NAME> replaces a name's address (a mirror, or file:///path for a copy made by hand;
for lbm the file then goes to $PIPS2_CACHE/lbm.pt) and PIPS2_SHA256_<NAME> gives its expected sha256. A download
is verified before it is used (its sha256 when known: the hub's for lbm; then a weights-only strict load), and a
refused one never replaces a good cached copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Literal, overload

import torch
import torch.nn as nn

from pips2.nets.lbm import LBM, MAX_MEMORY_SIZE, build_lbm
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.amp import amp_dtype
from pips2.utils.checkpoint import (
    LBM_LAYOUT,
    PIPS_LAYOUT,
    CheckpointError,
    Layout,
    apply_checkpoint,
    list_checkpoints,
    load_model_state,
    load_weights_only,
    resolve_device,
    strip_module_prefix,
)
from pips2.utils.download import MAX_CHECKPOINT_BYTES, DownloadError, download, fetch_reference
from pips2.utils.paths import (
    check_writable,
    new_temp_file,
    own_uids,
    pinned_file,
    pinned_folder,
    umask_mode,
    unpin,
    unpinned,
    unpinned_text,
)
from pips2.utils.procs import owned_tempdir, remove_owned, remove_stale_tempdirs
from pips2.utils.safe_load import UnsafeFileError, not_regular_problem, open_regular

CACHE_ENV = "PIPS2_CACHE"
KINDS = {"pips2": "PIPs++", "lbm": "LBM"}  # --model value -> the model's name in messages
LAYOUTS = {"pips2": PIPS_LAYOUT, "lbm": LBM_LAYOUT}
DEFAULT_PIPS = "./reference_model"  # the scripts' --init_dir for PIPs++, where get_reference_model.sh writes
DEMO_CHECKPOINTS = Path("demo_out/checkpoints")  # where `make demo` trains its small PIPs++ (a folder per run)
# How to get the authors' PIPs++ checkpoint: the script, or offline the same script reading a tarball copied by hand
OFFLINE_REFERENCE = "REF_MODEL_URL=file:///path/to/reference_model.tar.gz ./get_reference_model.sh"
GET_REFERENCE = (f"./get_reference_model.sh fetches the authors' model into ./reference_model "
                 f"(offline: {OFFLINE_REFERENCE})")


@dataclass(frozen=True)
class Known:
    """A released checkpoint: where it is, its sha256 when published, what it unpacks to in the cache, and, for
    one on the Hugging Face Hub, its repository and file there."""

    url: str
    sha256: str | None
    cached: str  # file (lbm) or folder (pips2, a tar.gz of reference_model/) name inside $PIPS2_CACHE
    archive: bool
    hf_repo: str | None = None
    hf_file: str | None = None


KNOWN = {
    # the authors' PIPs++ reference model, as get_reference_model.sh fetches it (dl=1: the file, not a web page)
    "pips2": Known("https://www.dropbox.com/scl/fi/czdlt2zc2ji2b7zd0pvoe/reference_model.tar.gz"
                   "?rlkey=56ebq4g5dk01kyq8kuismev14&dl=1", None, "reference_model", True),
    # the authors' released LBM weights (their README: huggingface-cli download ZhengGuangze/LBM lbm.pt)
    "lbm": Known("https://huggingface.co/ZhengGuangze/LBM/resolve/main/lbm.pt", None, "lbm.pt", False,
                 "ZhengGuangze/LBM", "lbm.pt"),
}
# an authors' training checkpoint also pickles their argparse arguments, which a weights-only load refuses
REFUSED_HINT = ("keep only the weights: {'model_state_dict': state_dict} for PIPs++, {'model': state_dict} for LBM "
                "(the authors' tools/ckpt_converter.py writes that)")


class HubError(CheckpointError):
    """A checkpoint that cannot be found, fetched or used; one line naming what was looked for and how to get it."""


# ---------------------------------------------------------------------------------------------------------
# The caches of the hub names


def cache_dir() -> Path:
    """The cache folder: $PIPS2_CACHE, else $XDG_CACHE_HOME/pips2, else ~/.cache/pips2 (XDG_CACHE_HOME moves the
    Hugging Face cache, where LBM is kept, too). HubError when none is set and the home folder is unknown."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG rule: a relative value is ignored
        return Path(xdg) / "pips2"
    try:
        return Path.home() / ".cache" / "pips2"
    except RuntimeError:  # no HOME, and no entry for this uid in the password database
        raise HubError(f"no folder for the hub's cache: HOME is not set and this user has no home folder; set "
                       f"{CACHE_ENV} to a folder of your own", local=True) from None


def url_override(name: str) -> str | None:
    """PIPS2_URL_<NAME>, the address given for a hub name, or None."""
    return os.environ.get(f"PIPS2_URL_{name.upper()}") or None


def source_of(name: str) -> tuple[str, str | None]:
    """(url, sha256 or None) of a known name, after the PIPS2_URL_<NAME> and PIPS2_SHA256_<NAME> overrides."""
    known = KNOWN[name]
    url = url_override(name) or known.url
    sha = os.environ.get(f"PIPS2_SHA256_{name.upper()}") or known.sha256
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        raise HubError(f"PIPS2_SHA256_{name.upper()} must be 64 hex digits, got {sha!r}")
    return url, None if sha is None else sha.lower()


def uses_hf(name: str) -> bool:
    """Whether a name is fetched by the Hugging Face client (its repository, no PIPS2_URL_<NAME> given)."""
    return KNOWN[name].hf_repo is not None and url_override(name) is None


def _hf():
    """The huggingface_hub module, imported when a name on the Hub is first used (it is not light)."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors  # noqa: F401 (a submodule the lazy package does not load by itself)

    return huggingface_hub


def hf_cache() -> Path:
    """The Hugging Face cache folder (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return Path(_hf().constants.HF_HUB_CACHE)


def hf_url(name: str) -> str:
    """The address a name on the Hub is fetched from: the file's resolve URL on HF_ENDPOINT (a mirror) or the Hub."""
    known = KNOWN[name]
    return f"{_hf().constants.ENDPOINT}/{known.hf_repo}/resolve/main/{known.hf_file}"


def cached(name: str) -> Path | None:
    """The cached copy of a hub name (a file for lbm, the reference_model/ folder for pips2), or None; no network,
    nothing read."""
    known = KNOWN[name]
    if uses_hf(name) and known.hf_repo and known.hf_file:
        found = _hf().try_to_load_from_cache(known.hf_repo, known.hf_file)
        return Path(found) if isinstance(found, str) else None
    dest = cache_dir() / known.cached
    return dest if dest.exists() else None


def cache_location(name: str) -> Path:
    """Where a hub name is (or will be) cached: $PIPS2_CACHE/<its file or folder>, or the Hugging Face cache."""
    return hf_cache() if uses_hf(name) else cache_dir() / KNOWN[name].cached


def _location_text(name: str) -> str:
    """`cache_location` for a line of advice, which must not fail: the rule itself without a home folder."""
    try:
        return str(cache_location(name))
    except HubError:
        return f"${CACHE_ENV}/{KNOWN[name].cached}"


def offline_hint(name: str) -> str:
    """How to give a hub name without the internet: the environment to start the program with."""
    copy = KNOWN[name].cached + (".tar.gz" if KNOWN[name].archive else "")
    given = f"PIPS2_URL_{name.upper()}=file:///path/to/{copy}"
    if KNOWN[name].hf_repo is None:
        return given
    return (f"{given}, or HF_HUB_OFFLINE=1 once `hf download {KNOWN[name].hf_repo} {KNOWN[name].hf_file}` has put "
            f"a copy in the Hugging Face cache")


def verify(path: Path, name: str, source: str) -> None:
    """Raise HubError unless every checkpoint at path reads weights-only, is of the name's kind and loads strictly
    into a model of the sizes it declares; errors name `source`, not the temp file checked."""
    files = [path] if path.is_file() else [p for _, p in list_checkpoints(path)]
    if not files:
        raise HubError(f"{source}: holds no reference_model/model-*.pth checkpoint")
    for p in files:
        where = source if path.is_file() else f"{source}: reference_model/{p.name}"
        try:
            kind, ckpt = read_checkpoint_of(p, name)
            _build(kind, ckpt[LAYOUTS[kind].model], str(p), "cpu", None, {})
        except CheckpointError as e:
            raise HubError(str(e).replace(str(p), where)) from None


def _swap_in(new: Path, dest: Path) -> None:
    """Put the verified folder `new` at dest, replacing an older copy only once the new one is complete."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception of another library as a short line (theirs may span lines and give advice of their own)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def _unreachable_line(name: str, why: str) -> str:
    """The loader's line for a name on the Hub that is not cached and cannot be fetched now (`why`)."""
    return (f"{name}: not in the Hugging Face cache ({hf_cache()}) and {why}; fetch it once with the internet, or "
            f"start with {offline_hint(name)}")


def unusable_now(name: str) -> str | None:
    """The loader's line refusing a hub name as things stand, without the network: its cached copy would be
    refused (`trusted_copy`), or it is not cached and HF_HUB_OFFLINE forbids the download; None otherwise."""
    if uses_hf(name):
        if cached(name) is None and _hf().constants.HF_HUB_OFFLINE:
            return _unreachable_line(name, "HF_HUB_OFFLINE is set")
        return None
    dest = cache_dir() / KNOWN[name].cached
    if not os.path.lexists(dest):  # a download, unless the cache folder is refused (`fetch`)
        problem = _cache_folder_problem(cache_dir()) if cache_dir().exists() else None
        return None if problem is None else (f"{cache_dir()}: {problem}: a copy fetched there could be replaced by "
                                             f"theirs; set {CACHE_ENV} to a folder of your own")
    try:
        trusted_copy(dest, cache_dir())
    except HubError as e:
        return str(e)
    return None


def _fetch_hf(name: str, refresh: bool) -> Path:
    """A name on the Hugging Face Hub through its client (its cache, HF_HUB_OFFLINE, HF_ENDPOINT): the size the
    Hub declares is bounded before the download, the file is checked against the sha256 the Hub names it by (its
    LFS object id) and loaded strictly; a file that fails is removed from the cache again."""
    hf, known, url = _hf(), KNOWN[name], hf_url(name)
    found = None if refresh else cached(name)
    if found is not None:
        return found

    def unreachable(why: str) -> HubError:
        return HubError(_unreachable_line(name, why))

    if hf.constants.HF_HUB_OFFLINE:
        raise unreachable("HF_HUB_OFFLINE is set")
    try:  # one question to the Hub, without the client's retries (a machine offline is told at once)
        meta = hf.get_hf_file_metadata(hf.hf_hub_url(known.hf_repo, known.hf_file))
    except (hf.errors.HfHubHTTPError, hf.errors.FileMetadataError) as e:  # missing, gated, a mirror that is no Hub
        raise HubError(f"{url}: {_one_line(e)}") from None
    except Exception as e:  # the connection (the client raises its HTTP library's errors): the machine is offline
        raise unreachable(f"{url} cannot be reached ({_one_line(e)})") from None
    if meta.size is None or meta.size > MAX_CHECKPOINT_BYTES:
        size = "no size" if meta.size is None else f"{meta.size} bytes"
        raise HubError(f"{url}: the Hub declares {size} for it, not at most the {MAX_CHECKPOINT_BYTES} a released "
                       f"model needs; refusing it")
    try:
        got = Path(hf.hf_hub_download(known.hf_repo, known.hf_file, force_download=refresh))
    except Exception as e:  # the client raises many kinds (HTTP, connection, its own); the user needs one line
        raise HubError(f"{url}: download failed ({_one_line(e)})") from None
    blob = got.resolve()  # the cache names an LFS file's content by its sha256
    try:
        if re.fullmatch(r"[0-9a-f]{64}", blob.name) and (sha := _sha256(blob)) != blob.name:
            raise HubError(f"{url}: sha256 mismatch (got {sha}, the Hub names it {blob.name})")
        verify(got, name, url)
    except HubError:
        got.unlink(missing_ok=True)
        if blob != got:
            blob.unlink(missing_ok=True)
        raise
    return got


def _copy_problem(st: os.stat_result, cache: Path) -> str | None:
    """Why a file or folder of the cache with stat `st` is not to be trusted as this user's copy, or None: it is
    a link, another user's, or others may change it (the cache may be a folder several users write to)."""
    if stat.S_ISLNK(st.st_mode):
        return "a link, not a copy this program made"
    if st.st_uid != os.geteuid() and st.st_uid not in own_uids(cache) | {0}:
        return f"made by uid {st.st_uid}, not by this user"
    if st.st_mode & 0o022:
        return f"other users may change it (mode {st.st_mode & 0o777:o})"
    return None


def _cache_folder_problem(cache: Path) -> str | None:
    """Why the cache folder itself is not to be trusted, or None: others may put entries in it (sticky or not: a
    file of this user's that another may move, as from a team folder, would pass for a copy this program made), or
    it is another user's."""
    try:
        st = os.stat(cache)
    except OSError as e:
        return f"cannot be read here ({(e.strerror or str(e)).lower()})"
    if st.st_uid != os.geteuid() and st.st_uid not in own_uids(cache) | {0}:
        return f"the cache folder belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        mode = f"mode {stat.S_IMODE(st.st_mode):o}"
        if st.st_uid == os.geteuid():  # this user's own, made under a umask of 002 (Debian's, Ubuntu's default)
            mode += f"; if it is meant for you alone: chmod go-w {cache}"
        return f"other users may put files in the cache folder ({mode})"
    return None


def trusted_copy(dest: Path, cache: Path) -> Path:
    """The cached copy at dest, pinned (utils/paths.pinned_folder: a name swapped later is not followed), once it
    and every checkpoint in it are this user's (or root's) and only theirs to change; HubError otherwise. Others
    who may write to the cache could otherwise put their own weights where the authors' are looked for."""
    if problem := _cache_folder_problem(cache):
        raise HubError(f"{cache}: {problem}: whoever may put files there could put their own weights where the "
                       f"authors' are looked for; not loaded. Set {CACHE_ENV} to a folder of your own", local=True)
    problem, where = None, dest
    try:
        link = os.lstat(dest)
        problem = _copy_problem(link, cache)
        if problem is None:
            folder = stat.S_ISDIR(link.st_mode)
            pinned = pinned_folder(dest) if folder else pinned_file(dest)
            problem = _copy_problem(os.stat(pinned), cache)
            for _, p in list_checkpoints(pinned) if folder and problem is None else []:
                problem, where = _copy_problem(os.lstat(p), cache), dest / p.name
                if problem:
                    break
    except OSError as e:
        raise HubError(f"{dest}: cannot be read here ({(e.strerror or str(e)).lower()})", local=True) from None
    if problem:
        raise HubError(f"{where}: {problem}: whoever may change the cached copy could put their own weights in place "
                       f"of the authors'; not loaded. Set {CACHE_ENV} to a folder of your own (or remove {dest} to "
                       f"fetch it again)", local=True)
    return pinned


def _keep_to_self(path: Path) -> None:
    """Give a new cached copy (a file, or a folder and its files) the umask's modes without write for others: a
    cache is trusted only while nobody else may change it (`trusted_copy`)."""
    mode = umask_mode(0o777, keep_from_others=True)
    for p in [path, *(path.iterdir() if path.is_dir() else [])]:
        os.chmod(p, mode if p.is_dir() else mode & 0o666)


def fetch(name: str, refresh: bool = False) -> Path:
    """The cached, verified checkpoint file (lbm) or folder (pips2) of a hub name, downloaded when missing (or
    when `refresh`); a refused download leaves the cached copy as it was. A copy in $PIPS2_CACHE is this user's
    and only theirs to change (`trusted_copy`)."""
    return unpinned(_fetch(name, refresh))


def _fetch(name: str, refresh: bool = False) -> Path:
    """`fetch`, with a copy in $PIPS2_CACHE given pinned (`trusted_copy`): the loader reads what was checked."""
    if name not in KNOWN:
        raise HubError(f"{name!r} is not a known model name (known: {', '.join(KNOWN)})")
    if uses_hf(name):
        return _fetch_hf(name, refresh)
    known, cache = KNOWN[name], cache_dir()
    dest = cache / known.cached
    if os.path.lexists(dest) and not refresh:
        return trusted_copy(dest, cache)
    url, sha = source_of(name)
    try:
        if not cache.is_dir():  # made for this user alone, whatever the umask (`_cache_folder_problem`)
            cache.mkdir(parents=True, exist_ok=True)
            os.chmod(cache, umask_mode(0o777, keep_from_others=True))
        check_writable(cache)
    except OSError as e:  # a read-only home (a container image's, a shared account's)
        raise HubError(f"cannot make the model cache {cache} ({(e.strerror or str(e)).lower()}) to fetch {name} "
                       f"into: set {CACHE_ENV} to a writable folder", local=True) from None
    if problem := _cache_folder_problem(cache):
        raise HubError(f"{cache}: {problem}: a copy fetched there could be replaced by theirs; set {CACHE_ENV} to a "
                       f"folder of your own", local=True)
    # a download killed by SIGKILL (or the OOM killer) left its folder and partial file (up to the model's size)
    remove_stale_tempdirs(f".{name}", cache)
    work = owned_tempdir(f".{name}", cache)
    try:
        if known.archive:
            got = fetch_reference(url, work, sha)
            verify(got, name, url)
            _keep_to_self(got)
            _swap_in(got, dest)
        else:
            got = download(url, work / known.cached, sha, max_bytes=MAX_CHECKPOINT_BYTES)
            verify(got, name, url)
            _keep_to_self(got)
            os.replace(got, dest)
    except DownloadError as e:
        raise HubError(str(e)) from None
    finally:
        remove_owned(work)
    return trusted_copy(dest, cache)


# ---------------------------------------------------------------------------------------------------------
# Finding the checkpoint file


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be a PyTorch checkpoint, judged from its first bytes and, for a zip archive, its member
    list (torch.save writes a zip holding <name>/data.pkl, or in its legacy format a pickle); None if it may be one.
    Says "a text file" or "empty" where torch.load would only say "list index out of range" or "EOFError"."""
    try:
        with open_regular(path) as f:  # a FIFO's open() would wait for a writer forever
            head = f.read(512)
    except UnsafeFileError as e:
        return e.problem
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    if not head:
        return "an empty file (0 bytes), not a checkpoint"
    if head[:1] == b"\x80":  # a pickle (protocol 2 or later): torch.save's legacy format; the loader judges it
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "not a checkpoint (a zip archive cut short or damaged: its member list cannot be read)"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "not a checkpoint (a zip archive that torch.save did not write: it holds no data.pkl)"
        return None
    try:
        head.decode("utf-8")
        text = all(c.isprintable() or c in "\t\r\n" for c in head.decode("utf-8"))
    except UnicodeDecodeError:  # also a multi-byte character cut at byte 512: judged binary, which is only wording
        text = False
    what = "a text file" if text else f"its first bytes are {head[:8]!r}"
    return f"not a checkpoint ({what}; torch.save writes a zip archive)"


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """CheckpointError naming the file unless it may be a PyTorch checkpoint (`checkpoint_file_problem`)."""
    problem = checkpoint_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def demo_checkpoint() -> Path | None:
    """The newest run folder `make demo` trained under ./demo_out/checkpoints/, if any."""
    try:
        runs = [p for p in DEMO_CHECKPOINTS.iterdir() if list_checkpoints(p)]
        return max(runs, key=lambda p: p.stat().st_mtime, default=None)
    except OSError:
        return None


def how_to_get(kind: str | None = None) -> str:
    """Where a checkpoint of `kind` (either, when None) comes from, in one line: the script, the hub names and
    their caches (offline too), and the model `make demo` trained when there is one."""
    ways = []
    if kind in (None, "pips2"):
        demo = demo_checkpoint()
        ways += [GET_REFERENCE,
                 f"or the hub name pips2 (--init_dir=pips2) fetches it once into {_location_text('pips2')} (offline: "
                 f"{offline_hint('pips2')})"]
        if demo is not None:
            ways.append(f"or --init_dir={demo}/ (the small model `make demo` trained)")
    if kind in (None, "lbm"):
        ways.append(f"{'or ' if ways else ''}the hub name lbm (--init_dir=lbm) fetches the authors' LBM weights "
                    f"(lbm.pt, huggingface.co/{KNOWN['lbm'].hf_repo}) once into {_location_text('lbm')} (offline: "
                    f"{offline_hint('lbm')})")
    return "; ".join(ways)


def _default_folder_problem(folder: Path) -> str | None:
    """Why the default checkpoint folder, ./reference_model in the folder the program runs from, is not to be
    loaded, or None: it, a link at its name or a checkpoint in it was made by another user (not root). The user
    never named it: run from a team's folder or /tmp, it could be anybody's model, taken for the authors'."""
    trusted = {os.geteuid(), 0}
    try:
        found = [folder] if os.path.lexists(folder) else []
        if found and folder.is_dir():  # every file find_file could pick: its model-*.pth, or its one *.pt/*.pth
            found += sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth"))
        owners = [(p, os.lstat(p)) for p in found] + [(folder, os.stat(folder))] if found else []
    except OSError:
        return None  # unreadable: find_file says so
    trust = f"if you trust it, give it by its path: --init_dir={folder.resolve()}"
    for p, st in owners:
        if st.st_uid not in trusted:
            return (f"{DEFAULT_PIPS}: {'made' if p == folder else p.name + ' in it was put there'} by uid "
                    f"{st.st_uid}, not by this user: the default checkpoint folder, found in the folder this program "
                    f"runs from ({Path.cwd()}), may be anybody's there; {trust}")
        if p != folder and stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:  # rewritable in place by others
            return (f"{DEFAULT_PIPS}: other users may write to {p.name} in it (mode {stat.S_IMODE(st.st_mode):o}), "
                    f"and could have rewritten it in place: `chmod go-w {folder}/*.pth` if nobody did; {trust}")
    return None


def find_file(path: str | os.PathLike, step: int | None = None, kind: str | None = None) -> Path:
    """The checkpoint file a path names: the file itself; in a folder, its model-*.pth of `step` (the newest when
    None), else its one *.pt/*.pth file. HubError naming the path, what was looked for and how to get one."""
    p = Path(path).expanduser()
    if os.fspath(path) != DEFAULT_PIPS:
        return _pick_file(p, path, step, kind)
    if problem := _default_folder_problem(p):
        raise HubError(problem)
    picked = _pick_file(p, path, step, kind)
    # read through a descriptor of the file judged (the user's own link to it followed), judged again as opened:
    # in a folder others may write to, another file could be put at its name between the judgement and the load
    try:
        pinned = pinned_file(picked, follow=True)
        st = os.stat(pinned)
    except OSError as e:
        raise HubError(f"{picked}: cannot be read here ({(e.strerror or str(e)).lower()})") from None
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        unpin(picked)
        raise HubError(f"{DEFAULT_PIPS}: {picked.name} in it was replaced while it was checked (now uid {st.st_uid}, "
                       f"mode {stat.S_IMODE(st.st_mode):o}); not loaded")
    return pinned


def _pick_file(p: Path, path: str | os.PathLike, step: int | None, kind: str | None) -> Path:
    """`find_file`'s choice in `p` (`path` as given, for messages)."""
    if p.is_file():
        if step is not None:
            raise HubError(f"{path}: a file; a step ({step}) picks one of a folder's model-*.pth files")
        return p
    if p.exists() and not p.is_dir():  # a FIFO, a device: something, but no file to load
        raise HubError(f"{path}: {not_regular_problem(p.stat().st_mode) or 'not a regular file'}")
    if not p.is_dir():
        raise HubError(f"{path}: no such checkpoint file or folder, and not a hub name ({', '.join(KNOWN)}); "
                       f"{how_to_get(kind)}")
    found = list_checkpoints(p)
    if found:
        if step is None:
            return found[-1][1]
        for s, f in found:
            if s == step:
                return f
        raise HubError(f"{path}: no checkpoint for step {step} (have {[s for s, _ in found]})")
    try:
        files = sorted(f for f in p.iterdir() if f.suffix in (".pt", ".pth") and f.is_file())
    except OSError as e:
        raise HubError(f"{path}: cannot list the folder ({e.strerror or type(e).__name__})") from None
    if len(files) == 1 and step is None:
        return files[0]
    if len(files) > 1:
        raise HubError(f"{path}: {len(files)} checkpoint files ({', '.join(f.name for f in files[:5])}) and no "
                       f"model-*.pth; pass the one to load")
    raise HubError(f"{path}: no checkpoint in this folder (expected model-*.pth files or one *.pt/*.pth file); "
                   f"{how_to_get(kind)}")


def check_kind(kind: str | None) -> None:
    """ValueError unless kind is None, 'pips2' or 'lbm' (the scripts' --model)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"--model must be pips2 or lbm, got {kind!r}")


def resolve(name_or_path: str | os.PathLike | None, kind: str | None = None, step: int | None = None,
            refresh: bool = False) -> Path:
    """The checkpoint file to load: a hub name fetched (once) into its cache, else `find_file`'s rules. None is
    the default of `kind`: ./reference_model for PIPs++; LBM has none."""
    check_kind(kind)
    if name_or_path is None:
        check_options(kind or "pips2", init_dir=None)
        name_or_path = DEFAULT_PIPS
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else str(name_or_path)
    if text in KNOWN:  # a name wins over a folder of that name in the cwd (this repository has one: pips2/)
        if kind is not None and kind != text:
            raise HubError(f"{text}: the hub name of the {KINDS[text]} model, but --model={kind}; pass --model={text}"
                           f" (or --init_dir={kind} for the {KINDS[kind]} one)")
        return find_file(_fetch(text, refresh=refresh), step, kind)
    return find_file(text, step, kind)


# ---------------------------------------------------------------------------------------------------------
# Reading and building


def kind_of(ckpt) -> str | None:
    """The model a loaded checkpoint holds, from its layout: 'pips2' for {'model_state_dict': ...}, 'lbm' for
    {'model': ...} or a bare state_dict (a dict of tensors); None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    if PIPS_LAYOUT.model in ckpt:
        return "pips2"
    if LBM_LAYOUT.model in ckpt or (ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())):
        return "lbm"
    return None


def _a(name: str) -> str:
    """name with its indefinite article: "a PIPs++", "an LBM"."""
    return f"{'an' if name[0] in 'AEFHILMNORSX' else 'a'} {name}"


def read_checkpoint_of(path: str | os.PathLike, kind: str | None = None) -> tuple[str, dict]:
    """(kind, checkpoint) of a file, read weights-only with its sizes bounded; the checkpoint in its kind's layout
    (a bare LBM state_dict comes back as {'model': it}), its state_dict's 'module.' prefixes removed. A file of
    another kind than `kind` (when given) is refused, naming both."""
    check_checkpoint_file(path)
    ckpt = load_weights_only(path, "cpu", refused_hint=REFUSED_HINT)
    found = kind_of(ckpt)
    if found is None:
        raise CheckpointError(f"{path}: not a checkpoint of either model (expected {{'model_state_dict': ...}} for "
                              f"PIPs++, {{'model': ...}} or a state_dict for LBM)")
    held = f"{{'{LAYOUTS[found].model}': ...}}"
    if found == "lbm" and LBM_LAYOUT.model not in ckpt:
        ckpt, held = {LBM_LAYOUT.model: ckpt}, "a bare state_dict"
    key = LAYOUTS[found].model
    state = ckpt[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: '{key}' is not a state_dict (a dict of tensors)")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: holds {_a(KINDS[found])} model ({held}), not {_a(KINDS[kind])} one "
                              f"(--model={kind}); pass --model={found}")
    return found, {**ckpt, key: strip_module_prefix(state, str(path))}


def check_options(kind: str, amp: str | None = None, memory_size: int | None = None,
                  init_dir: str | os.PathLike | None = DEFAULT_PIPS) -> None:
    """ValueError naming the flag unless the options suit the model, checked before anything is loaded: PIPs++
    runs under any --amp (memory_size is LBM's: refused); LBM in float32 only, with its memory of 1 to
    MAX_MEMORY_SIZE frames, and needs --init_dir (None: the script's flag was not given)."""
    check_kind(kind)
    amp_dtype(amp)
    if kind != "lbm":
        if memory_size is not None:  # ignored, the user would believe it changed something
            raise ValueError(f"--memory_size is LBM's (--model=lbm); --model={kind} has no memory to resample: "
                             f"leave the flag out")
        return
    if init_dir is None:
        raise ValueError(f"--model=lbm needs --init_dir: an LBM checkpoint file or folder, or {how_to_get('lbm')}; "
                         f"or download lbm.pt from huggingface.co/{KNOWN['lbm'].hf_repo}")
    if amp not in (None, "none"):
        raise ValueError(f"--amp={amp}: LBM runs in float32 only; leave --amp at none")
    if memory_size is not None and (isinstance(memory_size, bool) or not isinstance(memory_size, Integral)
                                    or not 1 <= memory_size <= MAX_MEMORY_SIZE):
        raise ValueError(f"--memory_size must be a whole number from 1 to {MAX_MEMORY_SIZE}, got {memory_size!r}")


def _build(kind: str, state: dict, source: str, device: torch.device | str, amp: str | None,
           config: dict) -> Pips | LBM:
    """The model of `kind` holding `state`, strictly; PIPs++ with the inference plan for the device and amp, LBM at
    the sizes its weights fix (`config` wins and must then match)."""
    if kind == "lbm":
        return build_lbm(state, source, **config)
    config.setdefault("plan", ExecPlan.auto(device, amp_dtype(amp) or torch.float32))
    model = Pips(**config)
    load_model_state(model, state, source=source)
    return model


@contextmanager
def _named_as_given() -> Iterator[None]:
    """CheckpointError and ValueError messages naming a cached copy by its pinned path (`trusted_copy`) name it as
    the user knows it."""
    try:
        yield
    except CheckpointError as e:
        raise type(e)(unpinned_text(str(e)), local=e.local) from None
    except ValueError as e:
        raise ValueError(unpinned_text(str(e))) from None


@overload
def load_model(name_or_path: str | os.PathLike | None, device: str | torch.device = ..., *,
               kind: Literal["pips2"], step: int | None = ..., amp: str | None = ..., memory_size: int | None = ...,
               refresh: bool = ..., **config) -> Pips: ...
@overload
def load_model(name_or_path: str | os.PathLike | None, device: str | torch.device = ..., *,
               kind: Literal["lbm"], step: int | None = ..., amp: str | None = ..., memory_size: int | None = ...,
               refresh: bool = ..., **config) -> LBM: ...
@overload
def load_model(name_or_path: str | os.PathLike | None, device: str | torch.device = ..., kind: str | None = ...,
               step: int | None = ..., amp: str | None = ..., memory_size: int | None = ..., refresh: bool = ...,
               **config) -> Pips | LBM: ...
def load_model(name_or_path: str | os.PathLike | None, device: str | torch.device = "cpu", kind: str | None = None,
               step: int | None = None, amp: str | None = None, memory_size: int | None = None,
               refresh: bool = False, **config) -> Pips | LBM:
    """A Pips or LBM in eval mode on `device` ("auto": CUDA when there is one) from a hub name ("pips2", "lbm"),
    a checkpoint file or folder (module docstring); None is ./reference_model for PIPs++.

    kind: the model expected ('pips2' or 'lbm'), checked against the file; None takes the file's.
    amp: the autocast PIPs++ will run under (its execution plan is chosen for it); LBM refuses any.
    memory_size: LBM's memory, resampled to this many frames. config: the model's constructor arguments.
    Raises ValueError (a flag) or CheckpointError (HubError included), one line each."""
    if isinstance(name_or_path, str) and not name_or_path.strip():  # '' would mean the current folder
        raise HubError("the checkpoint name is empty: give a hub name (pips2, lbm), a file or a folder")
    dev = resolve_device(device) if isinstance(device, str) else device
    if kind is not None:
        check_options(kind, amp, memory_size, name_or_path)
    with _named_as_given():
        path = resolve(name_or_path, kind, step, refresh)
        found, ckpt = read_checkpoint_of(path, kind)
        if kind is None:
            check_options(found, amp, memory_size, unpinned(path))
        model = _build(found, ckpt[LAYOUTS[found].model], str(unpinned(path)), dev, amp, dict(config))
    if isinstance(model, LBM) and memory_size is not None:
        model.set_memory_size(int(memory_size))
    return model.to(dev).eval()


def load_into(model: nn.Module, name_or_path: str | os.PathLike, kind: str, optimizer=None, scheduler=None,
              ignore_prefixes: tuple[str, ...] = (), step: int | None = None) -> tuple[Path, dict]:
    """Put a checkpoint's weights (and, when given, its optimizer and scheduler state) into a model of `kind`
    being trained, with `resolve`'s rules; keys under ignore_prefixes may be missing or extra. Returns (the file,
    its checkpoint in the kind's layout) for the caller's step and extras. CheckpointError in one line."""
    with _named_as_given():
        path = resolve(name_or_path, kind, step)
        _, ckpt = read_checkpoint_of(path, kind)
        path = unpinned(path)
        layout: Layout = LAYOUTS[kind]
        apply_checkpoint(ckpt, path, model, optimizer, scheduler, ignore_prefixes, layout=layout)
    return path, ckpt


def save_authors_format(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model's weights as the authors' code reads them: {'model': sd} for LBM, {'model_state_dict': sd}
    for PIPs++ (name it model-%09d.pth in a folder for their loader); temp file, then rename."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    net: nn.Module = model.module if wrapped else model
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    ckpt = {"model": state} if isinstance(net, LBM) else {"model_state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
