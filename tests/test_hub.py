"""pips2/hub.py: load_model for local checkpoints in both authors' formats, and known names fetched once into
the cache from a server on 127.0.0.1 or a file:// URL, refusing bad downloads without touching a good copy."""

import functools
import hashlib
import http.server
import os
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import left_by_a_killed_owner, sparse_tar_bytes, tar_bytes, torch_bytes

import pips2
from pips2 import hub
from pips2.nets.lbm import LBM
from pips2.nets.pips2 import Pips
from pips2.utils import checkpoint

SMALL_LBM: dict[str, Any] = dict(input_size=(64, 64), embed_dim=32, num_layers=2)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lbm_model():
    torch.manual_seed(0)
    return LBM(**SMALL_LBM).eval()


@pytest.fixture(scope="module")
def pips_model():
    torch.manual_seed(0)
    return Pips().eval()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; /truncated.pt promises the whole of good.pt but sends half of it."""

    def do_GET(self):
        if self.path != "/truncated.pt":
            return super().do_GET()
        data = (Path(self.directory) / "good.pt").read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, lbm_model, pips_model):
    root = tmp_path_factory.mktemp("www")
    good = torch_bytes({"model": lbm_model.state_dict()})
    (root / "good.pt").write_bytes(good)
    prefixed = {f"module.{k}": v for k, v in lbm_model.state_dict().items()}
    (root / "module.pt").write_bytes(torch_bytes({"model": prefixed}))
    (root / "corrupt.pt").write_bytes(good[: len(good) // 3])
    (root / "wrong.pt").write_bytes(torch_bytes({"model": {"x": torch.zeros(1)}}))
    (root / "ref.tar.gz").write_bytes(tar_bytes({"reference_model/model-000200000.pth":
                                                 torch_bytes({"model_state_dict": pips_model.state_dict()})}))
    (root / "sparse.tar.gz").write_bytes(sparse_tar_bytes("reference_model/model-000200000.pth", 2 << 30))
    (root / "extra.tar.gz").write_bytes(tar_bytes({"reference_model/model-000200000.pth": b"x",
                                                   "reference_model/finetuned/": (tarfile.DIRTYPE, "")}))
    nan = {k: v.clone() for k, v in lbm_model.state_dict().items()}
    nan["transformer.layers.0.collision_time_emb"][0, 0, 0] = float("nan")
    (root / "nan.pt").write_bytes(torch_bytes({"model": nan}))
    (root / "garbage.tar.gz").write_bytes(tar_bytes({"reference_model/model-000000001.pth": b"weights" * 10}))
    link = (tarfile.SYMTYPE, "/etc/passwd")
    (root / "link.tar.gz").write_bytes(tar_bytes({"reference_model/model-000000001.pth": link}))
    (root / "escape.tar.gz").write_bytes(tar_bytes({"reference_model/../../evil": b"x"}))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPS2_CACHE", str(tmp_path / "cache"))
    for name in hub.KNOWN:
        monkeypatch.delenv(f"PIPS2_URL_{name.upper()}", raising=False)
        monkeypatch.delenv(f"PIPS2_SHA256_{name.upper()}", raising=False)
    return tmp_path / "cache"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_lbm_fetched_once_over_http(server, cache, monkeypatch, lbm_model):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/good.pt")
    model = pips2.load_model("lbm", **SMALL_LBM)
    assert isinstance(model, LBM) and not model.training and _same_weights(model, lbm_model)
    assert (cache / "lbm.pt").read_bytes() == (root / "good.pt").read_bytes() and _leftovers(cache) == []
    # the second call uses the cache: the address may be gone
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/missing.pt")
    assert _same_weights(hub.load_model("lbm", **SMALL_LBM), lbm_model)


def test_file_url_and_module_prefix(server, cache, monkeypatch, lbm_model):
    _, root = server
    monkeypatch.setenv("PIPS2_URL_LBM", (root / "module.pt").as_uri())
    assert _same_weights(hub.load_model("lbm", **SMALL_LBM), lbm_model)


@pytest.mark.parametrize("name,msg", [
    ("truncated.pt", "download truncated"),
    ("corrupt.pt", "not a checkpoint"),
    ("wrong.pt", "does not match the model: missing keys"),
    ("missing.pt", "download failed"),
    ("nan.pt", "transformer.layers.0.collision_time_emb holds 1 NaN or infinite value; refusing it"),
])
def test_bad_download_is_refused_and_the_good_copy_stays(server, cache, monkeypatch, name, msg):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/good.pt")
    good = hub.fetch("lbm").read_bytes()
    url = f"{base}/{name}" if name != "corrupt.pt" else (root / name).as_uri()
    monkeypatch.setenv("PIPS2_URL_LBM", url)
    with pytest.raises(hub.HubError) as e:
        hub.load_model("lbm", refresh=True, **SMALL_LBM)
    line = str(e.value)
    assert "\n" not in line and msg in line and line.startswith(url), line
    assert str(cache) not in line  # names the address, not the temp file it was checked in
    assert (cache / "lbm.pt").read_bytes() == good and _leftovers(cache) == []
    # without a cached copy a bad download leaves nothing behind either
    (cache / "lbm.pt").unlink()
    with pytest.raises(hub.HubError, match=msg):
        hub.fetch("lbm")
    assert list(cache.iterdir()) == []


def test_sha256_checked_when_known(server, cache, monkeypatch):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/good.pt")
    monkeypatch.setenv("PIPS2_SHA256_LBM", "0" * 64)
    with pytest.raises(hub.HubError, match=r"sha256 mismatch \(got [0-9a-f]{64}, expected 0{64}\)"):
        hub.fetch("lbm")
    monkeypatch.setenv("PIPS2_SHA256_LBM", hashlib.sha256((root / "good.pt").read_bytes()).hexdigest().upper())
    assert hub.fetch("lbm") == cache / "lbm.pt"
    monkeypatch.setenv("PIPS2_SHA256_LBM", "abc")
    with pytest.raises(hub.HubError, match="64 hex digits"):
        hub.fetch("lbm", refresh=True)


def test_pips2_reference_tarball(server, cache, monkeypatch, pips_model):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_PIPS2", f"{base}/ref.tar.gz")
    model = pips2.load_model("pips2")  # a name, although this repository has a folder called pips2/
    assert isinstance(model, Pips) and _same_weights(model, pips_model)
    ref = cache / "reference_model"
    assert sorted(p.name for p in ref.iterdir()) == ["model-000200000.pth"]
    before = (ref / "model-000200000.pth").read_bytes()
    for bad, msg in (("garbage.tar.gz", r"reference_model/model-000000001.pth: not a checkpoint \(a text file"),
                     ("link.tar.gz", "model-000000001.pth' is a symlink to '/etc/passwd', not a regular"),
                     ("escape.tar.gz", r"unsafe paths \(absolute or \.\.\)"),
                     ("sparse.tar.gz", "'reference_model/model-000200000.pth' is a sparse file; refusing it"),
                     ("extra.tar.gz", "'reference_model/finetuned' is not a reference_model/model-\\*.pth")):
        monkeypatch.setenv("PIPS2_URL_PIPS2", (root / bad).as_uri() if bad == "sparse.tar.gz" else f"{base}/{bad}")
        with pytest.raises(hub.HubError, match=msg):
            hub.fetch("pips2", refresh=True)
        assert sorted(p.name for p in ref.iterdir()) == ["model-000200000.pth"]
        assert (ref / "model-000200000.pth").read_bytes() == before and _leftovers(cache) == []


def test_a_download_larger_than_a_model_is_refused_before_it_is_written(server, cache, monkeypatch):
    base, root = server
    size = (root / "good.pt").stat().st_size
    monkeypatch.setattr(hub, "MAX_CHECKPOINT_BYTES", size - 1)
    for url in (f"{base}/good.pt", (root / "good.pt").as_uri()):  # Content-Length first / counted as it comes
        monkeypatch.setenv("PIPS2_URL_LBM", url)
        with pytest.raises(hub.HubError, match=f"^{url}: download is .*more than the {size - 1} .*a released model "
                                               f"needs; refusing it$"):
            hub.fetch("lbm")
        assert list(cache.iterdir()) == []


def test_local_files_in_both_formats_both_ways(tmp_path, lbm_model, pips_model):
    # ours -> the authors': LBM as {'model': sd}, PIPs++ as {'model_state_dict': sd}
    lbm_file = hub.save_authors_format(torch.nn.DataParallel(lbm_model), tmp_path / "lbm.pt")
    assert list(torch.load(lbm_file, weights_only=True)) == ["model"]
    assert _same_weights(hub.load_model(lbm_file, **SMALL_LBM), lbm_model)
    assert _same_weights(hub.load_model(lbm_file), lbm_model)  # its sizes read from the weights
    # a run folder of train.py --model=lbm (model-*.pth holding {'model': ..., 'optimizer': ..., ...})
    checkpoint.save(tmp_path / "lbm_run", 4, lbm_model, optimizer=torch.optim.Adam(lbm_model.parameters()),
                    layout=checkpoint.LBM_LAYOUT)
    assert _same_weights(hub.load_model(tmp_path / "lbm_run"), lbm_model)
    # sizes given win, and a file that does not match them is refused in one line
    with pytest.raises(checkpoint.CheckpointError, match="does not match the model.*frame_pos_embedding"):
        hub.load_model(lbm_file, **{**SMALL_LBM, "input_size": (128, 128)})
    pips_file = hub.save_authors_format(pips_model, tmp_path / "ref" / "model-000000005.pth")
    assert list(torch.load(pips_file, weights_only=True)) == ["model_state_dict"]
    for path in (pips_file, pips_file.parent):  # a file, or a folder (its highest step)
        assert _same_weights(hub.load_model(str(path)), pips_model)
    # a training checkpoint of ours, with optimizer state, loads too
    checkpoint.save(tmp_path / "ck", 3, pips_model, optimizer=torch.optim.Adam(pips_model.parameters()))
    assert _same_weights(hub.load_model(tmp_path / "ck"), pips_model)


def test_unknown_name_or_missing_path_is_one_line(cache, tmp_path):
    with pytest.raises(hub.HubError, match=r"nothing: no such checkpoint file or folder, and not a hub name "
                                           r"\(pips2, lbm\); \./get_reference_model\.sh fetches"):
        hub.load_model(str(tmp_path / "nothing"))
    with pytest.raises(hub.HubError, match="'x' is not a known model name"):
        hub.fetch("x")
    with pytest.raises(hub.HubError, match="^the checkpoint name is empty: give a hub name"):  # was the current folder
        hub.load_model("")


# ---------------------------------------------------------------------------------------------------------
# The hub name lbm through the Hugging Face client: its cache, offline mode and HF_ENDPOINT (here a server on
# 127.0.0.1 answering as the Hub does: the commit, the file's sha256 as its ETag, its size)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(http.server.BaseHTTPRequestHandler):
    """/ZhengGuangze/LBM/resolve/main/lbm.pt as the Hub serves it; `state` says what to send and counts GETs."""

    state: dict = {}

    def _answer(self, body: bool):
        st = self.state
        if self.path != "/ZhengGuangze/LBM/resolve/main/lbm.pt":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = st["data"]
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{st.get("etag") or hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(st.get("declared", len(data))))
        self.end_headers()
        if body:
            st["gets"] = st.get("gets", 0) + 1
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hf_hub(tmp_path, monkeypatch, cache):
    """The Hub on 127.0.0.1 (HF_ENDPOINT), an empty Hugging Face cache, offline mode off; the handler's state."""
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hf_constants

    state: dict = {}
    handler = type("Hub", (_Hub,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"  # HF_ENDPOINT as the client read it at import
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/"
                        "{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield hf, state
    httpd.shutdown()


def test_lbm_comes_through_the_hugging_face_client_and_then_works_offline(hf_hub, tmp_path, monkeypatch, cache,
                                                                         lbm_model):
    import huggingface_hub.constants as hf_constants

    hf, state = hf_hub
    state["data"] = torch_bytes({"model": lbm_model.state_dict()})
    assert hub.cached("lbm") is None and hub.cache_location("lbm") == tmp_path / "hf"
    model = pips2.load_model("lbm")  # its sizes read from the weights
    assert isinstance(model, LBM) and _same_weights(model, lbm_model) and state["gets"] == 1
    # in the client's standard cache (where `hf download ZhengGuangze/LBM lbm.pt` puts it), named by its sha256
    found = hub.cached("lbm")
    assert found is not None
    assert found == tmp_path / "hf" / "models--ZhengGuangze--LBM" / "snapshots" / COMMIT / "lbm.pt"
    assert found.resolve().name == hashlib.sha256(state["data"]).hexdigest()
    assert not (cache / "lbm.pt").exists()
    # offline, and with the Hub gone, the cached copy loads; nothing is asked of the Hub when it is cached
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/"
                        "{revision}/{filename}")
    assert _same_weights(hub.load_model("lbm", kind="lbm"), lbm_model) and state["gets"] == 1
    # an empty cache offline: one line saying so and how to give the file without the internet
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(hub.HubError) as e:
        hub.load_model("lbm")
    line = str(e.value)
    assert "\n" not in line and line.startswith("lbm: not in the Hugging Face cache") and "HF_HUB_OFFLINE is set" \
        in line and "PIPS2_URL_LBM=file:///path/to/lbm.pt" in line and "hf download ZhengGuangze/LBM lbm.pt" in line
    # no network, offline mode not set: one line at once (the client's retries would wait half a minute)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(hub.HubError, match=r"^lbm: not in the Hugging Face cache .* and http://127\.0\.0\.1:9/\S+ "
                                           r"cannot be reached \(.*PIPS2_URL_LBM=file:///path/to/lbm\.pt") as e:
        hub.load_model("lbm")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case,msg", [
    ("sha", "sha256 mismatch (got "),
    ("wrong", "does not match the model: missing keys"),
    ("huge", "the Hub declares 300000000 bytes for it, not at most the 297823776 a released model needs"),
    ("pips", "holds a PIPs++ model ({'model_state_dict': ...}), not an LBM one"),
])
def test_a_bad_file_from_the_hub_is_refused_and_not_kept(hf_hub, case, msg, lbm_model, pips_model):
    hf, state = hf_hub
    state["data"] = torch_bytes({"model": lbm_model.state_dict()})
    if case == "sha":
        state["etag"] = "0" * 64
    elif case == "wrong":
        state["data"] = torch_bytes({"model": {"x": torch.zeros(1)}})
    elif case == "huge":
        state["declared"] = 300_000_000
    elif case == "pips":
        state["data"] = torch_bytes({"model_state_dict": pips_model.state_dict()})
    with pytest.raises(hub.HubError) as e:
        hub.load_model("lbm")
    line = str(e.value)
    assert "\n" not in line and msg in line and line.startswith(hub.hf_url("lbm")), line
    assert hub.cached("lbm") is None  # nothing kept for the next call to pick up
    assert state.get("gets", 0) == (0 if case == "huge" else 1)  # a declared size beyond the bound: no download


def test_a_killed_download_s_folder_is_removed_by_the_next_one(server, cache, monkeypatch, lbm_model):
    """SIGKILL (or the OOM killer) during a download left .lbm.*/.lbm.pt.<pid>.*.part in the cache for good, up
    to a model's size each; a live download's folder stays."""
    import os
    import socket
    import subprocess
    import sys

    base, _ = server
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from pips2.utils.procs import pid_namespace

    ns = pid_namespace()
    stale = cache / f".lbm.{host}.{dead.pid}.abc123"  # named before the namespace was recorded
    stale_ns = cache / f".lbm.{host}.{dead.pid}.{ns}.abc124"
    live = cache / f".lbm.{host}.{os.getpid()}.{ns}.def456"
    # another PID namespace (a container sharing the host's name and this folder): its pid means nothing here
    elsewhere = cache / f".lbm.{host}.{dead.pid}.{ns + 1}.ghi789"
    for d in (stale, stale_ns, live, elsewhere):
        d.mkdir(parents=True)
        (d / f".lbm.pt.{dead.pid}.x.part").write_bytes(b"half a model")
    for d in (stale, stale_ns):
        left_by_a_killed_owner(d)
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/good.pt")
    hub.fetch("lbm")
    assert _leftovers(cache) == sorted([live.name, elsewhere.name])


def test_a_fifo_given_as_a_checkpoint_is_named_as_such(tmp_path):
    """find_file(<a FIFO>) said "no such checkpoint file or folder" (it exists), and checkpoint_file_problem opened
    it with a plain open(), which waits for a writer forever."""
    import os

    from pips2 import hub

    os.mkfifo(tmp_path / "model.pth")
    with pytest.raises(hub.HubError, match=r"model\.pth: not a regular file \(a FIFO\)$"):
        hub.find_file(tmp_path / "model.pth")
    assert hub.checkpoint_file_problem(tmp_path / "model.pth") == "not a regular file (a FIFO)"


def test_a_cache_that_cannot_be_written_says_how_to_move_it(monkeypatch):
    """A read-only home (a container image's /root): `--init_dir=pips2` said only "error: [Errno 30] Read-only
    file system: '/root/.cache'". It now names the cache, what it was for and the way out, as this machine's
    error (exit 1 through the scripts), not the input's."""
    from pips2 import hub

    monkeypatch.setenv(hub.CACHE_ENV, "/proc/pips2_cache")  # cannot be made, even by root
    with pytest.raises(hub.HubError) as e:
        hub.fetch("pips2")
    msg = str(e.value)
    assert msg.startswith("cannot make the model cache /proc/pips2_cache (") and e.value.local, msg
    assert msg.endswith(f"to fetch pips2 into: set {hub.CACHE_ENV} to a writable folder"), msg


def _plant(cache: Path, pips_model, uid: int = 2002, mode: int = 0o644) -> Path:
    """A reference_model/ in the cache as another user (uid) would put it there, holding pips_model."""
    ref = cache / "reference_model"
    ref.mkdir(parents=True)
    ckpt = ref / "model-000200000.pth"
    ckpt.write_bytes(torch_bytes({"model_state_dict": pips_model.state_dict()}))
    for p in (ref, ckpt):
        os.chown(p, uid, uid)
        os.chmod(p, mode | (0o111 if p.is_dir() else 0))
    return ref


@pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user needs root")
def test_a_copy_another_user_put_in_a_shared_cache_is_not_loaded(cache, monkeypatch, pips_model):
    cache.mkdir()
    os.chmod(cache, 0o1777)  # a cache folder a team shares: anybody may put a reference_model/ there first
    ref = _plant(cache, pips_model)
    with pytest.raises(hub.HubError, match=rf"^{cache}: other users may put files in the cache folder \(mode 1777; "
                                           rf"if it is meant for you alone: chmod go-w {cache}\): "
                                           rf".* not loaded\. Set PIPS2_CACHE to a folder of your own"):
        pips2.load_model("pips2")
    os.chown(cache, 2002, 2002)
    os.chmod(cache, 0o755)
    with pytest.raises(hub.HubError, match=rf"^{cache}: the cache folder belongs to uid 2002, not to this user"):
        pips2.load_model("pips2")
    with pytest.raises(hub.HubError, match=rf"^{cache}: the cache folder belongs to uid 2002, .* could be replaced"):
        hub.fetch("pips2", refresh=True)  # nothing is fetched into it either
    os.chown(cache, os.geteuid(), os.getegid())
    # a folder only this user may write to, holding a copy another user made (an older cache, a chown)
    with pytest.raises(hub.HubError, match=rf"^{ref}: made by uid 2002, not by this user: .* not loaded\. Set "
                                           rf"PIPS2_CACHE to a folder of your own"):
        pips2.load_model("pips2")
    # their checkpoint in this user's own folder, and this user's folder or checkpoint that others may change
    os.chown(ref, os.geteuid(), os.getegid())
    with pytest.raises(hub.HubError, match=rf"^{ref}/model-000200000.pth: made by uid 2002"):
        pips2.load_model("pips2")
    os.chown(ref / "model-000200000.pth", os.geteuid(), os.getegid())
    os.chmod(ref / "model-000200000.pth", 0o664)
    with pytest.raises(hub.HubError, match=r"model-000200000.pth: other users may change it \(mode 664\)"):
        pips2.load_model("pips2")
    os.chmod(ref / "model-000200000.pth", 0o644)
    os.chmod(ref, 0o775)
    with pytest.raises(hub.HubError, match=rf"^{ref}: other users may change it \(mode 775\)"):
        pips2.load_model("pips2")
    os.chmod(ref, 0o755)
    assert _same_weights(pips2.load_model("pips2"), pips_model)
    # a link at the name, even to this user's own copy, is not a copy this program made
    ref.rename(cache / "mine")
    (cache / "reference_model").symlink_to(cache / "mine")
    with pytest.raises(hub.HubError, match="reference_model: a link, not a copy this program made"):
        hub.fetch("pips2")


@pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user needs root")
def test_a_lbm_file_another_user_put_in_the_cache_is_not_loaded(server, cache, monkeypatch, lbm_model):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_LBM", f"{base}/good.pt")
    cache.mkdir()
    planted = cache / "lbm.pt"
    planted.write_bytes((root / "good.pt").read_bytes())
    os.chown(planted, 2002, 2002)
    with pytest.raises(hub.HubError, match=rf"^{planted}: made by uid 2002"):
        pips2.load_model("lbm")
    # a file of this user's own moved into a sticky shared cache by another (from a team folder) is no copy made
    # by this program: such a cache folder is refused whoever owns the file
    os.chown(planted, os.geteuid(), os.getegid())
    cache.chmod(0o1777)
    with pytest.raises(hub.HubError, match=rf"^{cache}: other users may put files in the cache folder"):
        pips2.load_model("lbm")
    cache.chmod(0o755)
    planted.unlink()
    assert hub.fetch("lbm") == planted
    assert planted.stat().st_mode & 0o022 == 0 and planted.stat().st_uid == os.geteuid()
    assert _same_weights(pips2.load_model("lbm"), lbm_model)


def test_a_fetched_copy_is_kept_from_others_and_read_as_checked(server, cache, monkeypatch, pips_model):
    base, root = server
    monkeypatch.setenv("PIPS2_URL_PIPS2", f"{base}/ref.tar.gz")
    old = os.umask(0o002)  # a umask that gives the group write to new files: not to the cache's
    try:
        hub.fetch("pips2")
    finally:
        os.umask(old)
    ref = cache / "reference_model"
    assert all(p.stat().st_mode & 0o022 == 0 for p in (ref, *ref.iterdir()))
    # the copy is read through the folder that was checked: one put at its name afterwards is not followed
    pinned = hub.resolve("pips2")
    ref.rename(cache / "moved")
    other = _plant(cache, Pips().eval(), uid=os.geteuid())
    assert other.exists() and _same_weights(hub._build("pips2", hub.read_checkpoint_of(pinned)[1]["model_state_dict"],
                                                       "x", "cpu", None, {}), pips_model)
    with pytest.raises(hub.HubError, match=rf"^{ref}: no checkpoint for step 7 \(have \[200000\]\)"):
        pips2.load_model("pips2", step=7)


@pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user needs root")
def test_the_default_reference_model_folder_of_another_user_is_not_loaded(tmp_path, monkeypatch, pips_model):
    """./reference_model, the scripts' default --init_dir, is looked for in the folder a program runs from. Run from
    a team's folder (or /tmp), another user's folder there was loaded as the authors' model without a word; a
    checkpoint another user put into the user's own folder too. Both are refused, naming how to load it anyway."""
    monkeypatch.chdir(tmp_path)
    ref = _plant(tmp_path, pips_model)
    with pytest.raises(hub.HubError, match=rf"^\./reference_model: made by uid 2002, not by this user: .*runs from "
                                           rf"\({tmp_path}\).* --init_dir={ref}$"):
        pips2.load_model(None)
    os.chown(ref, os.geteuid(), os.getegid())
    with pytest.raises(hub.HubError, match=r"^\./reference_model: model-000200000.pth in it was put there by uid 2002"):
        pips2.load_model("./reference_model", kind="pips2")
    assert _same_weights(pips2.load_model(str(ref)), pips_model)  # named by its path: the user's choice
    os.chown(ref / "model-000200000.pth", os.geteuid(), os.getegid())
    assert _same_weights(pips2.load_model(None), pips_model)
    # the folder's one *.pth (find_file's other choice) of another user's, and the user's own others may rewrite
    (ref / "model-000200000.pth").rename(ref / "pips2.pth")
    os.chown(ref / "pips2.pth", 2002, 2002)
    with pytest.raises(hub.HubError, match=r"^\./reference_model: pips2.pth in it was put there by uid 2002"):
        pips2.load_model(None)
    os.chown(ref / "pips2.pth", os.geteuid(), os.getegid())
    os.chmod(ref / "pips2.pth", 0o664)
    with pytest.raises(hub.HubError, match=r"^\./reference_model: other users may write to pips2.pth in it \(mode "
                                           r"664\), and could have rewritten it in place: `chmod go-w "):
        pips2.load_model(None)
    os.chmod(ref / "pips2.pth", 0o644)
    assert _same_weights(pips2.load_model(None), pips_model)
    # the file judged is the file read: one put at its name afterwards is not, and one put there before it was
    # opened (between the judgement and the descriptor) is judged again
    picked = hub.find_file(hub.DEFAULT_PIPS)
    torch.save({"model_state_dict": Pips().state_dict()}, tmp_path / "planted.pth")
    os.chown(tmp_path / "planted.pth", 2002, 2002)
    os.replace(tmp_path / "planted.pth", ref / "pips2.pth")
    model = hub._build("pips2", hub.read_checkpoint_of(picked)[1]["model_state_dict"], "x", "cpu", None, {})
    assert _same_weights(model, pips_model)
    monkeypatch.setattr(hub, "_default_folder_problem", lambda folder: None)
    with pytest.raises(hub.HubError, match=r"^\./reference_model: pips2.pth in it was replaced while it was checked "
                                           r"\(now uid 2002, mode 644\); not loaded$"):
        pips2.load_model(None)


def test_the_cache_follows_xdg_and_a_missing_home_is_one_line(tmp_path, monkeypatch, capsys):
    """The cache folder was ~/.cache/pips2, computed when pips2.hub was imported: without HOME (a uid with no home
    folder, `env -i`) every script, `--help` too, ended in a traceback, PIPS2_CACHE set or not. It is now found
    when needed, follows XDG_CACHE_HOME as the Hugging Face cache does, and its absence is one line."""
    import pathlib

    from helpers import run_main

    from pips2.cli import app as app_cli

    monkeypatch.delenv("PIPS2_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "pips2"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG rule says
    assert hub.cache_dir() == Path.home() / ".cache" / "pips2"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pathlib.Path, "home", classmethod(no_home))
    said = "no folder for the hub's cache: HOME is not set and this user has no home folder; set PIPS2_CACHE to a " \
           "folder of your own"
    with pytest.raises(hub.HubError, match=f"^{said}$"):
        pips2.load_model("pips2")
    monkeypatch.chdir(tmp_path)  # no ./reference_model: the advice names the cache by its rule
    with pytest.raises(hub.HubError, match=r"fetches it once into \$PIPS2_CACHE/reference_model \(offline"):
        pips2.load_model(None)
    res = run_main(app_cli.main, capsys, init_dir=str(tmp_path / "none"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {said}", res.stderr
    monkeypatch.setenv("PIPS2_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
