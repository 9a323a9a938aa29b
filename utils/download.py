"""Downloading released checkpoints: the one home of fetching code, for pips2/hub.py and get_reference_model.sh.

Standard library only, so that get_reference_model.sh can fetch and check an archive with any Python and
report a missing torch only when it comes to verifying the checkpoint.

    python -m pips2.utils.download URL OUT_DIR [SHA256]   # OUT_DIR/reference_model/ from a reference tarball
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

try:
    from tqdm import tqdm
except ImportError:  # get_reference_model.sh may fetch with a bare Python: no progress bar then
    tqdm = None

MODEL_RE = re.compile(r"^model-\d+\.pth$")
KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.FIFOTYPE: "FIFO",
         tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}


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


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Fetch url (http, https, file) into dest through a temp file in dest's folder; the sha256 is checked
    when given and a short body (fewer bytes than Content-Length) is refused. dest appears only when whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".part", dir=dest.parent)
    digest, got = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    size = r.headers.get("Content-Length")
                    total = int(size) if size and size.isdigit() else None
                    bar = _NoBar() if tqdm is None else tqdm(total=total, unit="B", unit_scale=True,
                                                             desc=f"downloading {dest.name}", disable=None)
                    with bar:
                        while chunk := r.read(1 << 20):
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


def _check_member(m: tarfile.TarInfo) -> list[str]:
    """The path parts of a safe member under reference_model/, else DownloadError (without the address)."""
    parts = m.name.split("/")
    if m.name.startswith("/") or ".." in parts:
        raise DownloadError("archive holds unsafe paths (absolute or ..); refusing it")
    if parts[0] != "reference_model":
        raise DownloadError("archive holds files outside reference_model/; refusing it")
    if not (m.isreg() or m.isdir()):
        # links could point anywhere and a FIFO makes every later reader hang
        kind = KINDS.get(m.type, f"member of type {m.type!r}")
        to = f" to {m.linkname!r}" if m.issym() or m.islnk() else ""
        raise DownloadError(f"archive member {m.name!r} is a {kind}{to}, not a regular file or folder; refusing it")
    return parts


def unpack_reference(tarball: Path, dest: Path, source: str) -> None:
    """Unpack the reference_model/ folder of a tar.gz into dest (created): regular files and folders only,
    nothing outside reference_model/, at least one model-*.pth; written by us, never by tar's extract."""
    with open(tarball, "rb") as f:
        head = f.read(60)
    if head[:2] != b"\x1f\x8b":
        shown = "".join(c for c in head.decode("latin-1") if c.isprintable())
        raise DownloadError(f"{source} is not a gzip file (got {shown!r}...)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for m in tf:
                parts = _check_member(m)
                out = dest.joinpath(*parts[1:])
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
    except DownloadError as e:
        raise DownloadError(f"{source}: {e}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(f"{source} is not a tar.gz archive ({e})") from None
    if not any(MODEL_RE.match(p.name) for p in dest.iterdir()):
        raise DownloadError(f"{source}: archive holds no reference_model/model-*.pth checkpoint")


def fetch_reference(url: str, out_dir: Path, sha256: str | None = None) -> Path:
    """Download a reference tarball into out_dir and unpack it to out_dir/reference_model (checked, unverified)."""
    tarball = download(url, out_dir / "reference_model.tar.gz", sha256)
    unpack_reference(tarball, out_dir / "reference_model", url)
    tarball.unlink()
    return out_dir / "reference_model"


def main(argv: list[str]) -> int:
    """CLI for get_reference_model.sh: URL OUT_DIR [SHA256]; a problem is one line on stderr and exit code 1."""
    url, out_dir, sha = argv[0], Path(argv[1]), (argv[2] if len(argv) > 2 and argv[2] else None)
    try:
        fetch_reference(url, out_dir, sha)
    except DownloadError as e:
        print(f"get_reference_model.sh: {e}; nothing replaced", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
