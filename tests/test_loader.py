"""The one model loader (pips2/hub.py): its folder rules for both models, the kind read from the file and checked
against --model, the hub names wherever a checkpoint is accepted (demo.py, the web demo, torch.hub), and its error
lines (one line naming what was looked for and how to get it; exit 2 from the scripts)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import golden_model, golden_state_dict, run_main, tar_bytes, torch_bytes

import pips2
from pips2 import hub, webapp
from pips2.cli import demo, export_onnx
from pips2.nets.lbm import LBM
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils import checkpoint
from pips2.utils.checkpoint import CheckpointError
from pips2.utils.video import write_mp4

ROOT = Path(__file__).resolve().parents[1]
SMALL_LBM: dict[str, Any] = dict(input_size=(64, 96), embed_dim=32, num_layers=2, num_neighbors=4, top_k_regions=4,
                                 memory_size=4)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lbm_model():
    torch.manual_seed(0)
    return LBM(**SMALL_LBM).eval()


@pytest.fixture(scope="module")
def lbm_only(tmp_path_factory, lbm_model):
    """A folder holding only lbm.pt (the authors' {'model': ...} with DDP's `module.` prefixes)."""
    folder = tmp_path_factory.mktemp("lbm_only")
    torch.save({"model": {f"module.{k}": v for k, v in lbm_model.state_dict().items()}}, folder / "lbm.pt")
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 10-frame 150x130 (WxH) mp4."""
    d = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    base = (rng.random((180, 260, 3)) * 255).astype(np.uint8)
    write_mp4(d / "in.mp4", (base[t:t + 130, 2 * t:2 * t + 150] for t in range(10)))
    return d / "in.mp4"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache for the hub names, and no address given for them."""
    monkeypatch.setenv("PIPS2_CACHE", str(tmp_path / "cache"))
    for name in hub.KNOWN:
        monkeypatch.delenv(f"PIPS2_URL_{name.upper()}", raising=False)
        monkeypatch.delenv(f"PIPS2_SHA256_{name.upper()}", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def reference_tarball(tmp_path_factory) -> Path:
    """The authors' reference_model.tar.gz, holding the golden weights, as copied by hand for an offline machine."""
    path = tmp_path_factory.mktemp("www") / "reference_model.tar.gz"
    path.write_bytes(tar_bytes({"reference_model/model-000200000.pth":
                                torch_bytes({"model_state_dict": golden_state_dict()})}))
    return path


def _one_line(e, *parts) -> str:
    line = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in line, line
    for p in parts:
        assert str(p) in line, (p, line)
    return line


# ---------------------------------------------------------------------------------------------------------
# One set of folder rules for both models


def test_folder_rules_are_the_same_for_both_models(tmp_path, lbm_model, lbm_only):
    # a folder holding only lbm.pt is LBM (load_model guessed PIPs++ and failed)
    model = pips2.load_model(lbm_only)
    assert isinstance(model, LBM) and not model.training and _same(model, lbm_model)
    # a folder holding one *.pth of PIPs++ that is not named model-*.pth (refused as "no checkpoint here")
    one = tmp_path / "one"
    hub.save_authors_format(golden_model(), one / "weights.pth")
    assert isinstance(pips2.load_model(one), Pips)
    # model-*.pth: the newest, or the step asked for; a file given as itself
    run = tmp_path / "run"
    checkpoint.save(run, 5, golden_model())
    torch.manual_seed(1)
    other = Pips()
    checkpoint.save(run, 10, other)
    assert _same(hub.load_model(run), other) and _same(hub.load_model(run, step=5), golden_model())
    assert _same(hub.load_model(run / "model-000000005.pth"), golden_model())
    with pytest.raises(hub.HubError) as e:
        hub.load_model(run, step=6)
    _one_line(e, f"{run}: no checkpoint for step 6 (have [5, 10])")
    # more than one candidate and no model-*.pth: named, not guessed
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.pt", "b.pth"):
        (two / name).write_bytes((lbm_only / "lbm.pt").read_bytes())
    with pytest.raises(hub.HubError) as e:
        hub.load_model(two)
    _one_line(e, f"{two}: 2 checkpoint files (a.pt, b.pth) and no model-*.pth; pass the one to load")
    # a file in training's layout with its optimizer state loads too, and into a model being trained
    checkpoint.save(tmp_path / "lbm_run", 3, lbm_model, optimizer=torch.optim.Adam(lbm_model.parameters()),
                    layout=checkpoint.LBM_LAYOUT)
    assert _same(hub.load_model(tmp_path / "lbm_run", kind="lbm"), lbm_model)


def test_the_kind_is_read_from_the_file_and_checked_not_guessed(tmp_path, lbm_only, cache):
    pips_file = hub.save_authors_format(golden_model(), tmp_path / "ref" / "model-000000001.pth")
    with pytest.raises(CheckpointError) as e:
        hub.load_model(pips_file, kind="lbm")
    _one_line(e, f"{pips_file}: holds a PIPs++ model ({{'model_state_dict': ...}}), not an LBM one (--model=lbm); "
                 f"pass --model=pips2")
    with pytest.raises(CheckpointError) as e:
        hub.load_model(lbm_only, kind="pips2")
    _one_line(e, f"{lbm_only / 'lbm.pt'}: holds an LBM model ({{'model': ...}}), not a PIPs++ one", "--model=lbm")
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)  # a bare state_dict is LBM's layout: the strict load names the keys
    with pytest.raises(CheckpointError) as e:
        hub.load_model(bare, kind="pips2")
    _one_line(e, f"{bare}: holds an LBM model (a bare state_dict), not a PIPs++ one")
    torch.save({"step": 3}, bare)
    with pytest.raises(CheckpointError) as e:
        hub.load_model(bare)
    _one_line(e, f"{bare}: not a checkpoint of either model (expected {{'model_state_dict': ...}} for PIPs++")
    # a hub name of the other model: said before anything is fetched
    with pytest.raises(hub.HubError) as e:
        hub.load_model("lbm", kind="pips2")
    _one_line(e, "lbm: the hub name of the LBM model, but --model=pips2; pass --model=lbm")
    assert not cache.exists()


def test_plan_amp_and_memory(lbm_only):
    """PIPs++ gets the inference plan for its device and amp; LBM runs in float32 only and takes memory_size."""
    pips_dir = lbm_only.parent / "pips_plan"
    if not pips_dir.exists():
        checkpoint.save(pips_dir, 1, golden_model())
    model = hub.load_model(pips_dir, "cpu", amp="bf16")
    assert model.plan == ExecPlan.auto("cpu", torch.bfloat16)
    assert hub.load_model(pips_dir, "cpu").plan == ExecPlan.auto("cpu", torch.float32)
    with pytest.raises(ValueError) as e:
        hub.load_model(lbm_only, amp="bf16")
    assert _one_line(e) == "--amp=bf16: LBM runs in float32 only; leave --amp at none"
    assert hub.load_model(lbm_only, memory_size=7).memory_size == 7
    with pytest.raises(ValueError, match="--memory_size must be a whole number from 1 to 256, got 0"):
        hub.load_model(lbm_only, kind="lbm", memory_size=0)


# ---------------------------------------------------------------------------------------------------------
# Errors: what was looked for and how to get it


def test_a_missing_checkpoint_names_every_way_to_get_one(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError) as e:
        hub.load_model("nothing", kind="pips2")
    line = _one_line(e, "nothing: no such checkpoint file or folder, and not a hub name (pips2, lbm); ",
                     "./get_reference_model.sh", "REF_MODEL_URL=file:///path/to/reference_model.tar.gz",
                     f"--init_dir=pips2) fetches it once into {cache / 'reference_model'}",
                     "PIPS2_URL_PIPS2=file:///path/to/reference_model.tar.gz")
    assert "make demo" not in line and "lbm" not in line.split("(pips2, lbm); ")[1]
    # the model `make demo` trained is named once there is one: the newest run
    for run in ("run1", "run2"):
        checkpoint.save(tmp_path / "demo_out" / "checkpoints" / run, 5, golden_model())
        when = 1e9 if run == "run1" else 2e9
        os.utime(tmp_path / "demo_out" / "checkpoints" / run, (when, when))
    with pytest.raises(hub.HubError) as e:
        hub.load_model(tmp_path / "empty_dir_missing", kind="pips2")
    _one_line(e, "or --init_dir=demo_out/checkpoints/run2/ (the small model `make demo` trained)")
    # LBM: where lbm.pt comes from
    with pytest.raises(hub.HubError) as e:
        hub.load_model("lbm.pt", kind="lbm")
    line = _one_line(e, "lbm.pt: no such checkpoint file or folder", "the hub name lbm (--init_dir=lbm) fetches the "
                     "authors' LBM weights (lbm.pt, huggingface.co/ZhengGuangze/LBM) once into",
                     "PIPS2_URL_LBM=file:///path/to/lbm.pt", "hf download ZhengGuangze/LBM lbm.pt")
    assert "get_reference_model" not in line
    with pytest.raises(ValueError) as e:
        hub.load_model(None, kind="lbm")
    _one_line(e, "--model=lbm needs --init_dir", "--init_dir=lbm", "huggingface.co/ZhengGuangze/LBM")


@pytest.mark.parametrize("flags,parts", [
    (dict(init_dir="{tmp}/none"), ["{tmp}/none: no such checkpoint file or folder", "./get_reference_model.sh",
                                   "--init_dir=pips2", "PIPS2_URL_PIPS2=file://"]),
    (dict(model="lbm"), ["--model=lbm needs --init_dir", "--init_dir=lbm", "PIPS2_URL_LBM=file://"]),
    (dict(init_dir="{lbm}"), ["holds an LBM model", "pass --model=lbm"]),
    (dict(model="lbm", init_dir="{lbm}", amp="bf16"), ["--amp=bf16: LBM runs in float32 only"]),
    (dict(model="lbm", init_dir="pips2"), ["pips2: the hub name of the PIPs++ model, but --model=lbm"]),
])
def test_scripts_say_it_in_one_line_and_exit_2(tmp_path, clip, lbm_only, cache, capsys, flags, parts):
    flags = {k: v.format(tmp=tmp_path, lbm=lbm_only) for k, v in flags.items()}
    res = run_main(demo.main, capsys, video=str(clip), S=8, iters=1, out_dir=str(tmp_path / "out"), **flags)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for p in parts:
        assert p.format(tmp=tmp_path) in lines[0], (p, lines[0])
    assert not (tmp_path / "out").exists()


def test_export_onnx_names_the_hub_name_too(tmp_path, cache, capsys):
    res = run_main(export_onnx.main, capsys, init_dir=str(tmp_path / "none"), out=str(tmp_path / "m.onnx"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "./get_reference_model.sh" in lines[0] and "--init_dir=pips2" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# The hub names wherever a checkpoint is accepted, and the lbm.pt-only folder through every entry point


def test_demo_init_dir_pips2_fetches_the_reference_model_from_a_file_url(tmp_path, clip, reference_tarball):
    """`demo.py --init_dir=pips2` answered "no checkpoint here ... or pass --init_dir"; offline, the tarball copied
    by hand is given as a file:// URL."""
    env = {**os.environ, "PIPS2_CACHE": str(tmp_path / "cache"), "PIPS2_URL_PIPS2": reference_tarball.as_uri(),
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--init_dir=pips2", f"--video={clip}", "--S=8",
                          "--iters=1", "--grid_size=2", f"--out_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "with pips2" in res.stdout and "summary: 4 points x 10 frames" in res.stdout
    assert (tmp_path / "cache" / "reference_model" / "model-000200000.pth").is_file()
    assert np.load(tmp_path / "out" / "tracks.npz")["tracks"].shape == (10, 4, 2)


def test_the_lbm_only_folder_through_every_entry_point(tmp_path, clip, lbm_model, lbm_only, capsys, monkeypatch):
    # the library, and training's --init_dir (load_into: the weights into a model being trained)
    assert _same(pips2.load_model(lbm_only), lbm_model)
    torch.manual_seed(5)
    fresh = LBM(**SMALL_LBM)
    path, ckpt = hub.load_into(fresh, lbm_only, "lbm")
    assert path == lbm_only / "lbm.pt" and _same(fresh, lbm_model) and list(ckpt) == ["model"]
    # demo.py --model=lbm
    res = run_main(demo.main, capsys, video=str(clip), model="lbm", init_dir=str(lbm_only), grid_size=2,
                   out_dir=str(tmp_path / "out"))
    assert res.returncode == 0 and "summary: 4 points x 10 frames" in res.stdout, res.stderr[-2000:]
    # the web demo: offered as ready, and loaded as LBM
    app = webapp.App(init_dir=str(lbm_only), model="lbm", clip_dir=tmp_path / "clips")
    try:
        assert app.choice("lbm", str(lbm_only)).state == "ready"
        net = app.load_net("lbm", str(lbm_only))
        assert net is not None and _same(net, lbm_model)
    finally:
        app.close()
    # torch.hub
    model = torch.hub.load(str(ROOT), "lbm", source="local", checkpoint=str(lbm_only))
    assert isinstance(model, LBM) and _same(model, lbm_model)


def test_torch_hub_entry_points(tmp_path, monkeypatch, reference_tarball, lbm_only, lbm_model, cache):
    """hubconf.py: `pips2` and `lbm`, the hub names fetched from file:// URLs (no network), a checkpoint path, or
    random weights."""
    monkeypatch.setenv("PIPS2_URL_PIPS2", reference_tarball.as_uri())
    model = torch.hub.load(str(ROOT), "pips2", source="local", device="cpu")
    assert isinstance(model, Pips) and not model.training and _same(model, golden_model())
    assert (cache / "reference_model" / "model-000200000.pth").is_file()
    monkeypatch.setenv("PIPS2_URL_LBM", (lbm_only / "lbm.pt").as_uri())
    model = torch.hub.load(str(ROOT), "lbm", source="local", memory_size=6)
    assert isinstance(model, LBM) and model.memory_size == 6 and (cache / "lbm.pt").is_file()
    random = torch.hub.load(str(ROOT), "pips2", source="local", pretrained=False)
    assert isinstance(random, Pips) and not _same(random, golden_model())
    with pytest.raises(CheckpointError, match="holds an LBM model"):
        torch.hub.load(str(ROOT), "pips2", source="local", checkpoint=str(lbm_only))
