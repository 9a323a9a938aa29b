"""benchmarks/diff_authors.py, the generator of the differential cases (docs/CORRECTNESS.md): bad input, and a
small run against the authors' code when a checkout or the git mirror is at hand (as tests/test_bench_lbm.py;
elsewhere, CI included, that test is skipped and says so)."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA

from pips2.utils.golden import TrackCase, stored_cases

PIPS_OUTPUTS = ("out", "out_chain", "out_featinit")

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "benchmarks" / "diff_authors.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
MIRROR = Path(os.environ.get("PIPS_AUTHORS_MIRROR", "/work/.mirror/aharley+pips2/repo"))


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)


def test_generator_refuses_bad_flags_and_files_in_one_line(tmp_path):
    res = run_generator("pips", f"--authors_repo={tmp_path}", "--compare=fastest")
    assert res.returncode == 2 and "unknown plan 'fastest'" in res.stderr and "Traceback" not in res.stderr
    res = run_generator("pips", f"--authors_repo={tmp_path}", f"--out={tmp_path / 'out.npz'}")
    assert res.returncode == 2 and "not a checkout of aharley/pips2" in res.stderr
    assert not (tmp_path / "out.npz").exists()
    res = run_generator("lbm", f"--authors_repo={tmp_path}", "--compare=True")
    assert res.returncode == 2 and "not a checkout of George-Zhuang/lbm" in res.stderr
    # an output file of other cases (another seed) is neither extended nor overwritten
    other = tmp_path / "other.npz"
    shutil.copy(DATA / "diff_pips_f64.npz", other)
    res = run_generator("pips", f"--authors_repo={tmp_path}", "--seed=5", f"--out={other}")
    assert res.returncode == 2 and "holds other cases than this command draws" in res.stderr
    assert other.read_bytes() == (DATA / "diff_pips_f64.npz").read_bytes()


def test_stats_prints_the_numbers_the_docs_quote(tmp_path):
    """`stats` reads the stored files (no authors' code): how many PIPs++ cases are held to 1e-9 px itself, and
    the frame counts of the others (docs/CORRECTNESS.md quotes them); a missing file is one line, exit 2."""
    res = run_generator("stats")
    assert res.returncode == 0, res.stderr[-2000:]
    with np.load(DATA / "diff_pips_f64.npz", allow_pickle=False) as data:
        cases, spread = stored_cases(data, TrackCase), data["spread"].max(1)
    well = int((spread <= 1e-10).sum())
    assert f"{len(cases)} cases; {well} held to 1e-09 px" in res.stdout
    ill = sorted(c.S for c, x in zip(cases, spread, strict=True) if x > 1e-10)
    assert f"{len(cases) - well} others, with S = {ill}" in res.stdout
    res = run_generator("stats", f"--pips_file={tmp_path / 'none.npz'}")
    assert res.returncode == 2 and "none.npz: no such file" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def authors_pips(tmp_path_factory):
    """A checkout of the authors' PIPs++, or a skip that says why there is none."""
    if os.environ.get("PIPS_AUTHORS_REPO"):
        return Path(os.environ["PIPS_AUTHORS_REPO"])
    if not MIRROR.is_dir():
        pytest.skip(f"needs the authors' code (aharley/pips2): set PIPS_AUTHORS_REPO to a checkout, or provide the "
                    f"git mirror {MIRROR}; CI machines have neither")
    out = tmp_path_factory.mktemp("authors_pips2")
    archive = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


@pytest.mark.slow
def test_generator_stopped_by_sigterm_keeps_its_cases_and_resumes(authors_pips, tmp_path, monkeypatch, request):
    """SIGTERM during the second of three small cases: that case is finished, both are written, exit 1; the same
    command resumed (to three, with --compare) keeps them as they were, adds the third and finds our default
    plan within the bound."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    loaded = set(sys.modules)
    request.addfinalizer(lambda: [sys.modules.pop(k) for k in set(sys.modules) - loaded])  # theirs, stand-ins
    import diff_authors

    small: dict = dict(seed=3, budget=16, corners=False)
    out = tmp_path / "diff.npz"
    real, calls = diff_authors.track_three_ways, []

    def term_in_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a case calls it twice: the authors' run, then the nudged one
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(diff_authors, "track_three_ways", term_in_the_second_case)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        diff_authors.pips(str(authors_pips), out=str(out), cases=3, **small)
    assert stopped.value.code == 1 and len(calls) == 4
    assert signal.getsignal(signal.SIGTERM) is before
    with np.load(out, allow_pickle=False) as a:
        two = {k: a[k] for k in a.files}
    assert len(stored_cases(two, TrackCase)) == 2

    more = run_generator("pips", f"--authors_repo={authors_pips}", *(f"--{k}={v}" for k, v in small.items()),
                         "--cases=3", f"--out={out}", "--compare=default")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "2 of 3 cases done earlier" in more.stdout and "0 cases beyond" in more.stdout
    with np.load(out, allow_pickle=False) as b:
        cases = stored_cases(b, TrackCase)
        assert len(cases) == 3 and cases[:2] == stored_cases(two, TrackCase)
        for k in (*PIPS_OUTPUTS, "fingerprint", "spread"):
            np.testing.assert_array_equal(b[k][:len(two[k])], two[k], err_msg=k)
        assert len(b["out"]) > len(two["out"])
