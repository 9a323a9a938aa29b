"""utils/cli.run_fire: every script's flags are checked before any work; a typo or a mistyped value is one line."""

from __future__ import annotations

import importlib

import pytest

from pips2.utils.cli import run_fire

SCRIPTS = ["app", "demo", "eval_cro", "eval_pod", "eval_tap", "export", "export_onnx", "synthetic"]


def _run(main, argv, capsys):
    capsys.readouterr()
    try:
        result, code = run_fire(main, "prog.py", argv), 0
    except SystemExit as e:
        result, code = None, e.code
    out = capsys.readouterr()
    return result, code, out.out, out.err


def toy(S: int = 8, lr: float = 5e-4, use_augs: bool = True, max_clips: int | None = None, name: str = "x",
        crop_size=(256, 384)):
    """A script's main: returns what it was called with."""
    return dict(S=S, lr=lr, use_augs=use_augs, max_clips=max_clips, name=name, crop_size=crop_size)


def test_good_flags_reach_main_with_their_types(capsys):
    res, code, _, err = _run(toy, ["--S=36", "--lr", "1", "--nouse_augs", "--max-clips=4", "--name=run1",
                                   "--crop_size=128,192"], capsys)
    assert code == 0 and res is not None, err
    assert res == dict(S=36, lr=1.0, use_augs=False, max_clips=4, name="run1", crop_size=(128, 192))
    assert isinstance(res["lr"], float)
    res, code, _, _ = _run(toy, ["--use_augs=0"], capsys)  # 0 and 1 are booleans
    assert code == 0 and res is not None and res["use_augs"] is False
    res, code, _, _ = _run(toy, ["--l=1", "--n=y", "--max_clips=None"], capsys)  # fire's one-letter abbreviations
    assert code == 0 and res is not None and (res["lr"], res["name"], res["max_clips"]) == (1.0, "y", None)
    res, code, _, _ = _run(toy, [], capsys)
    assert res == toy()


@pytest.mark.parametrize("argv, msg", [
    (["--SS=36"], "prog.py: unknown flag --SS; did you mean --S?"),
    (["--max_clip=4"], "prog.py: unknown flag --max_clip; did you mean --max_clips?"),
    (["--zzz=1"], "prog.py: unknown flag --zzz (--help lists the flags)"),
    (["--S=abc"], "prog.py: --S must be an integer, got 'abc'"),
    (["--S=1.5"], "prog.py: --S must be an integer, got 1.5"),
    (["--S=True"], "prog.py: --S must be an integer, got True"),
    (["--lr=fast"], "prog.py: --lr must be a number, got 'fast'"),
    (["--use_augs=yes"], "prog.py: --use_augs must be True or False, got 'yes'"),
    (["--use_augs=1.0"], "prog.py: --use_augs must be True or False, got 1.0"),  # 0 and 1 only as integers
    (["--max_clips=all"], "prog.py: --max_clips must be an integer, got 'all'"),
    (["--S=None"], "prog.py: --S must be an integer, got None"),  # S is not Optional
    (["--s=3"], "prog.py: unknown flag --s (--help lists the flags)"),  # no parameter starts with s
    (["--m=3"], "prog.py: unknown flag --m (--help lists the flags)"),  # two start with m: fire refuses it too
])
def test_bad_flags_are_one_line_before_main_runs(capsys, argv, msg):
    called = []

    def main(S: int = 8, lr: float = 5e-4, use_augs: bool = True, max_clips: int | None = None, max_x: int = 0):
        called.append(1)

    _, code, out, err = _run(main, argv, capsys)
    assert code == 2 and not called and out == ""
    assert err.strip().splitlines() == [f"error: {msg}" + ("" if "(--help" in msg or "must be" in msg
                                                           else " (--help lists the flags)")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_a_misspelled_flag_before_it_starts(script, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"pips2.cli.{script}").main
    _, code, out, err = _run(main, ["--out_dirr=x", "--typo_flag=1"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "unknown flag --out_dirr" in err
    assert list(tmp_path.iterdir()) == []  # nothing was made: the script never ran


def test_a_mistyped_value_stops_the_exporter_before_it_starts(capsys, tmp_path):
    main = importlib.import_module("pips2.cli.export").main
    _, code, _, err = _run(main, [f"--out_dir={tmp_path / 'out'}", "--S=abc"], capsys)
    assert code == 2 and err.strip() == "error: prog.py: --S must be an integer, got 'abc'"
    assert not (tmp_path / "out").exists()


def test_help_still_shows_the_flags(capsys):
    for argv in (["--help"], ["--S=abc", "--help"], ["--typo=1", "-h"]):  # asked for help: help, not an error
        _, code, out, err = _run(toy, argv, capsys)
        assert code == 0 and "--max_clips" in out + err and "int" in out + err, argv


def test_train_keeps_its_own_flag_check(capsys):
    main = importlib.import_module("pips2.cli.train").main
    _, code, _, err = _run(main, ["--max_step=3"], capsys)
    assert code == 2 and "unknown flags: ['max_step']" in err
    # a flag of a stage the run does not train was never checked or used: --stage2_S=abc passed without a word
    _, code, _, err = _run(main, ["--stage2_S=abc"], capsys)
    assert code == 2 and ("--stage2_S: for a stage this run does not train (--stage=1); drop it or add that stage "
                          "with --stages=1,2") in err, err


def test_a_text_flag_keeps_the_text_typed_when_fire_reads_a_number_or_a_tuple(capsys):
    def main(out_dir: str = "out", init_dir: str | None = None, modes: str = "first", image_size=None):
        return dict(out_dir=out_dir, init_dir=init_dir, modes=modes, image_size=image_size)

    for argv, want in [
        (["--out_dir=2024"], dict(out_dir="2024")),  # a folder named after a year
        (["--out_dir", "1e3"], dict(out_dir="1e3")),  # not "1000.0"
        (["--out-dir=-5", "--init_dir=0x10"], dict(out_dir="-5", init_dir="0x10")),
        (["--init_dir=2024"], dict(init_dir="2024")),  # str | None
        (["--init_dir=None"], dict(init_dir=None)),
        (["--modes=first,strided"], dict(modes="first,strided")),  # a comma list is text to split
        (["--o=7"], dict(out_dir="7")),  # fire's one-letter abbreviation
        (["--out_dir=1", "--out_dir=2"], dict(out_dir="2")),  # the last one wins, as in fire
        (["--image_size=128,192"], dict(image_size=(128, 192))),  # unannotated: fire's value, untouched
    ]:
        res, code, _, err = _run(main, argv, capsys)
        assert code == 0, (argv, err)
        assert res == {**main(), **want}, argv


@pytest.mark.parametrize("argv, msg", [
    (["--out_dir=[1,2]"], "--out_dir must be text, got [1, 2]"),
    (["--out_dir={a: 1}"], "--out_dir must be text, got {'a': 1}"),
    (["--out_dir=True"], "--out_dir must be text, got True"),
    (["--out_dir"], "--out_dir must be text, got True"),  # a bare flag is fire's True
    (["--out_dir=None"], "--out_dir must be text, got None"),  # out_dir is not Optional
    (["--init_dir=[x]"], "--init_dir must be text, got ['x']"),
])
def test_a_text_flag_given_a_list_dict_or_bool_is_one_line(capsys, argv, msg):
    called = []

    def main(out_dir: str = "out", init_dir: str | None = None):
        called.append(1)

    _, code, out, err = _run(main, argv, capsys)
    assert code == 2 and not called and out == ""
    assert err.strip().splitlines() == [f"error: prog.py: {msg}"]


@pytest.mark.parametrize("script, argv, msg", [
    ("demo", ["--video=2024"], "error: 2024: no such video file"),
    ("demo", ["--video=[1,2]"], "error: prog.py: --video must be text, got [1, 2]"),
    ("eval_pod", ["--dataset_location=2024"], "error: 2024/test: no such split folder"),
    ("eval_pod", ["--dset=1", "--dataset_location=."], "error: 1: no such split folder"),
    ("eval_cro", ["--dataset_location=1e3"], "error: 1e3/HT21/train: no such folder"),
    ("eval_tap", ["--dataset_location=2024"], "error: 2024: no such file or folder"),
    ("export", ["--dataset_location=2024"], "error: --dataset_location: 2024/train: no such split folder"),
    ("export", ["--dset=[train]"], "error: prog.py: --dset must be text, got ['train']"),
])
def test_every_script_takes_a_number_as_the_path_typed(script, argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"pips2.cli.{script}").main
    _, code, out, err = _run(main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(msg), err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, msg", [
    (["--dataset_location=2024"], "error: 2024: no such dataset folder (--dataset_location)"),
    (["--stage2_dataset_location=[1]", "--stages=1,2"], "error: prog.py: --stage2_dataset_location must be text"),
])
def test_train_takes_a_number_as_the_path_typed(argv, msg, capsys, tmp_path, monkeypatch):
    train = importlib.import_module("pips2.cli.train")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["prog.py", *argv])
    with pytest.raises(SystemExit) as e:
        train.cli()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(msg), err
    assert "Traceback" not in err


def test_an_error_line_quoting_a_hostile_name_cannot_drive_the_terminal(capsys):
    """Every script's one-line `error:` (utils/cli.die) quotes names from data folders (an export's version folder
    in train.py's "found: ..."): their terminal escapes were printed raw. They are escaped, on one line."""
    import pytest

    from pips2.utils.cli import die

    with pytest.raises(SystemExit) as e:
        die("no export holds train clips (found: train_S8\x1b]0;PWNED\x07\x1b[2J\rfake: all good\nsecond)")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: no export holds train clips (found: train_S8\\x1b]0;PWNED\\x07\\x1b[2J\\rfake: all good\\n" \
                  "second)\n", repr(err)


def test_out_of_memory_in_any_script_is_one_line_and_a_bug_still_raises(capsys):
    """Under an address-space limit an evaluation ended in torch's 40-line allocator traceback while it built the
    model. Every script now says it in one line, exit 1; another RuntimeError is still raised as it is."""
    import pytest

    from pips2.utils.cli import run_fire

    def oom(size: int = 1):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4294967296 bytes.")

    def bug(size: int = 1):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(SystemExit) as e:
        run_fire(oom, prog="test_on_pod.py", argv=["--size=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: test_on_pod.py: out of memory on this machine ([enforce fail"), err
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_fire(bug, prog="x.py", argv=[])
    from pips2.utils.procs import out_of_memory

    assert out_of_memory(RuntimeError("could not create a primitive")) and out_of_memory(MemoryError())
    assert out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # an unsupported configuration, not memory
    assert not out_of_memory(RuntimeError("could not create a primitive descriptor for a convolution forward "
                                          "propagation primitive"))


def test_a_checkpoint_memory_cannot_map_is_this_machines_error_not_the_files(tmp_path, monkeypatch, capsys):
    """Under a memory limit torch could not map a good checkpoint ("unable to mmap ...: Cannot allocate memory
    (12)"): the line blamed the file ("not a readable checkpoint") with exit 2, bad input's code. It is now this
    machine's error, exit 1, and the file is not judged."""
    import pytest
    import torch

    from pips2.utils import checkpoint
    from pips2.utils.cli import die

    path = tmp_path / "m.pth"
    torch.save({"w": torch.zeros(3)}, path)

    def no_room(*args, **kwargs):
        raise RuntimeError(f"unable to mmap 210893881 bytes from file <{path}>: Cannot allocate memory (12)")

    monkeypatch.setattr(checkpoint.torch, "load", no_room)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_weights_only(path)
    assert e.value.local and str(e.value) == f"{path}: cannot be read here (out of memory)"
    with pytest.raises(SystemExit) as end:
        die(e.value)
    assert end.value.code == 1 and capsys.readouterr().err == f"error: {path}: cannot be read here (out of memory)\n"


EMPTY_FLAGS = {"app": "host", "demo": "out_dir", "eval_cro": "out_json", "eval_pod": "dataset_location",
               "eval_tap": "out_json", "export": "out_dir", "export_onnx": "out", "synthetic": "out"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_text_flag_given_empty_is_one_line_before_any_work(script, capsys, tmp_path, monkeypatch):
    """`--out_dir=$OUT` with OUT unset gives an empty path, which is the current folder: demo.py wrote its outputs
    wherever it was started (a checkout), exit 0. A text flag given empty is refused in one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"pips2.cli.{script}").main
    flag = EMPTY_FLAGS[script]
    # also fire's own quoting of the empty text (`--out_dir="''"`) and white space only (a folder named " ")
    for argv in ([f"--{flag}="], [f"--{flag}", ""], [f"--{flag}=''"], [f"--{flag}= "]):
        _, code, out, err = _run(main, argv, capsys)
        assert code == 2 and err.strip().splitlines() == [
            f"error: prog.py: --{flag} is empty (an unset shell variable?); give it a value or leave the flag out"], err
    # `--out_dir= x` (a space after the =): fire took x for a positional value, and the error named another flag
    _, code, out, err = _run(main, [f"--{flag}=", "x"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: prog.py: --{flag}= is empty and 'x' follows it as a word of its own: write --{flag}=x (no space after "
        f"the =)"], err
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_empty_path_and_takes_an_empty_exp_name(capsys, tmp_path, monkeypatch):
    train = importlib.import_module("pips2.cli.train")
    monkeypatch.chdir(tmp_path)
    for argv, msg in ((["--ckpt_dir="], "error: prog.py: --ckpt_dir is empty (an unset shell variable?)"),
                      (["--stage2_log_dir=", "--stages=1,2"], "error: prog.py: --stage2_log_dir is empty"),
                      (["--exp_name=", "--max_steps=0"], "error: --max_steps must be at least 1, got 0")):
        monkeypatch.setattr("sys.argv", ["prog.py", *argv])
        with pytest.raises(SystemExit) as e:
            train.cli()
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(msg), err


def test_a_removed_working_folder_is_one_line(tmp_path):
    """Run from a folder removed under the shell: `error: [Errno 2] No such file or directory`, or torch's import
    failing with `Intel oneMKL FATAL ERROR`. Every program now says it in one line, exit 2, before importing torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, subprocess, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
            "sys.exit(subprocess.run([sys.executable, sys.argv[2], '--help']).returncode)")
    for script in ("demo.py", "make_synthetic_pod.py", "test_on_pod.py"):
        res = subprocess.run([sys.executable, "-c", code, str(gone), str(root / script)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.strip() == (
            "error: the folder this program runs from was removed; cd to an existing folder and run it again"), \
            res.stderr[-1000:]
        gone.mkdir()
    # a program already running (torch loaded) that imports the commands, as torch.hub.load does: not ended by it
    code = ("import os, sys, torch; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); import pips2.cli.torch_hub; "
            "print('imported')")
    res = subprocess.run([sys.executable, "-c", code, str(gone)], capture_output=True, text=True, timeout=120,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0 and res.stdout.strip() == "imported", res.stderr[-1000:]
