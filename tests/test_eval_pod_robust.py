"""test_on_pod.py keeps going past bad sequences and never loses the scores it has (--out_json)."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import test_on_pod
from datasets.synthetic import SceneConfig, generate_dataset
from utils import checkpoint, tracking
from utils.video import VideoError

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--S=8", "--N=32", "--iters=2", "--image_size=128,192"]


@pytest.fixture(scope="module")
def pod_bad(tmp_path_factory):
    """synth_0000 good; synth_0001 with a zero-byte frame; synth_0002 with one frame of another size."""
    root = tmp_path_factory.mktemp("podbad")
    generate_dataset(root, {"test": 3}, seed=7, cfg=SceneConfig(W=320, H=192, T=12, n_points=300), progress=False)
    (root / "test" / "synth_0001" / "rgbs" / "rgb_00005.jpg").write_bytes(b"")
    f = root / "test" / "synth_0002" / "rgbs" / "rgb_00007.jpg"
    cv2.imwrite(str(f), cv2.resize(cv2.imread(str(f)), (160, 96)))
    return root


@pytest.fixture(scope="module")
def pod_good(tmp_path_factory):
    root = tmp_path_factory.mktemp("podgood")
    generate_dataset(root, {"test": 3}, seed=7, cfg=SceneConfig(W=320, H=192, T=12, n_points=300), progress=False)
    return root


def _run(root, out, *args):
    cmd = [sys.executable, str(ROOT / "test_on_pod.py"), f"--dataset_location={root}", *ARGS, f"--out_json={out}",
           *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _check_bad_scenes_skipped(res, js):
    assert res.returncode == 0, res.stderr
    assert list(js["per_sequence"]) == ["synth_0000"] and js["complete"] and js["status"] == "done"
    assert js["skipped"] == {
        "synth_0001": "unreadable frame (rgb_00005.jpg)",
        "synth_0002": "frames of different sizes (rgb_00007.jpg is 160x96, rgb_00000.jpg is 320x192)",
    }
    assert "synth_0001: skipped (unreadable frame (rgb_00005.jpg))" in res.stdout
    assert ("summary: 1 sequences scored, 2 skipped (unreadable frame: 1, frames of different sizes: 1)"
            in res.stdout)
    assert "Traceback" not in res.stderr


def test_bad_sequences_are_skipped_with_reasons_zero_velocity(pod_bad, tmp_path):
    res = _run(pod_bad, tmp_path / "r.json", "--zero_vel=True")
    _check_bad_scenes_skipped(res, json.loads((tmp_path / "r.json").read_text()))


def test_bad_sequences_are_skipped_with_reasons_with_a_model(pod_bad, tmp_path):
    import torch

    from nets.pips2 import Pips

    torch.manual_seed(0)
    checkpoint.save(tmp_path / "ck", 1, Pips().eval())
    res = _run(pod_bad, tmp_path / "r.json", f"--init_dir={tmp_path / 'ck'}")
    js = json.loads((tmp_path / "r.json").read_text())
    _check_bad_scenes_skipped(res, js)
    assert np.isfinite(js["per_sequence"]["synth_0000"]["d_avg"])


def test_frame_source_refuses_a_frame_of_another_size(pod_bad):
    paths = sorted((pod_bad / "test" / "synth_0002" / "rgbs").glob("*.jpg"))
    src = tracking.FileFrames(paths, (128, 192))
    assert src.get(0, 7).shape == (7, 128, 192, 3)
    with pytest.raises(VideoError, match=r"rgb_00007\.jpg: frame of 160x96, the first frame is 320x192"):
        src.get(4, 10)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_folder_or_empty_split_is_one_line(tmp_path, case):
    root = tmp_path / "pod"
    if case == "empty":
        (root / "test").mkdir(parents=True)
    res = _run(root, tmp_path / "r.json", "--zero_vel=True")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert str(root / "test") in res.stderr
    assert not (tmp_path / "r.json").exists()


def _interrupt_on_second(exc):
    real = test_on_pod.evaluate_scene
    calls = []

    def fake(model, scene, *a, **k):
        calls.append(scene.name)
        if len(calls) == 2:
            raise exc
        return real(model, scene, *a, **k)

    return fake


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (RuntimeError("a bug"), None)])
def test_partial_results_are_written_on_interrupt_and_on_errors(pod_good, tmp_path, monkeypatch, capsys, exc, code):
    root = pod_good
    monkeypatch.setattr(test_on_pod, "evaluate_scene", _interrupt_on_second(exc))
    out = tmp_path / "r.json"
    kw = dict(dataset_location=str(root), S=8, N=32, iters=2, image_size="128,192", zero_vel=True, out_json=str(out))
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            test_on_pod.main(**kw)
    else:
        with pytest.raises(SystemExit) as e:
            test_on_pod.main(**kw)
        assert e.value.code == code
    js = json.loads(out.read_text())
    assert list(js["per_sequence"]) == ["synth_0000"] and not js["complete"]
    assert js["status"] == ("interrupted" if code else "error: RuntimeError: a bug")
    stdout = capsys.readouterr().out
    assert "summary: 1 sequences scored, 0 skipped, 2 not done" in stdout and "(partial)" in stdout
    assert not list(tmp_path.glob(".r.json.*"))  # the temp file was renamed
