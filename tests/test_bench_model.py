"""benchmarks/bench_model.py against the authors' own code: same weights, same inputs, the same outputs."""

import json
import subprocess
import sys
from pathlib import Path

from test_diff_generator import authors_pips  # noqa: F401 (the fixture: a checkout, or a skip saying why)

ROOT = Path(__file__).resolve().parents[1]


def test_the_authors_model_runs_beside_ours_and_agrees(authors_pips, tmp_path):  # noqa: F811
    """With --authors_repo the authors' Pips (imported unmodified from the checkout) runs as one more
    configuration; its output must be ours within float32 rounding, or the ratios compare different work."""
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--sizes=t", "--repeats=1",
                          f"--authors_repo={authors_pips}", f"--json_out={out}"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(out.read_text())["t"]
    assert set(row["times_s"]) == {"authors_fp32", "baseline_fp32", "ours_fp32", "ours_bf16"}, row
    assert row["max_diff_fp32_vs_authors_px"] < 1e-3, row
    assert row["vs_authors_speedup_fp32"] > 0 and row["vs_authors_memory_ratio_fp32"] > 0, row
    assert "ours vs the authors' code:" in res.stdout, res.stdout
