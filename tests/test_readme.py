"""The README's examples run as written: its Python blocks are executed here (CPU, no network) beside a checkpoint
and a clip, and every command line it shows names a script that exists and flags that script accepts."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import golden_model

from pips2.datasets.synthetic import write_synthetic_video
from pips2.hub import save_authors_format

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the scripts at the top of the checkout and the module whose `main` takes their flags
SCRIPTS = {"train.py": "train", "export_mp4_dataset.py": "export", "test_on_pod.py": "eval_pod",
           "test_on_tap.py": "eval_tap", "test_on_cro.py": "eval_cro", "demo.py": "demo", "app.py": "app",
           "export_onnx.py": "export_onnx", "make_synthetic_pod.py": "synthetic"}


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, flags=re.S | re.M)


def commands() -> list[list[str]]:
    """Every `python <script>.py ...` or `torchrun ... <script>.py ...` command of the bash blocks, continuation
    lines joined and comments dropped, as argv from the script on."""
    out = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and not w.startswith("--")]
            if words and words[0] in ("python", "torchrun") and scripts:
                out.append(words[scripts[0]:])
    return out


def test_the_readme_has_examples_to_check():
    assert len(blocks("python")) >= 1
    assert len(commands()) >= 20


def test_every_command_names_a_script_and_flags_it_accepts():
    """A flag spelled wrong in the README (or renamed in the code) is caught here, without running the job."""
    from pips2.cli.train import ALIASES
    from pips2.trainer import Config

    train_flags = {f.name for f in fields(Config)} | set(ALIASES) | {"stage", "stages"}
    wrong = []
    for argv in commands():
        script, flags = argv[0], [w for w in argv[1:] if w.startswith("--")]
        if script not in SCRIPTS:
            wrong.append(f"{script}: no such script")
            continue
        assert (ROOT / script).is_file(), script
        main = importlib.import_module(f"pips2.cli.{SCRIPTS[script]}").main
        params = set(main.__code__.co_varnames[: main.__code__.co_argcount + main.__code__.co_kwonlyargcount])
        accepted = train_flags if script == "train.py" else params
        for flag in flags:
            name = flag[2:].split("=", 1)[0]
            name = re.sub(r"^stage[12]_", "", name) if script == "train.py" else name
            if name not in accepted:
                wrong.append(f"{script}: --{name}")
    assert not wrong, wrong


def test_the_check_catches_a_wrong_flag(monkeypatch):
    """The check above is not vacuous: a README with a misspelled flag fails it."""
    monkeypatch.setattr(sys.modules[__name__], "README",
                        "```bash\npython demo.py --vidoe=clip.mp4\n```\n" + README)
    with pytest.raises(AssertionError, match="demo.py: --vidoe"):
        test_every_command_names_a_script_and_flags_it_accepts()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs_as_written(index, tmp_path):
    """Each Python block, run in a folder holding ./reference_model (a checkpoint in the authors' format) and
    clip.mp4, on this machine's CPU torch, with no network."""
    save_authors_format(golden_model(), tmp_path / "reference_model" / "model-000000001.pth")
    write_synthetic_video(tmp_path / "clip.mp4", seed=0, frames=12, hw=(128, 160))
    code = blocks("python")[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"README's Python block {index + 1} failed:\n{code}\n{res.stderr[-3000:]}"
    assert not torch.cuda.is_available()  # "auto" and the examples' devices resolved to the CPU here
