"""get_reference_model.sh against tarballs served from 127.0.0.1 and file:// URLs."""

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import sparse_tar_bytes, tar_bytes, torch_bytes

ROOT = Path(__file__).resolve().parents[1]
CKPT = "reference_model/model-000200000.pth"


class Payload:
    """Unpickling this would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _tar(path: Path, members: dict, gz: bool = True) -> None:
    path.write_bytes(tar_bytes(members, gz))


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> bytes:
    from pips2.nets.pips2 import Pips

    return torch_bytes({"model_state_dict": Pips().state_dict()})


def _bad_weights(kind: str) -> bytes:
    """A reference checkpoint that loads but is wrong: one NaN or inf weight, or every weight stored as int64."""
    from pips2.nets.pips2 import Pips

    state = Pips().state_dict()
    if kind == "int64":
        state = {k: v.to(torch.int64) for k, v in state.items()}
    else:
        state["delta_block.dense.bias"][1] = float(kind)
    return torch_bytes({"model_state_dict": state})


@pytest.fixture(scope="module")
def server(tmp_path_factory, good_ckpt):
    root = tmp_path_factory.mktemp("www")
    marker = root / "ran"
    _tar(root / "good.tar.gz", {"reference_model/": (tarfile.DIRTYPE, ""), CKPT: good_ckpt})
    _tar(root / "nomodel.tar.gz", {"reference_model/": (tarfile.DIRTYPE, "")})
    _tar(root / "extra.tar.gz", {CKPT: good_ckpt, "reference_model/args.txt": b"S=36"})
    _tar(root / "finetuned.tar.gz", {CKPT: good_ckpt, "reference_model/finetuned/": (tarfile.DIRTYPE, "")})
    _tar(root / "many.tar.gz", {f"reference_model/model-{i:09d}.pth": b"x" for i in range(7)})
    (root / "sparse.tar.gz").write_bytes(sparse_tar_bytes(CKPT, 2 << 30))
    (root / "huge.tar.gz").write_bytes(sparse_tar_bytes(CKPT, 2 << 30, sparse=False))
    for kind in ("nan", "inf", "int64"):
        _tar(root / f"{kind}.tar.gz", {CKPT: _bad_weights(kind)})
    _tar(root / "plain.tar", {"reference_model/model-000000001.pth": b"x"}, gz=False)
    _tar(root / "escape.tar.gz", {"reference_model/model-000000001.pth": b"x", "../evil": b"x"})
    _tar(root / "symlink_abs.tar.gz", {CKPT: (tarfile.SYMTYPE, "/etc/passwd")})
    _tar(root / "symlink_up.tar.gz", {CKPT: (tarfile.SYMTYPE, "../../evil")})
    _tar(root / "symlink_dir.tar.gz", {CKPT: good_ckpt, "reference_model/sub": (tarfile.SYMTYPE, "/tmp")})
    _tar(root / "hardlink.tar.gz", {"reference_model/": (tarfile.DIRTYPE, ""), CKPT: (tarfile.LNKTYPE, "/etc/passwd")})
    _tar(root / "fifo.tar.gz", {CKPT: good_ckpt, "reference_model/pipe": (tarfile.FIFOTYPE, "")})
    _tar(root / "chardev.tar.gz", {CKPT: good_ckpt, "reference_model/null": (tarfile.CHRTYPE, "")})
    _tar(root / "garbage.tar.gz", {CKPT: b"weights" * 100})
    _tar(root / "wrongmodel.tar.gz", {CKPT: torch_bytes({"model_state_dict": {"x": torch.zeros(1)}})})
    _tar(root / "nostate.tar.gz", {CKPT: torch_bytes({"weights": torch.zeros(1)})})
    _tar(root / "evil.tar.gz", {CKPT: torch_bytes({"model_state_dict": Payload(marker)})})
    (root / "page.html").write_text("<html>login</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


FILE_CAP_KB = 512 << 10  # no file the script writes may grow past 512 MiB (a good checkpoint is 70 MB)


def _run(url, cwd, **env):
    # the script verifies the checkpoint with $PYTHON: this interpreter has torch and the project's deps; the
    # file size cap (SIGXFSZ beyond it) keeps a script that trusts a declared size from filling the disk
    env = {**os.environ, "REF_MODEL_URL": url, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", "-c", f'ulimit -f {FILE_CAP_KB} && exec bash "$0"',
                           str(ROOT / "get_reference_model.sh")], cwd=cwd, env=env, capture_output=True, text=True)


def _last_line(res) -> str:
    """The script's own error: curl's progress meter may precede it on stderr."""
    lines = res.stderr.strip().splitlines()
    assert lines and "Traceback" not in res.stderr, res.stderr
    return lines[-1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_leftovers(dest: Path):
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".")]


def test_good_tarball_over_http(server, tmp_path, good_ckpt):
    base, _ = server
    res = _run(f"{base}/good.tar.gz", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / CKPT).read_bytes() == good_ckpt
    assert "model-000200000.pth" in res.stdout
    _no_leftovers(tmp_path / "reference_model")


def test_file_url_and_other_cwd(server, tmp_path):
    _, root = server
    dest = tmp_path / "elsewhere" / "ref"
    res = _run(f"file://{root / 'good.tar.gz'}", tmp_path, REF_MODEL_DEST=str(dest))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["model-000200000.pth"]
    assert not (tmp_path / "reference_model").exists()
    # a destination that is the user's own link (to a data disk): installed there, and its files listed
    (tmp_path / "disk").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "disk")
    res = _run(f"file://{root / 'good.tar.gz'}", tmp_path, REF_MODEL_DEST=str(tmp_path / "linked"))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["model-000200000.pth"]
    assert "model-000200000.pth" in res.stdout.split(f"reference model in {tmp_path / 'linked'}:")[1]


def test_good_tarball_replaces_an_old_install(server, tmp_path, good_ckpt):
    base, _ = server
    dest = tmp_path / "reference_model"
    dest.mkdir()
    (dest / "model-000200000.pth").write_bytes(b"old")
    (dest / "args.txt").write_bytes(b"mine")
    (dest / "finetuned").mkdir()
    (dest / "finetuned" / "model-000000010.pth").write_bytes(b"mine")
    res = _run(f"{base}/good.tar.gz", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (dest / "model-000200000.pth").read_bytes() == good_ckpt
    # a file of the checkpoint's name that is another one may be the user's (train.py names its step-200,000
    # checkpoint so): it was replaced, now it is kept beside; the same checkpoint again is simply replaced
    assert (dest / "model-000200000.pth.old").read_bytes() == b"old", (res.stdout, res.stderr)
    assert "kept the earlier ./reference_model/model-000200000.pth as ./reference_model/model-000200000.pth.old" \
        in res.stdout
    res = _run(f"{base}/good.tar.gz", tmp_path)
    assert res.returncode == 0 and "kept the earlier" not in res.stdout, res.stdout
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("model-")) == [
        "model-000200000.pth", "model-000200000.pth.old"]
    # another readable checkpoint of that name (a training run's own model-000200000.pth) is the user's: nothing
    # is installed over it (it was replaced, and the folder then loaded the reference model as the run's)
    (dest / "model-000200000.pth").write_bytes(torch_bytes({"model_state_dict": {"x": torch.zeros(1)}}))
    mine = (dest / "model-000200000.pth").read_bytes()
    res = _run(f"{base}/good.tar.gz", tmp_path)
    assert res.returncode == 1 and _last_line(res) == (
        "get_reference_model.sh: ./reference_model/model-000200000.pth is another checkpoint (a training run's "
        "own?), not this one; nothing replaced: move it aside or give another REF_MODEL_DEST")
    assert (dest / "model-000200000.pth").read_bytes() == mine
    # what the tarball does not hold is the user's: kept as it was
    assert (dest / "args.txt").read_bytes() == b"mine"
    assert (dest / "finetuned" / "model-000000010.pth").read_bytes() == b"mine"
    _no_leftovers(dest)


@pytest.mark.parametrize("name,msg", [
    ("page.html", "not a gzip"), ("nomodel.tar.gz", "no reference_model/model"), ("plain.tar", "not a gzip"),
    ("extra.tar.gz", "'reference_model/args.txt' is not a reference_model/model-*.pth checkpoint"),
    ("finetuned.tar.gz", "'reference_model/finetuned' is not a reference_model/model-*.pth checkpoint"),
    ("many.tar.gz", "holds more than 5 model-*.pth checkpoints"),
    ("sparse.tar.gz", "'reference_model/model-000200000.pth' is a sparse file; refusing it"),
    ("huge.tar.gz", "'reference_model/model-000200000.pth' is 2147483648 bytes, more than the 297823776"),
    ("nan.tar.gz", "reference_model/model-000200000.pth: delta_block.dense.bias holds 1 NaN or infinite value"),
    ("inf.tar.gz", "reference_model/model-000200000.pth: delta_block.dense.bias holds 1 NaN or infinite value"),
    ("int64.tar.gz", "reference_model/model-000200000.pth: fnet.conv1.weight is torch.int64, the model's is "
                     "torch.float32"),
    ("escape.tar.gz", "unsafe paths"), ("missing.tar.gz", "download failed"),
    ("symlink_abs.tar.gz", "'reference_model/model-000200000.pth' is a symlink to '/etc/passwd', not a regular"),
    ("symlink_up.tar.gz", "'reference_model/model-000200000.pth' is a symlink to '../../evil', not a regular"),
    ("symlink_dir.tar.gz", "'reference_model/sub' is a symlink to '/tmp'"),
    ("hardlink.tar.gz", "'reference_model/model-000200000.pth' is a hard link to '/etc/passwd'"),
    ("fifo.tar.gz", "'reference_model/pipe' is a FIFO, not a regular file or folder; refusing it"),
    ("chardev.tar.gz", "'reference_model/null' is a character device"),
    ("garbage.tar.gz", "reference_model/model-000200000.pth: not a readable checkpoint"),
    ("wrongmodel.tar.gz", "reference_model/model-000200000.pth: does not match the model: missing keys"),
    ("nostate.tar.gz", "reference_model/model-000200000.pth: not a PIPs++ checkpoint"),
    ("evil.tar.gz", "reference_model/model-000200000.pth: refused: it holds more than tensors and plain data"),
])
def test_bad_downloads_are_refused(server, tmp_path, name, msg):
    base, root = server
    res = _run(f"{base}/{name}", tmp_path)
    line = _last_line(res)
    assert res.returncode != 0 and line.startswith("get_reference_model.sh: ") and msg in line, res.stderr
    assert str(tmp_path) not in line  # names the member, not the temp folder it was unpacked in
    assert not (tmp_path / "reference_model").exists()
    assert not (tmp_path.parent / "evil").exists() and not (root / "ran").exists()


@pytest.mark.parametrize("name", ["garbage.tar.gz", "symlink_abs.tar.gz", "fifo.tar.gz", "wrongmodel.tar.gz",
                                  "finetuned.tar.gz", "extra.tar.gz", "sparse.tar.gz", "nan.tar.gz"])
def test_refused_archive_leaves_the_good_install_untouched(server, tmp_path, good_ckpt, name):
    base, _ = server
    dest = tmp_path / "reference_model"
    dest.mkdir()
    (dest / "model-000200000.pth").write_bytes(good_ckpt)
    (dest / "args.txt").write_bytes(b"S=36")
    (dest / "finetuned").mkdir()
    (dest / "finetuned" / "model-000000010.pth").write_bytes(b"mine")
    before = {str(p.relative_to(dest)): _sha(p) for p in dest.rglob("*") if p.is_file()}
    res = _run(f"{base}/{name}", tmp_path)
    assert res.returncode != 0 and _last_line(res).startswith("get_reference_model.sh: ")
    # byte-identical, nothing added or removed
    assert {str(p.relative_to(dest)): _sha(p) for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in dest.iterdir()) == ["args.txt", "finetuned", "model-000200000.pth"]
    assert not (dest / "model-000200000.pth").is_symlink()


def test_sha256_match_installs(server, tmp_path):
    base, root = server
    res = _run(f"{base}/good.tar.gz", tmp_path, REF_MODEL_SHA256=_sha(root / "good.tar.gz").upper())
    assert res.returncode == 0, res.stderr
    assert (tmp_path / CKPT).is_file()


def test_sha256_mismatch_replaces_nothing(server, tmp_path):
    base, root = server
    dest = tmp_path / "reference_model"
    dest.mkdir()
    (dest / "model-000200000.pth").write_bytes(b"old")
    res = _run(f"{base}/good.tar.gz", tmp_path, REF_MODEL_SHA256="0" * 64)
    line = _last_line(res)
    assert res.returncode != 0 and "sha256 mismatch" in line and _sha(root / "good.tar.gz") in line
    assert "nothing replaced" in line and [p.name for p in dest.iterdir()] == ["model-000200000.pth"]
    assert (dest / "model-000200000.pth").read_bytes() == b"old"


def test_sha256_must_be_hex(server, tmp_path):
    base, _ = server
    res = _run(f"{base}/good.tar.gz", tmp_path, REF_MODEL_SHA256="abc")
    assert res.returncode != 0 and "64 hex digits" in _last_line(res)
    assert "downloading" not in res.stdout  # refused before anything is fetched


def test_verification_needs_the_project_python(server, tmp_path):
    base, _ = server
    fake = tmp_path / "bin"
    fake.mkdir()
    # a python that has the standard library but cannot import torch
    (fake / "py").write_text(f"#!/bin/sh\nexec {shutil.which('python3') or sys.executable} -S \"$@\"\n")
    (fake / "py").chmod(0o755)
    env = dict(os.environ, REF_MODEL_URL=f"{base}/good.tar.gz", PYTHON=str(fake / "py"), PYTHONNOUSERSITE="1")
    res = subprocess.run(["bash", str(ROOT / "get_reference_model.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    line = _last_line(res)
    assert res.returncode != 0 and "cannot verify reference_model/model-000200000.pth" in line
    assert not (tmp_path / "reference_model").exists()


def _pax_tar(name: str, data: bytes, pax: dict) -> bytes:
    """A tar.gz of one member whose pax header carries `pax` (which overrides what its ustar header says)."""
    import gzip
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = len(data), pax
        tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def _negative_size_tar(name: str) -> bytes:
    """A tar.gz of one member whose size field says -1 (GNU base-256)."""
    import gzip

    head = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT)[:tarfile.BLOCKSIZE])
    head[124:136] = b"\xff" * 12
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return gzip.compress(bytes(head) + bytes(2 * tarfile.BLOCKSIZE))


@pytest.mark.parametrize("case,msg", [
    ("pax size", "'reference_model/model-000000001.pth' is 1099511627776 bytes, more than the 297823776"),
    ("pax sparse", "'reference_model/model-000000001.pth' is a sparse file"),
    ("long name", "archive headers are longer than 65536 bytes"),
    ("negative size", "'reference_model/model-000000001.pth' declares -1 bytes"),
])
def test_sizes_in_pax_and_gnu_headers_are_bounded_before_anything_is_written(tmp_path, case, msg):
    from pips2.utils.download import DownloadError, unpack_reference

    name = "reference_model/model-000000001.pth"
    data = {"pax size": lambda: _pax_tar(name, b"abcd", {"size": str(1 << 40)}),
            "pax sparse": lambda: _pax_tar(name, b"abcd", {"GNU.sparse.map": "0,4", "GNU.sparse.size": str(2 << 30),
                                                         "GNU.sparse.major": "0", "GNU.sparse.minor": "1",
                                                         "GNU.sparse.name": name}),
            "long name": lambda: _pax_tar(f"reference_model/{'a' * 100_000}", b"abcd", {}),
            "negative size": lambda: _negative_size_tar(name)}[case]()
    (tmp_path / "a.tar.gz").write_bytes(data)
    with pytest.raises(DownloadError) as e:
        unpack_reference(tmp_path / "a.tar.gz", tmp_path / "out", "a.tar.gz")
    assert msg in str(e.value) and str(e.value).startswith("a.tar.gz: ")
    assert not (tmp_path / "out").exists()


def test_an_endless_download_stops_at_its_declared_length(tmp_path):
    # /dev/zero says it is 0 bytes long and never ends: the script must not write until the disk is full
    res = _run("file:///dev/zero", tmp_path)
    assert res.returncode != 0 and _last_line(res) == ("get_reference_model.sh: file:///dev/zero: download is longer "
                                                       "than the 0 bytes its Content-Length says; refusing it; "
                                                       "nothing replaced")
    assert not (tmp_path / "reference_model").exists()


@pytest.mark.parametrize("members,error", [
    ({"./": (tarfile.DIRTYPE, ""), "./reference_model/": (tarfile.DIRTYPE, ""), "./" + CKPT: b"w"}, None),
    ({"./reference_model/./model-000000001.pth": b"w"}, None),
    ({"./other/model-000000001.pth": b"w"}, "archive holds files outside reference_model/"),
    ({"./reference_model/../../evil": b"w"}, "unsafe paths"),
    ({"./": b"w"}, "outside reference_model/"),
])
def test_members_named_with_a_leading_dot_slash(tmp_path, members, error):
    """`tar czf x.tgz ./reference_model` names its members ./reference_model/...: they were refused as "files
    outside reference_model/"."""
    from pips2.utils.download import DownloadError, unpack_reference

    _tar(tmp_path / "x.tar.gz", members)
    dest = tmp_path / "out"
    if error is None:
        unpack_reference(tmp_path / "x.tar.gz", dest, "x.tar.gz")
        assert [p.read_bytes() for p in dest.iterdir()] == [b"w"]
    else:
        with pytest.raises(DownloadError, match=error):
            unpack_reference(tmp_path / "x.tar.gz", dest, "x.tar.gz")
        assert not dest.exists()


def test_six_checkpoints_without_a_folder_entry_are_refused(tmp_path):
    """The bound of 5 checkpoints held only through the member count, which counts the folder's own entry: six
    model-*.pth members and no folder entry were installed."""
    from pips2.utils.download import DownloadError, unpack_reference

    _tar(tmp_path / "six.tar.gz", {f"reference_model/model-{i:09d}.pth": b"w" for i in range(6)})
    with pytest.raises(DownloadError, match="archive holds more than 5 model-\\*.pth checkpoints"):
        unpack_reference(tmp_path / "six.tar.gz", tmp_path / "out", "six.tar.gz")
    assert not (tmp_path / "out").exists()


def test_a_missing_python_or_a_file_as_destination_is_one_line(server, tmp_path):
    """They were bash's own lines: "line 38: /nonexistent/python: No such file or directory", and mkdir's "File
    exists" naming neither the script nor the variable."""
    base, _ = server
    res = _run(f"{base}/good.tar.gz", tmp_path, PYTHON="/nonexistent/python")
    assert res.returncode == 1 and _last_line(res) == ("get_reference_model.sh: PYTHON=/nonexistent/python: no such "
                                                       "program (set PYTHON to the project's python)")
    (tmp_path / "afile").write_text("mine")
    res = _run(f"{base}/good.tar.gz", tmp_path, REF_MODEL_DEST=str(tmp_path / "afile"))
    assert res.returncode == 1 and _last_line(res) == (f"get_reference_model.sh: REF_MODEL_DEST={tmp_path / 'afile'} "
                                                       f"is a file, not a folder; nothing replaced")
    assert (tmp_path / "afile").read_text() == "mine"
