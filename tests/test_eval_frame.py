"""The evaluation frame the three scripts share (pips2/evaluation.Evaluation): one JSON layout, flags checked in
one line before anything loads, and partial results on SIGTERM and Ctrl-C, each script run as a user runs it."""

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import golden_model, run_main, run_then_close_its_terminal
from test_eval_tap_cro import _crohd, _entry

from pips2 import evaluation
from pips2.cli import eval_cro, eval_pod, eval_tap
from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.utils import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# the top-level keys of every --out_json (docs/EVALUATION.md#results-json)
JSON_KEYS = {"benchmark", "status", "complete", "settings", "mean", "tapvid", "per_item", "skipped", "curves"}
MAINS = {"pod": eval_pod.main, "cro": eval_cro.main, "tap": eval_tap.main}
SMALL = {"pod": dict(S=8, N=16, iters=1, image_size="128,192"),
         "cro": dict(S=8, N=16, iters=1, image_size="128,192", clip_len=10),
         "tap": dict(S=8, iters=1, image_size="128,160", modes="first")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four items for each script, and a checkpoint: (script -> dataset_location, checkpoint folder)."""
    root = tmp_path_factory.mktemp("evalframe")
    generate_dataset(root / "pod", {"test": 4}, seed=3, cfg=SceneConfig(W=256, H=192, T=10, n_points=120),
                     progress=False)
    for i in range(4):
        _crohd(root / "cro", T=10, seq=f"HT21-0{i + 1}")
    with open(root / "tapvid_davis.pkl", "wb") as f:
        pickle.dump({f"v{i}": _entry(seed=i) for i in range(4)}, f)
    checkpoint.save(root / "ck", 1, golden_model())
    return {"pod": root / "pod", "cro": root / "cro", "tap": root / "tapvid_davis.pkl"}, root / "ck"


def test_the_three_scripts_write_one_json_layout(data, tmp_path, capsys):
    locations, ck = data
    layouts = {}
    for script, main in MAINS.items():
        out = tmp_path / f"{script}.json"
        limit = {"pod": "max_scenes", "cro": "max_clips", "tap": "max_videos"}[script]
        res = run_main(main, capsys, dataset_location=str(locations[script]), init_dir=str(ck), out_json=str(out),
                       **{limit: 1}, **SMALL[script])
        assert res.returncode == 0, res.stderr
        js = json.loads(out.read_text())
        layouts[script] = set(js)
        assert js["status"] == "done" and js["complete"] and js["skipped"] == [] and len(js["per_item"]) == 1
        assert js["settings"]["S"] == 8 and js["settings"]["iters"] == 1 and set(js["mean"]) >= {"d_avg", "median_l2"}
        assert list(js["curves"]) == ["ck", "zero-velocity"]
        assert (tmp_path / f"{script}_curves.png").is_file()
    assert layouts == {s: JSON_KEYS for s in MAINS}
    docs = (ROOT / "docs" / "EVALUATION.md").read_text()
    assert all(f"`{k}`" in docs for k in JSON_KEYS)


BAD_FLAGS = [
    (dict(image_size="abc"), "image_size must be H,W (two integers), got 'abc'"),
    (dict(image_size="64,64"), "--image_size must be between 128 and 4096 pixels per side, got 64,64"),
    (dict(image_size="512,100000"), "--image_size must be between 128 and 4096 pixels per side"),
    (dict(S=1), "--S must be at least 2, got 1"),
    (dict(iters=0), "--iters must be at least 1, got 0"),
    (dict(iters=10**9), "--iters must be at most 64, got 1000000000"),
    (dict(point_batch=0), "--point_batch must be at least 1, got 0"),
    (dict(max_iters=0), "--max_iters must be at least 1, got 0"),
    (dict(device="foo"), "--device 'foo': expected auto, cpu, cuda, cuda:N or mps"),
    (dict(amp="fp8"), "--amp must be one of none, bf16, fp16, got 'fp8'"),
    (dict(out_json="/nonexistent_folder/r.json"), "no such folder /nonexistent_folder"),
]
SCRIPT_FLAGS = [("pod", dict(N=0), "--N must be at least 1, got 0"), ("cro", dict(N=0), "--N must be at least 1"),
                ("cro", dict(clip_len=1), "--clip_len must be at least 2, got 1"),
                ("pod", dict(max_scenes=0), "--max_scenes must be at least 1"),
                ("tap", dict(modes="first,bogus"), "--modes must be a comma-separated subset of first,strided"),
                ("tap", dict(modes="first,first"), "--modes must be a comma-separated subset of first,strided"),
                ("tap", dict(memory_size=0), "--memory_size must be at least 1, got 0")]


@pytest.mark.parametrize("script,flags,msg", [(s, f, m) for s in MAINS for f, m in BAD_FLAGS] + SCRIPT_FLAGS)
def test_bad_flags_are_one_line_before_anything_loads(tmp_path, capsys, script, flags, msg):
    # neither the data nor the checkpoint exists: the flag must be what is reported, in one line, exit 2
    res = run_main(MAINS[script], capsys, dataset_location=str(tmp_path / "nothing"),
                   init_dir=str(tmp_path / "no_model"), **flags)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: ")
    assert msg in res.stderr


NOUNS = {"pod": "sequences", "cro": "clips", "tap": "videos"}
FIRST = {"pod": "synth_0000: d_1", "cro": "HT21-01_00000: d_1", "tap": "v0: d_1"}
SCRIPTS = {"pod": "test_on_pod.py", "cro": "test_on_cro.py", "tap": "test_on_tap.py"}


def _interrupted_run(cmd: list[str], first: str, sig: int) -> tuple[int, str, str]:
    """Run cmd, wait for the line of its first item, send sig: (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(first):
                break
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, "".join(seen) + out, err


@pytest.mark.parametrize("script,name", [("pod", "SIGTERM"), ("cro", "SIGINT"), ("tap", "SIGHUP")])
def test_a_signal_keeps_the_finished_items_and_exits_cleanly(data, tmp_path, script, name):
    locations, ck = data
    sig = signal.Signals[name]
    out = tmp_path / "r.json"
    flags = [f"--{k}={v}" for k, v in SMALL[script].items()]
    code, stdout, stderr = _interrupted_run(
        [sys.executable, SCRIPTS[script], f"--dataset_location={locations[script]}", f"--init_dir={ck}",
         f"--out_json={out}", *flags], FIRST[script], sig)
    assert code == {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}[name], stderr  # SIGHUP: a closed terminal
    assert "Traceback" not in stderr
    last = [ln for ln in re.split(r"[\r\n]", stderr) if ln.strip()][-1]
    want = rf"stopped by {name}: (\d)( of 4)? {NOUNS[script]} scored; partial results in {re.escape(str(out))}"
    m = re.fullmatch(want, last)
    assert m, stderr
    n = int(m.group(1))
    assert 1 <= n < 4
    js = json.loads(out.read_text())
    assert set(js) == JSON_KEYS and js["status"] == "interrupted" and not js["complete"]
    assert len(js["per_item"]) == n and FIRST[script].split(":")[0] in js["per_item"]
    assert f"summary: {n} {NOUNS[script]} scored" in stdout and f"results -> {out} (partial)" in stdout
    assert not list(tmp_path.glob(".r.json.*"))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_that_closes_keeps_the_finished_items(data, tmp_path):
    """The terminal (a window, an ssh session) really closes: SIGHUP, then every write to it fails (EIO). The
    summary's first print raised, and --out_json, written after it, never was: the scores were lost."""
    locations, ck = data
    out = tmp_path / "r.json"
    flags = [f"--{k}={v}" for k, v in SMALL["tap"].items()]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    code, _ = run_then_close_its_terminal(
        [sys.executable, SCRIPTS["tap"], f"--dataset_location={locations['tap']}", f"--init_dir={ck}",
         f"--out_json={out}", *flags], FIRST["tap"], cwd=ROOT, env=env)
    assert code == 129
    js = json.loads(out.read_text())
    assert js["status"] == "interrupted" and "v0" in js["per_item"] and len(js["per_item"]) < 4


def _inputs(root: Path) -> dict[str, Path]:
    """Stand-ins for what a user evaluates (never read: the refusal comes first): a TAP-Vid pickle, a
    PointOdyssey and a CroHD folder, and a checkpoint folder."""
    (root / "tap").mkdir(parents=True)
    (root / "tap" / "davis.pkl").write_bytes(b"\x80\x04 a multi-GB download")
    for sub in ("pod/test/s0/anno.npz", "cro/HT21/train/HT21-01/gt/gt.txt", "ck/model-000001.pth"):
        (root / sub).parent.mkdir(parents=True)
        (root / sub).write_bytes(b"precious " + sub.encode())
    return {"tap": root / "tap" / "davis.pkl", "pod": root / "pod", "cro": root / "cro", "ck": root / "ck"}


# --out_json naming an input (a tab-completion slip): the data set itself, a file inside it, the checkpoint
CLOBBER = [("tap", lambda p: p["tap"], "--dataset_location="),
           ("pod", lambda p: p["pod"] / "test" / "s0" / "anno.npz", "--dataset_location="),
           ("cro", lambda p: p["cro"] / "HT21" / "train" / "HT21-01" / "gt" / "gt.txt", "--dataset_location="),
           ("cro", lambda p: p["cro"] / "new.json", "--dataset_location="),
           ("pod", lambda p: p["ck"] / "model-000001.pth", "--init_dir="),
           ("tap", lambda p: p["ck"] / "model-000001.pth", "--init_dir=")]


@pytest.mark.parametrize("script,target,owner", CLOBBER)
def test_out_json_never_overwrites_an_input(tmp_path, capsys, script, target, owner):
    paths = _inputs(tmp_path)
    out = target(paths)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = run_main(MAINS[script], capsys, dataset_location=str(paths[script]), init_dir=str(paths["ck"]),
                   out_json=str(out), **SMALL[script])
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(f"error: --out_json={out} would overwrite the input {owner}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_out_json_replaces_only_a_results_file(tmp_path, capsys):
    paths = _inputs(tmp_path / "in")
    for name, text in [("notes.json", '{"a": 1}'), ("model.pth", "weights"), ("list.json", "[1, 2]")]:
        (tmp_path / name).write_text(text)
        res = run_main(eval_tap.main, capsys, dataset_location=str(paths["tap"]), init_dir=str(paths["ck"]),
                       out_json=str(tmp_path / name), **SMALL["tap"])
        assert res.returncode == 2, res.stderr
        assert res.stderr == (f"error: --out_json={tmp_path / name} exists and is not a results file of this "
                              "program; give another name\n")
        assert (tmp_path / name).read_text() == text
    # a curves file with no results JSON beside it is someone's picture
    (tmp_path / "r_curves.png").write_bytes(b"\x89PNG a picture")
    res = run_main(eval_tap.main, capsys, dataset_location=str(paths["tap"]), init_dir=str(paths["ck"]),
                   out_json=str(tmp_path / "r.json"), **SMALL["tap"])
    assert res.returncode == 2 and "its curves file" in res.stderr and "give another name" in res.stderr
    assert (tmp_path / "r_curves.png").read_bytes() == b"\x89PNG a picture"
    # a results file of an earlier run (and its curves) may be replaced
    (tmp_path / "r.json").write_text(json.dumps({k: None for k in JSON_KEYS}))
    evaluation.check_out_json(str(tmp_path / "r.json"), dataset_location=str(paths["tap"]), init_dir="pips2")
    evaluation.check_out_json(str(tmp_path / "new.json"), dataset_location=str(paths["tap"]))


def _no_space(*args, **kwargs):
    """What a write to a full disk raises."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _lines(stderr: str) -> list[str]:
    """stderr without the progress bar's redraws."""
    return [ln for ln in re.split(r"[\r\n]", stderr) if ln.strip() and not re.search(r"\[\d\d:\d\d", ln)]


def test_a_full_disk_at_the_end_prints_the_results_instead(data, tmp_path, capsys, monkeypatch):
    locations, ck = data
    out = tmp_path / "r.json"
    kw = dict(dataset_location=str(locations["tap"]), init_dir=str(ck), out_json=str(out), max_videos=1,
              **SMALL["tap"])
    monkeypatch.setattr(evaluation, "write_json", _no_space)
    res = run_main(eval_tap.main, capsys, **kw)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert _lines(res.stderr) == [f"error: cannot write --out_json={out} (no space left on device); "
                                  "the results are printed above"]
    head, marker, rest = res.stdout.partition(evaluation.RESULTS_MARKER + "\n")
    assert marker and "summary: 1 videos scored" in head
    js = json.loads(rest)
    assert set(js) == JSON_KEYS and list(js["per_item"]) == ["v0"] and js["status"] == "done"
    assert not out.exists() and not list(tmp_path.iterdir())
    # the JSON written, its curves PNG not: a warning line, the results stand
    monkeypatch.undo()
    monkeypatch.setattr(evaluation.plots, "save_png", _no_space)
    res = run_main(eval_tap.main, capsys, **kw)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    png = tmp_path / "r_curves.png"
    assert _lines(res.stderr) == [f"warning: curves not drawn: cannot write {png} (no space left on device)"]
    assert json.loads(out.read_text())["per_item"].keys() == {"v0"} and not png.exists()


def test_out_json_on_a_disk_already_full_is_refused_at_start(tmp_path, monkeypatch):
    """The disk full before the run: said only after hours of scoring, when the results were written."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(evaluation.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ValueError, match=r"r.json: 1000 bytes free in .*, fewer than the 16777216 the results"):
        evaluation.check_out_json(str(tmp_path / "r.json"))
    monkeypatch.setattr(evaluation.shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
    evaluation.check_out_json(str(tmp_path / "r.json"))


def test_later_signals_do_not_change_how_a_stopped_evaluation_ends(tmp_path, monkeypatch, capsys):
    """A SIGTERM, then a SIGINT 50 ms later while the partial results were written: the line named SIGTERM but
    the exit status was SIGINT's 130. The first signal decides; the handlers come back once the run has ended."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run = evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(tmp_path / "r.json"))
    finish = run.finish

    def finish_then_interrupted(seconds):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the partial results are written
        finish(seconds)
        os.kill(os.getpid(), signal.SIGINT)  # and after

    monkeypatch.setattr(run, "finish", finish_then_interrupted)
    code_of = evaluation.exit_code

    def exit_code_then_interrupted(name):
        os.kill(os.getpid(), signal.SIGINT)  # arrives after the line, as the run exits
        return code_of(name)

    monkeypatch.setattr(evaluation, "exit_code", exit_code_then_interrupted)

    def items():
        figures = {k: 1.0 for k in evaluation.metrics.METRIC_NAMES}
        yield "a", lambda: evaluation.Scored(figures, "a: scored", 1)
        os.kill(os.getpid(), signal.SIGTERM)
        yield "b", lambda: evaluation.Scored(figures, "b: scored", 1)

    with pytest.raises(SystemExit) as e:
        run.run(items(), total=2)
    assert e.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped by SIGTERM: 1 of 2 scenes scored")
    assert {s: signal.getsignal(s) for s in before} == before
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "interrupted"


def scored_items(n: int, stop_after: int | None):
    """n items of equal figures named s0, s1, ...; a SIGTERM to this process as item `stop_after` is reached."""
    figures = {k: 1.0 for k in evaluation.metrics.METRIC_NAMES}
    for i in range(n):
        if i == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        yield f"s{i}", lambda: evaluation.Scored(figures, "scored", 1)


def test_a_stopped_rerun_keeps_the_finished_results(tmp_path, capsys):
    """A rerun stopped by SIGTERM replaced the earlier run's --out_json (hours of scoring, finished or not) and its
    curves with its partial results: they now go beside it, named in the stop line."""
    out = tmp_path / "r.json"

    def items(stop_after: int | None):
        return scored_items(3, stop_after)

    evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(out)).run(items(None), total=3)
    finished = out.read_bytes()
    assert json.loads(finished)["complete"] is True
    for _ in range(2):  # the partial file of an earlier stop is replaced
        with pytest.raises(SystemExit) as e:
            evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(out)).run(items(1), total=3)
        assert e.value.code == 143
        partial = tmp_path / "r.partial.json"
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"stopped by SIGTERM: 1 of 3 scenes scored; partial results in {partial}")
        assert out.read_bytes() == finished and json.loads(partial.read_text())["status"] == "interrupted"
    # a stopped run's --out_json is kept too (a later stopped rerun that scored fewer replaced it): the partial
    # results go beside it
    out.write_text(partial.read_text())
    kept = out.read_bytes()
    with pytest.raises(SystemExit):
        evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(out)).run(items(2), total=3)
    assert out.read_bytes() == kept and len(json.loads(partial.read_text())["per_item"]) == 2
    # a finished run replaces whatever is there
    evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(out)).run(items(None), total=3)
    assert json.loads(out.read_text())["complete"] is True


def test_names_from_data_files_cannot_drive_the_terminal(tmp_path, capsys):
    """A video or scene name holding terminal escapes (retitle, clear the screen, return to the line's start) was
    printed raw: now escaped in every line, kept as it is in the results file."""
    hostile = "c\x1b]0;PWNED\x07\x1b[2J\rfake: all good"
    figures = {k: 1.0 for k in evaluation.metrics.METRIC_NAMES}
    res = {**figures, "points": 4, "frames": 8}

    def skipped():
        raise evaluation.SkipItem(f"truncated frame ({hostile}.png)")

    items = [(hostile, lambda: evaluation.Scored(figures, evaluation.format_row(hostile, res), 8)),
             (hostile + "2", skipped)]
    out = tmp_path / "r.json"
    evaluation.Evaluation("TAP-Vid", "videos", "m", {}, out_json=str(out)).run(items, total=2)
    stdout, stderr = capsys.readouterr()
    printed = stdout + stderr
    assert not any(c in printed for c in "\x1b\x07") and "\r" not in stdout, repr(printed)  # tqdm's bar uses \r
    assert "c\\x1b]0;PWNED\\x07\\x1b[2J\\rfake: all good: " in printed
    assert "c\\x1b]0;PWNED\\x07\\x1b[2J\\rfake: all good2: skipped (truncated frame (c\\x1b" in printed
    saved = json.loads(out.read_text())
    assert hostile in saved["per_item"] and saved["skipped"][0]["name"] == hostile + "2"


def test_a_stopped_rerun_never_replaces_more_partial_results_with_fewer(tmp_path, capsys):
    """Under a scheduler whose limit stops every attempt, each stopped attempt replaced the previous attempt's
    partial results, however many fewer it had scored: 4 scored scenes gave way to 1. A stopped run now writes
    <stem>.partial.json only over as many results or fewer, else the next free <stem>.partial.<k>.json."""
    out = tmp_path / "r.json"

    def items(stop_after: int | None):
        return scored_items(4, stop_after)

    def stopped_run(after: int) -> Path:
        with pytest.raises(SystemExit):
            evaluation.Evaluation("PointOdyssey test", "scenes", "m", {}, out_json=str(out)).run(items(after), total=4)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        return Path(line.rsplit("partial results in ", 1)[1])

    assert stopped_run(3) == out  # the first attempt: --out_json itself
    assert stopped_run(3) == tmp_path / "r.partial.json"
    assert stopped_run(1) == tmp_path / "r.partial.2.json"  # fewer than r.partial.json holds: beside it
    assert len(json.loads((tmp_path / "r.partial.json").read_text())["per_item"]) == 3
    assert stopped_run(1) == tmp_path / "r.partial.2.json"  # as many as it holds: replaced
    assert stopped_run(2) == tmp_path / "r.partial.2.json"
    (tmp_path / "r.partial.3.json").write_text("the user's notes")  # not a results file: never replaced
    assert stopped_run(0) == tmp_path / "r.partial.4.json"
    assert (tmp_path / "r.partial.3.json").read_text() == "the user's notes"
    # partial results of a run with other settings (--iters=2 where this one runs 16) are another run's: kept
    other = json.loads((tmp_path / "r.partial.4.json").read_text())
    (tmp_path / "r.partial.4.json").write_text(json.dumps({**other, "settings": {"iters": 2}}))
    assert stopped_run(0) == tmp_path / "r.partial.5.json"
    assert len(json.loads(out.read_text())["per_item"]) == 3


def test_results_name_the_checkpoint_a_folder_held_when_it_was_loaded(tmp_path):
    """The settings named the --init_dir folder only: a run folder followed while it trains held another newest
    checkpoint at each stopped evaluation, whose partial results then replaced the other model's as "the same
    settings". They now name the file loaded, its size and time."""
    folder = tmp_path / "run"
    checkpoint.save(folder, 1, golden_model())
    first = evaluation.checkpoint_of(folder)
    assert first is not None and first["file"].endswith("model-000000001.pth") and first["bytes"] > 0
    checkpoint.save(folder, 2, golden_model())  # the training's next save
    second = evaluation.checkpoint_of(folder)
    assert second is not None and second["file"].endswith("model-000000002.pth") and second != first
    assert evaluation.checkpoint_of("pips2") is None and evaluation.checkpoint_of(None) is None  # a hub name
