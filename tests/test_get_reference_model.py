"""get_reference_model.sh against tarballs served from 127.0.0.1 and file:// URLs."""

import functools
import http.server
import io
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: dict[str, bytes], gz: bool = True):
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    _tar(root / "good.tar.gz", {"reference_model/model-000200000.pth": b"weights" * 100,
                                "reference_model/args.txt": b"S=36"})
    _tar(root / "nomodel.tar.gz", {"reference_model/readme.txt": b"hi"})
    _tar(root / "plain.tar", {"reference_model/model-000000001.pth": b"x"}, gz=False)
    _tar(root / "escape.tar.gz", {"reference_model/model-000000001.pth": b"x", "../evil": b"x"})
    (root / "page.html").write_text("<html>login</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


def _run(url, cwd):
    env = dict(os.environ, REF_MODEL_URL=url)
    return subprocess.run(["bash", str(ROOT / "get_reference_model.sh")], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_good_tarball_over_http(server, tmp_path):
    base, _ = server
    res = _run(f"{base}/good.tar.gz", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "reference_model" / "model-000200000.pth").read_bytes() == b"weights" * 100
    assert "model-000200000.pth" in res.stdout


def test_file_url(server, tmp_path):
    _, root = server
    res = _run(f"file://{root / 'good.tar.gz'}", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "reference_model" / "args.txt").is_file()


@pytest.mark.parametrize("name,msg", [("page.html", "not a gzip"), ("nomodel.tar.gz", "no reference_model/model"),
                                      ("plain.tar", "not a gzip"), ("escape.tar.gz", "unsafe paths"),
                                      ("missing.tar.gz", "download failed")])
def test_bad_downloads_are_refused(server, tmp_path, name, msg):
    base, _ = server
    res = _run(f"{base}/{name}", tmp_path)
    assert res.returncode != 0 and msg in res.stderr
    assert not (tmp_path / "reference_model").exists()
    assert not (tmp_path.parent / "evil").exists()
