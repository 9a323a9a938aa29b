"""benchmarks/bench_lbm.py: the equality check and a tiny end-to-end run against the authors' code.

The authors' code (George-Zhuang/lbm at cf39292) is not shipped with the project: the end-to-end tests run
when LBM_AUTHORS_REPO names a checkout of it, or LBM_AUTHORS_MIRROR a git repository of it (extracted with git
archive); without either, CI included, they are skipped and say so.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_lbm.py"
TINY = ["--hw=64,96", "--points=8", "--frames=4", "--warmup=1", "--rounds=2", "--per_round=1", "--threads=1"]
# the checkout under test, not an installed copy of the project
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def authors_repo(tmp_path_factory):
    """A checkout of the authors' repository, or a skip that says why there is none."""
    if os.environ.get("LBM_AUTHORS_REPO"):
        return Path(os.environ["LBM_AUTHORS_REPO"])
    mirror = os.environ.get("LBM_AUTHORS_MIRROR")
    if not mirror:
        pytest.skip("needs the authors' code (George-Zhuang/lbm cf39292): set LBM_AUTHORS_REPO to a checkout of it, "
                    "or LBM_AUTHORS_MIRROR to a git repository of it")
    out = tmp_path_factory.mktemp("authors_lbm")
    archive = subprocess.run(["git", "-C", mirror, "archive", "HEAD"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def run_bench(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_tiny_run_equal_outputs_and_flat_stream(authors_repo, tmp_path):
    out = tmp_path / "bench.json"
    res = run_bench(f"--authors_repo={authors_repo}", *TINY, "--stream_frames=20", "--stream_theirs=True",
                    "--stream_hw=32,64",
                    f"--out_json={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    eq = data["equality"]["fp64"]
    assert eq["max_diff_px"] <= 1e-3 and eq["visibility_mismatches"] == 0
    assert eq["visible_fraction"] > 0.5  # the memory path is exercised, not skipped
    assert data["equality"]["fp32"]["max_diff_px"] < 1e-2
    drift = data["equality"]["bf16_vs_own_fp32"]
    assert set(drift) == {"ours", "theirs"} and all(0 < d["median_diff_px"] <= d["max_diff_px"] for d in drift.values())
    for dt in ("fp32", "bf16"):
        t = data["timing"][dt]
        assert t["ours"]["steps"] == t["theirs"]["steps"] == 2 and t["speedup"] > 0
    assert set(data["stream"]) == {"ours", "theirs"} and data["config"]["stream_hw"] == [32, 64]
    for s in data["stream"].values():
        assert list(s["rss_mib"]) == ["1", "5", "10", "20"] and s["flat"]
    assert "ours ms/frame" in res.stdout and "stream ours (20 frames at 32x64" in res.stdout


def test_equality_check_catches_a_perturbed_weight(authors_repo, tmp_path):
    out = tmp_path / "bench.json"
    res = run_bench(f"--authors_repo={authors_repo}", *TINY[:3], "--frames=2", "--perturb_theirs=0.01",
                    f"--out_json={out}")
    assert res.returncode != 0
    assert "bench_lbm: outputs differ" in res.stderr and "nothing timed" in res.stderr
    assert not out.exists()


def test_not_a_checkout_is_one_clear_error(tmp_path):
    res = run_bench(f"--authors_repo={tmp_path}", *TINY)
    assert res.returncode != 0
    assert f"bench_lbm: {tmp_path}: not a checkout of George-Zhuang/lbm" in res.stderr


def test_rearrange_stand_in_matches_reshapes():
    # the einops patterns the authors' code uses, against the explicit reshapes they stand for
    code = """
import torch
from bench_lbm import rearrange as r
x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
assert torch.equal(r(x, 'b n m c -> (b n) m c'), x.reshape(6, 4, 5))
assert torch.equal(r(x.reshape(6, 1, 20), '(b n) 1 c -> b n c', b=2, n=3), x.reshape(2, 3, 20))
assert torch.equal(r(x, 'b n k c -> b (n k) c'), x.reshape(2, 12, 5))
assert torch.equal(r(x.reshape(2, 12, 5), 'b (n k) c -> b n k c', n=3, k=4), x)
assert torch.equal(r(x[..., 0], 'b n m -> (b n) m'), x[..., 0].reshape(6, 4))
assert torch.equal(r(x.reshape(2, 3, 20), 'b n c -> (b n) 1 c'), x.reshape(6, 1, 20))
y = x.reshape(2, 12, 5)
assert torch.equal(r(y, 'b (h w) c -> b c h w', h=3, w=4), y.permute(0, 2, 1).reshape(2, 5, 3, 4))
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
