"""Export PIPs++ to ONNX with a fixed clip length S and image size and a dynamic number of points N, then
check onnxruntime against PyTorch. Needs `pip install -r requirements-onnx.txt`.

    python export_onnx.py --init_dir=./reference_model --S=36 --H=256 --W=384 --iters=6 --out=pips2.onnx
    python export_onnx.py --init_dir=pips2     # the hub name: the authors' model, fetched once (docs/MODELS.md)
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pips2.hub import HubError, find_file, load_model
from pips2.nets.pips2 import MIN_SIZE
from pips2.nets.plan import ExecPlan
from pips2.tracking import MAX_ITERS
from pips2.utils.checkpoint import CheckpointError
from pips2.utils.cli import die, run_fire
from pips2.utils.paths import check_writable, output_folder_problem, same_file
from pips2.utils.procs import (
    Stopped,
    exit_code,
    held_stops,
    is_space_error,
    os_error_in,
    owned_tempdir,
    remove_owned,
    remove_stale_tempdirs,
    stopping_on_signals,
)


class TrackerForExport(torch.nn.Module):
    """(trajs_e0 (1,S,N,2), rgbs (1,S,3,H,W) in [0,255]) -> final tracks (1,S,N,2), iters fixed."""

    def __init__(self, model, iters: int):
        super().__init__()
        self.model, self.iters = model, iters
        model.set_plan(ExecPlan.export())  # traceable forms; no chunk size computed from N, which would pin N

    def forward(self, trajs_e0: torch.Tensor, rgbs: torch.Tensor) -> torch.Tensor:
        return self.model(trajs_e0, rgbs, iters=self.iters)[0][-1]


def export(model, out: str | Path, S: int, model_hw: tuple[int, int], iters: int) -> Path:
    """Write the ONNX graph (opset from the dynamo exporter) with N as a dynamic axis. It and its weights' sidecar
    (<out>.data) are written in a temp folder beside --out and renamed into place once both are complete: a stop
    mid-way leaves the old files as they were, and no temp."""
    wrapper = TrackerForExport(model.eval(), iters).eval()
    H, W = model_hw
    g = torch.Generator().manual_seed(0)
    rgbs = torch.rand(1, S, 3, H, W, generator=g) * 255
    trajs = (torch.rand(1, 1, 8, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])).repeat(1, S, 1, 1)
    N = torch.export.Dim("N", min=1, max=65536)
    out = Path(out)
    # named by its owner: what a killed export (SIGKILL, the OOM killer) left, up to a model's size, goes now
    remove_stale_tempdirs(f".{out.name}.tmp", out.parent)
    tmp = owned_tempdir(f".{out.name}.tmp", out.parent)
    try:
        torch.onnx.export(wrapper, (trajs, rgbs), str(tmp / out.name), dynamo=True,
                          dynamic_shapes={"trajs_e0": {2: N}, "rgbs": None}, input_names=["trajs_e0", "rgbs"],
                          output_names=["tracks"], verbose=False)
        install(tmp, out)
    finally:
        remove_owned(tmp)
    return out


def install(tmp: Path, out: Path) -> None:
    """Rename the graph written in `tmp` (and its sidecar, if any) to `out`, a stop signal held until both are
    in place: a stop between the two renames would pair the new weights with the old graph. An older
    export's sidecar that the new graph does not use is removed with it."""
    sidecar, old_sidecar = tmp / (out.name + ".data"), out.with_name(out.name + ".data")
    # judged again at the end: another user's file put at either name meanwhile (in /tmp, whose sticky bit then
    # refuses the rename over it) would leave the new weights beside a graph of theirs
    if problem := output_folder_problem(out.parent, "--out", (out.name, old_sidecar.name)):
        raise OSError(errno.EPERM, problem.removeprefix("--out: "))
    replaced = out.is_file()
    has_sidecar = sidecar.is_file()
    with held_stops():
        if has_sidecar:
            os.replace(sidecar, old_sidecar)
        try:
            os.replace(tmp / out.name, out)
        except OSError:
            if has_sidecar and not replaced:  # the weights of a graph that is not there: not left as a stray
                old_sidecar.unlink(missing_ok=True)
            raise
        # after the graph: killed between the two, the old graph would have lost its weights
        if not has_sidecar and replaced and old_sidecar.is_file() and not old_sidecar.is_symlink():
            old_sidecar.unlink()


# the traced clip is one window held whole in memory (S frames of H x W, their feature maps, the float64 copy
# the check runs): 256 frames of 2048 x 2048 is already tens of GB
MAX_S, MAX_SIDE = 256, 2048


def check_flags(S: int, H: int, W: int, iters: int, out: str | None = None) -> None:
    """ValueError naming the first of --S, --H, --W, --iters out of its range, or an --out that cannot be written
    (a folder, a missing folder), before the model loads."""
    for name, v, low, high in (("S", S, 2, MAX_S), ("H", H, MIN_SIZE, MAX_SIDE), ("W", W, MIN_SIZE, MAX_SIDE),
                               ("iters", iters, 1, MAX_ITERS)):
        if not low <= v <= high:
            raise ValueError(f"--{name} must be from {low} to {high}, got {v}")
    if out is not None:
        if Path(out).is_dir():
            raise ValueError(f"--out={out} is a folder; name the .onnx file to write")
        if not Path(out).parent.is_dir():
            raise ValueError(f"--out={out}: no such folder {Path(out).parent}")
        try:  # a folder that takes no file (read-only, /sys): a traceback after the model had loaded
            check_writable(Path(out).parent)
        except OSError as e:
            raise ValueError(f"--out={out}: cannot write in {Path(out).parent} ({e.strerror or e})") from None


def check_out_spares_input(out: str, init_dir: str) -> None:
    """ValueError when --out (or its weights' sidecar, <out>.data) is the checkpoint --init_dir names: the
    checkpoint was replaced by the graph, exit 0."""
    try:
        src = find_file(init_dir).resolve()
    except (HubError, OSError):
        return  # a hub name or nothing there: load_model says what is wrong
    for dest in (Path(out), Path(out).with_name(Path(out).name + ".data")):
        if same_file(dest, src):
            raise ValueError(f"--out={out} would overwrite the checkpoint --init_dir={init_dir} ({src}); give "
                             f"another --out")


def written_here(path: Path) -> bool:
    """Whether `path` is a regular file holding an ONNX graph PyTorch wrote: its model record opens with the IR
    version, then the producer's name, "pytorch" (protobuf keeps fields in number order)."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    return head[:1] == b"\x08" and b"\x12\x07pytorch" in head


def check_out_replaceable(out: str) -> None:
    """ValueError when --out, or its weights' sidecar <out>.data, exists and is not an earlier export's: the graph
    was renamed over whatever --out named (a user's file, a link, a device node such as /dev/null run as root)."""
    graph, sidecar = Path(out), Path(out).with_name(Path(out).name + ".data")
    if (graph.exists() or graph.is_symlink()) and not written_here(graph):
        raise ValueError(f"--out={out} exists and is not an ONNX graph this program wrote; give another name")
    if sidecar.exists() or sidecar.is_symlink():
        if not stat.S_ISREG(sidecar.lstat().st_mode) or not written_here(graph):
            raise ValueError(f"--out={out}: {sidecar} exists and is not the weights of an earlier export to --out; "
                             f"give another name (or remove it, if it is a stray of an export whose graph is gone)")


ONNX_FACTOR, ONNX_FLOOR = 4.0, 1e-3  # onnxruntime may be this many times as far from float64 as PyTorch's float32


def check(path: str | Path, model, S: int, model_hw: tuple[int, int], iters: int, Ns=(5, 37)) -> dict[str, float]:
    """Max differences in pixels over random clips with each N in Ns: onnxruntime vs PyTorch ("onnx"), and
    onnxruntime and PyTorch's float32 each vs PyTorch in float64 ("onnx_f64", "torch_f64").

    The tracker iterates, so float32 rounding grows with the iterations and with how settled the weights are
    (random weights at iters=6: pixels): onnxruntime, another float32 implementation, is judged against how far
    PyTorch's own float32 lies from float64 on the same clips, not against a fixed tolerance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f64 = copy.deepcopy(model).double().eval()
    H, W = model_hw
    worst = {"onnx": 0.0, "onnx_f64": 0.0, "torch_f64": 0.0}
    for k, n in enumerate(Ns):
        g = torch.Generator().manual_seed(10 + k)
        rgbs = torch.rand(1, S, 3, H, W, generator=g) * 255
        trajs = (torch.rand(1, 1, n, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])).repeat(1, S, 1, 1)
        with torch.no_grad():
            ref = model(trajs, rgbs, iters=iters)[0][-1].numpy()
            ref64 = f64(trajs.double(), rgbs.double(), iters=iters)[0][-1].numpy()
        got = sess.run(None, {"trajs_e0": trajs.numpy(), "rgbs": rgbs.numpy()})[0]
        for key, d in (("onnx", got - ref), ("onnx_f64", got - ref64), ("torch_f64", ref - ref64)):
            worst[key] = max(worst[key], float(np.abs(d).max()))
    return worst


def agrees(diffs: dict[str, float]) -> bool:
    """Whether onnxruntime is within ONNX_FACTOR times PyTorch float32's distance from float64 (+ ONNX_FLOOR)."""
    return diffs["onnx_f64"] <= ONNX_FACTOR * diffs["torch_f64"] + ONNX_FLOOR


def main(init_dir: str = "./reference_model", out: str = "pips2.onnx", S: int = 36, H: int = 256, W: int = 384,
         iters: int = 6, verify: bool = True) -> None:
    """Export, then (by default) compare onnxruntime with PyTorch at two values of N."""
    try:
        check_flags(S, H, W, iters, out)
        if problem := (output_folder_problem(out, "--out")
                       or output_folder_problem(Path(out).parent, "--out", (Path(out).name + ".data",))):
            raise ValueError(problem)
        check_out_spares_input(out, init_dir)
        check_out_replaceable(out)
        model = load_model(init_dir, "cpu", kind="pips2")
    except (ValueError, CheckpointError) as e:
        die(e)
    t0 = time.time()
    kept = "an earlier one is kept as it was" if Path(out).is_file() else "nothing written"
    try:
        with stopping_on_signals():
            path = export(model, out, S, (H, W), iters)
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"error: stopped by {name}: {out} not written ({kept})", file=sys.stderr, flush=True)
        sys.exit(exit_code(name))
    except (OSError, RuntimeError) as e:  # the graph or its weights' sidecar did not fit (a full disk, a quota)
        cause = os_error_in(e)
        if cause is None:
            raise
        why = "no space left on device" if is_space_error(e) else (cause.strerror or str(cause)).lower()
        print(f"error: cannot write {out} and its weights ({why}); {kept}", file=sys.stderr, flush=True)
        sys.exit(1)
    files = [path] + [p for p in (path.with_name(path.name + ".data"),) if p.is_file()]  # the weights' sidecar
    print(f"wrote {' + '.join(f'{p} ({p.stat().st_size / 2**20:.1f} MiB)' for p in files)} in "
          f"{time.time() - t0:.0f} s: S={S}, {H}x{W}, iters={iters}, N dynamic")
    if verify:
        d = check(path, load_model(init_dir, "cpu", kind="pips2"), S, (H, W), iters)
        print(f"summary: over N in (5, 37), onnxruntime vs PyTorch max |diff| {d['onnx']:.2e} px; vs float64 "
              f"{d['onnx_f64']:.2e} px, PyTorch float32 vs float64 {d['torch_f64']:.2e} px")
        if not agrees(d):
            sys.exit(f"error: {path}: onnxruntime is {d['onnx_f64']:.2e} px from float64, more than "
                     f"{ONNX_FACTOR:g} x PyTorch float32's {d['torch_f64']:.2e} px + {ONNX_FLOOR:g}")


def cli() -> None:
    """The `pips2-export-onnx` command (and `python export_onnx.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
