"""Differential cases against the authors' code: their outputs in float64 over many seeded cases.

`pips` runs the authors' PIPs++ (aharley/pips2, imported unmodified from the checkout `--authors_repo`, never
copied into this repository) in float64 with the golden weights (utils/golden.py) over `--cases` cases drawn
from `--seed`: windows of golden videos of several sizes (multiples of 8, odd multiples and non-square among
them), 2..16 frames, 1..64 points on, next to and beyond every border and at exact halves of a cell, points
leaving the frame during the clip, 1..8 iterations; a case makes the first one, two or three of these calls:
a forward, a chained call on the clip backwards with feat_init, a feat_init call
(`utils.golden.track_three_ways`). Each case runs again with the initial estimates moved by a relative 2^-50
and, when its clip has 2 to 4 frames or that moved it by more than 1e-11 px, twice more with the weights moved
by a relative 2^-52: the largest change of each output is its spread (docs/CORRECTNESS.md). Inputs are made
again from the stored settings, so `--out` holds only the settings, a fingerprint of the inputs, the spreads
and the authors' final outputs (tests/data/diff_pips_f64.npz; tests/test_diff_authors.py checks every plan
against it). `--compare=default,reference,...` also runs our model on those plans and reports every case beyond
max(`--tol` px, 10 x its spread), with the first iteration that differs (exit 1 if any): run it with a fresh
`--seed` to look for new differences. `lbm` does the same for the authors' online LBM tracker
(George-Zhuang/lbm), see its docstring. `stats` prints the numbers docs/CORRECTNESS.md quotes from the stored
files (no authors' code needed).

    python benchmarks/diff_authors.py pips --authors_repo=$HOME/src/pips2 --out=tests/data/diff_pips_f64.npz
    python benchmarks/diff_authors.py pips --authors_repo=$HOME/src/pips2 --seed=7 --cases=40 --compare=all
    python benchmarks/diff_authors.py lbm --authors_repo=$HOME/src/lbm --out=tests/data/lbm/diff_lbm_f64.npz
    python benchmarks/diff_authors.py stats --plans=all

A stopped run (Ctrl-C, SIGTERM) writes the cases it finished; run the same command again to go on from there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from tqdm import tqdm

from pips2.nets.lbm import LBM, LBMOnlineState
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.cli import die
from pips2.utils.golden import (
    VIDEO_FRAMES,
    LbmCase,
    TrackCase,
    case_slices,
    fingerprint,
    lbm_golden_state_dict,
    load_golden_weights,
    stored_cases,
    track_online,
    track_three_ways,
)
from pips2.utils.paths import code_folder_problem, new_temp_file, output_folder_problem

# frame sizes of the golden videos (H, W): multiples of 8, odd multiples (136 = 17 x 8, ...), non-square
VIDEO_SIZES = [(128, 128), (128, 192), (136, 136), (136, 200), (200, 136), (152, 168), (184, 128), (128, 232)]
PIPS_OUTPUTS = ("out", "out_chain", "out_featinit")
PLANS = {
    "default": ExecPlan.auto(),
    "reference": ExecPlan.reference(),
    "export": ExecPlan.export(),
    "training": ExecPlan.auto(training=True, checkpointing=True),
}


# ----------------------------------------------------------------------------------------------------------
# The authors' code, imported from a checkout


def ensure_module(name: str, **attrs) -> types.ModuleType:
    """The module `name` from sys.modules, or a stand-in registered there; missing `attrs` are added."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so that find_spec still answers
        sys.modules[name] = mod
    for k, v in attrs.items():
        if not hasattr(mod, k):
            setattr(mod, k, v)
    return mod


class _Unused:
    """A stand-in class the authors' model imports but never uses."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("diff_authors: a stand-in for a library the authors' model does not use was called")


def import_authors_pips(repo: str | Path) -> type:
    """The authors' Pips class, imported unmodified from their checkout `repo`.

    Their modules import `utils.*` and `nets.*` as top-level packages, names this project's own folders also
    have: they are loaded as packages whose path is the checkout's folder, then moved out of sys.modules
    under another name (their functions keep their own references), so no later import sees them.
    einops and prettytable, which their model imports but does not use, are stood in for when missing.
    """
    repo = Path(repo).resolve()
    if not (repo / "nets" / "pips2.py").is_file() or not (repo / "utils" / "samp.py").is_file():
        die(f"diff_authors: {repo}: not a checkout of aharley/pips2 (no nets/pips2.py, utils/samp.py)")
    if problem := code_folder_problem(repo, "--authors_repo"):  # its code runs as this user
        die(f"diff_authors: {problem}")
    if importlib.util.find_spec("einops") is None:
        from bench_lbm import rearrange

        ensure_module("einops", rearrange=rearrange, repeat=_Unused)
        ensure_module("einops.layers", __path__=[])
        ensure_module("einops.layers.torch", Rearrange=_Unused, Reduce=_Unused)
    if importlib.util.find_spec("prettytable") is None:
        ensure_module("prettytable", PrettyTable=_Unused)

    def theirs(k: str) -> bool:
        return k in ("utils", "nets") or k.startswith(("utils.", "nets."))

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if theirs(k)}
    try:
        for pkg in ("utils", "nets"):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(repo / pkg)]
            sys.modules[pkg] = mod
        cls = importlib.import_module("nets.pips2").Pips
    finally:
        for k in [k for k in sys.modules if theirs(k)]:
            sys.modules[f"authors_pips2.{k}"] = sys.modules.pop(k)
        sys.modules.update(saved)
    return cls


@contextlib.contextmanager
def cuda_is_cpu() -> Iterator[None]:
    """While the authors' forward runs: its first line makes an unused loss accumulator with
    `torch.tensor(0.0).cuda()`, which fails without CUDA; `.cuda()` then returns the tensor itself."""
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def commit_of(repo: str | Path, given: str | None) -> str:
    """The commit of the authors' code: --authors_commit, else the checkout's, else 'unknown' (a `git archive`
    has none)."""
    if given:
        return str(given)
    res = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def authors_pips_model(repo: str | Path) -> torch.nn.Module:
    """The authors' Pips in float64 eval mode with the golden weights (strict: the key names are theirs)."""
    cls = import_authors_pips(repo)
    torch.manual_seed(0)  # their constructor draws an init we overwrite; keep the global stream predictable
    model = cls(stride=8)
    load_golden_weights_into(model)
    return model.double().eval()


def load_golden_weights_into(model: torch.nn.Module) -> None:
    """The golden weights of our Pips's keys and order, loaded strictly into `model`."""
    ours = load_golden_weights(Pips())
    model.load_state_dict(ours.state_dict(), strict=True)


def our_model(plan: ExecPlan) -> Pips:
    """Our Pips with the golden weights in float64 eval mode, running `plan`."""
    return load_golden_weights(Pips(plan)).double().eval()


# ----------------------------------------------------------------------------------------------------------
# Cases


# cases every draw starts with, so that the extremes of every range are there: (H, W), B, S, N, iters
PIPS_CORNERS = [((128, 192), 1, 12, 24, 6), ((128, 128), 1, 2, 64, 1), ((136, 200), 1, 16, 1, 8),
                ((200, 136), 2, 16, 4, 2), ((128, 232), 1, 3, 40, 1), ((152, 168), 2, 4, 8, 4)]


def draw_pips_cases(seed: int, n: int, budget: int, corners: bool = True) -> list[TrackCase]:
    """n cases from `seed`: first PIPS_CORNERS (all three calls; unless not `corners`), then random ones: a video
    size and window, B (2 one time in 7), S in 2..4 one time in 10 and in 5..16 otherwise, N log-uniform in
    1..64, iters in 1..8 with odds 1/iters, drawn again while B*S*N*iters exceeds `budget` (the test's running
    time), and 1, 2 or 3 calls."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        if corners and i < len(PIPS_CORNERS):
            (H, W), B, S, N, iters = PIPS_CORNERS[i]
            calls = 3
        else:
            while True:
                B = 2 if rng.random() < 1 / 7 else 1
                # clips of 2 to 4 frames are chaotic (docs/CORRECTNESS.md): a tenth of the cases, not a fifth
                S = rng.randint(2, 4) if rng.random() < 0.1 else rng.randint(5, 16)
                iters = rng.choices(range(1, 9), weights=[1 / k for k in range(1, 9)])[0]
                N = min(64, max(1, round(math.exp(rng.uniform(0, math.log(64.5))))))
                if B * S * N * iters <= budget:
                    break
            H, W = rng.choice(VIDEO_SIZES)
            calls = rng.randint(1, 3)
        v = VIDEO_SIZES.index((H, W))
        cases.append(TrackCase(seed=seed * 100_000 + i, video_seed=seed * 100 + v, H=H, W=W,
                               start=rng.randint(0, VIDEO_FRAMES - S), B=B, S=S, N=N, iters=iters, calls=calls))
    return cases


class Videos:
    """Golden videos made once each."""

    def __init__(self):
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def __call__(self, case: TrackCase) -> torch.Tensor:
        """The case's video."""
        key = (case.video_seed, case.H, case.W)
        if key not in self.cache:
            self.cache[key] = case.video()
        return self.cache[key]


def case_arrays(cases: list) -> dict[str, np.ndarray]:
    """The cases' settings as one int64 array per field."""
    return {f.name: np.array([getattr(c, f.name) for c in cases], dtype=np.int64) for f in fields(cases[0])}


# ----------------------------------------------------------------------------------------------------------
# How far a case's outputs can be trusted: the authors' own spread

SPREADS = 10  # a case passes within max(tol, SPREADS x its spread); see docs/CORRECTNESS.md
NUDGE = 2.0**-50  # relative change of the initial estimates that measures the spread


def nudged(trajs0: torch.Tensor, seed: int) -> torch.Tensor:
    """The initial estimates with every coordinate after frame 0 moved by a relative 2^-50 (a few float64
    rounding steps), in a direction drawn from `seed`: the outputs' change measures how much a float64
    rounding anywhere in the computation can move them (for 2 or 3 frames the delta block's instance norms
    amplify it to whole pixels)."""
    g = torch.Generator().manual_seed(seed)
    sign = (torch.randint(0, 2, trajs0.shape, generator=g) * 2 - 1).to(trajs0.dtype)
    out = trajs0 * (1 + sign * NUDGE)
    out[:, 0] = trajs0[:, 0]
    return out


CHAOS_CHECK = 1e-11  # px: an input-nudge spread above this (or a clip of 2 to 4 frames) gets the weight nudges too
WEIGHT_NUDGES = (1, 2)  # seeds of the two weight-nudged copies of the authors' model


def weight_nudged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `model` with every weight moved by a relative 2^-52 (one float64 rounding), in directions drawn
    from `seed`: every product of the computation rounds a little differently, as under another evaluation
    order (an input nudge alone perturbs the later calls of a case only through their inputs)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            sign = (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype)
            p.mul_(1 + sign * 2.0**-52)
    return out


def bound(spread: np.ndarray, tol: float) -> np.ndarray:
    """The allowed |ours - theirs| for outputs whose spread is `spread`."""
    return np.maximum(tol, SPREADS * spread)


# ----------------------------------------------------------------------------------------------------------
# Running


class Stop:
    """Set by SIGTERM until `restore`: the loop finishes the case under way, saves and stops."""

    def __init__(self):
        self.requested = False
        self.before = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame) -> None:
        """Note the request."""
        self.requested = True

    def restore(self) -> None:
        """The SIGTERM handler from before again."""
        signal.signal(signal.SIGTERM, self.before)


def _exit_if_unfinished(stopped: bool, differs: bool) -> None:
    """Exit 1 after a run stopped early (the same command goes on from its cases) or one that found differences."""
    if stopped:
        print("diff_authors: stopped before the end; run the same command again to go on")
        sys.exit(1)
    if differs:
        sys.exit(1)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed to a temporary name, then renamed into place."""
    if problem := output_folder_problem(path, "--out"):  # never through another user's link or into their folder
        die(f"diff_authors: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path.parent, f".{path.name}.")  # a random name: a link planted at a fixed one is not met
    try:
        with os.fdopen(fd, "wb") as f:
            # numpy's stub reads **arrays as if it could hold its allow_pickle parameter
            np.savez_compressed(f, **arrays)  # pyright: ignore[reportArgumentType]
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def finished_before(path: Path, cases: list, outputs: tuple[str, ...]) -> list[dict]:
    """The outputs of the leading cases an earlier run of the same command stored in `path` (resume)."""
    if not path.is_file():
        return []
    with np.load(path, allow_pickle=False) as data:
        done = stored_cases(data, type(cases[0]))
        if done != cases[:len(done)]:
            die(f"diff_authors: {path}: holds other cases than this command draws; remove it or give "
                             "another --out")
        out = [{"fingerprint": str(data["fingerprint"][i]), "spread": data["spread"][i]} for i in range(len(done))]
        for k in outputs:
            for d, sl in zip(out, case_slices(done, k), strict=True):
                d[k] = data[k][sl]
        return out


def compare_plans(spec) -> list[str]:
    """--compare: plan names (fire gives a tuple for a,b), 'all', or empty."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec or "").split(",")
    names = [str(s) for s in items if s]
    names = list(PLANS) if names == ["all"] else names
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        die(f"diff_authors: --compare: unknown plan {unknown[0]!r} (known: {', '.join(PLANS)}, all)")
    return names


def pips(authors_repo: str, out: str | None = None, cases: int = 200, seed: int = 0, budget: int = 128,
         corners: bool = True, compare: str = "", tol: float = 1e-9, threads: int = 1,
         authors_commit: str | None = None) -> None:
    """The authors' PIPs++ over `cases` seeded cases in float64: their outputs to --out, and/or ours on the
    --compare plans against them (exit 1 if a case differs by more than max(--tol px, SPREADS x its spread))."""
    torch.set_num_threads(threads)
    plans = compare_plans(compare)
    if out is None and not plans:
        die("diff_authors: give --out (write the authors' outputs) and/or --compare (check ours)")
    if cases < 1 or budget < 2:
        die("diff_authors: --cases must be at least 1 and --budget at least 2")
    todo = draw_pips_cases(seed, cases, budget, corners)
    done = finished_before(Path(out), todo, PIPS_OUTPUTS) if out else []
    if done:
        print(f"diff_authors: {out}: {len(done)} of {len(todo)} cases done earlier, going on", flush=True)
    theirs = authors_pips_model(authors_repo)
    theirs_nudged = [weight_nudged(theirs, k) for k in WEIGHT_NUDGES]
    ours = {name: our_model(PLANS[name]) for name in plans}
    videos, stop, bad = Videos(), Stop(), []
    worst, worst_ratio = dict.fromkeys(plans, 0.0), dict.fromkeys(plans, 0.0)
    try:
        for case in tqdm(todo[len(done):], desc="pips cases", unit="case", mininterval=5):
            if stop.requested:
                break
            rgbs, trajs0 = case.clip(videos(case)), case.tracks()
            with torch.no_grad(), cuda_is_cpu():
                res = track_three_ways(theirs, trajs0, rgbs, case.iters, calls=case.calls)
                moved = track_three_ways(theirs, nudged(trajs0, case.seed), rgbs, case.iters, calls=case.calls)
                spread = np.array([(res[k] - moved[k]).abs().max().item() if k in res else 0.0 for k in PIPS_OUTPUTS])
                if case.S <= 4 or spread.max() > CHAOS_CHECK:  # chaotic: a spread from one nudge can be far too low
                    for other in theirs_nudged:
                        alt = track_three_ways(other, trajs0, rgbs, case.iters, calls=case.calls)
                        spread = np.maximum(spread, [(res[k] - alt[k]).abs().max().item() if k in res else 0.0
                                                     for k in PIPS_OUTPUTS])
            done.append({k: res[k].numpy().reshape(-1) if k in res else np.zeros(0) for k in PIPS_OUTPUTS}
                        | {"fingerprint": fingerprint(rgbs, trajs0), "spread": spread})
            for name in plans:
                with torch.no_grad():
                    got = track_three_ways(ours[name], trajs0, rgbs, case.iters, calls=case.calls)
                err = np.array([(got[k] - res[k]).abs().max().item() if k in res else 0.0 for k in PIPS_OUTPUTS])
                ratio = err / np.maximum(spread, tol / SPREADS)
                worst[name] = max(worst[name], err.max())
                worst_ratio[name] = max(worst_ratio[name], ratio.max())
                if (spread > tol / SPREADS).any():
                    tqdm.write(f"{name}: case {len(done) - 1} (S={case.S}) is ill-conditioned: |ours - theirs| "
                               + ", ".join(f"{e:.1e}" for e in err) + " px, spread "
                               + ", ".join(f"{x:.1e}" for x in spread))
                if (err > bound(spread, tol)).any():
                    per_iter = (got["out_iters"] - res["out_iters"]).abs().flatten(1).amax(1)
                    first = int((per_iter > tol).nonzero()[0]) if (per_iter > tol).any() else None
                    bad.append((name, len(done) - 1))
                    tqdm.write(f"{name}: case {len(done) - 1} {case}: " + ", ".join(
                        f"{k} {e:.2e} px (spread {sp:.1e})" for k, e, sp in zip(PIPS_OUTPUTS, err, spread, strict=True))
                        + f"; first iteration beyond {tol:g} px: {first}")
    except KeyboardInterrupt:
        stop.requested = True
    finally:
        stop.restore()
        if out and done:
            arrays = case_arrays(todo[:len(done)]) | {k: np.concatenate([d[k] for d in done]) for k in PIPS_OUTPUTS}
            arrays |= {"fingerprint": np.array([d["fingerprint"] for d in done]),
                       "spread": np.stack([d["spread"] for d in done]),
                       "authors_commit": np.array(commit_of(authors_repo, authors_commit)),
                       "generator": np.array(f"benchmarks/diff_authors.py pips --seed={seed} --cases={cases} "
                                             f"--budget={budget} --corners={corners}")}
            write_npz(Path(out), arrays)
    print(f"diff_authors pips: {len(done)} of {len(todo)} cases" + (f" written to {out}" if out else ""))
    for name in plans:
        n_bad = sum(1 for b in bad if b[0] == name)
        print(f"  {name}: worst |ours - theirs| {worst[name]:.2e} px, worst ratio to the spread "
              f"{worst_ratio[name]:.2f}; {n_bad} cases beyond max({tol:g} px, {SPREADS} x spread)")
    if done:
        spreads = np.stack([d["spread"] for d in done]).max(1)
        print(f"  ill-conditioned cases (the authors' own spread above {tol / SPREADS:g} px): "
              f"{int((spreads > tol / SPREADS).sum())} of {len(done)}")
    _exit_if_unfinished(stop.requested, bool(bad))


# ----------------------------------------------------------------------------------------------------------
# LBM

LBM_SPEC = Path(__file__).resolve().parents[1] / "tests" / "data" / "lbm" / "state_dict.json"
# source frame sizes: the model's input size, larger, smaller, and not of its aspect
LBM_SIZES = [(96, 128), (120, 160), (72, 100), (100, 180), (128, 96)]
LBM_MEMORY = (12, 4, 3)  # the weights' memory length, and shorter ones that the clips overrun
# thousandths added to the visibility bias: never visible, often flipping (the logits' median then lies near
# the threshold), mostly visible
LBM_VIS_SHIFTS = (0, 1700, 2000, 2000, 2300, 3500)
LBM_FLOATS = ("points", "rho")
VIS_KEY = "transformer.vis_head.net.3.bias"


def draw_lbm_cases(seed: int, n: int) -> list[LbmCase]:
    """n LBM cases from `seed`: T uniform in 2..12, the start frame the first (a quarter), the last (a quarter)
    or any, N log-uniform in 1..32, a source size, memory length and visibility shift from the lists above."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        H, W = rng.choice(LBM_SIZES)
        T = rng.randint(2, 12)
        start = rng.choice([0, T - 1, rng.randint(0, T - 1), rng.randint(0, T - 1)])
        cases.append(LbmCase(seed=seed * 100_000 + i, T=T, start=start,
                             N=min(32, max(1, round(math.exp(rng.uniform(0, math.log(32.5)))))), H=H, W=W,
                             memory=rng.choice(LBM_MEMORY), vis_shift_milli=rng.choice(LBM_VIS_SHIFTS)))
    return cases


def lbm_spec() -> tuple[dict, list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """The golden LBM's configuration and its state_dict entries (tests/data/lbm/state_dict.json)."""
    spec = json.loads(LBM_SPEC.read_text())
    return spec["config"], [(e["name"], tuple(e["shape"]), getattr(torch, e["dtype"])) for e in spec["keys"]]


def lbm_weights(case: LbmCase, integers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The golden LBM weights with the case's visibility shift."""
    sd = lbm_golden_state_dict(lbm_spec()[1], integers)
    sd[VIS_KEY] = sd[VIS_KEY].clone()
    sd[VIS_KEY][0] += case.vis_shift_milli / 1000
    return sd


class TheirsOnline:
    """The authors' LBM_online behind `track_online`'s tracker interface; start = their init, then their
    online_forward on the same frame (their demo does not step the first frame; ours does)."""

    STATE = ("query", "query_points", "collision_dist", "stream_dist", "vis_mask", "mem_mask")

    def __init__(self, model: Any):  # the authors' online tracker: attributes set and called as theirs are
        self.model = model

    def start(self, points: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Start the points on this frame and step it."""
        for name in self.STATE:  # their init keeps an earlier init's state
            setattr(self.model, name, None)
        self.model.t, self.model.N = 0, 0
        self.model.init(points, frame)
        return self.step(frame)

    def step(self, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One frame: points, visibility, rho probability."""
        points, vis, rho, _ = self.model.online_forward(frame)
        return points, vis, rho


def authors_lbm_model(cls: type, case: LbmCase, integers: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The authors' LBM_online for a case: golden weights (strict), float64, eval, the case's memory length."""
    config = lbm_spec()[0]
    model = cls(argparse.Namespace(**config))
    model.load_state_dict(lbm_weights(case, integers), strict=True)
    model = model.double().eval()
    if case.memory != config["memory_size"]:
        model.set_memory_size(case.memory)
    return model


def our_lbm_model(case: LbmCase) -> LBM:
    """Our LBM for a case, as authors_lbm_model."""
    config = lbm_spec()[0]
    model = LBM(**config)
    model.load_state_dict(lbm_weights(case, model.state_dict()), strict=True)
    model = model.double().eval()
    if case.memory != config["memory_size"]:
        model.set_memory_size(case.memory)
    return model


class OursOnline:
    """Our LBMOnlineState behind `track_online`'s tracker interface."""

    def __init__(self, model: LBM):
        self.online = LBMOnlineState(model)

    def start(self, points: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Start the points on this frame (stepping it)."""
        r = self.online.init(points, frame)
        return r["points"], r["visibility"], r["rho_prob"]

    def step(self, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One frame."""
        r = self.online.track(frame)
        return r["points"], r["visibility"], r["rho_prob"]


def nudged_points(points: torch.Tensor, seed: int) -> torch.Tensor:
    """Every coordinate moved by a relative 2^-50, as `nudged` does for PIPs++."""
    g = torch.Generator().manual_seed(seed)
    sign = (torch.randint(0, 2, points.shape, generator=g) * 2 - 1).to(points.dtype)
    return points * (1 + sign * NUDGE)


def lbm_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> np.ndarray:
    """max |a - b| of the points and of rho, and the number of visibility flags that differ."""
    return np.array([(a[k] - b[k]).abs().max().item() for k in LBM_FLOATS]
                    + [int((a["visibility"] != b["visibility"]).sum())], dtype=np.float64)


def lbm(authors_repo: str, out: str | None = None, cases: int = 60, seed: int = 0, compare: bool = False,
        tol: float = 1e-9, threads: int = 1, authors_commit: str | None = None) -> None:
    """The authors' online LBM over `cases` seeded cases in float64: their outputs to --out, and/or (--compare)
    ours (LBMOnlineState and LBM.inference) against them (exit 1 if a case differs by more than max(--tol,
    SPREADS x spread), or a visibility flag differs that the nudge does not flip)."""
    from bench_lbm import import_authors

    torch.set_num_threads(threads)
    if out is None and not compare:
        die("diff_authors: give --out (write the authors' outputs) and/or --compare (check ours)")
    if cases < 1:
        die("diff_authors: --cases must be at least 1")
    todo = draw_lbm_cases(seed, cases)
    done = finished_before(Path(out), todo, (*LBM_FLOATS, "visibility")) if out else []
    if done:
        print(f"diff_authors: {out}: {len(done)} of {len(todo)} cases done earlier, going on", flush=True)
    if not (Path(authors_repo) / "lbm" / "models" / "lbm_online.py").is_file():
        die(f"diff_authors: {authors_repo}: not a checkout of George-Zhuang/lbm (no lbm/models/lbm_online.py)")
    cls = import_authors(authors_repo)
    integers = LBM(**lbm_spec()[0]).state_dict()
    stop, bad, worst, worst_ratio = Stop(), [], 0.0, 0.0
    try:
        for case in tqdm(todo[len(done):], desc="lbm cases", unit="case", mininterval=5):
            if stop.requested:
                break
            video, points = case.inputs()
            theirs = authors_lbm_model(cls, case, integers)
            with torch.no_grad():
                res = track_online(TheirsOnline(theirs), video, points, case.start)
                moved = track_online(TheirsOnline(theirs), video, nudged_points(points, case.seed), case.start)
            spread = lbm_differences(res, moved)
            done.append({k: res[k].numpy().reshape(-1) for k in (*LBM_FLOATS, "visibility")}
                        | {"fingerprint": fingerprint(video, points), "spread": spread})
            if compare:
                ours = our_lbm_model(case)
                for name, got in (("online", track_online(OursOnline(ours), video, points, case.start)),
                                  ("inference", lbm_inference_from(ours, video, points, case.start))):
                    err = lbm_differences(got, res)
                    worst = max(worst, err[:-1].max())
                    worst_ratio = max(worst_ratio, (err[:-1] / np.maximum(spread[:-1], tol / SPREADS)).max())
                    if (err[:-1] > bound(spread[:-1], tol)).any() or (err[-1] and not spread[-1]):
                        bad.append(len(done) - 1)
                        tqdm.write(f"lbm {name}: case {len(done) - 1} {case}: points {err[0]:.2e} px, rho "
                                   f"{err[1]:.2e} (spread {spread[0]:.1e}, {spread[1]:.1e}); visibility flags "
                                   f"differing {int(err[2])} (flipped by the nudge {int(spread[2])})")
    except KeyboardInterrupt:
        stop.requested = True
    finally:
        stop.restore()
        if out and done:
            arrays = case_arrays(todo[:len(done)])
            arrays |= {k: np.concatenate([d[k] for d in done]) for k in (*LBM_FLOATS, "visibility")}
            arrays |= {"fingerprint": np.array([d["fingerprint"] for d in done]),
                       "spread": np.stack([d["spread"] for d in done]),
                       "authors_commit": np.array(commit_of(authors_repo, authors_commit)),
                       "generator": np.array(f"benchmarks/diff_authors.py lbm --seed={seed} --cases={cases}")}
            write_npz(Path(out), arrays)
    print(f"diff_authors lbm: {len(done)} of {len(todo)} cases" + (f" written to {out}" if out else ""))
    if done:
        spreads = np.stack([d["spread"] for d in done])
        ill = (spreads[:, :-1] > tol / SPREADS).any(1) | (spreads[:, -1] > 0)
        flips = sum(int(np.diff(d["visibility"].reshape(c.T - c.start, c.N), axis=0).any())
                    for c, d in zip(todo, done, strict=False))
        print(f"  ill-conditioned cases (the authors' own spread above {tol / SPREADS:g}, or a visibility flag "
              f"flipped by the nudge): {int(ill.sum())} of {len(done)}; cases whose visibility changes over time: "
              f"{flips}")
    if compare:
        print(f"  ours (online and inference): worst |ours - theirs| {worst:.2e}, worst ratio to the spread "
              f"{worst_ratio:.2f}; {len(bad)} runs beyond max({tol:g}, {SPREADS} x spread) or with other visibility")
    _exit_if_unfinished(stop.requested, bool(bad))


def lbm_inference_from(model: LBM, video: torch.Tensor, points: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
    """Our LBM.inference with every point queried on frame `start`, from that frame on (what the online tracker
    started there gives): points, visibility, rho probability."""
    queries = torch.cat([torch.full_like(points[:, :1], start), points], -1).unsqueeze(0)
    r = model.inference(video, queries, with_raw=True)
    return {"points": r["points"][0, start:], "visibility": r["visibility"][0, start:],
            "rho": torch.sigmoid(r["rho"][0, start:])}


# ----------------------------------------------------------------------------------------------------------
# The numbers docs/CORRECTNESS.md quotes


def stats(pips_file: str = "tests/data/diff_pips_f64.npz", lbm_file: str = "tests/data/lbm/diff_lbm_f64.npz",
          plans: str = "", tol: float = 1e-9, threads: int = 1) -> None:
    """The stored files' spreads: how many cases are held to --tol itself (spread at most tol / SPREADS), their
    largest and median spread, the frame counts of the others; with --plans=a,b (or all), how far our model on
    those plans lands from the authors on those other cases, in multiples of their spread."""
    torch.set_num_threads(threads)
    names = compare_plans(plans)
    for path in (pips_file, lbm_file):
        if not Path(path).is_file():
            die(f"diff_authors: {path}: no such file")
    with np.load(pips_file, allow_pickle=False) as data:
        cases = stored_cases(data, TrackCase)
        spread = data["spread"].max(1)
        theirs = {k: [data[k][sl] for sl in case_slices(cases, k)] for k in PIPS_OUTPUTS}
        per_output = data["spread"]
    well = spread <= tol / SPREADS
    ill = [i for i in range(len(cases)) if not well[i]]
    print(f"pips: {pips_file}: {len(cases)} cases; {int(well.sum())} held to {tol:g} px (spread at most "
          f"{spread[well].max():.1e} px, median {np.median(spread[well]):.1e} px); {len(ill)} others, with S = "
          f"{sorted(cases[i].S for i in ill)}; clips of 2 to 4 frames: {sum(c.S <= 4 for c in cases)}")
    with np.load(lbm_file, allow_pickle=False) as data:
        lbm_spread = data["spread"]
    print(f"lbm: {lbm_file}: {len(lbm_spread)} cases; spread at most {lbm_spread[:, 0].max():.1e} px (points), "
          f"{lbm_spread[:, 1].max():.1e} (rho); visibility flags flipped by the nudge: {int(lbm_spread[:, 2].sum())}")
    videos = Videos()
    for name in names:
        model, worst, worst_case = our_model(PLANS[name]), 0.0, None
        for i in tqdm(ill, desc=name, unit="case", mininterval=5):
            c = cases[i]
            with torch.no_grad():
                got = track_three_ways(model, c.tracks(), c.clip(videos(c)), c.iters, calls=c.calls)
            err = np.array([np.abs(got[k].numpy().reshape(-1) - theirs[k][i]).max() if k in got else 0.0
                            for k in PIPS_OUTPUTS])
            ratio = (err / np.maximum(per_output[i], tol / SPREADS)).max()
            if ratio > worst:
                worst, worst_case = ratio, i
        print(f"  {name}: on those {len(ill)} cases |ours - theirs| is at most {worst:.2f} x the spread"
              + (f" (case {worst_case}, S={cases[worst_case].S})" if worst_case is not None else ""))


if __name__ == "__main__":
    fire.Fire({"pips": pips, "lbm": lbm, "stats": stats})
