"""benchmarks/learning_check.py: the training loss curve read from train.py's step lines, and `compare`."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_step_lines_give_the_loss_curve():
    lines = ["s1_8_32_x; step 000007/400; rtime 0.10; itime 1.20; loss 12.500; loss_t 13.000; d_t 4.0; d_v nan",
             "s1_8_32_x; step 000008/400; rtime 0.10; itime 1.20; loss nan; loss_t 13.000; d_t 4.0; d_v nan",
             "loaded checkpoint; resuming at step 8", "$ python train.py --max_steps=400"]
    res = _py("import json, sys\nfrom learning_check import STEP_LINE\n"
              f"lines = {lines!r}\n"
              "print(json.dumps([[int(m[1]), m[2]] for m in map(STEP_LINE.search, lines) if m]))")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == [[7, "12.500"], [8, "nan"]]


def test_compare_prints_both_runs_and_draws_the_curves(tmp_path):
    for name, amp, losses in (("fp32", "none", [9.0, 8.0, 7.0, 6.0]), ("bf16", "bf16", [9.5, 8.5, 7.5, 6.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "learning_check.json").write_text(json.dumps({
            "amp": amp, "max_iters": 4, "train_minutes": 1.0, "d_avg_model": 18.0, "d_avg_zero_velocity": 4.0,
            "median_l2_model": 30.0, "median_l2_zero_velocity": 50.0,
            "loss_curve": [[i + 1, v] for i, v in enumerate(losses)]}))
    png = tmp_path / "curves.png"
    res = subprocess.run([sys.executable, "learning_check.py", "compare", f"--runs={tmp_path / 'fp32'},"
                          f"{tmp_path / 'bf16'}", f"--png={png}", "--points=2"], cwd=ROOT / "benchmarks", env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(4.50x)" in res.stdout and "amp bf16" in res.stdout and "fp32 (none)" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("1-2", "3-4"))]
    assert rows == [["1-2", "8.500", "9.000"], ["3-4", "6.500", "7.000"]]
    assert png.stat().st_size > 1000


def test_compare_takes_plain_run_names_and_refuses_runs_without_a_curve(tmp_path):
    # fire turns --runs=a,b into a tuple; a summary without a loss curve is one clear error
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "learning_check.json").write_text(json.dumps({
            "max_iters": 2, "train_minutes": 1.0, "d_avg_model": 1.0, "d_avg_zero_velocity": 1.0,
            "median_l2_model": 1.0, "median_l2_zero_velocity": 1.0,
            **({"loss_curve": [[1, 2.0], [2, 1.0]]} if name == "a" else {})}))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_check.py"), "compare", "--runs=a,b"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "error: no loss curve in b" in res.stderr
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_check.py"), "compare", "--runs=a,c"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "error: c/learning_check.json: not found" in res.stderr
