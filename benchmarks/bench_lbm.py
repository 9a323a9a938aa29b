"""LBM's online step: ours (`LBMOnlineState.track`) against the authors' (`LBM_online.online_forward`), same run.

Both models hold the same weights (a random init of ours copied into theirs by a strict state_dict load, or
`--checkpoint`) and see the same frames and the same 256 query points. Before anything is timed, the two are
stepped side by side over `--frames` frames in float64 (copies of both models) and must agree to `--tol` px
with identical visibility flags; otherwise the script stops. The float32 difference is reported, not gated:
the top-k region choice is discontinuous, so float32 rounding can move the odd point by a few 1e-3 px (with
random weights: 1 point of 2,048 at 2.2e-3 px, mean 2.6e-6 px; float64: 7.6e-6 px, measured before the model
kept the authors' float32 steps, docs/LBM.md; tests/test_diff_authors.py now finds float64 equal to 1e-13 px).
Then, in float32 and in bf16 (CPU autocast for both), each tracker steps one frame at a time, ours and
theirs taking turns (`common.interleaved_times`), after `--warmup` frames. Last, each tracker follows a
`--stream_frames`-frame stream in a process of its own, at `--stream_hw` (default: `--hw`; the per-query state
does not depend on the frame size), with its RSS recorded at 1/20, 1/4, 1/2 and all of the stream (frames
100, 500, 1000, 2000 by default): it must stay flat.

The unit of work is what the authors' `tools/benchmark_torch.py` times: one call per frame, frame encoding
included (source frames at the input size). The authors' `online_forward` does not step the frame that
`init` samples the queries on, ours does; to compare equal outputs theirs is stepped on that frame too.

Their code runs unmodified from a checkout (`git archive` of George-Zhuang/lbm at cf39292) with stand-ins
for what this environment lacks, as the golden vectors were made (docs/LBM.md): mmcv's
`MultiScaleDeformableAttention` is their own pure-PyTorch copy (`lbm/models/lbm/msdeformattn.py`),
torchvision's resnet18 and Normalize, einops' rearrange (unless einops is installed:
benchmarks/requirements-bench.txt) and addict's Dict are small local equivalents.

With random weights every point would be predicted invisible and no memory slot would ever be read (their
step then skips the memory attention); `--vis_bias` (default 3) raises the visibility logit's bias so that
points are visible and the memory path runs, as with trained weights. It is not applied to a `--checkpoint`.
`--perturb_theirs=x` adds x to one of their weights after the copy: a self-test, the run must then stop.

    python benchmarks/bench_lbm.py --authors_repo=$HOME/src/lbm
    python benchmarks/bench_lbm.py --authors_repo=$HOME/src/lbm --out_json=docs/bench_lbm_cpu.json
    python benchmarks/bench_lbm.py --authors_repo=$HOME/src/lbm --hw=64,96 --points=8 --frames=5 --stream_frames=50
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import interleaved_times, machine_description, reset_peak_rss, status_bytes
from tqdm import tqdm

from pips2.hub import load_model
from pips2.nets.lbm import LBM, LBMOnlineState
from pips2.utils.cli import parse_hw
from pips2.utils.paths import code_folder_problem, output_folder_problem, write_json

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.5  # the target: ours at least 1.5x the authors' frames/s
PERTURBED_KEY = "transformer.offset_head.net.3.bias"  # moves every predicted point (used by --perturb_theirs)
FLAT_MIB = 16.0  # RSS growth over the stream above this counts as not flat (allocator noise is a few MiB)
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------
# Stand-ins for the authors' dependencies that this environment does not have


def rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops.rearrange for plain axis patterns: named axes, groups in parentheses, the literal 1."""
    sides = [[g.strip("()").split() for g in re.findall(r"\([^)]*\)|\S+", side)] for side in pattern.split("->")]
    lhs, rhs = sides
    if len(lhs) != x.dim():
        raise ValueError(f"rearrange: pattern {pattern!r} does not fit a tensor of shape {tuple(x.shape)}")
    known, axes = dict(sizes), []
    for group, dim in zip(lhs, x.shape, strict=True):
        names = [n for n in group if n != "1"]
        unknown = [n for n in names if n not in known]
        if len(unknown) > 1:
            raise ValueError(f"rearrange: {pattern!r} leaves {unknown} undetermined")
        if unknown:
            rest = 1
            for n in names:
                rest *= known.get(n, 1)
            known[unknown[0]] = dim // rest
        axes += names
    out_axes = [n for group in rhs for n in group if n != "1"]
    y = x.reshape([known[n] for n in axes]).permute([axes.index(n) for n in out_axes])
    out_shape = []
    for group in rhs:
        size = 1
        for n in group:
            size *= known.get(n, 1)
        out_shape.append(size)
    return y.reshape(out_shape)


class Normalize(nn.Module):
    """torchvision.transforms.Normalize on (..., C, H, W) tensors. As torchvision does, the mean and std are
    made in the input's dtype from the numbers given (a float64 input does not see their float32 roundings)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = list(mean), list(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel."""
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, same submodule names (so the authors' key names come out)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def torchvision_resnet18(weights=None) -> nn.Module:
    """The parts of torchvision's resnet18 the authors' backbone takes (stem, layer1-3); `weights` is ignored
    (the benchmark loads its own)."""
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(64)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(3, 2, 1)
    for i, (cin, cout, stride) in enumerate([(64, 64, 1), (64, 128, 2), (128, 256, 2)], start=1):
        setattr(net, f"layer{i}", nn.Sequential(TorchvisionBasicBlock(cin, cout, stride),
                                                TorchvisionBasicBlock(cout, cout, 1)))
    return net


class AttrDict(dict):
    """addict.Dict as far as the authors' object tracker needs it (attribute access, nested creation)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.setdefault(name, AttrDict())

    def __setattr__(self, name, value):
        self[name] = value


def stand_in(name: str, **attrs) -> None:
    """Register a module `name` holding `attrs` in sys.modules."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def import_authors(repo: str | os.PathLike) -> type:
    """The authors' LBM_online class, imported unmodified from their checkout `repo`, with the stand-ins."""
    repo = Path(repo).resolve()
    if not (repo / "lbm" / "models" / "lbm_online.py").is_file():
        raise SystemExit(f"bench_lbm: {repo}: not a checkout of George-Zhuang/lbm (no lbm/models/lbm_online.py)")
    if problem := code_folder_problem(repo, "--authors_repo"):  # its code runs as this user
        raise SystemExit(f"bench_lbm: {problem}")
    # Their modules import each other as the top-level package `lbm`, which resolves only with the
    # checkout's root on sys.path (their own scripts do the same); this benchmark is the only place it is done.
    sys.path.insert(0, str(repo))
    if importlib.util.find_spec("einops") is None:
        stand_in("einops", rearrange=rearrange)
    if importlib.util.find_spec("addict") is None:
        stand_in("addict", Dict=AttrDict)
    # always the stand-ins: the real torchvision would download ImageNet weights, mmcv's op is compiled CUDA
    stand_in("torchvision.transforms", Normalize=Normalize)
    stand_in("torchvision.models", resnet18=torchvision_resnet18,
             ResNet18_Weights=types.SimpleNamespace(DEFAULT=None))
    stand_in("torchvision", transforms=sys.modules["torchvision.transforms"],
             models=sys.modules["torchvision.models"])
    msda = importlib.import_module("lbm.models.lbm.msdeformattn")
    stand_in("mmcv.ops", MultiScaleDeformableAttention=msda.MultiScaleDeformableAttention)
    stand_in("mmcv", ops=sys.modules["mmcv.ops"])
    return importlib.import_module("lbm.models.lbm_online").LBM_online


# ----------------------------------------------------------------------------------------------------------
# Models, frames, points


def lbm_config(input_hw: tuple[int, int], memory_size: int) -> dict:
    """The authors' lbm.yaml model keys at input size input_hw."""
    return dict(input_size=list(input_hw), N=256, T=24, stride=4, num_layers=3, embed_dim=256, num_heads=4,
                num_levels=4, num_neighbors=9, top_k_regions=9, dropout=0.1, memory_size=memory_size,
                lambda_cls=3.0, lambda_vis=1.0, lambda_reg=1.0, lambda_unc=1.0, lambda_ref=1.0, loss_after_query=True)


def build_ours(input_hw: tuple[int, int], memory_size: int, seed: int, checkpoint: str | None, vis_bias: float) -> LBM:
    """Our model in eval mode: the checkpoint's weights, or a seeded random init with the visibility bias raised."""
    if checkpoint:
        model = load_model(checkpoint, kind="lbm", **lbm_config(input_hw, 12))
    else:
        torch.manual_seed(seed)
        model = LBM(**lbm_config(input_hw, 12))
        with torch.no_grad():
            model.get_parameter("transformer.vis_head.net.3.bias")[0] += vis_bias
    if memory_size != 12:
        model.set_memory_size(memory_size)
    return model.eval()


def build_theirs(cls: type, ours: LBM, input_hw: tuple[int, int], memory_size: int, perturb: float = 0.0) -> nn.Module:
    """The authors' LBM_online with our weights (strict load: the key names are theirs); `perturb` is added to
    one weight afterwards, to show that the equality check catches a difference."""
    model = cls(argparse.Namespace(**lbm_config(input_hw, memory_size)))
    model.load_state_dict(ours.state_dict(), strict=True)
    if perturb:
        with torch.no_grad():
            model.state_dict()[PERTURBED_KEY] += perturb
    return model.eval()


def frame_source(hw: tuple[int, int], seed: int) -> Callable[[int], torch.Tensor]:
    """frame(t) -> (1,3,H,W) in [0,255]: a smooth random texture moving by (2, 1) px per frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, hw[0] // 8, hw[1] // 8, generator=g)
    base = F.interpolate(base, size=hw, mode="bicubic", align_corners=False).clamp(0, 1) * 255
    return lambda t: torch.roll(base, shifts=(t, 2 * t), dims=(2, 3))


def query_points(hw: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """n points (x, y) spread over the frame, away from its border."""
    g = torch.Generator().manual_seed(seed + 1)
    return (0.05 + 0.9 * torch.rand(n, 2, generator=g)) * torch.tensor([hw[1] - 1.0, hw[0] - 1.0])


# ----------------------------------------------------------------------------------------------------------
# The two trackers behind one interface: start on a frame, step a frame -> (points, visibility, rho)


class OursTracker:
    """Our LBMOnlineState; `start` steps the first frame as well."""

    def __init__(self, model: LBM):
        self.state = LBMOnlineState(model)

    def start(self, points: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Start the points on this frame and step it."""
        return self.unpack(self.state.init(points, frame))

    def step(self, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One frame."""
        return self.unpack(self.state.track(frame))

    @staticmethod
    def unpack(r: dict) -> tuple[torch.Tensor, ...]:
        """(points, visibility, rho probability)."""
        return r["points"], r["visibility"], r["rho_prob"]

    def state_bytes(self) -> int:
        """Bytes of the per-query state (query vectors and memory)."""
        q, m = self.state.query, self.state.memory
        assert q is not None and m is not None, "no points started"
        return sum(t.nbytes for t in (q, m.collision, m.stream, m.vis_mask, m.mem_mask))


class TheirsTracker:
    """The authors' LBM_online; `start` = their init, then their online_forward on the same frame."""

    STATE = ("query", "collision_dist", "stream_dist", "vis_mask", "mem_mask")

    def __init__(self, model: nn.Module):
        self.model: Any = model  # their LBM_online, whose tracking state lives in attributes it sets itself

    @torch.no_grad()
    def start(self, points: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Start the points on this frame and step it."""
        # their init keeps the memory of an earlier init (it copies the old state): clear it first
        for name in (*self.STATE, "query_points"):
            setattr(self.model, name, None)
        self.model.t, self.model.N = 0, 0
        self.model.init(points.clone(), frame)
        return self.step(frame)

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One frame."""
        points, vis, rho, _ = self.model.online_forward(frame)
        return points, vis, rho

    def state_bytes(self) -> int:
        """Bytes of the per-query state (query vectors and memory)."""
        return sum(getattr(self.model, name).nbytes for name in self.STATE)


def autocast(amp: bool):
    """bf16 CPU autocast when amp, else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)


# ----------------------------------------------------------------------------------------------------------
# Measurements


def run_frames(tracker, points: torch.Tensor, frame: Callable[[int], torch.Tensor], frames: int,
               amp: bool) -> list[torch.Tensor]:
    """Start the tracker on frame 0 and step it to `frames`: points, visibility and rho probability over time."""
    with autocast(amp):
        seq = [tracker.start(points, frame(0))] + [tracker.step(frame(t)) for t in range(1, frames)]
    return [torch.stack([s[i].float() for s in seq]) for i in range(3)]


def compare(trackers: dict, points: torch.Tensor, frame: Callable[[int], torch.Tensor], frames: int,
            amp: bool, tol: float = 1e-3) -> dict:
    """Step both trackers over the same frames; max point difference (px), visibility disagreements, ..."""
    outs = {name: run_frames(tr, points, frame, frames, amp) for name, tr in trackers.items()}
    (p_o, v_o, r_o), (p_t, v_t, r_t) = outs["ours"], outs["theirs"]
    return {"frames": frames, "max_diff_px": (p_o - p_t).abs().max().item(),
            "mean_diff_px": (p_o - p_t).abs().mean().item(),
            "beyond_tol": int(((p_o - p_t).abs().amax(-1) > tol).sum()),
            "visibility_mismatches": int((v_o != v_t).sum()), "max_diff_rho_prob": (r_o - r_t).abs().max().item(),
            "visible_fraction": v_o.mean().item()}


def own_drift(tracker, points: torch.Tensor, frame: Callable[[int], torch.Tensor], frames: int) -> dict:
    """How far one tracker's bf16 points move from its own float32 points over the same frames (px)."""
    fp32, bf16 = (run_frames(tracker, points, frame, frames, amp)[0] for amp in (False, True))
    d = (bf16 - fp32).abs()
    return {"max_diff_px": d.max().item(), "mean_diff_px": d.mean().item(),
            "median_diff_px": d.amax(-1).median().item()}


def time_steps(trackers: dict, points: torch.Tensor, frame: Callable[[int], torch.Tensor], pool: int, warmup: int,
               rounds: int, per_round: int, amp: bool) -> dict:
    """Per-frame latency of each tracker, the two taking turns, after `warmup` frames each."""
    frames = [frame(t) for t in range(pool)]
    counters = dict.fromkeys(trackers, 0)

    def stepper(name):
        def run():
            counters[name] += 1
            with autocast(amp):
                trackers[name].step(frames[counters[name] % pool])
        return run

    runs: dict[str, Callable[[], object]] = {name: stepper(name) for name in trackers}
    for name, tr in trackers.items():
        with autocast(amp):
            tr.start(points, frames[0])
        for _ in range(warmup):
            runs[name]()
    times = interleaved_times(runs, rounds, per_round)
    res = {}
    for name, ts in times.items():
        ms = sorted(1000 * t for t in ts)
        med = statistics.median(ms)
        res[name] = {"ms_per_frame": med, "fps": 1000 / med, "ms_p10": ms[len(ms) // 10],
                     "ms_p90": ms[(9 * len(ms)) // 10], "steps": len(ms)}
    res["speedup"] = res["theirs"]["ms_per_frame"] / res["ours"]["ms_per_frame"]
    return res


def stream_checkpoints(n: int) -> list[int]:
    """Frames at which RSS is recorded: 1/20, 1/4, 1/2 and all of the stream (100, 500, 1000, 2000 for 2000)."""
    return sorted({max(1, n // 20), max(1, n // 4), max(1, n // 2), n})


def stream_worker(spec_json: str, out_path: str) -> None:
    """Run one tracker over a long stream in this (fresh) process; write RSS at the checkpoints as JSON."""
    spec = json.loads(spec_json)
    hw = tuple(spec["hw"])
    torch.set_num_threads(spec["threads"])
    ours = build_ours(hw, spec["memory_size"], spec["seed"], spec["checkpoint"], spec["vis_bias"])
    if spec["which"] == "ours":
        tracker = OursTracker(ours)
    else:
        tracker = TheirsTracker(build_theirs(import_authors(spec["authors_repo"]), ours, hw, spec["memory_size"]))
    del ours
    frame = frame_source(hw, spec["seed"])
    n, marks, warm = spec["frames"], stream_checkpoints(spec["frames"]), min(10, spec["frames"])
    tracker.start(query_points(hw, spec["points"], spec["seed"]), frame(0))
    rss, state = {}, {}
    for t in tqdm(range(1, n + 1), desc=f"stream {spec['which']}", unit="frame", mininterval=5):
        if t == warm:
            reset_peak_rss()  # the peak from here on: building the model and the first calls are not the stream
        tracker.step(frame(t))
        if t in marks:
            rss[t], state[t] = status_bytes("VmRSS") / MIB, tracker.state_bytes() / MIB
    res = {"rss_mib": rss, "state_mib": state, "peak_rss_mib": status_bytes("VmHWM") / MIB,
           "rss_growth_mib": rss[marks[-1]] - rss[marks[0]]}
    res["flat"] = res["rss_growth_mib"] <= FLAT_MIB and state[marks[-1]] == state[marks[0]]
    Path(out_path).write_text(json.dumps(res))


def run_stream(which: str, spec: dict) -> dict:
    """stream_worker in a subprocess, so that the RSS is that of the stream alone."""
    with tempfile.TemporaryDirectory(prefix="bench_lbm_") as tmp:
        out = Path(tmp) / "stream.json"
        cmd = [sys.executable, __file__, "_stream", json.dumps({**spec, "which": which}), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------------------
# Report


def print_report(res: dict) -> None:
    """The table of latencies, ratios, output differences and stream memory."""
    cfg = res["config"]
    print(f"\nLBM online step, {cfg['hw'][0]}x{cfg['hw'][1]}, {cfg['points']} points, memory {cfg['memory_size']}; "
          f"{res['machine']['cpu']}, {res['machine']['threads']} threads, torch {res['machine']['torch']}")
    print(f"{'':14s}{'ours ms/frame':>15s}{'theirs ms/frame':>17s}{'ours fps':>10s}{'theirs fps':>12s}{'ratio':>8s}")
    for dt in ("fp32", "bf16"):
        t = res["timing"][dt]
        verdict = "meets" if t["speedup"] >= TARGET else "below"
        print(f"{dt:14s}{t['ours']['ms_per_frame']:15.2f}{t['theirs']['ms_per_frame']:17.2f}"
              f"{t['ours']['fps']:10.2f}{t['theirs']['fps']:12.2f}{t['speedup']:7.2f}x  ({verdict} {TARGET}x target)")
    print_equality(res)
    for which, s in res["stream"].items():
        marks = ", ".join(f"{t}: {v:.0f}" for t, v in s["rss_mib"].items())
        state = list(s["state_mib"].values())[-1]
        sh = cfg.get("stream_hw", cfg["hw"])
        print(f"stream {which} ({cfg['stream_frames']} frames at {sh[0]}x{sh[1]}, fp32): RSS MiB at frame {marks}; "
              f"peak {s['peak_rss_mib']:.0f} MiB; growth {s['rss_growth_mib']:+.1f} MiB; state {state:.2f} MiB; "
              f"{'flat' if s['flat'] else 'NOT FLAT'}")


def print_equality(res: dict) -> None:
    """The output differences: ours vs theirs in fp64, fp32 and bf16, and each one's bf16 vs its own fp32."""
    cfg, eq = res["config"], res["equality"]
    print(f"outputs fp64 ({eq['fp64']['frames']} frames): max |ours - theirs| {eq['fp64']['max_diff_px']:.2e} px "
          f"(tolerance {cfg['tol']:g}), visibility mismatches {eq['fp64']['visibility_mismatches']}, "
          f"visible {100 * eq['fp64']['visible_fraction']:.0f} %")
    print(f"outputs fp32: max |ours - theirs| {eq['fp32']['max_diff_px']:.2e} px, mean "
          f"{eq['fp32']['mean_diff_px']:.1e} px, points beyond {cfg['tol']:g} px {eq['fp32']['beyond_tol']}, "
          f"visibility mismatches {eq['fp32']['visibility_mismatches']}")
    print(f"outputs bf16: max |ours - theirs| {eq['bf16']['max_diff_px']:.3f} px, mean "
          f"{eq['bf16']['mean_diff_px']:.3f} px, visibility mismatches {eq['bf16']['visibility_mismatches']}")
    for name, d in eq.get("bf16_vs_own_fp32", {}).items():
        print(f"bf16 vs its own fp32, {name}: max {d['max_diff_px']:.3f} px, mean {d['mean_diff_px']:.3f} px, "
              f"median point {d['median_diff_px']:.3f} px")


def main(authors_repo: str, hw="384,512", points: int = 256, frames: int = 8, warmup: int = 5, rounds: int = 6,
         per_round: int = 10, stream_frames: int = 2000, stream_theirs: bool = False, stream_hw=None,
         memory_size: int = 12,
         seed: int = 0, checkpoint: str | None = None, vis_bias: float = 3.0, tol: float = 1e-3,
         threads: int | None = None, perturb_theirs: float = 0.0, out_json: str | None = None,
         check_only: bool = False) -> None:
    """Check equal outputs, then time both online steps in fp32 and bf16 and follow a long stream's memory
    (--check_only: print the output differences and stop)."""
    hw = parse_hw(hw, "hw")
    if threads:
        torch.set_num_threads(threads)
    if frames < 2 or stream_frames < 1:
        raise SystemExit("bench_lbm: --frames must be at least 2 and --stream_frames at least 1")
    their_cls = import_authors(authors_repo)
    ours = build_ours(hw, memory_size, seed, checkpoint, vis_bias)
    theirs = build_theirs(their_cls, ours, hw, memory_size, perturb_theirs)
    frame, pts = frame_source(hw, seed), query_points(hw, points, seed)
    trackers = {"ours": OursTracker(ours), "theirs": TheirsTracker(theirs)}
    res = {"machine": machine_description(),
           "config": {"hw": list(hw), "points": points, "memory_size": memory_size, "tol": tol,
                      "weights": checkpoint or f"random init (seed {seed}), visibility bias +{vis_bias}",
                      "stream_frames": stream_frames, "authors_commit": "cf39292"}}

    trackers64 = {"ours": OursTracker(copy.deepcopy(ours).double()),
                  "theirs": TheirsTracker(copy.deepcopy(theirs).double())}
    eq64 = compare(trackers64, pts.double(), lambda t: frame(t).double(), frames, amp=False, tol=tol)
    del trackers64
    print(f"fp64 check over {frames} frames: max |ours - theirs| {eq64['max_diff_px']:.2e} px, "
          f"{eq64['visibility_mismatches']} visibility mismatches", flush=True)
    if eq64["max_diff_px"] > tol or eq64["visibility_mismatches"]:
        raise SystemExit(f"bench_lbm: outputs differ: max |ours - theirs| {eq64['max_diff_px']:.3g} px (tolerance "
                         f"{tol:g} px), {eq64['visibility_mismatches']} visibility mismatches; nothing timed")
    eq32 = compare(trackers, pts, frame, frames, amp=False, tol=tol)
    if eq32["visible_fraction"] == 0:
        print("warning: no point is ever visible, so no memory slot is read (raise --vis_bias)", flush=True)
    res["equality"] = {"fp64": eq64, "fp32": eq32, "bf16": compare(trackers, pts, frame, frames, amp=True),
                       "bf16_vs_own_fp32": {n: own_drift(tr, pts, frame, frames) for n, tr in trackers.items()}}
    if check_only:
        print_equality(res)
        return

    res["timing"] = {}
    for name, amp in (("fp32", False), ("bf16", True)):
        res["timing"][name] = time_steps(trackers, pts, frame, frames, warmup, rounds, per_round, amp)
        print(f"{name}: ours {res['timing'][name]['ours']['ms_per_frame']:.2f} ms/frame, theirs "
              f"{res['timing'][name]['theirs']['ms_per_frame']:.2f} ms/frame", flush=True)

    stream_hw = parse_hw(stream_hw, "stream_hw") if stream_hw else hw
    res["config"]["stream_hw"] = list(stream_hw)
    spec = {"hw": list(stream_hw), "points": points, "memory_size": memory_size, "seed": seed, "checkpoint": checkpoint,
            "vis_bias": vis_bias, "frames": stream_frames, "threads": torch.get_num_threads(),
            "authors_repo": str(authors_repo)}
    res["stream"] = {w: run_stream(w, spec) for w in (["ours", "theirs"] if stream_theirs else ["ours"])}
    print_report(res)
    if out_json:
        if problem := output_folder_problem(out_json, "--json_out"):
            raise SystemExit(f"error: {problem}; the results are printed above")
        write_json(out_json, res)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stream":
        stream_worker(sys.argv[2], sys.argv[3])
    else:
        fire.Fire(main)
