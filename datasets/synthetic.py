"""Synthetic scenes in the PointOdyssey v1.2 layout: textured layers under camera and object motion.

Each scene is a large textured background moved by a smoothly panning, rotating and zooming camera, plus
textured objects (ellipses, rectangles, polygons) that translate, rotate and scale on top of it, in a fixed
depth order, so they occlude the background and each other. Every layer is drawn with cv2.warpAffine,
which puts pixel centres at integer coordinates; a texture point (u, v) therefore lands exactly at
A_t @ (u, v, 1), which gives exact tracks. A point is visible when it is inside the frame and its layer is
the front-most one at its pixel. Everything is deterministic given the seed.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from pips2.utils.paths import foreign_owner, write_json
from pips2.utils.procs import owned_tempdir, remove_owned, remove_stale_tempdirs
from pips2.utils.video import read_rgb, write_mp4

DEPTH_SCALE = 65535.0 / 1000.0  # PointOdyssey: metres = value / 65535 * 1000


@dataclass
class SceneConfig:
    """Size, length and motion of one synthetic scene."""

    W: int = 512
    H: int = 384
    T: int = 48
    n_objects: int = 4
    n_points: int = 1024
    cam_speed: float = 3.0  # px/frame of camera pan
    obj_speed: float = 4.0  # px/frame of object motion relative to the camera
    rot_speed: float = 0.01  # rad/frame, objects
    scale_amp: float = 0.15  # relative scale oscillation
    jpeg_quality: int = 95


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colourful multi-scale noise plus sharp random shapes: rich enough to be trackable everywhere."""
    tex = np.zeros((h, w, 3), np.float32)
    for cell in (64, 16, 4):
        small = rng.random((max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        tex += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / 3
    tex = np.clip(tex * 255, 0, 255).astype(np.uint8)
    for _ in range(max(4, h * w // 1500)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(2, 9))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.circle(tex, (x, y), r, colour, -1, lineType=cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(tex, (x - r, y - r), (x + r, y + r // 2), colour, -1)
        else:
            cv2.line(tex, (x, y), (x + int(rng.integers(-15, 16)), y + int(rng.integers(-15, 16))), colour, 2,
                     lineType=cv2.LINE_AA)
    return tex


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    kind = rng.integers(0, 3)
    if kind == 0:
        cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 2, h // 2 - 2), 0, 0, 360, 1, -1)
    elif kind == 1:
        mask[2:-2, 2:-2] = 1
    else:
        k = int(rng.integers(5, 9))
        ang = np.sort(rng.random(k) * 2 * np.pi)
        rad = 0.6 + 0.4 * rng.random(k)
        pts = np.stack([w / 2 + (w / 2 - 2) * rad * np.cos(ang), h / 2 + (h / 2 - 2) * rad * np.sin(ang)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask


def _affine(cx: float, cy: float, angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """2x3 map: rotate/scale about texture point (cx, cy), then place that point at (tx, ty)."""
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, tx - c * cx + s * cy], [s, c, ty - s * cx - c * cy]], np.float64)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a after b, for 2x3 affines."""
    A = np.vstack([a, [0, 0, 1]])
    B = np.vstack([b, [0, 0, 1]])
    return (A @ B)[:2]


def _smooth_path(rng: np.random.Generator, T: int, speed: float) -> np.ndarray:
    """(T,2) offsets: constant velocity plus two slow sinusoids; speed in px/frame."""
    t = np.arange(T, dtype=np.float64)
    ang = rng.random() * 2 * np.pi
    v = speed * (0.5 + rng.random()) * np.array([math.cos(ang), math.sin(ang)])
    path = t[:, None] * v
    for _ in range(2):
        amp = speed * rng.random(2) * 6
        per = rng.uniform(20, 60)
        ph = rng.random(2) * 2 * np.pi
        path += amp * (np.sin(2 * np.pi * t[:, None] / per + ph) - np.sin(ph))
    return path


@dataclass
class Layer:
    """A textured layer: its texture, its shape's mask, one 2x3 placement per frame and its depth per frame."""

    tex: np.ndarray
    mask: np.ndarray
    A: list[np.ndarray]
    depth: np.ndarray


def _camera(rng: np.random.Generator, cfg: SceneConfig) -> tuple[Layer, list[np.ndarray], np.ndarray]:
    """The background layer under a camera that pans, rotates slightly and zooms over a texture twice the
    frame size; returns (background, per-frame camera affines, camera path (T,2))."""
    W, H, T = cfg.W, cfg.H, cfg.T
    bw, bh = 2 * W, 2 * H
    bg_tex = _texture(rng, bh, bw)
    cam_path = _smooth_path(rng, T, cfg.cam_speed)
    cam_rot = rng.uniform(-0.004, 0.004) * np.arange(T)
    cam_zoom = 1 + rng.uniform(-0.004, 0.004) * np.arange(T)
    cam = [_affine(W / 2, H / 2, cam_rot[t], cam_zoom[t], W / 2 - cam_path[t, 0], H / 2 - cam_path[t, 1])
           for t in range(T)]
    bg_place = _affine(bw / 2, bh / 2, 0.0, 1.0, W / 2, H / 2)  # texture centre at frame centre
    bg = Layer(bg_tex, np.ones((bh, bw), np.uint8), [_compose(c, bg_place) for c in cam],
               rng.uniform(30, 50) * np.ones(T))
    return bg, cam, cam_path


def _objects(rng: np.random.Generator, cfg: SceneConfig, cam: list[np.ndarray]) -> list[Layer]:
    """Textured objects that translate, rotate and scale relative to the camera, far to near."""
    W, H, T = cfg.W, cfg.H, cfg.T
    layers = []
    depth_order = np.sort(rng.uniform(3, 25, cfg.n_objects))[::-1]  # far to near
    for k in range(cfg.n_objects):
        side = min(W, H)
        oh = int(rng.uniform(0.2, 0.45) * side) // 2 * 2 + 8
        ow = int(rng.uniform(0.2, 0.45) * side) // 2 * 2 + 8
        tex, mask = _texture(rng, oh, ow), _shape_mask(rng, oh, ow)
        start = rng.uniform([0.15 * W, 0.15 * H], [0.85 * W, 0.85 * H])
        path = _smooth_path(rng, T, cfg.obj_speed)
        rot0, rot_v = rng.uniform(-0.5, 0.5), rng.uniform(-1, 1) * cfg.rot_speed
        sc0, sc_p = rng.uniform(0.8, 1.2), rng.uniform(25, 70)
        scale = sc0 * (1 + cfg.scale_amp * np.sin(2 * np.pi * np.arange(T) / sc_p + rng.random() * 6))
        A = [_compose(cam[t], _affine(ow / 2, oh / 2, rot0 + rot_v * t, scale[t], *(start + path[t])))
             for t in range(T)]
        layers.append(Layer(tex, mask, A, depth_order[k] / (scale / sc0)))
    return layers


def _sample_points(rng: np.random.Generator, cfg: SceneConfig, layers: list[Layer]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Texture coordinates (N,2) and layer index (N,) of the tracked points: background ones anywhere on
    its texture, object ones well inside their shape."""
    n_bg = cfg.n_points * 2 // 5
    per_obj = (cfg.n_points - n_bg) // max(1, cfg.n_objects)
    pts_uv, pts_layer = [], []
    for li, layer in enumerate(layers):
        n = n_bg if li == 0 else per_obj
        if li == 0:
            bh, bw = layer.tex.shape[:2]
            uv = rng.uniform([0, 0], [bw - 1, bh - 1], (n, 2))
        else:
            inner = cv2.erode(layer.mask, np.ones((5, 5), np.uint8))
            ys, xs = np.nonzero(inner)
            if not len(xs):  # a thin shape of a small frame has no inside: its points anywhere on it
                ys, xs = np.nonzero(layer.mask if layer.mask.any() else np.ones_like(layer.mask))
            pick = rng.integers(0, len(xs), n)
            uv = np.stack([xs[pick], ys[pick]], 1) + rng.uniform(-0.5, 0.5, (n, 2))
        pts_uv.append(uv)
        pts_layer.append(np.full(n, li))
    return np.concatenate(pts_uv), np.concatenate(pts_layer)


def _render(layers: list[Layer], t: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t composited back to front: image (H,W,3) float, label map (H,W) (layer + 1) and depth (H,W)."""
    H, W = hw
    img = np.zeros((H, W, 3), np.float32)
    label = np.zeros((H, W), np.uint8)
    depth = np.zeros((H, W), np.float32)
    for li, layer in enumerate(layers):
        A = layer.A[t]
        warped = cv2.warpAffine(layer.tex, A, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        alpha = cv2.warpAffine(layer.mask.astype(np.float32), A, (W, H), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if li == 0:
            alpha[:] = 1
        img = img * (1 - alpha[..., None]) + warped.astype(np.float32) * alpha[..., None]
        front = alpha > 0.5
        label[front] = li + 1
        depth[front] = layer.depth[t]
    return img, label, depth


def _track(layers: list[Layer], uv: np.ndarray, lay: np.ndarray, t: int, label: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (N,2), visibility (N,) and depth (N,) of the points at frame t: a point is visible inside
    the frame where its layer is the front-most one."""
    H, W = label.shape
    xy = np.zeros((len(uv), 2), np.float64)
    depth = np.zeros(len(uv), np.float64)
    for li, layer in enumerate(layers):
        A = layer.A[t]
        sel = lay == li
        xy[sel] = uv[sel] @ A[:, :2].T + A[:, 2]
        depth[sel] = layer.depth[t]
    x, y = xy[:, 0], xy[:, 1]
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    xi = np.clip(np.round(x), 0, W - 1).astype(int)
    yi = np.clip(np.round(y), 0, H - 1).astype(int)
    return xy, inside & (label[yi, xi] == lay + 1), depth


def _imwrite(path: Path, image: np.ndarray, params: list[int] | None = None) -> None:
    """cv2.imwrite, whose failure (a full disk) is only a False it returns: an OSError naming the file."""
    if not cv2.imwrite(str(path), image, params or []):
        raise OSError(errno.EIO, "the image could not be written (a full disk?)", str(path))


def _write_frame(out: Path, t: int, img: np.ndarray, label: np.ndarray, depth: np.ndarray, palette: np.ndarray,
                 jpeg_quality: int) -> None:
    """rgbs/, masks/ (palette PNG), depths/ (uint16 PNG) and normals/ files of frame t."""
    H, W = label.shape
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    _imwrite(out / "rgbs" / f"rgb_{t:05d}.jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    m = Image.fromarray(label, mode="P")
    m.putpalette(palette.reshape(-1).tolist())
    m.save(out / "masks" / f"mask_{t:05d}.png")
    depth16 = np.clip(depth * DEPTH_SCALE, 0, 65535).astype(np.uint16)
    _imwrite(out / "depths" / f"depth_{t:05d}.png", depth16)
    normal = np.empty((H, W, 3), np.uint8)
    normal[:] = (255, 128, 128)  # BGR of a camera-facing normal (0, 0, 1)
    _imwrite(out / "normals" / f"normal_{t:05d}.png", normal)


def _write_annotations(out: Path, cfg: SceneConfig, trajs: np.ndarray, visibs: np.ndarray, depth_pt: np.ndarray,
                       cam_path: np.ndarray) -> None:
    """anno.npz: 2D tracks, their 3D points through a pinhole camera that translates with the pan, cameras.

    Written last and atomically: its presence marks a complete scene.
    """
    W, H, T = cfg.W, cfg.H, cfg.T
    N = trajs.shape[1]
    f = float(W)
    K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], np.float32)
    intrinsics = np.repeat(K[None], T, 0)
    # camera translates in its own plane (in metres, proportional to the pan), no rotation: world->camera
    extrinsics = np.repeat(np.eye(4, dtype=np.float32)[None], T, 0)
    extrinsics[:, 0, 3] = -cam_path[:, 0] * 0.01
    extrinsics[:, 1, 3] = -cam_path[:, 1] * 0.01
    cam_x = (trajs[..., 0] - K[0, 2]) * depth_pt / f
    cam_y = (trajs[..., 1] - K[1, 2]) * depth_pt / f
    cam_pts = np.stack([cam_x, cam_y, depth_pt], -1)
    trajs_3d = cam_pts - extrinsics[:, None, :3, 3]
    tmp = out / "anno.tmp.npz"
    np.savez_compressed(
        tmp, trajs_2d=trajs.astype(np.float32), trajs_3d=trajs_3d.astype(np.float32),
        visibs=visibs, valids=np.ones((T, N), bool), intrinsics=intrinsics, extrinsics=extrinsics,
        synthetic_config=np.array(str(asdict(cfg))),
    )
    tmp.replace(out / "anno.npz")


def generate_scene(out_dir: str | Path, seed: int, cfg: SceneConfig | None = None) -> Path:
    """Write one scene (rgbs/, masks/, depths/, normals/, anno.npz) to out_dir; returns out_dir."""
    cfg = cfg or SceneConfig()
    rng = np.random.default_rng(seed)  # drawn from in this order: camera, objects, points
    out = Path(out_dir)
    for sub in ("rgbs", "masks", "depths", "normals"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    background, cam, cam_path = _camera(rng, cfg)
    layers = [background, *_objects(rng, cfg, cam)]
    uv, lay = _sample_points(rng, cfg, layers)
    trajs = np.zeros((cfg.T, len(uv), 2), np.float64)
    visibs = np.zeros((cfg.T, len(uv)), bool)
    depth_pt = np.zeros((cfg.T, len(uv)), np.float64)
    palette = (np.random.default_rng(12345).integers(0, 256, (256, 3))).astype(np.uint8)
    palette[0] = 0
    for t in range(cfg.T):
        img, label, depth = _render(layers, t, (cfg.H, cfg.W))
        trajs[t], visibs[t], depth_pt[t] = _track(layers, uv, lay, t, label)
        _write_frame(out, t, img, label, depth, palette, cfg.jpeg_quality)
    _write_annotations(out, cfg, trajs, visibs, depth_pt, cam_path)
    return out


def scene_dir(root: str | Path, split: str, i: int) -> Path:
    """Where generate_dataset writes scene i of a split: <root>/<split>/synth_%04d."""
    return Path(root) / split / f"synth_{i:04d}"


def generate_dataset(root: str | Path, dsets: dict[str, int], seed: int = 0, cfg: SceneConfig | None = None,
                     progress: bool = True) -> list[Path]:
    """Write `dsets[name]` scenes into root/name/ for each split; scene i of a split is seeded by (seed, split, i)."""

    # made one at a time: a list of every job came first, 3.5 GB before any scene for 10^8 scenes
    jobs = ((scene_dir(root, name, i), seed * 1000003 + d * 10007 + i)
            for d, (name, count) in enumerate(sorted(dsets.items())) for i in range(count))
    for name in dsets:
        # a split folder another user made in a --out others may add to (sticky, as /tmp): its owner could move the
        # scenes made in it and put others in their place
        if (uid := foreign_owner(Path(root) / name)) is not None:
            raise SceneInTheWay(f"{Path(root) / name} is a folder of uid {uid}, not this user's: its owner could "
                                f"move the scenes made in it and put others in their place; give another --out")
        # scenes of runs killed outright (SIGKILL) while being made: one look a split
        remove_stale_tempdirs(SCENE_TEMP, Path(root) / name)
    done = []
    for path, s in tqdm(jobs, total=sum(dsets.values()), desc="synthetic scenes", disable=not progress):
        if (path / "anno.npz").is_file():
            _not_in_the_way(path)  # a complete scene is kept: only a folder this user made
            done.append(path)
            continue
        done.append(_generate_whole(path, s, cfg))
    return done


class SceneInTheWay(ValueError):
    """Something other than a scene folder holds a scene's name in --out."""


SCENE_TEMP = ".synth_tmp"  # a scene being made: <split>/.synth_tmp.<owner tag>.<random>/scene, then renamed


def _not_in_the_way(path: Path) -> None:
    """SceneInTheWay unless `path` is absent or a real folder (a link or anything else is not a scene made here)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SceneInTheWay(f"{path} is {'a symlink' if path.is_symlink() else 'not a folder'}, not a scene folder "
                            "this generator made: remove it")
    if (uid := foreign_owner(path)) is not None:
        raise SceneInTheWay(f"{path} is a folder of uid {uid}, not this user's: a scene another user put there is "
                            f"not taken as one this generator made; remove it, or give another --out")


def _generate_whole(path: Path, seed: int, cfg: SceneConfig | None) -> Path:
    """generate_scene into a temp folder beside `path`, renamed to it once complete: a stopped or killed run left
    a scene's frames without its anno.npz under the scene's name, which every later reader skipped or rejected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _not_in_the_way(path)  # before the scene's work, which would be thrown away
    work = owned_tempdir(SCENE_TEMP, path.parent)
    try:
        generate_scene(work / "scene", seed, cfg)
        _not_in_the_way(path)  # and again: it may have appeared meanwhile
        if path.exists():  # a half scene of an older version (frames, no anno.npz): this generator's, remade
            shutil.rmtree(path)
        (work / "scene").rename(path)
    finally:
        remove_owned(work)
    return path


SETTINGS = "settings.json"  # <root>/settings.json: the settings every scene of the folder was made with
MAX_SETTINGS_BYTES = 1 << 16  # a dozen numbers: a larger file is not ours and is not read


def _recorded(path: Path) -> dict | None:
    """The settings recorded in path, None if it is not a settings file of this generator."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_SETTINGS_BYTES:
            return None
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def record_settings(root: str | Path, settings: dict) -> None:
    """Record the generation settings in root/settings.json, or check that the folder's record holds the same
    ones: ValueError naming the folder if it holds scenes made with other settings (kept scenes would mix two
    sizes), or scenes without a record."""
    root = Path(root)
    path = root / SETTINGS
    if (uid := foreign_owner(path)) is not None:  # the record decides which scenes are kept as this run's
        raise ValueError(f"{path}: a file of uid {uid}, not this user's: another user's record of the settings is "
                         f"not taken; remove it, or give another --out")
    if path.exists():
        old = _recorded(path)
        if old is None:
            raise ValueError(f"{path}: not a settings file of this generator; give another --out")
        diff = [f"{k}={old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"--out={root} holds scenes made with other settings ({', '.join(diff)}, see "
                             f"{path}); give another --out or the same settings")
        return
    if root.is_dir() and any(root.glob("*/synth_*")):
        raise ValueError(f"--out={root} holds scenes without a record of their settings ({SETTINGS}); give "
                         "another --out")
    # a real PointOdyssey folder (or any scenes of another maker): synthetic scenes added to its splits would mix
    # into its exports and scores without a word
    other = sorted(p for p in root.glob("*/*/rgbs") if not p.parent.name.startswith("synth_")) if root.is_dir() else []
    if other:
        raise ValueError(f"--out={root} holds scenes this generator did not make ({other[0].parent}); give another "
                         f"--out")
    root.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def write_synthetic_video(path: str | Path, seed: int, frames: int, hw: tuple[int, int]) -> Path:
    """An mp4 at path of one synthetic scene's frames (moving textured layers): a video to try tracking on."""
    with tempfile.TemporaryDirectory() as tmp:
        scene = generate_scene(Path(tmp) / "scene", seed, SceneConfig(W=hw[1], H=hw[0], T=frames, n_points=16))
        write_mp4(path, (read_rgb(p) for p in sorted((scene / "rgbs").glob("*.jpg"))))
    return Path(path)
