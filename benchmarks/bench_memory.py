"""Peak memory of one training step (forward with loss, backward, AdamW update), measured on the CPU.

Each (shape, model) runs in its own process; its peak is the peak RSS above the process's size before the
model was built, so it counts weights, gradients, AdamW states, activations and workspace: what a GPU would
have to hold (plus the CUDA context and the caching allocator's slack, see docs/BENCHMARKS.md).

Models: "ours" = the CPU training plan train.py runs, "ours_ckpt" = the same with --grad_ckpt
("ours_ckpt_chunk16": with the encoder in chunks of 16 frames), "authors" =
the authors' forms (full correlation volumes, the whole clip through the encoder at once, conv1d delta
block). Shapes too large for this machine are measured at smaller B or S and extrapolated linearly.

    python benchmarks/bench_memory.py --json_out=docs/bench_memory_cpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import fire
import torch
from common import name_list, reset_peak_rss, save_results, status_bytes, synthetic_batch

from pips2 import train_step as train
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.golden import load_golden_weights

ROOT = Path(__file__).resolve().parents[1]


MODELS = {  # name: the plan of the training step
    # every activation kept (the default CPU float32 plan until 2026-12-03, when recompute_cheap became it; the
    # figures in docs/BENCHMARKS.md were measured with this plan as "ours")
    "ours": ExecPlan.auto("cpu", training=True, recompute_cheap=False),
    "ours_ckpt": ExecPlan.auto("cpu", training=True, checkpointing=True),
    # convolution outputs kept, norms and activations recomputed in backward (train.py's CPU float32 default)
    "ours_recompute": ExecPlan.auto("cpu", training=True, recompute_cheap=True),
    # the encoder in chunks of 16 frames under checkpointing, so a recompute holds 16 frames at once
    "ours_ckpt_chunk16": replace(ExecPlan.auto("cpu", training=True, checkpointing=True), encoder_chunk=16),
    "authors": ExecPlan.reference(),
}
# name: (B, S, N, H, W, iters) of the steps measured here
RUNS = {
    "stage1_B1": (1, 36, 128, 256, 384, 4),
    "stage1_B2": (2, 36, 128, 256, 384, 4),
    "stage2_S8": (1, 8, 128, 512, 896, 4),
    "stage2_S16": (1, 16, 128, 512, 896, 4),
    "stage2_S64": (1, 64, 128, 512, 896, 4),
}
# the shapes of the issue and how each is reached from what was measured: (runs, variable, target value)
TARGETS = {
    "stage 1: B=4 S=36 N=128 256x384 iters=4": (("stage1_B1", "stage1_B2"), 0, 4),
    "stage 2: B=1 S=64 N=128 512x896 iters=4": (("stage2_S8", "stage2_S16"), 1, 64),
}


def _worker(run: str, model_name: str, out_path: str) -> None:

    B, S, N, H, W, iters = RUNS[run]
    batch = synthetic_batch(B, S, N, H, W)
    rss0 = status_bytes("VmRSS")
    reset_peak_rss()
    model = load_golden_weights(Pips(MODELS[model_name])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6, eps=1e-8)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=200, pct_start=0.1,
                                                cycle_momentum=False, anneal_strategy="linear")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    t0 = time.perf_counter()
    loss, _, _ = train.forward_loss(model, batch, torch.device("cpu"), iters, torch.Generator().manual_seed(1), None)
    loss.backward()
    train.optimizer_update(model, opt, sched, scaler)
    dt = time.perf_counter() - t0
    peak = status_bytes("VmHWM") - rss0
    Path(out_path).write_text(json.dumps({"peak": peak, "time": dt, "loss": loss.item()}))


def _measure(run: str, model: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        subprocess.run([sys.executable, __file__, "_worker", run, model, path], check=True, cwd=ROOT)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def main(runs: str = "stage1_B1,stage1_B2,stage2_S8,stage2_S16", models: str = "ours,ours_ckpt,authors",
         direct: str = "stage2_S64:ours_ckpt", json_out: str | None = None) -> None:
    """Measure every run x model, plus the `direct` run:model pairs; extrapolate the targets; print a table."""
    runs_l = name_list(runs)
    models_l = [m for m in (models.split(",") if isinstance(models, str) else models) if m]
    pairs = [(r, m) for r in runs_l for m in models_l]
    pairs += [tuple(p.split(":")) for p in (direct.split(",") if isinstance(direct, str) else direct) if p]
    got: dict[str, dict[str, dict]] = {}
    for r, m in pairs:
        res = _measure(r, m)
        got.setdefault(r, {})[m] = res
        B, S, N, H, W, iters = RUNS[r]
        print(f"{r:11s} B={B} S={S:3d} N={N} {H}x{W} iters={iters}  {m:10s} peak {res['peak'] / 2**30:6.2f} GiB  "
              f"step {res['time']:6.1f} s", flush=True)
    print("\ntargets (linear in the varied size, from two measured points):")
    targets = {}
    for name, (two, var, value) in TARGETS.items():
        (ra, rb) = two
        xa, xb = RUNS[ra][var], RUNS[rb][var]
        row = {}
        for m in models_l:
            if m in got.get(ra, {}) and m in got.get(rb, {}):
                pa, pb = got[ra][m]["peak"], got[rb][m]["peak"]
                row[m] = pa + (pb - pa) / (xb - xa) * (value - xa)
        targets[name] = row
        print(f"  {name}: " + ", ".join(f"{m} {v / 2**30:.1f} GiB" for m, v in row.items()))
    if json_out:
        save_results(json_out, {"measured": got, "extrapolated_bytes": targets})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        fire.Fire(main)
