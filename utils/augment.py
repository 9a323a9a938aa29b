"""Export and training augmentations (docs/FORMATS.md) with OpenCV and NumPy: colour, occluders, time reversal, spatial.

Geometry: every spatial operation (resize, padding, drifting scale, drifting crop, flips) is folded into
one 2x3 affine per frame that maps input pixel coordinates to output ones, with pixel centres at
integer coordinates (resize: x' = (x + 0.5) * s - 0.5; flip: x' = W - 1 - x). Frames are warped with
that affine and tracks are multiplied by it, so pixels and tracks move identically by construction.
All randomness comes from the numpy Generator passed in, so a clip's augmentation is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BORDER_INVISIBLE_PX = 1.0  # points within this distance of the crop border count as invisible
OUTSIDE_INVALID_PX = 64.0  # points further than this outside the crop become invalid


# ---------------------------------------------------------------------------------------------------------
# Colour: parameters drawn once per clip, applied identically to every frame.


def sample_color_params(rng: np.random.Generator) -> dict:
    """Draw one clip's colour augmentation (each op on with its own probability)."""
    p = {}
    if rng.random() < 0.3:
        p["noise_std"] = rng.uniform(2, 10)
    if rng.random() < 0.3:
        kind = ["motion", "median", "box"][rng.integers(3)]
        p["blur"] = (kind, int(rng.choice([3, 5])), float(rng.uniform(0, 180)))
    if rng.random() < 0.3:
        kind = ["clahe", "sharpen", "emboss"][rng.integers(3)]
        p["detail"] = (kind, float(rng.uniform(0.2, 0.5)), float(rng.uniform(1, 4)))
    if rng.random() < 0.3:
        p["rgb_shift"] = rng.uniform(-20, 20, 3)
    if rng.random() < 0.5:
        p["contrast"], p["brightness"] = rng.uniform(0.8, 1.2), rng.uniform(-25, 25)
    if rng.random() < 0.3:
        p["gamma"] = rng.uniform(0.8, 1.25)
    if rng.random() < 0.3:
        p["hsv"] = (rng.uniform(-10, 10), rng.uniform(-25, 25), rng.uniform(-20, 20))
    if rng.random() < 0.3:
        p["jpeg"] = int(rng.integers(40, 96))
    return p


def _motion_kernel(k: int, angle: float) -> np.ndarray:
    ker = np.zeros((k, k), np.float32)
    ker[k // 2] = 1
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), angle, 1.0)
    ker = cv2.warpAffine(ker, rot, (k, k))
    return ker / max(ker.sum(), 1e-6)


def apply_color(frames: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Apply colour parameters to uint8 RGB frames (S,H,W,3); fresh noise per frame, same settings."""
    out = []
    lut = None
    if "gamma" in p:
        lut = np.clip(255 * (np.arange(256) / 255.0) ** p["gamma"], 0, 255).astype(np.uint8)
    for f in frames:
        f = f.copy()
        if "blur" in p:
            kind, k, ang = p["blur"]
            if kind == "motion":
                f = cv2.filter2D(f, -1, _motion_kernel(k, ang))
            elif kind == "median":
                f = cv2.medianBlur(f, k)
            else:
                f = cv2.blur(f, (k, k))
        if "detail" in p:
            kind, alpha, clip = p["detail"]
            if kind == "clahe":
                lab = cv2.cvtColor(f, cv2.COLOR_RGB2LAB)
                lab[..., 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(lab[..., 0])
                f = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
            else:
                if kind == "sharpen":
                    ker = np.array([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]], np.float32)
                else:
                    ker = np.array([[-1, -1, 0], [-1, 1, 1], [0, 1, 1]], np.float32)
                eff = cv2.filter2D(f, -1, ker)
                f = cv2.addWeighted(f, 1 - alpha, eff, alpha, 0)
        g = f.astype(np.float32)
        if "rgb_shift" in p:
            g += p["rgb_shift"]
        if "contrast" in p:
            g = (g - 128) * p["contrast"] + 128 + p["brightness"]
        if "noise_std" in p:
            g += rng.normal(0, p["noise_std"], g.shape).astype(np.float32)
        f = np.clip(g + 0.5, 0, 255).astype(np.uint8)
        if lut is not None:
            f = cv2.LUT(f, lut)
        if "hsv" in p:
            dh, ds, dv = p["hsv"]
            hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV).astype(np.int16)
            hsv[..., 0] = (hsv[..., 0] + int(round(dh))) % 180
            hsv[..., 1] = np.clip(hsv[..., 1] + int(round(ds)), 0, 255)
            hsv[..., 2] = np.clip(hsv[..., 2] + int(round(dv)), 0, 255)
            f = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
        if "jpeg" in p:
            ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, p["jpeg"]])
            f = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        out.append(f)
    return np.stack(out)


def color_augment(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one set of colour parameters and apply it to every frame."""
    return apply_color(frames, sample_color_params(rng), rng)


# ---------------------------------------------------------------------------------------------------------
# Occluders and time.


def add_occluders(frames: np.ndarray, trajs: np.ndarray, visibs: np.ndarray, rng: np.random.Generator,
                  p: float = 0.2, max_count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """With probability p paste 1..max_count mean-colour rectangles on later frames; covered points go invisible."""
    frames, visibs = frames.copy(), visibs.copy()
    if rng.random() >= p:
        return frames, visibs
    S, H, W = frames.shape[:3]
    for _ in range(int(rng.integers(1, max_count + 1))):
        w, h = int(rng.uniform(0.1, 0.4) * W), int(rng.uniform(0.1, 0.4) * H)
        x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
        t0 = int(rng.integers(1, S))
        colour = frames[t0, y0:y0 + h, x0:x0 + w].reshape(-1, 3).mean(0)
        frames[t0:, y0:y0 + h, x0:x0 + w] = np.round(colour).astype(np.uint8)
        # pixel i covers [i - 0.5, i + 0.5]
        x, y = trajs[t0:, :, 0], trajs[t0:, :, 1]
        covered = (x >= x0 - 0.5) & (x <= x0 + w - 0.5) & (y >= y0 - 0.5) & (y <= y0 + h - 0.5)
        visibs[t0:][covered] = False
    return frames, visibs


def erase_and_replace(frames: np.ndarray, trajs: np.ndarray, visibs: np.ndarray, rng: np.random.Generator,
                      p: float = 0.5, max_count: int = 10, bounds: tuple[int, int] = (2, 100),
                      ref_side: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """LBM's Kubric occlusion augmentations: on each frame after the first, with probability p, 1..max_count
    boxes filled with their mean colour ("eraser"); then, in a second pass drawn the same way, boxes pasted
    from a random place and frame of a colour-augmented copy of the clip ("replace"). A point inside a box on
    that frame becomes invisible. Box sides are drawn from `bounds` pixels of a `ref_side`-pixel frame (the
    authors' 512x512 MOVi-F) and scale with the frame's shorter side."""
    frames, visibs = frames.copy(), visibs.copy()
    S, H, W = frames.shape[:3]
    k = min(H, W) / ref_side
    lo, hi = max(1, round(bounds[0] * k)), max(2, round(bounds[1] * k))

    def boxes() -> list[tuple[int, int, int, int]]:
        if rng.random() >= p:
            return []
        out = []
        for _ in range(int(rng.integers(1, max_count + 1))):
            xc, yc = rng.integers(0, W), rng.integers(0, H)
            dx, dy = rng.integers(lo, hi), rng.integers(lo, hi)
            x0, x1 = np.clip(np.round([xc - dx / 2, xc + dx / 2]), 0, W - 1).astype(int)
            y0, y1 = np.clip(np.round([yc - dy / 2, yc + dy / 2]), 0, H - 1).astype(int)
            if x1 > x0 and y1 > y0:
                out.append((int(x0), int(x1), int(y0), int(y1)))
        return out

    def hide(t: int, x0: int, x1: int, y0: int, y1: int) -> None:
        # pixel i covers [i - 0.5, i + 0.5): the box's pixels x0..x1-1 cover [x0 - 0.5, x1 - 0.5)
        x, y = trajs[t, :, 0], trajs[t, :, 1]
        visibs[t, (x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5)] = False

    for t in range(1, S):
        for x0, x1, y0, y1 in boxes():
            frames[t, y0:y1, x0:x1] = np.round(frames[t, y0:y1, x0:x1].reshape(-1, 3).mean(0)).astype(np.uint8)
            hide(t, x0, x1, y0, y1)
    alt = None  # the colour-augmented copy, made only when a box needs it
    for t in range(1, S):
        for x0, x1, y0, y1 in boxes():
            if alt is None:
                alt = color_augment(frames, rng)
            h, w = y1 - y0, x1 - x0
            ys, xs, src = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1), rng.integers(0, S)
            frames[t, y0:y1, x0:x1] = alt[src, ys:ys + h, xs:xs + w]
            hide(t, x0, x1, y0, y1)
    return frames, visibs


def reverse_time(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same arrays with the time axis (axis 0) reversed."""
    return tuple(np.ascontiguousarray(a[::-1]) for a in arrays)


# ---------------------------------------------------------------------------------------------------------
# Spatial.


@dataclass
class SpatialPlan:
    """Per-frame affines (S,2,3) from input pixels to output pixels, the output size, and a pre-resize.

    `affines` always map original input coordinates; `pre_scale` only changes how frames are resampled.
    """

    affines: np.ndarray
    out_hw: tuple[int, int]
    pre_scale: float = 1.0  # a global INTER_AREA resize applied first, to avoid aliasing when shrinking


def _smooth_walk(rng: np.random.Generator, S: int, step: float) -> np.ndarray:
    """A smooth random walk of length S starting at 0: integrated, smoothed noise."""
    v = rng.normal(0, step, S)
    v = np.convolve(v, np.ones(5) / 5, mode="same")
    return np.concatenate([[0.0], np.cumsum(v[1:])])


def _scale_affine(sx: float, sy: float) -> np.ndarray:
    """Resize with pixel-centre alignment: x' = (x + 0.5) * sx - 0.5."""
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)


def plan_spatial(S: int, H: int, W: int, crop_hw: tuple[int, int], rng: np.random.Generator, p: float = 0.7,
                 scale_range: tuple[float, float] = (0.8, 1.6), drift: bool = True, flips: bool = True) -> SpatialPlan:
    """Draw the spatial augmentation of one clip (probability p), else a plain random crop or resize."""
    ch, cw = crop_hw
    base = max(ch / H, cw / W)
    mats = np.zeros((S, 3, 3))
    if rng.random() >= p:
        if H >= ch and W >= cw:  # plain crop
            x0, y0 = rng.integers(0, W - cw + 1), rng.integers(0, H - ch + 1)
            m = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
        else:  # plain resize to the crop size
            m = _scale_affine(cw / W, ch / H)
        mats[:] = m
        return SpatialPlan(mats[:, :2].copy(), (ch, cw))

    # a base scale around "just covers the crop" (below it, the canvas is padded)
    s0 = base * rng.uniform(*scale_range)
    sx, sy = s0 * 2 ** rng.uniform(-0.1, 0.1), s0 * 2 ** rng.uniform(-0.1, 0.1)
    dscale = np.exp(np.clip(_smooth_walk(rng, S, 0.01), -0.2, 0.2)) if drift else np.ones(S)
    pad = rng.integers(0, max(1, int(0.1 * min(ch, cw))), 4) if rng.random() < 0.3 else np.zeros(4, int)
    padL, padT = int(pad[0]), int(pad[2])
    # canvas size after resize and padding (at scale 1 of the drift)
    Wc, Hc = W * sx + pad[0] + pad[1], H * sy + pad[2] + pad[3]
    # crop window: starts anywhere, then drifts smoothly
    cx0 = rng.uniform(0, max(0.0, Wc - cw))
    cy0 = rng.uniform(0, max(0.0, Hc - ch))
    if drift:
        cx = cx0 + _smooth_walk(rng, S, 1.5)
        cy = cy0 + _smooth_walk(rng, S, 1.5)
    else:
        cx, cy = np.full(S, cx0), np.full(S, cy0)
    hflip = flips and rng.random() < 0.5
    vflip = flips and rng.random() < 0.5
    for t in range(S):
        m = _scale_affine(sx * dscale[t], sy * dscale[t])
        m = np.array([[1, 0, padL - cx[t]], [0, 1, padT - cy[t]], [0, 0, 1]]) @ m
        if hflip:
            m = np.array([[-1, 0, cw - 1], [0, 1, 0], [0, 0, 1]]) @ m
        if vflip:
            m = np.array([[1, 0, 0], [0, -1, ch - 1], [0, 0, 1]]) @ m
        mats[t] = m
    smin = min(sx, sy) * dscale.min()
    pre = smin / 0.85 if smin < 0.7 else 1.0  # shrink most of the way with area averaging, warp the rest
    return SpatialPlan(mats[:, :2].copy(), (ch, cw), pre)


def warp_frames(frames: np.ndarray, plan: SpatialPlan) -> np.ndarray:
    """Apply a spatial plan to uint8 frames (S,H,W,3)."""
    ch, cw = plan.out_hw
    out = np.empty((len(frames), ch, cw, 3), np.uint8)
    for t, f in enumerate(frames):
        if plan.pre_scale != 1.0:
            h, w = f.shape[:2]
            # cv2.resize uses the same pixel-centre convention; _pre_fix folds its exact scale into the warp
            f = cv2.resize(f, (max(1, round(w * plan.pre_scale)), max(1, round(h * plan.pre_scale))),
                           interpolation=cv2.INTER_AREA)
        out[t] = cv2.warpAffine(f, _pre_fix(plan, t, frames.shape[1:3]), (cw, ch), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return out


def _pre_fix(plan: SpatialPlan, t: int, hw: tuple[int, int]) -> np.ndarray:
    """The frame-t affine for a frame already resized by the plan's pre-scale (rounded to whole pixels)."""
    if plan.pre_scale == 1.0:
        return plan.affines[t]
    h, w = hw
    nw, nh = max(1, round(w * plan.pre_scale)), max(1, round(h * plan.pre_scale))
    actual = _scale_affine(nw / w, nh / h)
    return (np.vstack([plan.affines[t], [0, 0, 1]]) @ np.linalg.inv(actual))[:2]


def warp_tracks(trajs: np.ndarray, plan: SpatialPlan) -> np.ndarray:
    """Move tracks (S,N,2) with the plan's per-frame affines (NaN/inf stay non-finite)."""
    A = plan.affines
    return (np.einsum("sij,snj->sni", A[:, :, :2], trajs) + A[:, None, :, 2]).astype(np.float32)


def crop_visibility(trajs: np.ndarray, visibs: np.ndarray, valids: np.ndarray, hw: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Points within 1 px of the border are invisible; points > 64 px outside are invalid (and invisible)."""
    H, W = hw
    x, y = trajs[..., 0], trajs[..., 1]
    finite = np.isfinite(x) & np.isfinite(y)
    m = BORDER_INVISIBLE_PX
    inside = finite & (x >= m) & (x <= W - 1 - m) & (y >= m) & (y <= H - 1 - m)
    o = OUTSIDE_INVALID_PX
    near = finite & (x >= -o) & (x <= W - 1 + o) & (y >= -o) & (y <= H - 1 + o)
    valids = valids & near
    return visibs & inside & valids, valids
