"""Deterministic golden weights (docs/MODEL.md), used for the golden test vectors, tests and benchmarks, and
deterministic inputs for the differential cases against the authors' code (docs/CORRECTNESS.md)."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def golden_state_dict(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """For the i-th (name, shape): seeded float64 normals scaled by tensor kind, dense x0.05, then float32."""
    out = {}
    for i, (name, shape) in enumerate(shapes):
        g = torch.Generator().manual_seed(1000 + i)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.01 * t
        if name.startswith("delta_block.dense."):
            t = t * 0.05
        out[name] = t.float()
    return out


def lbm_golden_state_dict(entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                          integers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LBM's deterministic weights (docs/LBM.md): entry i (name, shape, dtype) from its own generator seeded
    5000 + i, scaled by kind; integer entries (batch-norm counters) are taken from `integers`."""
    out = {}
    for i, (name, shape, dtype) in enumerate(entries):
        if not dtype.is_floating_point:
            out[name] = integers[name].clone()
            continue
        t = torch.randn(shape, generator=torch.Generator().manual_seed(5000 + i), dtype=torch.float64)
        if name.endswith("running_var"):
            t = 1 + 0.1 * t.abs()
        elif name.endswith("running_mean"):
            t = 0.05 * t
        elif len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.02 * t
        out[name] = t.to(dtype)
    return out


def load_golden_weights(model: ModuleT) -> ModuleT:
    """Fill a Pips with the golden weights (its state-dict order is the checkpoint's, which tests check)."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(golden_state_dict(shapes), strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------
# Deterministic differential cases: inputs made from a seed, so that only settings and the authors' outputs
# are stored (tests/data/diff_pips_f64.npz, benchmarks/diff_authors.py, docs/CORRECTNESS.md)

VIDEO_FRAMES = 16  # frames of a golden video; a case's clip is a window of it


def golden_video(seed: int, hw: tuple[int, int], frames: int = VIDEO_FRAMES) -> torch.Tensor:
    """(frames, 3, H, W) float64 holding whole numbers 0..255, the same on every machine (integer arithmetic
    only): a blocky random texture drifting by whole pixels, and a rectangle of one colour moving over it."""
    H, W = hw
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (3, H // 4 + 1, W // 4 + 1), generator=g)
    texture = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :H, :W]
    texture = (texture + torch.randint(-12, 13, (3, H, W), generator=g)).clamp(0, 255)
    drift = torch.randint(-3, 4, (2,), generator=g).tolist()
    box_hw = torch.randint(16, 41, (2,), generator=g).tolist()
    box_at = [int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))]
    box_speed = torch.randint(-6, 7, (2,), generator=g).tolist()
    colour = torch.randint(0, 256, (3, 1, 1), generator=g)
    out = torch.empty(frames, 3, H, W, dtype=torch.float64)
    for t in range(frames):
        frame = torch.roll(texture, (drift[0] * t, drift[1] * t), (1, 2)).clone()
        y0, x0 = box_at[0] + box_speed[0] * t, box_at[1] + box_speed[1] * t
        frame[:, max(y0, 0):max(y0 + box_hw[0], 0), max(x0, 0):max(x0 + box_hw[1], 0)] = colour
        out[t] = frame
    return out


def special_positions(size: int, stride: int = 8, levels: int = 4) -> torch.Tensor:
    """Pixel positions along an axis of `size` pixels where sampling rules differ: on, next to and beyond
    the frame's borders (0, size - 1) and the feature map's (the centre of its last cell, stride * (size //
    stride - 1)), and exact halves of a cell at every pyramid level (float64)."""
    last = stride * (size // stride - 1)
    eps = 1e-6
    vals = [0, eps, -eps, 0.5, -0.5, -1, -4, -8, -12.5, -30, size - 1, size - 1 - eps, size - 1 + eps, size - 1.5,
            size - 0.5, size, size + 3.5, size + 30, last, last - eps, last + eps, last - 0.5, last + 0.5,
            last - stride / 2, last + stride / 2]
    for lvl in range(levels):
        cell = stride * 2**lvl
        vals += [cell / 2, cell * (size // cell) - cell / 2, cell * (size // (2 * cell)) + cell / 2]
    return torch.tensor(vals, dtype=torch.float64)


def golden_tracks(seed: int, B: int, S: int, N: int, hw: tuple[int, int]) -> torch.Tensor:
    """(B, S, N, 2) float64 initial estimates in pixels, frame 0 the queries, the same on every machine.

    Each coordinate of a query is uniform over the frame or one of `special_positions`. Each point's later
    frames: the query again (zero velocity); a straight line that leaves the frame during the clip; a
    random walk; fresh uniform positions around the frame; or special positions, frame by frame.
    """
    H, W = hw
    g = torch.Generator().manual_seed(seed)

    def along(size: int, shape: tuple[int, ...]) -> torch.Tensor:
        special = special_positions(size)
        pick = special[torch.randint(0, len(special), shape, generator=g)]
        uniform = torch.rand(shape, generator=g, dtype=torch.float64) * (size - 1)
        return torch.where(torch.rand(shape, generator=g) < 0.4, uniform, pick)

    def positions(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([along(W, shape), along(H, shape)], -1)

    size = torch.tensor([W, H], dtype=torch.float64)
    query = positions((B, N))  # B,N,2
    t = torch.arange(S, dtype=torch.float64).view(1, S, 1, 1)
    still = query.unsqueeze(1).expand(B, S, N, 2)
    # a straight line from the query to a point up to 40 px beyond a random border, reached at a random frame
    beyond = 1 + 39 * torch.rand(B, 1, N, generator=g, dtype=torch.float64)
    across = torch.rand(B, 1, N, 2, generator=g, dtype=torch.float64) * (size + 80) - 40
    side = torch.randint(0, 4, (B, 1, N), generator=g)
    exit_x = torch.where(side == 0, -beyond, torch.where(side == 1, W - 1 + beyond, across[..., 0]))
    exit_y = torch.where(side == 2, -beyond, torch.where(side == 3, H - 1 + beyond, across[..., 1]))
    exit_at = torch.stack([exit_x, exit_y], -1)
    reach = 1 + torch.rand(B, 1, N, 1, generator=g, dtype=torch.float64) * max(S - 2, 0)
    line = still + (exit_at - still[:, :1]) * t / reach
    walk = still + torch.cumsum(torch.randn(B, S, N, 2, generator=g, dtype=torch.float64) * 3, 1)
    noise = torch.rand(B, S, N, 2, generator=g, dtype=torch.float64) * (size + 32) - 16
    jumps = positions((B, S, N))
    kind = torch.randint(0, 5, (B, 1, N, 1), generator=g)
    out = still.clone()
    for k, form in enumerate((still, line, walk, noise, jumps)):
        out = torch.where(kind == k, form, out)
    out[:, 0] = query
    return out


@dataclass(frozen=True)
class TrackCase:
    """One differential case: a window of a golden video, initial estimates from a seed, and iterations."""

    seed: int  # of the initial estimates (golden_tracks)
    video_seed: int
    H: int
    W: int
    start: int  # first frame of the window in the video
    B: int  # 1, or 2: the second clip is the same window backwards
    S: int
    N: int
    iters: int
    calls: int = 3  # the first 1, 2 or all 3 of track_three_ways's calls

    def video(self) -> torch.Tensor:
        """The whole video (VIDEO_FRAMES, 3, H, W) the case's clips are cut from."""
        return golden_video(self.video_seed, (self.H, self.W))

    def clip(self, per_frame: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) from a per-frame tensor of the case's video (its frames or its feature maps)."""
        window = per_frame[self.start:self.start + self.S]
        return torch.stack([window, window.flip(0)][:self.B])

    def tracks(self) -> torch.Tensor:
        """The initial estimates (B, S, N, 2) float64, frame 0 the queries."""
        return golden_tracks(self.seed, self.B, self.S, self.N, (self.H, self.W))


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of a case's inputs, stored with the outputs: it tells when this code no longer makes the
    inputs the outputs were computed from (another torch random stream, an edited recipe)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def track_three_ways(model: Callable, trajs0: torch.Tensor, clip: torch.Tensor, iters: int,
                     clip_is_fmaps: bool = False, calls: int = 3) -> dict[str, torch.Tensor]:
    """The calls of a differential case (as the golden vectors): a forward (`out_iters`, every iteration's
    estimate and the final one, `out` the final one), a second call on the clip backwards from `out` with the
    first call's templates as feat_init (`out_chain`), and the first call again with them (`out_featinit`);
    only the first `calls` of them.

    `clip` holds frames (B,S,3,H,W), or feature maps (B,S,H8,W8,C) of a model that takes `fmaps=` when
    `clip_is_fmaps`; `model` is any callable with the authors' forward signature.
    """
    def call(start, frames, **kw):
        if clip_is_fmaps:
            return model(start, None, iters=iters, fmaps=frames, **kw)
        return model(start, frames, iters=iters, **kw)

    preds, _, feats, _ = call(trajs0, clip)
    out = dict(out=preds[-1], out_iters=torch.stack(preds))
    if calls >= 2:
        out["out_chain"] = call(preds[-1], clip.flip(1), feat_init=feats)[0][-1]
    if calls >= 3:
        out["out_featinit"] = call(trajs0, clip, feat_init=feats)[0][-1]
    return out


@dataclass(frozen=True)
class LbmCase:
    """One differential case of LBM's online tracker: a golden video at a source size, points started on frame
    `start` (the last frame included) on, next to and beyond its borders and tracked to the end, the model's
    memory length and a shift of its visibility bias (which decides how often points are visible, so how often
    the memory is read and visibility flips)."""

    seed: int
    T: int
    start: int
    N: int
    H: int  # source frame size; the model resizes frames to its input size
    W: int
    memory: int
    vis_shift_milli: int  # added to the visibility logit's bias, in thousandths

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """video (1,T,3,H,W) float64 whole numbers and points (N,2) (x,y) source px, the same on every machine."""
        g = torch.Generator().manual_seed(self.seed)
        video = golden_video(self.seed, (self.H, self.W), frames=self.T).unsqueeze(0)

        def along(size: int) -> torch.Tensor:
            special = special_positions(size, stride=4)
            pick = special[torch.randint(0, len(special), (self.N,), generator=g)]
            uniform = torch.rand(self.N, generator=g, dtype=torch.float64) * (size - 1)
            return torch.where(torch.rand(self.N, generator=g) < 0.4, uniform, pick)

        return video, torch.stack([along(self.W), along(self.H)], -1)


def track_online(tracker, video: torch.Tensor, points: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
    """An online tracker started with `points` (N,2) on frame `start` of video (1,T,3,H,W) and stepped to its
    end: points (T-start,N,2), visibility and rho probability (T-start,N). `tracker.start(points, frame)` and
    `tracker.step(frame)` return (points, visibility, rho probability) of that frame."""
    steps = [tracker.start(points.clone(), video[:, start].clone())]
    steps += [tracker.step(video[:, t].clone()) for t in range(start + 1, video.shape[1])]
    return {k: torch.stack([s[i] for s in steps]) for i, k in enumerate(("points", "visibility", "rho"))}


# ----------------------------------------------------------------------------------------------------------
# Stored cases: one int64 array per setting, outputs of all cases concatenated into one flat array per output


def stored_cases(data, cls: type) -> list:
    """The cases (TrackCase or LbmCase) a file (an npz mapping) stores."""
    names = [f.name for f in fields(cls)]
    return [cls(**{k: int(data[k][i]) for k in names}) for i in range(len(data[names[0]]))]


def case_values(case, key: str) -> int:
    """How many values one case holds in output `key`: PIPs++ (B,S,N,2); LBM points (T-start,N,2), its
    visibility and rho (T-start,N)."""
    if isinstance(case, TrackCase):
        made = {"out": 1, "out_chain": 2, "out_featinit": 3}[key] <= case.calls
        return case.B * case.S * case.N * 2 * made
    return (case.T - case.start) * case.N * (2 if key == "points" else 1)


def case_slices(cases: list, key: str) -> list[slice]:
    """Each case's part of the flat array of output `key`."""
    sizes = [case_values(c, key) for c in cases]
    ends = list(itertools.accumulate(sizes))
    return [slice(e - n, e) for n, e in zip(sizes, ends, strict=True)]
