"""demo.py: point files, outputs people can use, and the missing-checkpoint message."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import golden_model

import demo
from utils import checkpoint
from utils.video import read_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]


def test_read_points_formats(tmp_path):
    (tmp_path / "a.csv").write_text("t,x,y\n3,10.5,20\n0,1,2\n")
    (tmp_path / "b.csv").write_text("10,20\n30,40\n")
    (tmp_path / "c.json").write_text(json.dumps([[1, 2, 3], {"x": 5, "y": 6}, [7, 8]]))
    assert demo.read_points(tmp_path / "a.csv").tolist() == [[3, 10.5, 20], [0, 1, 2]]
    assert demo.read_points(tmp_path / "b.csv", query_frame=4).tolist() == [[4, 10, 20], [4, 30, 40]]
    assert demo.read_points(tmp_path / "c.json", query_frame=2).tolist() == [[1, 2, 3], [2, 5, 6], [2, 7, 8]]
    (tmp_path / "d.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match="no points"):
        demo.read_points(tmp_path / "d.csv")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    checkpoint.save(d, 5, golden_model())
    return d


def test_demo_end_to_end(tmp_path, ckpt):
    rng = np.random.default_rng(0)
    base = (rng.random((180, 260, 3)) * 255).astype(np.uint8)
    write_mp4(tmp_path / "in.mp4", (base[t:t + 130, 2 * t:2 * t + 150] for t in range(14)))
    (tmp_path / "pts.csv").write_text("t,x,y\n5,40,50\n0,100,60\n")
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), f"--video={tmp_path / 'in.mp4'}", f"--init_dir={ckpt}",
                          f"--points={tmp_path / 'pts.csv'}", "--backward=True", "--S=8", "--iters=1",
                          f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "summary: 2 points x 14 frames" in res.stdout
    z = np.load(tmp_path / "out" / "tracks.npz")
    assert z["tracks"].shape == (14, 2, 2) and z["estimated"].all()
    np.testing.assert_allclose(z["tracks"][5, 0], [40, 50], atol=1e-3)
    with open(tmp_path / "out" / "tracks.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 28 and float(rows[10]["x"]) == pytest.approx(z["tracks"][5, 0, 0], abs=1e-3)
    video = read_video(tmp_path / "out" / "tracks.mp4")
    assert video.shape == (14, 130, 150, 3)


def test_demo_grid_on_a_synthetic_video(tmp_path, ckpt):
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), f"--init_dir={ckpt}", "--grid_size=3", "--S=8",
                          "--iters=1", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "synthetic.mp4").is_file() and np.load(tmp_path / "tracks.npz")["tracks"].shape == (48, 9, 2)


def test_missing_checkpoint_message(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), f"--init_dir={tmp_path / 'none'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "get_reference_model.sh" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
