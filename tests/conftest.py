import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The Hugging Face client (pips2.hub fetches the hub name lbm with it) reads its cache folder and offline mode
# from the environment when it is first imported: the tests, and the programs they start, get an empty cache of
# their own and no network; a test that serves the Hub from 127.0.0.1 turns offline mode off for itself.
HF_PREFIX = "pips2_tests_hf_"


def _remove_dead_hf_homes() -> None:
    """The cache folders of test processes that ended without their atexit (os._exit, a kill): named by pid."""
    for p in Path(tempfile.gettempdir()).glob(f"{HF_PREFIX}*"):
        pid = p.name[len(HF_PREFIX):].split("_")[0]
        try:
            os.kill(int(pid), 0)
            continue  # its process is alive (or another user's)
        except ProcessLookupError:  # the process is gone
            shutil.rmtree(p, ignore_errors=True)
        except ValueError:  # an older name, without the pid: left for a day, as its session may still run
            try:
                if time.time() - p.stat().st_mtime > 86400:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
        except OSError:
            continue


_remove_dead_hf_homes()
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix=f"{HF_PREFIX}{os.getpid()}_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)

EXPORT_ARGS = ["--S=8", "--N=32", "--crop_size=128,192", "--quiet=True"]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic PointOdyssey: 3 train scenes, 1 test scene, 320x256, 24 frames."""
    from pips2.datasets.synthetic import SceneConfig, generate_dataset

    root = tmp_path_factory.mktemp("pod")
    cfg = SceneConfig(W=320, H=256, T=24, n_objects=3, n_points=400)
    generate_dataset(root, {"train": 3, "test": 1}, seed=0, cfg=cfg, progress=False)
    return root


def run_export(root, out, *extra, check=True, **kw):
    cmd = [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={root}", "--dset=train",
           f"--out_dir={out}", *EXPORT_ARGS, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope="session")
def exported(synth_root, tmp_path_factory):
    """Clips exported from synth_root by 2 workers: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("export")
    res = run_export(synth_root, out, "--workers=2", "--max_iters=16")
    return out, res.stdout


@pytest.fixture
def make_fifo():
    """make_fifo(path) replaces path by a FIFO. Code that wrongly open()s it for reading blocks until a writer
    comes: a watcher plays that writer (opens and closes it at once), so such code reads an empty file and its
    test fails instead of hanging the suite."""
    fifos, done = [], threading.Event()

    def watch():
        while not done.wait(0.2):
            for f in fifos:
                try:  # succeeds only while a reader is blocked in open()
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass

    def make(path: Path) -> Path:
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        fifos.append(path)
        return path

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield make
    done.set()
    watcher.join()


@pytest.fixture(autouse=True)
def _stop_signals_restored():
    """Each test leaves the stop signals (SIGINT, SIGTERM, SIGHUP, SIGUSR1, ...) as it found them: a handler left
    ignored is inherited by every process a later test starts."""
    from pips2.utils.procs import STOP_SIGNALS

    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) != handler and handler is not None:
            signal.signal(s, handler)
