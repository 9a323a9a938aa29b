"""One training step (forward with loss, backward, AdamW update with clipping) of ours against the reference
forms, side by side in one run, each step in its own process so that its peak memory is its own.

"reference" is `Pips(ExecPlan.reference())`: the authors' computation as they write it (full correlation
volumes, the whole clip through the encoder at once, conv1d delta block), the stand-in for their code, which
is not in the project (docs/BENCHMARKS.md compares the two). "ours" is the plan train.py runs in float32,
"ours_bf16" the same under `--amp=bf16`, "ours_ckpt" under `--grad_ckpt`. Every variant starts from the same
weights and batch, so the first step's loss and gradient norm must agree (the table shows how closely).

Also measured: the training data loader (clips/s from exported mp4s, default workers) against what one
step consumes at B=4.

    python benchmarks/bench_train.py --json_out=docs/bench_train_cpu.json   # every target, ~45 min here
    python benchmarks/bench_train.py --shapes=demo --variants=reference,ours --rounds=1 --steps=1 \
        --ckpt_ratio_shape=demo --ckpt_shapes=demo --reference_memory_shapes=demo_S4,demo   # a quick check
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import fire
import torch
from common import machine_description, reset_peak_rss, save_results, scratch_export, status_bytes, synthetic_batch

from pips2 import train_step as train
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.trainer import Config, Ranks, TrainData
from pips2.utils.golden import load_golden_weights

ROOT = Path(__file__).resolve().parents[1]

# name: (plan for a batch's points B*N and crop (H, W), amp) of a training step as train.py builds it
# (utils/trainer.build_model)
VARIANTS = {
    "reference": (lambda points, crop_hw: ExecPlan.reference(), None),
    # train.py's float32 plan: at the stage-1 and stage-2 crops it replays cheap operations in backward
    # (recompute_cheap, on by default since 2026-12-03 evening)
    "ours": (lambda points, crop_hw: ExecPlan.auto("cpu", training=True, points=points, crop_hw=crop_hw), None),
    # the float32 plan keeping every activation (--recompute_cheap=False)
    "ours_keep": (lambda points, crop_hw: ExecPlan.auto("cpu", training=True, recompute_cheap=False, points=points,
                                                        crop_hw=crop_hw), None),
    # the delta block's GEMM form keeping every activation, the float32 plan of 2026-12-02
    "ours_gemm": (lambda points, crop_hw: replace(ExecPlan.auto("cpu", training=True, recompute_cheap=False,
                                                                points=points, crop_hw=crop_hw), delta="gemm"), None),
    # the float32 training plan before the training-speed work (docs/BENCHMARKS.md): conv1d delta block,
    # every activation stored
    "ours_before": (lambda points, crop_hw: replace(ExecPlan.auto("cpu", training=True, recompute_cheap=False),
                                                    delta="conv1d"), None),
    "ours_recompute": (lambda points, crop_hw: ExecPlan.auto("cpu", training=True, recompute_cheap=True, points=points,
                                                             crop_hw=crop_hw), None),  # --recompute_cheap
    "ours_bf16": (lambda points, crop_hw: ExecPlan.auto("cpu", torch.bfloat16, training=True, points=points,
                                                        crop_hw=crop_hw), "bf16"),
    "ours_ckpt": (lambda points, crop_hw: ExecPlan.auto("cpu", training=True, checkpointing=True, points=points,
                                                        crop_hw=crop_hw), None),
    # candidate: the float32 plan keeping every activation, with a channels-last encoder (docs/BENCHMARKS.md:
    # 34.2 vs 36.0 s, not chosen)
    "ours_cl": (lambda points, crop_hw: replace(ExecPlan.auto("cpu", training=True, recompute_cheap=False,
                                                              points=points, crop_hw=crop_hw), channels_last=True),
                None),
    # bf16 with the delta block's GEMM form, the bf16 plan before F(2,3)
    "ours_gemm_bf16": (lambda points, crop_hw: replace(ExecPlan.auto("cpu", torch.bfloat16, training=True,
                                                                     points=points, crop_hw=crop_hw), delta="gemm"),
                       "bf16"),
    # candidate: bf16 with F(4,3) in the delta block (docs/BENCHMARKS.md: faster, ~3x the rounding error; not chosen)
    "ours_wino_bf16": (lambda points, crop_hw: replace(ExecPlan.auto("cpu", torch.bfloat16, training=True,
                                                                     points=points, crop_hw=crop_hw),
                                                       delta="winograd"), "bf16"),
    # the large-batch choices (Winograd delta block, local correlation, one frame at a time; every activation kept)
    # at any shape
    "ours_large": (lambda points, crop_hw: ExecPlan.auto("cpu", training=True, recompute_cheap=False), None),
}
# name: (B, S, N, H, W, iters)
SHAPES = {
    "stage1": (1, 36, 128, 256, 384, 4),
    "stage1_B4": (4, 36, 128, 256, 384, 4),
    "stage2": (1, 64, 128, 512, 896, 4),
    "stage2_S8": (1, 8, 128, 512, 896, 4),
    "stage2_S16": (1, 16, 128, 512, 896, 4),
    "demo": (2, 8, 32, 128, 128, 4),  # make demo's training step
    "demo_S4": (2, 4, 32, 128, 128, 4),  # with "demo": a quick run of every part of main
}


def _worker(shape: str, variant: str, steps: int, out_path: str) -> None:
    """Warm-up step, then `steps` timed steps; writes times, peak RSS above the start, first loss, grad norm."""
    B, S, N, H, W, iters = SHAPES[shape]
    make_plan, amp = VARIANTS[variant]
    plan = make_plan(B * N, (H, W))
    batch = synthetic_batch(B, S, N, H, W)
    rss0 = status_bytes("VmRSS")
    reset_peak_rss()
    model = load_golden_weights(Pips(plan)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6, eps=1e-8)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=200, pct_start=0.1,
                                                cycle_momentum=False, anneal_strategy="linear")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times, first = [], {}
    for k in range(1 + steps):
        t0 = time.perf_counter()
        loss, _, _ = train.forward_loss(model, batch, torch.device("cpu"), iters, torch.Generator().manual_seed(1),
                                        amp)
        loss.backward()
        if k == 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            first = {"loss": loss.item(), "grad_norm": torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()}
        train.optimizer_update(model, opt, sched, scaler)
        if k > 0:
            times.append(time.perf_counter() - t0)
    peak = status_bytes("VmHWM") - rss0
    Path(out_path).write_text(json.dumps({"times": times, "peak": peak, **first}))


def _measure(shape: str, variant: str, steps: int, memory: bool = False) -> dict:
    """One worker process; `memory`: measure the peak of live memory (slower: do not time such a run)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        # a fixed mmap threshold returns every freed block of 128 KiB or more to the system at once, so peak RSS
        # is the peak of live memory; glibc's default (a threshold that grows with the blocks freed) kept up to
        # 2 GiB of freed activations resident into the second step, more for some variants than for others. It
        # costs a page fault per fresh block, so timed runs keep the default
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if memory else None
        subprocess.run([sys.executable, __file__, "_worker", shape, variant, str(steps), path], check=True,
                       cwd=ROOT, env=env)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def _loader_rate(B: int, batches: int, S: int = 36, N: int = 128, crop_hw: tuple[int, int] = (256, 384)) -> dict:
    """Clips/s of train.py's loader (default workers) over a fresh export of synthetic scenes (stage 1's shape)."""
    with scratch_export(S=S, N=N, crop_hw=crop_hw) as (root, version):
        cfg = Config(stage=1, B=B, S=S, N=N, crop_hw=crop_hw, iters=4, lr=5e-4, max_steps=batches + 2,
                     dataset_location=str(root), dataset_version=version, device="cpu", quiet=True)
        # told of no skipped clip: what is measured is the loader (TrainData goes through the list returned)
        data = TrainData(cfg, Ranks.setup("cpu"), 0, lambda kind, batch: [])
        data.next(1, 0)  # workers started, first batches decoded
        t0 = time.perf_counter()
        for step in range(2, 2 + batches):
            data.next(step, 0)
        dt = time.perf_counter() - t0
        workers = cfg.workers
        del data  # stops the loader's workers before the clips are removed
    return {"workers": workers, "B": B, "batches": batches, "clips_per_s": B * batches / dt}


DEFAULT_VARIANTS = "reference,ours,ours_keep,ours_bf16"


def _table(shape: str, rows: dict) -> None:
    """Print one shape's variants with their ratios to the reference."""
    ref = rows.get("reference")
    print(f"\n{shape} {SHAPES[shape]} (B, S, N, H, W, iters)")
    print(f"{'variant':14s} {'step s':>8s} {'steps/s x':>10s} {'peak GiB':>9s} {'memory x':>9s} "
          f"{'loss':>12s} {'grad norm':>12s}")
    for n, row in rows.items():
        speed = f"{ref['step_s'] / row['step_s']:.2f}" if ref else "-"
        mem = f"{row['peak_gib'] / ref['peak_gib']:.2f}" if ref else "-"
        print(f"{n:14s} {row['step_s']:8.1f} {speed:>10s} {row['peak_gib']:9.2f} {mem:>9s} "
              f"{row['loss']:12.6f} {row['grad_norm']:12.6f}")


def _variants(shape: str, names: list[str], rounds: int, steps: int) -> dict:
    """Time `names` at `shape` in alternating rounds, then one memory run each; the median step per variant."""
    got: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            got[n].append(_measure(shape, n, steps))
            print(f"{shape} {n}: {got[n][-1]['times']} s", flush=True)
    rows = {}
    for n, runs in got.items():
        mem = _measure(shape, n, 1, memory=True)
        print(f"{shape} {n}: peak {mem['peak'] / 2**30:.2f} GiB", flush=True)
        rows[n] = {"step_s": statistics.median(t for run in runs for t in run["times"]),
                   "step_s_all": [t for run in runs for t in run["times"]], "peak_gib": mem["peak"] / 2**30,
                   "peak_gib_default_malloc": max(run["peak"] for run in runs) / 2**30,
                   "loss": runs[0]["loss"], "grad_norm": runs[0]["grad_norm"]}
    _table(shape, rows)
    return rows


@functools.cache
def _reference_peak(shape: str) -> float:
    """The reference's peak memory (GiB) at `shape`, measured once per run."""
    return _measure(shape, "reference", 1, memory=True)["peak"] / 2**30


def _extrapolated_reference_peak(shapes: list[str], target: str) -> dict:
    """The reference's peak memory at `target` (too large for this machine), linear in S through two shorter
    clips of the same crop: activations grow with the frames, the weights and the rest do not."""
    same = lambda n: SHAPES[n][:1] + SHAPES[n][2:]  # noqa: E731  (all but S)
    if len(shapes) != 2 or any(same(n) != same(target) for n in shapes):
        raise SystemExit(f"bench_train: --reference_memory_shapes must be two shapes that differ from {target} "
                         f"{SHAPES[target]} only in S, got {shapes}")
    (s0, s1), S = [SHAPES[n][1] for n in shapes], SHAPES[target][1]
    p0, p1 = [_reference_peak(n) for n in shapes]
    peak = p1 + (p1 - p0) / (s1 - s0) * (S - s1)
    print(f"\nreference peak: {p0:.2f} GiB at S={s0}, {p1:.2f} GiB at S={s1}; at S={S} (linear): {peak:.1f} GiB")
    return {"measured": {shapes[0]: p0, shapes[1]: p1}, "extrapolated_gib": peak}


def _verdicts(res: dict) -> list[tuple[str, str, bool]]:
    """The training-speed targets against this run's figures: (target, measured, met) for each one measured."""
    out: list[tuple[str, str, bool]] = []
    s1 = res["runs"].get("stage1", {})
    ref = s1.get("reference")
    if ref:
        # the memory target allows recomputing cheap operations, which the default float32 plan does at this
        # shape: it must meet both at once
        if "ours" in s1:
            x, m = ref["step_s"] / s1["ours"]["step_s"], s1["ours"]["peak_gib"] / ref["peak_gib"]
            out.append(("fp32 (default plan): >= 1.5x steps/s, <= 0.5x memory", f"{x:.2f}x steps/s, {m:.2f}x memory",
                        x >= 1.5 and m <= 0.5))
        if "ours_bf16" in s1:
            x = ref["step_s"] / s1["ours_bf16"]["step_s"]
            out.append(("bf16: >= 2.5x the fp32 reference's steps/s", f"{x:.2f}x", x >= 2.5))
    ratio = res.get("ckpt_ratio")
    if ratio:
        out.append((f"--grad_ckpt: <= 1.4x the step time without it ({ratio['shape']})",
                    f"{ratio['time_x']:.2f}x", ratio["time_x"] <= 1.4))
    for shape, rows in res["runs"].items():
        ext = res.get("reference_peak", {}).get(shape)
        if "ours_ckpt" in rows and ext:
            m = rows["ours_ckpt"]["peak_gib"] / ext["extrapolated_gib"]
            out.append((f"--grad_ckpt {shape}: <= 0.25x the reference's memory",
                        f"{rows['ours_ckpt']['peak_gib']:.2f} / {ext['extrapolated_gib']:.1f} GiB = {m:.3f}x",
                        m <= 0.25))
    if "loader" in res and "ours" in s1:
        # a B=4 step consumes 4 clips in about 4 B=1 steps' time here (an estimate: the work is per clip, in
        # kernels already large at B=1)
        x = res["loader"]["clips_per_s"] * s1["ours"]["step_s"]
        out.append(("loader: >= 3x what the B=4 step consumes", f"{x:.0f}x", x >= 3))
    return out


def main(shapes: str = "stage1", variants: str = DEFAULT_VARIANTS, rounds: int = 2, steps: int = 2,
         ckpt_ratio_shape: str = "stage2_S16", ckpt_shapes: str = "stage2",
         reference_memory_shapes: str = "stage2_S8,stage2_S16", loader: bool = True,
         json_out: str | None = None) -> None:
    """Every training-speed target in one run: `variants` at each of `shapes` (`rounds` alternating rounds of `steps`
    timed steps), --grad_ckpt against no checkpointing at `ckpt_ratio_shape`, the --grad_ckpt step at
    `ckpt_shapes` against the reference's memory extrapolated from `reference_memory_shapes`, the loader;
    ratios and a verdict per target printed, everything written to json_out. Empty strings skip a part."""
    as_list = lambda v: [x for x in (v.split(",") if isinstance(v, str) else v) if x]  # noqa: E731
    res: dict = {"machine": machine_description(), "runs": {}, "reference_peak": {}}
    for shape in as_list(shapes):
        res["runs"][shape] = _variants(shape, as_list(variants), rounds, steps)
    if ckpt_ratio_shape:
        # its own runs (one round each), kept apart from the rows of `shapes` and `ckpt_shapes`
        rows = _variants(ckpt_ratio_shape, ["ours", "ours_ckpt"], 1, steps)
        res["ckpt_ratio"] = {"shape": ckpt_ratio_shape, "rows": rows,
                             "time_x": rows["ours_ckpt"]["step_s"] / rows["ours"]["step_s"],
                             "memory_x": rows["ours_ckpt"]["peak_gib"] / rows["ours"]["peak_gib"]}
    for shape in as_list(ckpt_shapes):
        run, mem = _measure(shape, "ours_ckpt", steps), _measure(shape, "ours_ckpt", 1, memory=True)
        res["runs"].setdefault(shape, {})["ours_ckpt"] = {"step_s": statistics.median(run["times"]),
                                                         "step_s_all": run["times"],
                                                         "peak_gib": mem["peak"] / 2**30}
        print(f"\n{shape} {SHAPES[shape]} with --grad_ckpt: step {statistics.median(run['times']):.1f} s, "
              f"peak {mem['peak'] / 2**30:.2f} GiB", flush=True)
        if reference_memory_shapes:
            res["reference_peak"][shape] = _extrapolated_reference_peak(as_list(reference_memory_shapes), shape)
    if loader:
        res["loader"] = _loader_rate(4, 8)
        print(f"\nloader: {res['loader']['clips_per_s']:.2f} clips/s with {res['loader']['workers']} workers")
    res["verdicts"] = _verdicts(res)
    if res["verdicts"]:
        print("\ntraining-speed targets:")
        for target, measured, ok in res["verdicts"]:
            print(f"  {'met ' if ok else 'MISS'}  {target}: {measured}")
    if json_out:
        save_results(json_out, res)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        fire.Fire(main)
