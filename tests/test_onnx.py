"""ONNX export with fixed S and dynamic N; onnxruntime agrees with PyTorch (1e-3 px at one iteration).

One refinement iteration: export time grows with the traced graph (~560 nodes per iteration, half the
graph at iters=1). Later iterations add only the feats2/feats4 refresh (a constant frame index, then the
bilinear sampling the first iteration's templates use); test_golden.py checks the export plan's numbers
over four iterations.
"""

import re

import pytest
import torch
from helpers import golden_model

pytest.importorskip("onnxruntime", reason="optional: pip install -r requirements-onnx.txt")

from pips2.cli import export_onnx  # noqa: E402
from pips2.nets.plan import ExecPlan  # noqa: E402

S, HW, ITERS = 6, (128, 128), 1


def test_onnx_matches_pytorch_for_several_n(tmp_path):
    model = golden_model()
    path = export_onnx.export(model, tmp_path / "m.onnx", S=S, model_hw=HW, iters=ITERS)
    assert model.plan == ExecPlan.export()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written in a temp folder, renamed
    diffs = export_onnx.check(path, golden_model(), S=S, model_hw=HW, iters=ITERS, Ns=(3, 17))
    assert diffs["onnx"] < 1e-3 and export_onnx.agrees(diffs)
    # the check is not vacuous: a different model is far off
    other = golden_model()
    with torch.no_grad():
        other.delta_block.dense.bias.add_(1.0)
    diffs = export_onnx.check(path, other, S=S, model_hw=HW, iters=ITERS, Ns=(3,))
    assert diffs["onnx"] > 1e-2 and not export_onnx.agrees(diffs)


def test_cli_passes_a_model_whose_float32_rounding_grows_with_the_iterations(tmp_path, capsys):
    """Random weights at two iterations: PyTorch's float32 already lies ~2e-3 px from float64, and so does
    onnxruntime (a fixed 1e-3 px tolerance refused such exports); the CLI judges against that distance."""
    from helpers import run_main

    from pips2.nets.pips2 import Pips
    from pips2.utils import checkpoint

    torch.manual_seed(0)
    checkpoint.save(tmp_path / "ck", 1, Pips().eval())
    res = run_main(export_onnx.main, capsys, init_dir=str(tmp_path / "ck"), out=str(tmp_path / "r.onnx"), S=6, H=128,
                   W=128, iters=2)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("summary: "))
    _, f64, torch_f64 = (float(v) for v in re.findall(r"([0-9.]+e[-+][0-9]+) px", line))
    assert torch_f64 > 5e-4 and f64 <= 4 * torch_f64 + 1e-3, line  # (here onnx is ~3e-3 px)
    assert f"{tmp_path / 'r.onnx'} (" in res.stdout and f"{tmp_path / 'r.onnx.data'} (" in res.stdout


@pytest.mark.parametrize("flags,line", [
    (dict(S=0), "error: --S must be from 2 to 256, got 0"),
    (dict(H=-1), "error: --H must be from 128 to 2048, got -1"),
    (dict(W=100000), "error: --W must be from 128 to 2048, got 100000"),
    (dict(iters=10**6), "error: --iters must be from 1 to 64, got 1000000"),
])
def test_cli_flags_out_of_range_are_one_line_before_the_model_loads(tmp_path, capsys, flags, line):
    """--S=0 and --H=-1 were tracebacks from inside the export, after the model had loaded."""
    from helpers import run_main

    res = run_main(export_onnx.main, capsys, init_dir=str(tmp_path / "no_such_checkpoint"),
                   out=str(tmp_path / "r.onnx"), **flags)
    assert res.returncode == 2 and res.stderr.strip() == line, res
    assert not list(tmp_path.iterdir())


def test_cli_out_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path, capsys):
    """A folder or a missing folder as --out were tracebacks, the second after the whole export had run."""
    from helpers import run_main

    for out, line in ((tmp_path, f"error: --out={tmp_path} is a folder; name the .onnx file to write"),
                      (tmp_path / "no" / "x.onnx", f"error: --out={tmp_path / 'no' / 'x.onnx'}: no such folder "
                                                   f"{tmp_path / 'no'}")):
        res = run_main(export_onnx.main, capsys, init_dir=str(tmp_path / "no_such_checkpoint"), out=str(out))
        assert res.returncode == 2 and res.stderr.strip() == line, res
    try:  # a folder that takes no file, even for root (sysfs): it failed in a traceback after the model loaded
        open("/sys/.pips2_probe", "wb").close()
    except OSError:
        res = run_main(export_onnx.main, capsys, init_dir=str(tmp_path / "no_such_checkpoint"), out="/sys/x.onnx")
        assert res.returncode == 2 and res.stderr.startswith("error: --out=/sys/x.onnx: cannot write in /sys ("), res


def test_cli_out_never_replaces_the_checkpoint(tmp_path, capsys):
    """--out naming the --init_dir checkpoint replaced the 70 MB checkpoint by the graph, exit 0: refused before the
    model loads, the checkpoint untouched."""
    from helpers import run_main

    from pips2.utils import checkpoint

    ck = checkpoint.save(tmp_path / "ck", 1, golden_model())
    before = ck.read_bytes()
    for init_dir in (ck, ck.parent):
        res = run_main(export_onnx.main, capsys, init_dir=str(init_dir), out=str(ck), S=4, H=128, W=128, iters=1)
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: --out={ck} would overwrite the checkpoint --init_dir={init_dir} ({ck.resolve()}); give another "
            f"--out"), res.stderr
    assert ck.read_bytes() == before


def test_the_graph_and_its_sidecar_are_renamed_together(tmp_path, monkeypatch):
    """A stop between the sidecar's rename and the graph's paired the new weights with the old graph; a new graph
    without a sidecar left the older export's <out>.data beside it."""
    import os
    import signal

    from pips2.utils.procs import Stopped, stopping_on_signals

    out = tmp_path / "m.onnx"
    out.write_text("old graph")
    out.with_name("m.onnx.data").write_text("old weights")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "m.onnx").write_text("new graph")
    (tmp / "m.onnx.data").write_text("new weights")
    renames = []

    def replace_then_stop(src, dst):
        renames.append(dst)
        os.rename(src, dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop right after the first rename

    monkeypatch.setattr(export_onnx.os, "replace", replace_then_stop)
    with pytest.raises(Stopped), stopping_on_signals():
        export_onnx.install(tmp, out)
    assert len(renames) == 2 and out.read_text() == "new graph"
    assert out.with_name("m.onnx.data").read_text() == "new weights"
    # a graph that keeps its weights inside: the older sidecar goes
    monkeypatch.undo()
    (tmp / "m.onnx").write_text("newer graph")
    export_onnx.install(tmp, out)
    assert out.read_text() == "newer graph" and not out.with_name("m.onnx.data").exists()


def test_cli_out_replaces_only_an_earlier_export(tmp_path, capsys):
    """--out was renamed over whatever it named: a user's file and its `.data` neighbour, a link, a device node
    (`--out=/dev/null` as root made /dev/null a regular file). Only an earlier export's graph (and its sidecar) is
    replaced now; anything else is refused before the model loads."""
    import os

    from helpers import run_main

    from pips2.utils import checkpoint

    ck = checkpoint.save(tmp_path / "ck", 1, golden_model())
    notes, link, fifo = tmp_path / "notes.txt", tmp_path / "stdout", tmp_path / "fifo"
    notes.write_text("the user's")
    link.symlink_to(notes)
    os.mkfifo(fifo)
    alone = tmp_path / "alone.onnx"
    alone.with_name("alone.onnx.data").write_text("the user's too")
    for out in (notes, link, fifo):
        res = run_main(export_onnx.main, capsys, init_dir=str(ck), out=str(out), S=4, H=128, W=128, iters=1)
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: --out={out} exists and is not an ONNX graph this program wrote; give another name"), res.stderr
    res = run_main(export_onnx.main, capsys, init_dir=str(ck), out=str(alone), S=4, H=128, W=128, iters=1)
    assert res.returncode == 2 and "alone.onnx.data exists and is not the weights of an earlier export" in res.stderr
    assert notes.read_text() == "the user's" and link.is_symlink() and fifo.is_fifo()
    # an earlier export is replaced, its sidecar with it; the temp folder of an export killed outright goes
    import socket
    import subprocess
    import sys

    from helpers import left_by_a_killed_owner

    from pips2.utils.procs import pid_namespace

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed = tmp_path / f".m.onnx.tmp.{socket.gethostname()}.{dead}.{pid_namespace()}.abc123"
    killed.mkdir()
    (killed / "m.onnx.data").write_bytes(bytes(1000))
    left_by_a_killed_owner(killed)
    out = tmp_path / "m.onnx"
    for _ in range(2):
        res = run_main(export_onnx.main, capsys, init_dir=str(ck), out=str(out), S=4, H=128, W=128, iters=1,
                       verify=False)
        assert res.returncode == 0 and export_onnx.written_here(out), res.stderr
    assert not killed.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx")]


def test_cli_a_full_disk_is_one_line_and_keeps_the_earlier_export(tmp_path, capsys, monkeypatch):
    """The weights' sidecar not fitting on the disk ended in a 24-frame traceback from inside the ONNX writer. Now
    one line, exit 1, the earlier export as it was and no temp folder left."""
    import errno
    import os

    from helpers import run_main

    from pips2.utils import checkpoint

    ck = checkpoint.save(tmp_path / "ck", 1, golden_model())
    out = tmp_path / "m.onnx"
    res = run_main(export_onnx.main, capsys, init_dir=str(ck), out=str(out), S=4, H=128, W=128, iters=1,
                   verify=False)
    assert res.returncode == 0, res.stderr
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_onnx.torch.onnx, "export", full)
    res = run_main(export_onnx.main, capsys, init_dir=str(ck), out=str(out), S=4, H=128, W=128, iters=1,
                   verify=False)
    assert res.returncode == 1 and res.stderr.strip() == (
        f"error: cannot write {out} and its weights (no space left on device); an earlier one is kept as it was")
    assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx")]
