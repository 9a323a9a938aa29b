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


def _check(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_check.py"), "--quick=True",
                           "--train_scenes=1", "--test_scenes=1", "--workers=1", *flags], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_out_through_another_user_s_link_is_refused_and_a_failed_step_is_one_line(tmp_path):
    """`make demo` runs this check into ./demo_out: another user's link there was followed (the path resolved
    first, the scenes written in-process), so the whole check wrote where the link's maker chose. A failed step
    ended in a CalledProcessError traceback."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "demo_out").symlink_to(mine)
    if os.geteuid() == 0:
        os.lchown(tmp_path / "demo_out", 2002, 2002)
        res = _check(tmp_path, "--out=demo_out")
        assert res.returncode == 1 and res.stderr.strip() == (
            f"error: --out: {tmp_path / 'demo_out'} is a link of uid 2002's (to {mine}), not this user's: its maker "
            f"chose where this program's files would go; remove it, or give another --out"), res.stderr[-2000:]
        assert list(mine.iterdir()) == []
    res = _check(tmp_path, "--out=own", "--S=1000")  # more frames than a scene has: the export refuses
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == ("error: learning check: export_mp4_dataset.py failed (exit 2); "
                                                   "its lines are above"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
