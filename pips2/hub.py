"""One model loader: `load_model("pips2" | "lbm" | path)`, with the authors' released weights fetched once.

A known name is downloaded into a cache folder (PIPS2_CACHE, default ~/.cache/pips2) the first time, into a
temp name that is verified (sha256 when known, else a weights-only load that must match the model's keys
strictly) and only then renamed into place, so a bad download never replaces a good cached copy.
PIPS2_URL_<NAME> overrides a name's address (a mirror, or file:///path for an offline copy) and
PIPS2_SHA256_<NAME> gives its expected sha256. The authors' formats are read and written both ways:
PIPs++ `{'model_state_dict': sd}` (model-%09d.pth, docs/MODEL.md), LBM `{'model': sd}` (docs/LBM.md).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pips2.nets.lbm import LBM, load_lbm, read_state_dict
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.amp import amp_dtype
from pips2.utils.checkpoint import (
    CKPT_RE,
    CheckpointError,
    find_checkpoint,
    list_checkpoints,
    load,
    load_model_state,
    read_checkpoint,
)
from pips2.utils.download import MAX_CHECKPOINT_BYTES, DownloadError, download, fetch_reference

CACHE_ENV = "PIPS2_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "pips2"


@dataclass(frozen=True)
class Known:
    """A released checkpoint: where it is, its sha256 when published, and what it unpacks to in the cache."""

    url: str
    sha256: str | None
    cached: str  # file (lbm) or folder (pips2, a tar.gz of reference_model/) name inside the cache
    archive: bool


KNOWN = {
    # the authors' PIPs++ reference model, as get_reference_model.sh fetches it (dl=1: the file, not a web page)
    "pips2": Known("https://www.dropbox.com/scl/fi/czdlt2zc2ji2b7zd0pvoe/reference_model.tar.gz"
                   "?rlkey=56ebq4g5dk01kyq8kuismev14&dl=1", None, "reference_model", True),
    # the authors' released LBM weights (their README: huggingface-cli download ZhengGuangze/LBM lbm.pt)
    "lbm": Known("https://huggingface.co/ZhengGuangze/LBM/resolve/main/lbm.pt", None, "lbm.pt", False),
}


class HubError(CheckpointError):
    """A download or cached file that cannot be used; one line naming the address or file and the problem."""


def cache_dir() -> Path:
    """The cache folder: $PIPS2_CACHE, else ~/.cache/pips2."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def source_of(name: str) -> tuple[str, str | None]:
    """(url, sha256 or None) of a known name, after the PIPS2_URL_<NAME> and PIPS2_SHA256_<NAME> overrides."""
    known = KNOWN[name]
    url = os.environ.get(f"PIPS2_URL_{name.upper()}") or known.url
    sha = os.environ.get(f"PIPS2_SHA256_{name.upper()}") or known.sha256
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        raise HubError(f"PIPS2_SHA256_{name.upper()} must be 64 hex digits, got {sha!r}")
    return url, None if sha is None else sha.lower()


def verify(path: Path, name: str, source: str, **config) -> None:
    """Raise HubError unless every checkpoint at path loads weights-only and matches the model's keys strictly."""
    if name == "lbm":
        checks = [(path, source, lambda p, where: load_model_state(LBM(**config), read_state_dict(p), source=where))]
    else:
        found = sorted(p for p in path.iterdir() if CKPT_RE.match(p.name))
        if not found:
            raise HubError(f"{source}: holds no reference_model/model-*.pth checkpoint")
        checks = [(p, f"{source}: reference_model/{p.name}",
                   lambda p, where: load_model_state(Pips(**config), read_checkpoint(p)["model_state_dict"],
                                                     source=where)) for p in found]
    for p, where, check in checks:
        try:
            check(p, where)
        except CheckpointError as e:  # name what was downloaded, not the temp file it was verified in
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


def fetch(name: str, refresh: bool = False, **config) -> Path:
    """The cached, verified checkpoint file (lbm) or folder (pips2) of a known name, downloaded when missing
    (or when `refresh`); a refused download leaves the cached copy as it was."""
    if name not in KNOWN:
        raise HubError(f"{name!r} is not a known model name (known: {', '.join(KNOWN)})")
    known, cache = KNOWN[name], cache_dir()
    dest = cache / known.cached
    if dest.exists() and not refresh:
        return dest
    url, sha = source_of(name)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        if known.archive:
            got = fetch_reference(url, work, sha)
            verify(got, name, url, **config)
            _swap_in(got, dest)
        else:
            got = download(url, work / known.cached, sha, max_bytes=MAX_CHECKPOINT_BYTES)
            verify(got, name, url, **config)
            os.replace(got, dest)
    except DownloadError as e:
        raise HubError(str(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be a PyTorch checkpoint, judged from its first bytes and, for a zip archive, its member
    list (torch.save writes a zip holding <name>/data.pkl, or in its legacy format a pickle); None if it may be one.
    Says "a text file" or "empty" where torch.load would only say "list index out of range" or "EOFError"."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
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


def load_pips(init_dir: str | os.PathLike, device: str | torch.device = "cpu", step: int | None = None,
              amp: str | None = None, **kwargs):
    """A Pips in eval mode with weights from a checkpoint folder or file; a missing one names the fix.

    Its plan is the inference plan for `device` and `amp` (the autocast the caller will run it under).
    """

    p = Path(init_dir)
    if not p.exists() or (p.is_dir() and not list_checkpoints(p)):
        raise CheckpointError(f"{init_dir}: no checkpoint here; fetch the authors' model with "
                              f"./get_reference_model.sh (it creates ./reference_model) or pass --init_dir")
    check_checkpoint_file(find_checkpoint(p, step))
    kwargs.setdefault("plan", ExecPlan.auto(device, amp_dtype(amp) or torch.float32))
    model = Pips(**kwargs)
    load(init_dir, model, step=step, map_location="cpu")
    return model.to(device).eval()


def model_kind(path: Path) -> str:
    """'pips2' for a {'model_state_dict': ..} file or a folder whose newest model-*.pth is one, 'lbm' for
    {'model': ..} or a bare state_dict (or a folder of them: train.py --model=lbm writes model-*.pth too)."""
    if path.is_dir():
        try:
            path = find_checkpoint(path)
        except CheckpointError:  # the loader that runs next says what is wrong with the folder
            return "pips2"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the loader that runs next reports the file's problem in one line
        return "pips2"
    return "pips2" if isinstance(ckpt, dict) and "model_state_dict" in ckpt else "lbm"


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", refresh: bool = False,
               **config) -> nn.Module:
    """A Pips or LBM in eval mode on `device`: a known name ("pips2", "lbm"), fetched once into the cache, or a
    local checkpoint folder or file in the authors' format (or ours, with or without 'module.' prefixes);
    a local folder named like a known name is given as a path, e.g. "./lbm".

    `config` goes to the model's constructor (e.g. LBM's input_size); a file that does not match it is refused.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if text in KNOWN:  # a name wins over a folder of that name in the cwd (this repository has one: pips2/)
        kind, path = text, fetch(text, refresh=refresh, **config)
    elif path.exists():
        if path.is_dir() and not list_checkpoints(path):
            raise HubError(f"{text}: no checkpoint in this folder (expected model-*.pth files)")
        check_checkpoint_file(find_checkpoint(path))
        kind = model_kind(path)
    else:
        raise HubError(f"{text}: no such checkpoint file or folder, and not a known model name "
                       f"(known: {', '.join(KNOWN)})")
    if kind == "lbm":
        return load_lbm(find_checkpoint(path), device, **config)
    return load_pips(path, device, **config)


def save_authors_format(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model's weights as the authors' code reads them: {'model': sd} for LBM, {'model_state_dict': sd}
    for PIPs++ (name it model-%09d.pth in a folder for their loader); temp file, then rename."""
    net = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    ckpt = {"model": state} if isinstance(net, LBM) else {"model_state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
