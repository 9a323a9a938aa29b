"""Downloading released checkpoints: the one home of fetching code, for pips2/hub.py and get_reference_model.sh.

Standard library only, so that get_reference_model.sh can fetch and check an archive with any Python and
report a missing torch only when it comes to verifying the checkpoint.

    python -m pips2.utils.download URL OUT_DIR [SHA256]   # OUT_DIR/reference_model/ from a reference tarball
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from pips2.utils.paths import new_temp_file, output_folder_problem  # standard library only, as this module

try:
    from tqdm import tqdm
except ImportError:  # get_reference_model.sh may fetch with a bare Python: no progress bar then
    tqdm = None

MODEL_RE = re.compile(r"^model-\d{1,18}\.pth$")
KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.FIFOTYPE: "FIFO",
         tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}

# Bounds on a download, from what a reference model is (docs/MODELS.md lists them). A PIPs++ checkpoint holds
# 17,565,410 float32 weights (docs/MODEL.md): 70 MB, or 211 MB with the two AdamW moments the authors' trainer
# saves beside them (their saverloader), 281 MB with a third (amsgrad). LBM's weights are 17.8 M floats, as many.
MODEL_WEIGHT_BYTES = 17_565_410 * 4
MAX_CHECKPOINT_BYTES = 4 * MODEL_WEIGHT_BYTES + (16 << 20)  # one model-*.pth or lbm.pt: 297 MB (+16 MiB of names)
MAX_CHECKPOINTS = 5  # model-*.pth in one tarball: the authors' saverloader keeps the latest 5 of a run
MAX_MEMBERS = MAX_CHECKPOINTS + 1  # and the reference_model/ folder itself
MAX_UNPACKED_BYTES = MAX_CHECKPOINTS * MAX_CHECKPOINT_BYTES  # all members together: 1.49 GB
MAX_HEADER_BYTES = 64 << 10  # all tar headers together (a block of 512 bytes per member, a long name's record)
MAX_TAR_BYTES = MAX_UNPACKED_BYTES + (1 << 20)  # the uncompressed tar: members, headers, 512-byte padding
MAX_ARCHIVE_BYTES = MAX_TAR_BYTES + (MAX_TAR_BYTES >> 10)  # gzip adds a few bytes per 64 KiB of weights
READ_CHUNK = 1 << 20  # bytes copied at a time from the archive


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass


class DownloadError(RuntimeError):
    """A download or archive that cannot be used; the message is one line naming the address and the problem."""


def download(url: str, dest: Path, sha256: str | None = None, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Fetch url (http, https, file) into dest through a temp file in dest's folder; the sha256 is checked
    when given, a short body (fewer bytes than Content-Length) is refused, and so is one longer than max_bytes
    (before it is fetched when Content-Length says so). dest appears only when whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(dest.parent, f".{dest.name}.{os.getpid()}.", ".part")
    digest, got = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    size = r.headers.get("Content-Length")
                    total = int(size) if size and size.isdigit() else None
                    if total is not None and total > max_bytes:
                        raise DownloadError(f"{url}: download is {total} bytes, more than the {max_bytes} a "
                                            f"released model needs; refusing it")
                    bar = _NoBar() if tqdm is None else tqdm(total=total, unit="B", unit_scale=True,
                                                             desc=f"downloading {dest.name}", disable=None)
                    with bar:
                        while chunk := r.read(READ_CHUNK):
                            if got + len(chunk) > max_bytes:
                                raise DownloadError(f"{url}: download is more than the {max_bytes} bytes a "
                                                    f"released model needs; refusing it")
                            if total is not None and got + len(chunk) > total:
                                raise DownloadError(f"{url}: download is longer than the {total} bytes its "
                                                    f"Content-Length says; refusing it")
                            f.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise DownloadError(f"{url}: download failed ({getattr(e, 'reason', None) or e})") from None
            if total is not None and got != total:
                raise DownloadError(f"{url}: download truncated ({got} of {total} bytes)")
            f.flush()
            os.fsync(f.fileno())
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"{url}: sha256 mismatch (got {digest.hexdigest()}, expected {sha256.lower()})")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


class _Bounded:
    """A decompressed stream seen by tarfile, refusing (DownloadError) to go past `limit` bytes, and, while
    `header_budget` is set, to hand out more than that many bytes through read(): reading the headers, tarfile
    reads only them and skips every member's data by seeking, so the budget bounds what the headers (a pax
    record, a sparse map, a long name) may make it hold before any member is looked at."""

    def __init__(self, f, limit: int, header_budget: int | None):
        self.f, self.limit, self.header_budget = f, limit, header_budget

    def _refuse(self, what: str) -> None:
        raise DownloadError(f"archive {what}; a reference model is at most {MAX_CHECKPOINTS} model-*.pth of "
                            f"{MAX_CHECKPOINT_BYTES} bytes each; refusing it")

    def read(self, n: int = -1) -> bytes:
        pos = self.f.tell()
        n = self.limit + 1 - pos if n is None or n < 0 else min(n, self.limit + 1 - pos)
        if self.header_budget is not None and n > self.header_budget:
            self._refuse(f"headers are longer than {MAX_HEADER_BYTES} bytes")
        data = self.f.read(max(n, 0))
        if pos + len(data) > self.limit:
            self._refuse(f"unpacks to more than {self.limit} bytes")
        if self.header_budget is not None:
            self.header_budget -= len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        target = pos if whence == os.SEEK_SET else self.f.tell() + pos if whence == os.SEEK_CUR else None
        if target is None:
            raise OSError("seeking from the end of a compressed stream")
        if target > self.limit:
            self._refuse(f"unpacks to more than {self.limit} bytes")
        return self.f.seek(target)

    def tell(self) -> int:
        return self.f.tell()

    # the rest of the file-object interface tarfile declares: this stream is read-only, and the GzipFile and file
    # under it are closed by their own with-blocks
    def write(self, b: bytes) -> int:
        raise io.UnsupportedOperation("write")

    def close(self) -> None:
        pass


def _check_member(m: tarfile.TarInfo, seen: set[str]) -> str | None:
    """The file name of a checkpoint member, None for the reference_model/ folder itself; DownloadError (without
    the address) for anything else: a reference model is its model-*.pth files and nothing more."""
    # `tar czf x.tgz ./reference_model` and `tar -C dir .` name members ./reference_model/...: the same place
    parts = [p for p in m.name.split("/") if p not in ("", ".")]
    if m.name.startswith("/") or ".." in parts:
        raise DownloadError("archive holds unsafe paths (absolute or ..); refusing it")
    if not parts and m.isdir():  # the archive's own top folder ("./")
        return None
    if not parts or parts[0] != "reference_model":
        raise DownloadError("archive holds files outside reference_model/; refusing it")
    if not (m.isreg() or m.isdir()):
        # links could point anywhere and a FIFO makes every later reader hang
        kind = KINDS.get(m.type, f"member of type {m.type!r}")
        to = f" to {m.linkname!r}" if m.issym() or m.islnk() else ""
        raise DownloadError(f"archive member {m.name!r} is a {kind}{to}, not a regular file or folder; refusing it")
    if m.issparse():  # holes that unpack to any size from a few bytes of archive
        raise DownloadError(f"archive member {m.name!r} is a sparse file; refusing it")
    rest = parts[1:]
    if m.isdir() and not rest:
        return None
    if not (m.isreg() and len(rest) == 1 and MODEL_RE.match(rest[0])):
        raise DownloadError(f"archive member {m.name!r} is not a reference_model/model-*.pth checkpoint, the only "
                            f"files a reference model has; refusing it")
    if rest[0] in seen:
        raise DownloadError(f"archive holds {m.name!r} twice; refusing it")
    if not 0 <= m.size <= MAX_CHECKPOINT_BYTES:
        raise DownloadError(f"archive member {m.name!r} is {m.size} bytes, more than the {MAX_CHECKPOINT_BYTES} "
                            f"a checkpoint of the model needs; refusing it" if m.size > 0 else
                            f"archive member {m.name!r} declares {m.size} bytes; refusing it")
    seen.add(rest[0])
    return rest[0]


def _checked_members(tf: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, str]]:
    """(member, file name) of every checkpoint in the archive, all headers checked before anything is written."""
    found, seen, total = [], set(), 0
    for i, m in enumerate(tf, 1):  # each member is checked before tarfile reads the next header
        if i > MAX_MEMBERS:
            raise DownloadError(f"archive holds more than {MAX_MEMBERS} members (a reference model is at most "
                                f"{MAX_CHECKPOINTS} model-*.pth and their folder); refusing it")
        name = _check_member(m, seen)
        if name is not None:
            total += m.size
            found.append((m, name))
            if len(found) > MAX_CHECKPOINTS:  # MAX_MEMBERS counts the folder's own entry, which may be absent
                raise DownloadError(f"archive holds more than {MAX_CHECKPOINTS} model-*.pth checkpoints (a reference "
                                    f"model has at most {MAX_CHECKPOINTS}); refusing it")
    if total > MAX_UNPACKED_BYTES:
        raise DownloadError(f"archive unpacks to {total} bytes, more than {MAX_UNPACKED_BYTES}; refusing it")
    return found


def unpack_reference(tarball: Path, dest: Path, source: str) -> None:
    """Unpack the model-*.pth files of a tar.gz's reference_model/ folder into dest (created), written by us,
    never by tar's extract. Every header is checked first (docs/MODELS.md: only regular model-*.pth files under
    reference_model/, each and all together within the bounds above, no links, devices or sparse files,
    at least one checkpoint); nothing is written unless all pass."""
    with open(tarball, "rb") as f:
        head = f.read(60)
    if head[:2] != b"\x1f\x8b":
        shown = "".join(c for c in head.decode("latin-1") if c.isprintable())
        raise DownloadError(f"{source} is not a gzip file (got {shown!r}...)")
    try:
        with open(tarball, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
            stream = _Bounded(gz, MAX_TAR_BYTES, MAX_HEADER_BYTES)
            with tarfile.open(fileobj=stream, mode="r:") as tf:
                members = _checked_members(tf)
                if not members:
                    raise DownloadError("archive holds no reference_model/model-*.pth checkpoint")
                stream.header_budget = None  # the data of the members just checked is read below
                dest.mkdir(parents=True, exist_ok=True)
                for m, name in members:
                    src = tf.extractfile(m)
                    assert src is not None  # members are regular files (_check_member), which extractfile opens
                    with src, open(dest / name, "wb") as out:
                        while chunk := src.read(READ_CHUNK):
                            out.write(chunk)
    except DownloadError as e:
        raise DownloadError(f"{source}: {e}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DownloadError(f"{source} is not a tar.gz archive ({e})") from None


def fetch_reference(url: str, out_dir: Path, sha256: str | None = None) -> Path:
    """Download a reference tarball into out_dir and unpack it to out_dir/reference_model (checked, unverified)."""
    tarball = download(url, out_dir / "reference_model.tar.gz", sha256)
    unpack_reference(tarball, out_dir / "reference_model", url)
    tarball.unlink()
    return out_dir / "reference_model"


def main(argv: list[str]) -> int:
    """CLI for get_reference_model.sh: URL OUT_DIR [SHA256]; a problem is one line on stderr and exit code 1."""
    url, out_dir, sha = argv[0], Path(argv[1]), (argv[2] if len(argv) > 2 and argv[2] else None)
    if len(argv) > 3 and (problem := output_folder_problem(argv[3], "REF_MODEL_DEST")):  # where it will be installed
        print(f"get_reference_model.sh: {problem}; nothing replaced", file=sys.stderr)
        return 1
    try:
        fetch_reference(url, out_dir, sha)
    except DownloadError as e:
        print(f"get_reference_model.sh: {e}; nothing replaced", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
