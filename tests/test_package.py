"""`pip install .` gives a package and console commands that work outside the checkout."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"pips2-export": "dataset_location", "pips2-train": "dataset_location", "pips2-eval-pod": "init_dir",
            "pips2-eval-tap": "init_dir", "pips2-eval-cro": "init_dir", "pips2-demo": "init_dir",
            "pips2-export-onnx": "init_dir", "pips2-synthetic": "n_points", "pips2-app": "port"}
# no network and no dependencies: the running environment's setuptools builds it, its packages serve the imports
PIP_OFFLINE = ["--quiet", "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
# one module of each subpackage, printed by a child process: where did each come from?
WHERE = ("import pips2, pips2.cli.train, pips2.nets.pips2, pips2.tracking, pips2.datasets.synthetic\n"
         "for m in (pips2, pips2.cli.train, pips2.nets.pips2, pips2.tracking, pips2.datasets.synthetic): "
         "print(m.__file__)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A regular (not editable) install of the checkout into a folder of its own: (folder, environment)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # no network and no dependencies: the venv's setuptools builds it, the venv's packages serve the imports
    subprocess.run([sys.executable, "-m", "pip", "install", *PIP_OFFLINE, "--target", str(target), str(ROOT)],
                   check=True, cwd=build, env={**os.environ, "TMPDIR": str(build)})
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return target, env


def run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """A command away from the checkout."""
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_installed_package_is_imported_not_the_checkout(installed, tmp_path):
    target, env = installed
    res = run([sys.executable, "-c", WHERE], env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    files = res.stdout.split()
    assert len(files) == 5 and all(Path(f).is_relative_to(target / "pips2") for f in files), files
    assert (target / "pips2" / "webapp.html").is_file()  # package data: the web demo's page
    assert not (target / "pips2" / "tests").exists() and not (target / "tests").exists()
    # the top-level scripts are the checkout's callers, not modules for site-packages (`import train` anywhere)
    assert not [p.name for p in target.glob("*.py")]


def test_editable_install_runs_the_checkout(tmp_path):
    """`pip install -e .` into a fresh venv: its commands run the checkout's own files, from any folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the running environment's packages (torch, fire...) as plain folders: their .pth files, and so an editable
    # pips2 installed there, are not processed, so only the new venv's install can provide pips2
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(purelib) / "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    # the running environment's own pips2 install (the Makefile's `pip install -e .`), which must survive
    ours = [d.locate_file(f) for d in importlib.metadata.distributions(name="pips2") for f in d.files or []]
    # --ignore-installed: the pips2 the new venv sees through deps.pth is another environment's; never uninstall it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", *PIP_OFFLINE, "--ignore-installed",
                    "-e", str(ROOT)], check=True, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert all(Path(str(f)).exists() for f in ours), "installing into the new venv removed the running one's pips2"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    res = run([str(py), "-c", WHERE], env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    # pips2/nets etc. are symlinks to the top-level folders: compare the files they resolve to
    files = [Path(f).resolve() for f in res.stdout.split()]
    assert files == [ROOT / "pips2" / "__init__.py", ROOT / "pips2" / "cli" / "train.py", ROOT / "nets" / "pips2.py",
                     ROOT / "pips2" / "tracking.py", ROOT / "datasets" / "synthetic.py"], files
    res = run([str(venv / "bin" / "pips2-eval-pod"), "--help"], {**env, "PAGER": "cat"}, tmp_path)
    assert res.returncode == 0 and "init_dir" in res.stdout + res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_console_command_shows_its_flags(installed, tmp_path, command):
    target, env = installed
    exe = target / "bin" / command
    assert exe.is_file(), f"{command} was not installed"
    res = run([str(exe), "--help"], {**env, "PAGER": "cat"}, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert COMMANDS[command] in res.stdout + res.stderr
    if command == "pips2-train":  # its own usage line (main takes **flags) names the command it runs as
        assert res.stdout.startswith("usage: pips2-train "), res.stdout[:200]


def test_synthetic_then_export_outside_the_checkout(installed, tmp_path):
    target, env = installed
    res = run([str(target / "bin" / "pips2-synthetic"), "--out=pod", "--train=1", "--test=0", "--W=256", "--H=192",
               "--T=12", "--n_points=200"], env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "pod" / "train" / "synth_0000").is_dir()
    res = run([str(target / "bin" / "pips2-export"), "--dataset_location=pod", "--dset=train", "--S=8", "--N=16",
               "--crop_size=128,128", "--out_dir=clips", "--workers=1", "--max_iters=2", "--quiet=True"],
              env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    clips = sorted((tmp_path / "clips").rglob("*.npz"))
    assert clips, res.stdout
    with np.load(clips[0], allow_pickle=False) as z:
        assert any(v.shape[:1] == (8,) for v in (z[k] for k in z.files))


def test_tests_and_benchmarks_import_the_package_not_the_scripts():
    """`import train` works only with the checkout's root on sys.path (python -m pytest run from it); the tests and
    benchmarks import pips2.cli instead, so they also run against an installed copy."""
    scripts = {p.stem for p in ROOT.glob("*.py")}
    assert {"train", "demo", "test_on_pod", "export_mp4_dataset"} <= scripts
    offenders = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n and n.split(".")[0] in scripts]
    assert not offenders, offenders
