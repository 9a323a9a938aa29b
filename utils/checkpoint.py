"""Checkpoints in the authors' format: a folder of `model-%09d.pth` dicts (docs/MODEL.md)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import stat
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.nn as nn
from prettytable import PrettyTable

from pips2.utils.download import MAX_CHECKPOINT_BYTES
from pips2.utils.paths import make_dirs, new_temp_file, own_uids, remove_empty_dirs, umask_mode
from pips2.utils.procs import out_of_memory, pid_alive, pid_namespace, process_start
from pips2.utils.safe_load import (
    UnsafeFileError,
    not_regular_problem,
    open_regular,
    open_zip,
    pickle_objects_problem,
    zip_end_record,
)

CKPT_RE = re.compile(r"^model-(\d+)\.pth$")
# .model-%09d.pth.<host>.<pid>.<random>.tmp: host and pid say whether the writer may still be alive
TEMP_RE = re.compile(r"^\.model-\d+\.pth\.(?P<host>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
LEGACY_TEMP_RE = re.compile(r"^\.model-\d+\.pth\.[A-Za-z0-9_]+\.tmp$")
LEGACY_TEMP_AGE_S = 3600  # temps of the old naming carry no pid: only remove them once clearly abandoned
LOCK_NAME = ".train.lock"
# Records (one per storage) a checkpoint file may hold, counted from its zip directory before torch reads it: a
# training checkpoint of LBM, the larger model, has ~1,000 (336 weights, two AdamW moments of each parameter).
MAX_RECORDS = 10_000


@dataclass(frozen=True)
class Layout:
    """The top-level keys a model family's training checkpoints keep their parts under."""

    model: str
    optimizer: str
    scheduler: str
    kind: str  # named in errors


# PIPs++: the authors' model_state_dict/optimizer_state_dict; LBM: the authors' {'model': ..., 'optimizer': ...}
# (pips2.hub's loader and theirs read ['model'] of it)
PIPS_LAYOUT = Layout("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "PIPs++")
LBM_LAYOUT = Layout("model", "optimizer", "scheduler", "LBM")


KEY_TEXT = 40  # characters of a key a refusal spells out: a file's key may be a megabyte long


def _cut(text: str, n: int = KEY_TEXT) -> str:
    """text for one line of a refusal: at most n characters (then '...'), anything unprintable escaped."""
    short = text[:n]
    if not short.isprintable():
        short = repr(short)[1:-1]
    return short + ("..." if len(text) > n else "")


def key_text(key: Any, i: int | None = None, n: int = KEY_TEXT) -> str:
    """A dict key as a refusal names it: text cut to n characters, an int of up to n digits, anything else
    `<key i>` (its place in the dict): spelling out a tuple key nested 25 deep writes 2^25 tuples."""
    if isinstance(key, str):
        return _cut(key, n)
    if type(key) in (int, bool) and -10 ** n < key < 10 ** n:
        return str(key)
    return f"<key {i}>" if i is not None else "<a key that is not text>"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem. `local`: the problem is this
    machine's (the file could not be opened or read: permissions, I/O, descriptors), not the file's content, so
    the file must not be set aside as damaged."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


class LockError(RuntimeError):
    """The checkpoint folder belongs to another live training run."""


def ckpt_name(step: int) -> str:
    """File name of the checkpoint saved at `step`."""
    return f"model-{step:09d}.pth"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every model-*.pth in folder, lowest step first; one that exists but is not a regular file
    (a FIFO, whose open() would wait forever, a folder) is no checkpoint and is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name)) and not _odd_file(p)]
    return sorted(found)


def _odd_file(path: Path) -> str | None:
    """'not a regular file (a FIFO)' and the like for a path that exists (symlinks followed) and is not a regular
    file; None for a regular file or a missing one (its reader says what is wrong)."""
    try:
        return not_regular_problem(path.stat().st_mode)
    except OSError:
        return None


def find_checkpoint(init: str | os.PathLike, step: int | None = None) -> Path:
    """Resolve a file path, or a folder's checkpoint at `step` (highest step when None)."""
    init = Path(init)
    if init.is_file():
        return init
    if not init.exists():
        raise CheckpointError(f"{init}: no such checkpoint file or folder")
    if not init.is_dir():
        raise CheckpointError(f"{init}: {_odd_file(init) or 'not a regular file'}")
    found = list_checkpoints(init)
    if not found:
        raise CheckpointError(f"{init}: folder holds no model-*.pth checkpoint")
    if step is None:
        return found[-1][1]
    for s, p in found:
        if s == step:
            return p
    raise CheckpointError(f"{init}: no checkpoint for step {step} (have {[s for s, _ in found]})")


def step_of(path: str | os.PathLike) -> int:
    """Training step encoded in a checkpoint's file name, 0 when the name has none."""
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else 0


def _load_problem(e: Exception) -> str:
    """One line for a failed torch.load, without torch's advice to retry with weights_only=False."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return f"not a readable checkpoint ({type(e).__name__})"
    if lines[0].startswith("Weights only load failed"):
        # the preamble suggests weights_only=False, which would run whatever the file holds; keep the cause
        cause = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))
                 and "weights_only" not in ln]
        foreign = [ln for ln in cause if "GLOBAL" in ln or "Unsupported global" in ln]
        if foreign:
            return f"refused: it holds more than tensors and plain data ({foreign[0]})"
        return f"not a readable checkpoint ({cause[0] if cause else 'the weights-only unpickler failed'})"
    # torch's other messages (its legacy tar branch, for one) may give the same advice: never passed on
    kept = [t for t in re.split(r"(?<=\.)\s+", lines[0]) if not re.search(r"False|arbitrary code", t)]
    return f"not a readable checkpoint ({' '.join(kept).strip(' .') or type(e).__name__})"


MAX_PICKLE_BYTES = 64 << 20  # a checkpoint's data.pkl: names and shapes, ~100 KB for an LBM training one
MAX_DEPTH = 64  # nesting of a checkpoint's dicts and lists: torch.save of a model and optimizer needs 5
# A file in torch's legacy format (torch < 1.6; this program and torch >= 1.6 write the zip format) holds its
# tensors' data after its pickles: bounded as a released checkpoint is (utils/download.py)
MAX_LEGACY_BYTES = MAX_CHECKPOINT_BYTES
# The records torch.save writes in its archive folder, besides data/<storage key>: torch reads each of these
# whole, so they are bounded (their contents are a few bytes: a version number, "little", an id)
TORCH_RECORDS = frozenset({"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                           ".data/serialization_id", ".data/version"})
MAX_SMALL_RECORD_BYTES = 1024
STORAGE_RECORD = re.compile(r"data/\d+")


class _Capped:
    """A file read no further than `limit` bytes: past them reading fails (`exceeded` says so), which bounds what a
    pre-scan of pickles read straight from the file may cost."""

    def __init__(self, fh: IO[bytes], limit: int):
        self.fh, self.left, self.exceeded = fh, limit, False

    def _take(self, data: bytes) -> bytes:
        if len(data) > self.left:
            self.exceeded = True
            raise EOFError("beyond the bound")
        self.left -= len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self.fh.read(self.left + 1 if n < 0 or n > self.left else n))

    def readline(self) -> bytes:
        return self._take(self.fh.readline(self.left + 1))

    def tell(self) -> int:
        return self.fh.tell()


def _pickle_problem(data: bytes | IO[bytes]) -> str | None:
    """pickle_objects_problem of a pickle torch will unpickle, strict (one the pre-scan cannot read is never
    handed to torch unchecked: for the legacy format, whose pickles follow one another, the scan would lose its
    place), its parse failure worded as a checkpoint's."""
    problem = pickle_objects_problem(data, strict=True)
    if problem and problem.startswith("not a readable pickle"):
        return "not a readable checkpoint" + problem[len("not a readable pickle"):]
    return problem


def _check_legacy(path: str | os.PathLike, fh: IO[bytes]) -> None:
    """The legacy format: torch unpickles five pickles in a row from the file (magic number, protocol, system info,
    the contents, the storage keys), then reads the storages' bytes. All five are pre-scanned, from where torch
    reads each, at most MAX_PICKLE_BYTES of them together; the file is at most MAX_LEGACY_BYTES."""
    size = os.fstat(fh.fileno()).st_size
    if size > MAX_LEGACY_BYTES:
        raise CheckpointError(f"{path}: refused: a checkpoint in torch's legacy format of {size} bytes (at most "
                              f"{MAX_LEGACY_BYTES})")
    fh.seek(0)
    capped = _Capped(fh, MAX_PICKLE_BYTES)
    for _ in range(5):
        problem = _pickle_problem(cast(IO[bytes], capped))  # read and readline are all a pre-scan calls
        if capped.exceeded:
            problem = f"refused: its pickles take more than {MAX_PICKLE_BYTES} bytes"
        if problem:
            raise CheckpointError(f"{path}: {problem}")


def _check_zip(path: str | os.PathLike, fh: IO[bytes]) -> None:
    """torch's zip format: the archive must be one torch's reader and Python's zipfile read alike (one directory,
    just before the end record, nothing after it), holding only records torch.save writes, under one folder,
    none compressed, at most MAX_RECORDS; its data.pkl, as torch's own reader returns it, is pre-scanned."""
    try:
        end = zip_end_record(fh)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable zip archive ({e})") from None
    # Python's zipfile reads the directory that ends where the end record begins, torch's reader (miniz) the one
    # the record's offset names: of an archive holding two, each reader saw another data.pkl
    if end.trailing:
        raise CheckpointError(f"{path}: refused: {end.trailing} bytes follow its zip end record (torch.save writes "
                              f"none; zip readers may disagree on what such an archive holds)")
    if end.dir_offset + end.dir_size != end.dir_end:
        raise CheckpointError(f"{path}: refused: its zip directory is not where its end record says (torch.save "
                              f"writes it just before; zip readers may disagree on what such an archive holds)")
    zf = open_zip(path, fh, MAX_RECORDS)
    infos = zf.infolist()
    if len(infos) != end.entries:  # miniz reads as many as the end record counts, zipfile all the directory holds
        raise CheckpointError(f"{path}: refused: its zip end record counts {end.entries} records, its directory "
                              f"holds {len(infos)}")
    folder = infos[0].filename.split("/", 1)[0] if infos else ""
    named: dict[str, zipfile.ZipInfo] = {}
    for i in infos:  # torch reads <folder of the first record>/data.pkl: no other name may stand for it
        inside = i.filename[len(folder) + 1:] if i.filename.startswith(f"{folder}/") else None
        if inside is None or not (inside in TORCH_RECORDS or STORAGE_RECORD.fullmatch(inside)):
            raise CheckpointError(f"{path}: refused: it holds the record {_cut(i.filename)}, which torch.save never "
                                  f"writes")
        named[inside] = i
    if "data.pkl" not in named:
        where = f"{_cut(folder)}/data.pkl" if folder else "data.pkl"
        raise CheckpointError(f"{path}: not a checkpoint (a zip archive that torch.save did not write: it holds no "
                              f"{where})")
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"{path}: refused: record {packed[0]} is compressed (torch.save never compresses)")
    if named["data.pkl"].file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: refused: its data.pkl is {named['data.pkl'].file_size} bytes (at most "
                              f"{MAX_PICKLE_BYTES})")
    big = [(n, i.file_size) for n, i in named.items() if n in TORCH_RECORDS and n != "data.pkl"
           and i.file_size > MAX_SMALL_RECORD_BYTES]
    if big:
        raise CheckpointError(f"{path}: refused: its record {big[0][0]} is {big[0][1]} bytes (torch.save writes a "
                              f"few)")
    try:  # the bytes torch will unpickle, read by torch's own reader
        fh.seek(0)
        reader = torch._C.PyTorchFileReader(fh)
        seen = set(reader.get_all_records())
        data = reader.get_record("data.pkl") if seen == set(named) else b""
    except Exception as e:  # torch's reader raises RuntimeError with its own text for a damaged archive
        raise CheckpointError(f"{path}: {_load_problem(e)}") from None
    if seen != set(named):
        odd = sorted(seen ^ set(named))[0]
        raise CheckpointError(f"{path}: refused: torch's zip reader and Python's disagree on its records "
                              f"({_cut(odd)})")
    problem = _pickle_problem(data)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def _check_records(path: str | os.PathLike) -> bool:
    """True for a checkpoint in torch's zip format whose records are fit to map: stored as torch writes them (a
    compressed one would be inflated whole before torch compares its size with what the pickle declares) and at
    most MAX_RECORDS of them; False for the legacy format (torch < 1.6), which torch reads without a zip. Told
    apart as torch.load tells them (a zip's first local header at the start). In both, every pickle torch will
    unpickle must not build more objects than safe_load allows (counting shared references: unpickling a dict
    key of 40 nested pairs of one tuple would hash 2^40 of them), nest too deep, or hash too many collidable keys.
    Anything but a regular file is refused without being waited on (a FIFO's open() waits for a writer)."""
    try:
        with open_regular(path) as fh:
            if fh.read(4) != b"PK\x03\x04":
                _check_legacy(path, fh)
                return False
            _check_zip(path, fh)
            return True
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None


def _view_problem(t: torch.Tensor) -> str | None:
    """Why a loaded tensor is not one torch.save writes for a weight (a dense tensor over storage of its own
    size), or None. A stride of 0 or a storage smaller than the shape lets a few bytes declare gigabytes, which
    whatever copies the tensor (or builds a model of its shape) would then allocate."""
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor"
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if need > have or any(st == 0 for st, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        return (f"declares shape {tuple(t.shape)} with strides {t.stride()} ({need} bytes) over {max(have, 0)} "
                f"bytes of storage")
    return None


META_PROBLEM = "is a meta tensor (no data: the model was saved before its weights were materialised)"


def _device_problem(t: torch.Tensor, device: torch.device | None) -> str | None:
    """Why a loaded tensor is not where map_location put the others (`device`; None: not one device), or None. A
    meta tensor has a shape and no data: reading it raised a RuntimeError in the middle of whatever used it."""
    if t.device.type == "meta":
        return META_PROBLEM
    if device is not None and t.device.type != device.type:
        return f"is on {t.device}, not {device} where the checkpoint was loaded"
    return None


def _map_device(map_location: Any) -> torch.device | None:
    """The one device a torch.load map_location puts every tensor on, or None (a dict or a function)."""
    try:
        return torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
    except (RuntimeError, TypeError, ValueError):
        return None


# Where an object lies in a loaded checkpoint: (where its container lies, the container, its key or index, its place
# in the container); None for the checkpoint itself. Text is made of it only for the one refusal reported: text for
# every entry copied every key above it (a 1 MB key over 6,000 entries made 6 GB of it).
Where = tuple[Any, Any, Any, int] | None


def where_text(where: Where) -> str:
    """`model.backbone.w`, `extra[0]`, `extra.<key 3>`: a location's text, each key cut (`key_text`)."""
    parts = []
    while where is not None:
        where, container, key, i = where
        parts.append(f"[{i}]" if isinstance(container, (list, tuple)) else "." + key_text(key, i))
    return "".join(reversed(parts)).lstrip(".")


def _check_tensors(obj, path: str | os.PathLike, device: torch.device | None = None) -> None:
    """CheckpointError naming the first tensor anywhere in a loaded checkpoint that is not on `device` (or is a
    meta tensor, whatever `device`) or whose view is not a whole one, or a dict or list that contains itself or is
    nested deeper than MAX_DEPTH (whatever walks the checkpoint afterwards would never end, or overflow Python's
    stack). Each object is visited once, however often shared."""
    seen: set[int] = set()
    open_: set[int] = set()  # containers on the current path: meeting one again is a cycle
    stack: list[tuple[Where, object, int, bool]] = [(None, obj, 0, False)]
    while stack:
        where, o, depth, leaving = stack.pop()
        if leaving:
            open_.discard(id(o))
            continue
        if id(o) in open_:
            raise CheckpointError(f"{path}: refused: {where_text(where)} contains itself")
        if id(o) in seen:
            continue
        if isinstance(o, torch.Tensor):
            seen.add(id(o))
            problem = _device_problem(o, device) or _view_problem(o)
            if problem:
                raise CheckpointError(f"{path}: refused: {where_text(where) or 'the tensor'} {problem}")
        elif isinstance(o, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise CheckpointError(f"{path}: refused: {where_text(where)} is nested more than {MAX_DEPTH} deep")
            seen.add(id(o))
            open_.add(id(o))
            stack.append((where, o, depth, True))
            items = o.items() if isinstance(o, dict) else enumerate(o)
            stack += [((where, o, k, i), v, depth + 1, False) for i, (k, v) in enumerate(items)]


@contextmanager
def _utf8_named(path: str | os.PathLike) -> Iterator[str | os.PathLike]:
    """path, or where it cannot be written as UTF-8 (a byte of a Latin-1 folder name) a link to it under a plain
    name: torch hands a mapped file's name to its C++ reader as UTF-8, and every good checkpoint of such a folder
    was called unreadable (and set aside as *.bad by a resume)."""
    try:
        os.fsdecode(os.fspath(path)).encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="pips2_ckpt_link.") as tmp:
            link = os.path.join(tmp, "checkpoint.pth")
            os.symlink(os.path.abspath(os.fspath(path)), link)
            yield link
        return
    yield path


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu", refused_hint: str = ""):
    """torch.load(weights_only=True) with one clear error line (CheckpointError) for a corrupt or foreign file;
    `refused_hint` is appended when the file holds more than tensors and plain data. What the file declares is
    checked before anything of its size is allocated: its zip records (count, none compressed) before torch reads
    them, then, the file mapped rather than read (mmap), every tensor's shape against its storage."""
    zipped = _check_records(path)
    try:
        # torch's deprecation notices for what a file holds (a quantized tensor, typed storages) are not the
        # user's to act on: the file is judged in one line below
        with _utf8_named(path) as named, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(named, map_location=map_location, weights_only=True, mmap=zipped)
    except OSError as e:  # opening or reading failed here: nothing is known of the content
        raise CheckpointError(f"{path}: cannot be read here ({e.strerror or type(e).__name__})", local=True) from None
    except MemoryError:  # this machine's memory (a ulimit, overcommit under load), not the file's content
        raise CheckpointError(f"{path}: cannot be read here (out of memory)", local=True) from None
    except Exception as e:  # torch raises many types for a bad file; the user needs one line
        if out_of_memory(e):  # torch's allocator: this machine
            raise CheckpointError(f"{path}: cannot be read here (out of memory)", local=True) from None
        problem = _load_problem(e)
        if refused_hint and problem.startswith("refused"):
            problem += f"; {refused_hint}"
        raise CheckpointError(f"{path}: {problem}") from None
    _check_tensors(ckpt, path, _map_device(map_location))
    return ckpt


def looks_like_torch_file(path: str | os.PathLike) -> bool:
    """Whether the file starts as torch.save writes one (a zip archive, or the legacy format's pickle); nothing
    else of it is read."""
    try:
        with open_regular(path) as f:
            head = f.read(4)
    except (OSError, UnsafeFileError):
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    layout: Layout = PIPS_LAYOUT) -> dict:
    """torch.load a checkpoint safely; one clear error line for a corrupt or foreign file."""
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or layout.model not in ckpt:
        raise CheckpointError(f"{path}: not a {layout.kind} checkpoint (no '{layout.model}')")
    return ckpt


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP's, torch.compile's


def strip_module_prefix(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Drop the prefixes that wrappers add to every key: 'module.' (DataParallel/DDP) and '_orig_mod.'
    (torch.compile), in any order. CheckpointError for a key that is not text (an AttributeError traceback in
    every loader before) or a value that is not a tensor."""
    out = {}
    for i, (k, v) in enumerate(state.items()):
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: its state dict has a key that is not text ({key_text(k, i)}); "
                                  f"refusing it")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {key_text(k)} is {type(v).__name__}, not a tensor; refusing it")
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


MAX_LISTED = 5  # keys a mismatch error names of each kind
LISTED_KEY_TEXT = 60  # characters of each: a file's key may be megabytes long


# the floating dtypes a checkpoint's weights may have: torch has no isfinite for its float8 types, which no
# released checkpoint uses (a traceback before)
CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def weight_problem(key: str, v: torch.Tensor, own: torch.Tensor) -> str | None:
    """Why a checkpoint's tensor cannot stand for the model's: a meta tensor (no data), a dtype of another kind
    (int64 weights would load as whole numbers and track a constant) or a value that is NaN or infinite in the
    model's dtype (track() would return NaN; 1e300 in float64 is inf once cast to float32); None if fine."""
    if v.device.type == "meta":
        return f"{key} {META_PROBLEM}"
    if v.is_floating_point() != own.is_floating_point() or v.is_complex() or v.dtype == torch.bool \
            or (v.is_floating_point() and v.dtype not in CHECKED_FLOATS):
        return f"{key} is {v.dtype}, the model's is {own.dtype}"
    if v.is_floating_point():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            return f"{key} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}"
        if v.dtype != own.dtype:
            bad = int((~torch.isfinite(v.to(own.dtype))).sum())
            if bad:
                return (f"{key} holds {bad} value{'s' if bad > 1 else ''} too large for the model's {own.dtype} "
                        f"(infinite once cast from {v.dtype})")
    return None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], ignore_prefixes: tuple[str, ...] = (),
                     source: str = "checkpoint") -> None:
    """Load strictly; keys under `ignore_prefixes` may be missing or extra. Mismatches raise and list keys; a
    tensor of another dtype kind than the model's (float for its weights, integer for its counters) or holding
    NaN or inf raises naming it. Nothing is copied unless every tensor passes."""
    state = strip_module_prefix(state, source)
    ignored = lambda k: any(k.startswith(p) for p in ignore_prefixes)  # noqa: E731
    state = {k: v for k, v in state.items() if not ignored(k)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not ignored(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{_cut(k, LISTED_KEY_TEXT)} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def some(what: str, items: list[str]) -> str:  # a readable line, not every key of a model of other sizes
            more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            return f"{what} {items[:MAX_LISTED]}{more}"

        cut = lambda keys: [_cut(k, LISTED_KEY_TEXT) for k in keys[:MAX_LISTED]] + keys[MAX_LISTED:]  # noqa: E731
        parts = [some(what, items) for what, items in (("missing keys", cut(missing)),
                                                        ("unexpected keys", cut(unexpected)),
                                                        ("shape mismatches", wrong)) if items]
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(parts))
    for k, v in state.items():
        problem = weight_problem(k, v, own[k])
        if problem:
            raise CheckpointError(f"{source}: {problem}; refusing it")
    own.update(state)
    model.load_state_dict(own, strict=True)


def apply_checkpoint(ckpt: dict, path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None,
                     ignore_prefixes: tuple[str, ...] = (), layout: Layout = PIPS_LAYOUT) -> None:
    """Put a read checkpoint's model (and optionally optimizer/scheduler) state into the given objects."""
    state = ckpt[layout.model]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: '{layout.model}' is not a state_dict")
    load_model_state(model, state, ignore_prefixes, source=str(path))
    if optimizer is not None:
        if layout.optimizer not in ckpt:
            raise CheckpointError(f"{path}: has no {layout.optimizer} to resume from")
        saved = ckpt[layout.optimizer]
        problem = _optimizer_problem(optimizer, saved) if isinstance(saved, dict) else None
        if problem:
            raise CheckpointError(f"{path}: '{layout.optimizer}' {problem}")
        _load_part(path, layout.optimizer, optimizer, _owned(saved))
        for param, state in optimizer.state.items():  # a wrong shape fails only inside the first step
            for name, v in state.items() if isinstance(state, dict) else ():
                # a 0-dim moment broadcast past the check and failed inside the first step ("step" is a count)
                if isinstance(v, torch.Tensor) and name != "step" and v.shape != param.shape:
                    raise CheckpointError(f"{path}: '{layout.optimizer}' holds a {name} of shape {tuple(v.shape)} for "
                                          f"a parameter of shape {tuple(param.shape)}")
    if scheduler is not None and layout.scheduler in ckpt:
        _load_part(path, layout.scheduler, scheduler, ckpt[layout.scheduler])


def _load_part(path: str | os.PathLike, key: str, part: Any, state: Any) -> None:
    """part.load_state_dict(state), its failure a CheckpointError naming the file and the key."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: '{key}' is not a state dict (a {type(state).__name__})")
    try:
        part.load_state_dict(state)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        # torch's text may quote whatever the file held: one line, cut
        raise CheckpointError(f"{path}: '{key}' is not one this program saves ({type(e).__name__}: "
                              f"{_cut(' '.join(str(e).split()), 200)})") from None


# What AdamW (the trainer's optimizer) needs of a param group's values; the schedules add rates of their own
# (OneCycleLR's initial_lr, max_lr, min_lr, from which it computes every later lr)
GROUP_RATES = ("lr", "weight_decay", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")
GROUP_FLAGS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")  # a parameter's state once stepped (amsgrad adds max_exp_avg_sq)
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # square roots are taken of them


def _number(v: Any) -> float | None:
    """v as a float if it is a real number (an int or float, or a one-element real tensor), else None."""
    if isinstance(v, bool):
        return None
    try:
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
            return float(v)
    except OverflowError:
        return math.inf
    except RuntimeError:  # no data (a meta tensor)
        return None
    return None


def _value_text(v: Any) -> str:
    """A value of a file's optimizer state for one line: a plain scalar as written, cut; else what it is."""
    if isinstance(v, (float, bool, str)) or v is None or (isinstance(v, int) and abs(v) < 10 ** KEY_TEXT):
        return _cut(repr(v))
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"a {type(v).__name__}"


def _group_problem(g: int, group: dict) -> str | None:
    """Why a saved param group's hyper-parameters would not train (a text lr failed inside the first step, a NaN
    one made every weight NaN there, eps -1 divided by zero), or None."""
    for key, v in group.items():
        where = f"param_groups[{g}] {key_text(key)}"
        x = _number(v)
        if key == "params":
            continue
        if key in GROUP_FLAGS:
            if not (v is None or isinstance(v, bool)):
                return f"{where} is {_value_text(v)}, not True, False or None"
        elif key in GROUP_RATES or key == "eps":
            if x is None or not math.isfinite(x) or x < 0 or (key == "eps" and x == 0):
                return f"{where} is {_value_text(v)}; AdamW needs a finite number {'> 0' if key == 'eps' else '>= 0'}"
        elif key == "betas":
            pair = [_number(b) for b in v] if isinstance(v, (tuple, list)) and len(v) == 2 else [None]
            if any(b is None or not 0 <= b < 1 for b in pair):
                return f"{where} is {_value_text(v)}; AdamW needs a pair of numbers in [0, 1)"
        elif x is not None and not math.isfinite(x):
            return f"{where} is {_value_text(v)}, not a finite number"
    return None


def _optimizer_problem(optimizer: Any, saved: dict) -> str | None:
    """Why a saved optimizer state would not train, or None; checked before it is loaded (which casts every state
    tensor to its parameter's dtype, and made a text 'step' a '<generator object ...>' it then quoted). Each
    group's hyper-parameters (`_group_problem`); each parameter's state: 'step' a finite number >= 0, every
    other value a tensor, finite, of its parameter's dtype (float64 moments of float32 weights are not what was
    trained), the second moments >= 0, and AdamW's keys all there once it has stepped. A structure torch's own
    load refuses (groups or parameters of other counts) is left to it."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(isinstance(g, dict) for g in groups):
        return None
    for g, group in enumerate(groups):
        problem = _group_problem(g, group)
        if problem:
            return problem
    mine = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        ids = [(i, group) for group in groups for i in group.get("params", ())]
        params = {i: (p, group) for (i, group), p in zip(ids, mine, strict=True)}
    except (TypeError, ValueError):  # other counts, or an id that is no key: torch's load says so
        params = {}
    adam = isinstance(optimizer, torch.optim.Adam)  # AdamW is one
    for i, (pid, entry) in enumerate(state.items()):
        if not isinstance(entry, dict):
            continue
        where = f"state of parameter {key_text(pid, i)}:"
        param, group = params.get(pid, (None, {})) if isinstance(pid, (int, str)) else (None, {})
        need = ADAM_STATE + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
        missing = [k for k in need if k not in entry] if adam and entry else []
        if missing:
            return f"{where} it has no {missing[0]!r} (AdamW keeps {', '.join(need)} once it has stepped)"
        for j, (name, v) in enumerate(entry.items()):
            what = f"{where} its {key_text(name, j)!r}" if isinstance(name, str) else f"{where} {key_text(name, j)}"
            if name == "step":
                x = _number(v)
                if x is None or not math.isfinite(x) or x < 0:
                    return f"{what} is {_value_text(v)}, not a number of steps (a finite number >= 0)"
                continue
            if not isinstance(v, torch.Tensor):
                return f"{what} is {_value_text(v)}, not a tensor"
            if param is not None and param.is_floating_point() and v.dtype != param.dtype:
                return f"{what} is {v.dtype}, its parameter's is {param.dtype}"
            if v.is_floating_point() and v.dtype not in CHECKED_FLOATS:
                return f"{what} is {v.dtype}, not a dtype an optimizer keeps"
            if v.is_floating_point() or v.is_complex():
                bad = int((~torch.isfinite(v)).sum())
                if bad:
                    return f"{what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}"
                if name in SECOND_MOMENTS and v.is_floating_point() and bool((v < 0).any()):
                    return f"{what} holds negative values (a second moment is a mean of squares)"
    return None


def _owned(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """obj with every tensor copied into memory: an optimizer keeps its state tensors as given, and those of a
    checkpoint read by load_weights_only are pages of the file, which may be replaced or removed while training.
    A shared object is copied once (load_weights_only has refused cycles and bounded the nesting)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.clone()
    elif isinstance(obj, dict):
        out = {k: _owned(v, memo) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_owned(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def trusted_owners(run_folder: str | os.PathLike) -> set[int]:
    """Whose run folder `run_folder` may be, and whose checkpoints in it are resumed: this user (as its file
    system records this user's files), root, and the owner of the --ckpt_dir it is in when nobody else could have
    put that folder where it is (its parent belongs to root or this user, and others may not write to it: a
    folder made for the user, as a container's mount of its host user's). Not the owner of a --ckpt_dir made in a
    folder everybody may write to (/tmp, a scratch disk): anybody could have made it, the run folder in it too."""
    run_folder = Path(run_folder)
    # the folders themselves, links resolved: `--ckpt_dir=..` read as text has the folder the user is in as its
    # "parent", a folder below the real one
    ckpt_dir = Path(os.path.realpath(run_folder.parent))
    trusted = own_uids(ckpt_dir) | {0}
    if str(ckpt_dir) != os.path.abspath(run_folder.parent):
        # a link on the way (made by whoever may write where it is, a group member in a team folder): the real
        # folder's placement says nothing of who chose the name
        return trusted
    try:
        st, above = os.stat(ckpt_dir), os.stat(ckpt_dir.parent)
        if above.st_uid in trusted and not above.st_mode & 0o022:
            trusted.add(st.st_uid)
    except OSError:
        pass
    return trusted


def run_folder_problem(folder: str | os.PathLike, flag: str = "--ckpt_dir") -> str | None:
    """Why an existing run folder may not be trained in (its owner not trusted, or a link at its name made by an
    untrusted user: it would steer the run into another run's folder, whose checkpoints it would resume and mix
    with its own), or None. `flag` is the folder's flag: --ckpt_dir, or --log_dir for the run's TensorBoard log."""
    folder = Path(folder)
    link, st = os.lstat(folder), os.stat(folder)
    mine = os.geteuid()
    what = "checkpoints" if flag == "--ckpt_dir" else "logs"
    if stat.S_ISLNK(link.st_mode) and link.st_uid != mine and link.st_uid not in trusted_owners(folder):
        return (f"{folder}: a link of uid {link.st_uid}'s (to {os.path.realpath(folder)}), not this user's: it could "
                f"steer this run's {what} into another folder; remove it, or give another {flag} (or --exp_name)")
    if st.st_uid != mine and st.st_uid not in trusted_owners(folder):
        return (f"{folder}: a folder of uid {st.st_uid}, not this user's: its owner could put or replace {what} "
                f"in it; give another {flag} (or --exp_name)")
    return None


def foreign_checkpoints(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """(path, owner uid) of the checkpoints in `folder` whose owners are not trusted (`trusted_owners`: put there
    by another user of a folder others may write to): never resumed. A link is judged by its own owner (whoever
    made it chose its target); one whose target is gone is left to the reader, which sets it aside."""
    found = []
    for _, p in list_checkpoints(folder):
        try:
            found.append((p, os.lstat(p).st_uid))
        except FileNotFoundError:  # removed meanwhile
            continue
    if all(uid == os.geteuid() for _, uid in found):
        return []
    trusted = trusted_owners(folder)
    return [(p, uid) for p, uid in found if uid not in trusted]


def changeable_checkpoints(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """(path, mode) of the checkpoints in `folder` that others may write to (group or other write permission):
    whoever may rewrite one in place can put any weights in it under the run's own name, step and owner, so a run
    never resumes from one. `save` writes none such."""
    found = []
    for _, p in list_checkpoints(folder):
        try:
            mode = os.stat(p).st_mode
        except OSError:  # removed meanwhile, or a link whose target is gone: the reader's to judge
            continue
        if mode & 0o022:
            found.append((p, stat.S_IMODE(mode)))
    return found


def untrusted_run_folder(folder: str | os.PathLike) -> bool:
    """Whether an existing run folder is not to be trained in or resumed from: its owner, or a checkpoint's in it,
    is not trusted (`trusted_owners`), or others may rewrite a checkpoint in it (`changeable_checkpoints`)."""
    return (run_folder_problem(folder) is not None or bool(foreign_checkpoints(folder))
            or bool(changeable_checkpoints(folder)))


def read_newest(folder: str | os.PathLike, on_bad: Callable[[Path, CheckpointError], None] | None = None,
                map_location: str | torch.device = "cpu", rename: bool = True,
                layout: Layout = PIPS_LAYOUT) -> tuple[Path, dict] | None:
    """(path, dict) of the newest readable model-*.pth in folder, or None; each unreadable newer one is passed to
    on_bad and, with rename, renamed to *.bad (kept for inspection, never picked again)."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, read_checkpoint(path, map_location, layout)
        except CheckpointError as e:
            if e.local:  # not the file's fault: set nothing aside, and resume from nothing older
                raise
            if on_bad is not None:
                on_bad(path, e)
            if not rename:
                continue
            try:
                os.replace(path, path.with_name(path.name + ".bad"))
            except OSError:
                pass  # a read-only folder: it is skipped again next time, which is still correct
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of a DataParallel or DistributedDataParallel wrapper (which holds it as .module)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save(folder: str | os.PathLike, step: int, model: nn.Module, optimizer=None, scheduler=None,
         keep_latest: int | None = None, extra: dict | None = None, layout: Layout = PIPS_LAYOUT) -> Path:
    """Write model-%09d.pth atomically (temp file, then rename) and keep only the latest K checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {layout.model: unwrap(model).state_dict()}
    if optimizer is not None:
        ckpt[layout.optimizer] = optimizer.state_dict()
    if scheduler is not None:
        ckpt[layout.scheduler] = scheduler.state_dict()
    if extra:
        ckpt.update(extra)
    path = folder / ckpt_name(step)
    fd, tmp = new_temp_file(folder, f".{path.name}.{socket.gethostname()}.{os.getpid()}.")
    try:
        # readable as the umask allows, never writable by others: a resume refuses a checkpoint others may
        # rewrite in place (`changeable_checkpoints`), which a umask of 002 would otherwise let the group do
        os.fchmod(fd, umask_mode(0o666, keep_from_others=True))
    except OSError:  # a file system without modes
        pass
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if keep_latest:
        for _, old in list_checkpoints(folder)[:-keep_latest]:
            old.unlink(missing_ok=True)
    return path


def clean_stale_temps(folder: str | os.PathLike, lock_held: bool = False) -> list[Path]:
    """Remove checkpoint temps left by killed writers (dead pid on this host); returns the removed paths.

    A temp of another host is left alone: its writer's liveness cannot be checked from here. With `lock_held`
    (the caller holds the folder's RunLock and has written nothing yet) every temp is stale, whatever its host
    or pid: only the lock's holder writes checkpoints there. A run requeued onto another node, or restarted as a
    container's pid 1 again, left a checkpoint-sized temp for good at every kill during a save.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m:
            stale = lock_held or (m.group("host") == host and not pid_alive(int(m.group("pid"))))
        elif LEGACY_TEMP_RE.match(p.name):
            try:
                stale = time.time() - p.stat().st_mtime > LEGACY_TEMP_AGE_S
            except OSError:
                continue
        else:
            continue
        if stale:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


# Locks this process holds: a lock naming this process's pid that it does not hold is another process's.
_HELD_HERE: set[Path] = set()
_HELD_AS: dict[Path, RunLock] = {}  # each lock this process holds, by its file: to see it taken away
_HELD_NAMED: dict[str, RunLock] = {}  # the same, by the run folder's name as given: to see the folder replaced
# A held lock's file is touched every LOCK_BEAT_S by a thread of its owner. A lock whose pid cannot be judged here
# (another PID namespace: a container sharing the host's name) is stale once it has not been touched for
# LOCK_SILENT_S; one of another host (a restarted container's new name, a requeue onto another node) after
# LOCK_FOREIGN_SILENT_S, longer because the file server's clock and this machine's may disagree.
LOCK_BEAT_S, LOCK_SILENT_S, LOCK_FOREIGN_SILENT_S = 60.0, 300.0, 900.0
MAX_LOCK_BYTES = 4096  # a lock this program writes is ~150 bytes of JSON


class RunLock:
    """A lock file in a checkpoint folder holding the owner's host, pid and start time, so two runs never share a
    folder.

    A lock of this host whose process is gone is taken over: its pid is dead, or names another process now (a
    different start time), or is this process's own without this process holding it (a container restarted after
    SIGKILL gets the same pid 1 and hostname). A lock whose pid cannot be judged here is judged by its heartbeat:
    of another PID namespace, stale after LOCK_SILENT_S without one; of another host, after LOCK_FOREIGN_SILENT_S
    (a lock written before locks had a heartbeat is never stale). A live owner raises LockError. A run paused
    longer than that (Ctrl-Z, `docker pause`) loses its lock while alive (docs/BAD_INPUTS.md).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                   "ns": pid_namespace(), "beat": LOCK_BEAT_S}
        self._beating: threading.Event | None = None
        self.held = False
        self.made: list[Path] = []  # folders acquire() created: removed again by release() if left empty
        self.ident: tuple[int, int] | None = None  # the run folder's (device, inode) once the lock is held

    def _read(self, path: Path) -> dict | None:
        """The owner a lock file names, or None when it is not what this program writes (not JSON, empty, or a pid
        that is not a positive whole number: a traceback in _dead before)."""
        try:  # a FIFO there blocked the run forever, a link to /dev/zero was read until memory ran out
            with open_regular(path) as f:
                if os.fstat(f.fileno()).st_size > MAX_LOCK_BYTES:  # a 3 GB sparse file
                    return None
                owner = json.loads(f.read(MAX_LOCK_BYTES + 1))
        # UnsafeFileError (not a regular file) is a ValueError; RecursionError: JSON nested 200,000 deep
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(owner, dict):
            return None
        pid = owner.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
            return None
        return owner

    def _create(self) -> bool:
        """Create the lock file with its content in one step (a temp file linked into place): a lock created empty
        and then written was left empty by a full disk or a SIGKILL between the two, and refused every later run."""
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.new.", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                return self._create_exclusive()  # a file system without hard links
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """O_EXCL create, then write; the file is removed again if the write fails."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _age(self, path: Path | None = None) -> float | None:
        """Seconds since the lock file was last touched (None if it cannot be read); of a link, the link's own."""
        try:
            return time.time() - (path or self.path).lstat().st_mtime
        except OSError:
            return None

    def _silence(self, owner: dict) -> float | None:
        """How long the owner's lock may go without a heartbeat before it is stale; None when its pid is judged
        here instead (this host and PID namespace), or when it has no heartbeat to judge (another host's lock
        from before locks had one: never stale)."""
        ns = owner.get("ns")
        if owner.get("host") != self.me["host"]:
            return LOCK_FOREIGN_SILENT_S if "beat" in owner else None
        if isinstance(ns, int) and ns != self.me["ns"]:  # its pid means another process, or none, here
            return LOCK_SILENT_S
        return None

    def _dead(self, owner: dict, path: Path | None = None, confirm: bool = False) -> bool:
        """Whether the owner the lock file at `path` (the lock's by default) names is gone. A lock judged by its
        heartbeat that looks silent is, with `confirm`, watched for one beat and a half more by this process's own
        clock: its age compares this machine's clock with the stamp of the file's server, and a clock ahead by more
        than the silence (a VM resumed from suspend, NTP's first step) made a live run's lock look stale."""
        silence = self._silence(owner)
        if silence is not None:
            age = self._age(path)
            if age is None or age <= silence:
                return False
            return not confirm or self._unchanged_for(path or self.path, 1.5 * LOCK_BEAT_S)
        if owner.get("host") != self.me["host"]:
            return False
        pid = int(owner["pid"])
        if pid == os.getpid():
            return self.path.resolve() not in _HELD_HERE
        start = owner.get("start")
        return not pid_alive(pid) or (isinstance(start, int) and process_start(pid) not in (None, start))

    @staticmethod
    def _unchanged_for(path: Path, seconds: float) -> bool:
        """Whether the lock file at path keeps its modification time (and stays there) for `seconds` of this
        process's monotonic clock."""
        try:
            first = path.lstat().st_mtime_ns
        except OSError:
            return False
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            try:
                if path.lstat().st_mtime_ns != first:
                    return False
            except OSError:
                return False
        return True

    def _holder(self, owner: dict) -> str:
        """The live owner as the refusal names it, with the rule that would let the lock be taken over."""
        where = f"pid {owner['pid']} on {owner.get('host')}"
        silence = self._silence(owner)
        if silence is not None:
            age = self._age()
            ago = ("at an unknown time" if age is None else f"{age:.0f} s ago" if age >= 0 else
                   f"dated {-age:.0f} s in the future (the clocks disagree)")
            other = ", in another PID namespace" if owner.get("host") == self.me["host"] else ""
            return (f"{where}{other}: its last heartbeat was {ago}; the lock is taken over after "
                    f"{silence / 60:g} minutes without one")
        if owner.get("host") != self.me["host"]:
            return f"{where}, another host, by a version without a heartbeat: this machine cannot tell if it runs"
        return where

    def acquire(self) -> RunLock:
        """Take the lock or raise LockError naming the folder and the owner."""
        if os.path.islink(self.folder) and not os.path.exists(self.folder):  # mkdir said only "File exists"
            uid = os.lstat(self.folder).st_uid
            whose = "" if uid == os.geteuid() else f" of uid {uid}'s"
            raise LockError(f"{self.folder}: a link{whose} to {os.readlink(self.folder)}, which does not exist; remove "
                            f"it, or give another --ckpt_dir (or --exp_name)")
        self.made = make_dirs(self.folder)
        # the run folder's name follows from the flags: on a disk every user may write to (/tmp, a scratch disk)
        # another user can make it first, and then put checkpoints in it, or replace this run's, at will
        if not self.made and (problem := run_folder_problem(self.folder)):
            raise LockError(problem)
        for _ in range(5):
            if self._create():
                self.held = True
                _HELD_HERE.add(self.path.resolve())
                _HELD_AS[self.path.resolve()] = self
                st = os.stat(self.folder)
                self.ident = (st.st_dev, st.st_ino)
                _HELD_NAMED[os.path.abspath(self.folder)] = self
                self._start_beating()
                return self
            owner = self._read(self.path)
            if owner is None:
                if not os.path.lexists(self.path):
                    continue
                if self.path.is_dir() and not self.path.is_symlink():  # moved aside, it could not be removed
                    raise LockError(f"{self.folder}: {self.path.name} is a folder, not a lock file; remove it if no "
                                    f"training writes into this folder")
                # not what this program writes (an older one's lock left empty by a full disk): whoever wrote it
                # cannot be judged, so only a long silence lets it go
                age = self._age()
                if age is not None and age < 0:
                    raise LockError(f"{self.folder}: lock file {self.path.name} is unreadable and dated {-age:.0f} "
                                    f"s in the future (the clocks disagree); remove it if no training writes into "
                                    f"this folder")
                if age is None or age <= LOCK_FOREIGN_SILENT_S:
                    raise LockError(f"{self.folder}: lock file {self.path.name} is unreadable; it is taken over once "
                                    f"unchanged for {LOCK_FOREIGN_SILENT_S / 60:g} minutes; remove it now if no "
                                    f"training writes into this folder")
            elif not self._dead(owner, confirm=True):
                raise LockError(f"{self.folder}: another training ({self._holder(owner)}) writes checkpoints here "
                                f"(lock {self.path.name}; if none does, remove that file)")
            # move the stale lock aside atomically, so of two runs taking it over only one wins
            aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            live = (not self._dead(moved, aside)) if moved is not None else \
                (self._age(aside) or 0) <= LOCK_FOREIGN_SILENT_S
            if live:  # a live run took it over between our read and move
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                who = f"pid {moved['pid']} on {moved.get('host')}" if moved else "its lock just rewritten"
                raise LockError(f"{self.folder}: another training ({who}) writes checkpoints here (lock "
                                f"{self.path.name})")
            aside.unlink(missing_ok=True)
        raise LockError(f"{self.folder}: could not take the lock {self.path.name} (contended)")

    def release(self) -> None:
        """Remove the lock if it is still ours, and the folders acquire() made if nothing else was written there
        (a run that stopped on bad input leaves no empty run folder)."""
        if self.held and self._read(self.path) == self.me:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a folder turned read-only (remounted after an I/O error): the error said before stands;
                pass  # the lock left names a dead process, which the next run takes over
            remove_empty_dirs(self.made)
        if self.held:
            _HELD_HERE.discard(self.path.resolve())
            _HELD_AS.pop(self.path.resolve(), None)
            _HELD_NAMED.pop(os.path.abspath(self.folder), None)
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        self.held = False

    def _start_beating(self) -> None:
        """A thread touching the lock file every LOCK_BEAT_S until release()."""
        self._beating = threading.Event()
        threading.Thread(target=self._beat, args=(self._beating,), daemon=True).start()

    def _beat(self, stopped: threading.Event) -> None:
        """Touch the lock file every LOCK_BEAT_S until released: the heartbeat another PID namespace judges."""
        while not stopped.wait(LOCK_BEAT_S):
            if self._read(self.path) != self.me:  # taken over or removed (see lock_lost): not ours to keep alive
                stopped.set()
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_lost(folder: str | os.PathLike) -> str | None:
    """Why this process no longer holds the lock it took on `folder` (the lock file now names another run, or is
    gone), or None. Three runs taking over one stale lock at once could leave two believing they held it: a run
    asks before each save, and stops rather than write beside another."""
    named = _HELD_NAMED.get(os.path.abspath(folder))
    if named is not None and named.ident is not None:
        # renamed away (a copy kept by hand), or a link put at its name by someone who may write its parent:
        # the run would write, and prune, another folder (another run's, another user's)
        try:
            st = os.stat(folder)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != named.ident:
            now = "is gone" if st is None else f"is a link to {os.path.realpath(folder)}" if os.path.islink(folder) \
                else "is another folder"
            return f"{folder}: the run folder was moved or replaced during the run (its name {now} now)"
    path = (Path(folder) / LOCK_NAME).resolve()
    lock = _HELD_AS.get(path)
    if lock is None:
        return None
    now = lock._read(path)
    if now == lock.me:
        if lock._beating is None or lock._beating.is_set():
            lock._start_beating()
        return None
    if now is None and not os.path.lexists(path) and lock._create():
        # removed by hand (its refusal says "if none does, remove that file"): nobody else holds the folder, so
        # the run takes its lock again rather than lose the steps since its last save, and beats again (its
        # heartbeat stopped when the file went: another namespace or host would take the live folder over)
        if lock._beating is not None:
            lock._beating.set()
        lock._start_beating()
        return None
    who = "is gone" if now is None and not os.path.lexists(path) else \
        f"names pid {now['pid']} on {now.get('host')}" if now else "is unreadable"
    return f"{folder}: this run's lock file {LOCK_NAME} {who}: another training took this folder over"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(model: nn.Module) -> str:
    """Per-module parameter table ending in 'total params: X.XX M', as the authors' trainer prints."""
    table = PrettyTable(["Modules", "Parameters"])
    table.align["Modules"] = "l"
    for name, p in model.named_parameters():
        if p.requires_grad:
            table.add_row([name, p.numel()])
    return f"{table}\ntotal params: {count_parameters(model) / 1e6:.2f} M"


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU; cpu, cuda[:N] and mps must exist here (ValueError, one line
    naming --device, otherwise: before a model is loaded, not when it is moved)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} found)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    return dev
