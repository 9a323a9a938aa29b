"""PointOdyssey scenes on disk (v1.2 and legacy), clip sampling and the track filters (docs/FORMATS.md).

A scene or clip that cannot be used raises `SkipItem` with a short reason; callers count reasons and go on.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pips2.utils.paths import printable
from pips2.utils.safe_load import MAX_NPZ_MEMBERS, UnsafeFileError, load_npz, open_zip
from pips2.utils.video import MAX_IMAGE_PIXELS, VideoError, image_file_wh, not_regular_file, read_rgb

FRAME_RE = re.compile(r"^rgb_(\d+)\.(jpg|jpeg|png)$")
STRIDES = (1, 2, 4)
START_STEP = 2


class SkipItem(Exception):
    """A scene or clip that cannot be used; str(e) is the reason (short, for counting)."""


@dataclass
class Scene:
    """One sequence: frame files (sorted by their number) and its annotations."""

    name: str
    path: Path
    rgb_paths: list[Path]
    mask_paths: list[Path] | None
    trajs: np.ndarray  # (T,N,2) float32, non-finite entries allowed
    visibs: np.ndarray  # (T,N) bool, False where invalid
    valids: np.ndarray  # (T,N) bool, False where non-finite

    @property
    def num_frames(self) -> int:
        return len(self.rgb_paths)


def list_scenes(dataset_location: str | Path, split: str) -> list[Path]:
    """Scene folders of one split, sorted by name, hidden ones left out; a folder reached under a second name (a
    link to a scene beside it) is listed once, under its first name, with a note on stderr: it was scored and
    exported twice."""
    root = Path(dataset_location) / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such split folder (expected <dataset_location>/{split}/<scene>/)")
    seen: dict[Path, Path] = {}
    # a hidden folder is never a scene: an editor's (.ipynb_checkpoints) or a scene being made (.synth_tmp.*)
    for p in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        real = p.resolve()
        if real in seen:
            print(printable(f"note: {p} is {seen[real]} under another name (a link): listed once"), file=sys.stderr,
                  flush=True)
            continue
        seen[real] = p
    return list(seen.values())


def frame_files(scene: Path) -> list[Path]:
    """rgb_*.jpg files sorted by the number in their name (which need not start at 0)."""
    rgb_dir = scene / "rgbs"
    if not rgb_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in rgb_dir.iterdir() if (m := FRAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _mask_for(rgb: Path) -> Path:
    m = FRAME_RE.match(rgb.name)
    assert m is not None, rgb  # rgb is one of frame_files, which keeps only the names FRAME_RE matches
    num = m.group(1)
    return rgb.parent.parent / "masks" / f"mask_{num}.png"


# where each release keeps the visibility: v1.2 anno.npz has visibs (+ valids), legacy annotations.npz has
# visibilities in {0,1,2} (valid = <2, visible = ==1)
_FORMATS = (("anno.npz", "visibs"), ("annotations.npz", "visibilities"))

# The most frame-track entries (T x N) a scene's annotations may declare; T itself must equal the frames on disk.
# 2^27 is 2,000 frames (PointOdyssey's average length) of 67,000 tracks, while a clip needs 128 of them (256 in
# evaluation).
MAX_TRACK_ENTRIES = 1 << 27
# The most tracks (N) on their own, twice the 67,000 above: without it a scene of 2 frames could declare 67 M.
MAX_TRACKS = 1 << 17
# The most bytes the members read for 2D tracks (trajs_2d and the flags) may declare together: the entry bound
# with float64 positions and bool flags (18 bytes an entry, 2.25 GiB). Counting bytes, not entries, is what
# keeps float64 flags (8 bytes an entry, not 1) from tripling the memory a scene at the entry bound takes.
MAX_ANNO_BYTES = MAX_TRACK_ENTRIES * (2 * 8 + 2)
# the largest member the loader reads: trajs_3d, float64 (T, N, 3), read only on request; the others are smaller
MAX_MEMBER_BYTES = MAX_TRACK_ENTRIES * 3 * 8 + (1 << 16)

# what each member the loaders use may hold: (dims after T, allowed dtype kinds, allowed values or None)
_FLAG_KINDS, _FLOAT_KINDS = "biuf", "f"
_MEMBERS = {"trajs_2d": ((2,), _FLOAT_KINDS, None), "visibs": ((), _FLAG_KINDS, (0, 1)),
            "valids": ((), _FLAG_KINDS, (0, 1)), "visibilities": ((), "iuf", (0, 1, 2)),
            "trajs_3d": ((3,), _FLOAT_KINDS, None)}


def _member_problem(key: str, shape: tuple[int, ...], dtype: np.dtype, num_frames: int) -> str | None:
    """Why the header of an annotation member cannot be used, or None (read before its data is)."""
    if key not in _MEMBERS:
        return None
    if key == "trajs_3d" and dtype.hasobject and shape == ():
        return None  # the pickled None of scenes without 3D tracks: the caller says what that means
    tail, kinds, _ = _MEMBERS[key]
    if dtype.kind not in kinds or dtype.hasobject:
        return f"is {dtype}, expected {'a float' if kinds == _FLOAT_KINDS else 'a bool, 0/1 or 0./1.'} array"
    if kinds == _FLOAT_KINDS and dtype.itemsize < 4:  # float16 rounds positions to 0.25-0.5 px at 1000-2000 px
        return f"is {dtype}, expected float32 or float64 positions (float16 rounds them to fractions of a pixel)"
    if len(shape) != 2 + len(tail) or shape[2:] != tail:
        want = ", ".join(["T", "N", *map(str, tail)])
        return f"has shape {shape}, expected ({want})"
    if shape[0] != num_frames:
        return f"{num_frames} frames on disk but {shape[0]} in the annotations"
    if shape[1] > MAX_TRACKS:
        return f"declares {shape[1]} tracks, more than {MAX_TRACKS}"
    if shape[0] * shape[1] > MAX_TRACK_ENTRIES:
        return f"declares {shape[1]} tracks over {shape[0]} frames, more than {MAX_TRACK_ENTRIES} entries"
    return None


class _AnnoBudget:
    """The `expect` of load_npz for one annotation file: each member's header as _member_problem checks it, and
    the bytes the 2D members declare counted together against MAX_ANNO_BYTES, before any is read."""

    def __init__(self, num_frames: int):
        self.num_frames, self.spent = num_frames, 0

    def __call__(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        problem = _member_problem(key, shape, dtype, self.num_frames)
        if problem or key not in _MEMBERS or key == "trajs_3d":
            return problem
        self.spent += math.prod(shape) * dtype.itemsize
        if self.spent > MAX_ANNO_BYTES:
            return (f"is {dtype} {shape}: with the members before it, {self.spent} bytes of 2D tracks, more than "
                    f"{MAX_ANNO_BYTES} (float64 positions and bool flags of {MAX_TRACK_ENTRIES} entries)")
        return None


def _value_problem(key: str, a: np.ndarray) -> str | None:
    """Why a loaded flag member's values cannot be used (a flag of 0.1 or 7 is not "visible"), or None."""
    allowed = _MEMBERS[key][2]
    if allowed is None or a.dtype == bool:
        return None
    bad = ~np.isin(a, allowed)
    if bad.any():
        t, n = np.argwhere(bad)[0]
        return f"holds {a[t, n]!r} at frame {t}, track {n}; only {', '.join(map(str, allowed))} are allowed"
    return None


# The form of content_fingerprint's values: "v2-" and 16 hex digits. An export folder may record fingerprints of the
# earlier form (16 hex digits alone, `legacy_fingerprint`), made before masks and modification times were listed.
FINGERPRINT_FORM = "v2-"


def _anno_listing(scene: Path) -> list[str]:
    """The annotation file's name, then each member's name, CRC-32 and size from its zip directory (nothing
    unpacked); empty when there is none or it cannot be read (the export then skips the scene)."""
    found = [scene / name for name, _ in _FORMATS if (scene / name).is_file()]
    if not found:
        return []
    try:
        with open(found[0], "rb") as fh, open_zip(found[0], fh, MAX_NPZ_MEMBERS) as zf:
            return [found[0].name] + [f"{i.filename}:{i.CRC:08x}:{i.file_size}" for i in zf.infolist()]
    except (OSError, UnsafeFileError):
        return []


def _stat_entry(path: Path, rel: str) -> str:
    """rel with the file's size and modification time in nanoseconds (one stat), or "rel:-" when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return f"{rel}:-"
    return f"{rel}:{st.st_size}:{st.st_mtime_ns}"


def content_fingerprint(scene: Path) -> str:
    """What changes with the content the export reads from a scene, read cheaply: its annotation members' names,
    CRC-32s and sizes (the zip directory of anno.npz or annotations.npz), and each frame's and its mask's name,
    size and modification time (one stat each: a file rewritten in place at the same size, or a mask regenerated
    under unchanged frames, changes it; so does a copy that does not keep the times), hashed, as
    FINGERPRINT_FORM + 16 hex digits. Nothing is unpacked or decoded."""
    listing = _anno_listing(scene)
    for f in frame_files(scene):
        listing.append(_stat_entry(f, f"rgbs/{f.name}"))
        mask = _mask_for(f)
        listing.append(_stat_entry(mask, f"masks/{mask.name}"))
    return FINGERPRINT_FORM + hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


def legacy_fingerprint(scene: Path) -> str:
    """content_fingerprint as exporters before FINGERPRINT_FORM computed it (the annotation listing and each
    frame's name and size; no masks, no times): what an export folder made by them records."""
    listing = _anno_listing(scene)
    for f in frame_files(scene):
        try:
            listing.append(f"{f.name}:{f.stat().st_size}")
        except OSError:
            listing.append(f"{f.name}:?")
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


def load_annotations(scene: Path, require_3d: bool = False, num_frames: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trajs_2d, visibs, valids) from anno.npz (v1.2) or annotations.npz (legacy visibilities 0/1/2).

    Every member's header is checked before its data is read: T must equal `num_frames` (default: the scene's
    rgbs/rgb_* files), N by MAX_TRACKS, T x N by MAX_TRACK_ENTRIES, the bytes of the 2D members together by
    MAX_ANNO_BYTES, dtypes and shapes are what docs/FORMATS.md says;
    then the flags must be 0/1 (visibilities 0/1/2). trajs_3d is large and unused by 2D training and evaluation,
    so it is read (and must be present and not None) only with require_3d.
    """
    found = [(scene / name, key) for name, key in _FORMATS if (scene / name).is_file()]
    if not found:
        raise SkipItem("no anno.npz or annotations.npz")
    path, vis_key = found[0]
    T = len(frame_files(scene)) if num_frames is None else num_frames
    keys = ("trajs_2d", vis_key, "valids") + (("trajs_3d",) if require_3d else ())
    try:
        # never np.load(allow_pickle=True): trajs_3d is a pickle when None
        z = load_npz(path, keys=keys, max_member_bytes=MAX_MEMBER_BYTES, expect=_AnnoBudget(T))
        if "trajs_2d" not in z or vis_key not in z:
            raise SkipItem(f"{path.name} lacks trajs_2d/{vis_key}")
        if require_3d and ("trajs_3d" not in z or z["trajs_3d"].dtype == object):
            raise SkipItem("trajs_3d is None")
        N = z["trajs_2d"].shape[1]
        for key in (k for k in keys if k in z):
            if z[key].shape[:2] != (T, N):
                raise SkipItem(f"{path.name}: member {key} has shape {z[key].shape}, trajs_2d {z['trajs_2d'].shape}")
            problem = _value_problem(key, z[key])
            if problem:
                raise SkipItem(f"{path.name}: member {key} {problem}")
        trajs = z["trajs_2d"].astype(np.float32)
        if vis_key == "visibs":
            visibs = z["visibs"].astype(bool)
            valids = z["valids"].astype(bool) if "valids" in z else np.ones_like(visibs)
        else:
            valids, visibs = z["visibilities"] < 2, z["visibilities"] == 1
    except SkipItem:
        raise
    except UnsafeFileError as e:
        # the file's own name, not its full path, keeps the reason countable across scenes
        raise SkipItem(f"{e.path.name}: {e.problem}") from None
    except Exception as e:
        raise SkipItem(f"unreadable annotations ({type(e).__name__})") from None
    finite = np.isfinite(trajs).all(-1)
    valids = valids & finite
    visibs = visibs & valids
    return trajs, visibs, valids


def load_scene(path: str | Path, require_masks: bool = True, require_3d: bool = False) -> Scene:
    """Read a scene's file lists and annotations; raises SkipItem with the reason when it is unusable."""
    path = Path(path)
    rgbs = frame_files(path)
    if not rgbs:
        raise SkipItem("no rgbs/rgb_*.jpg frames")
    # a FIFO (or a link to one) named like a frame would block every later open() of it forever
    if odd := next((p for p in rgbs if not_regular_file(p)), None):
        raise SkipItem(f"rgbs/{odd.name}: not a regular file")
    masks = [_mask_for(p) for p in rgbs]
    if not all(m.is_file() for m in masks):
        if require_masks:
            raise SkipItem("missing masks")
        masks = None
    trajs, visibs, valids = load_annotations(path, require_3d, num_frames=len(rgbs))
    return Scene(path.name, path, rgbs, masks, trajs, visibs, valids)


def clip_starts(num_frames: int, S: int, strides: tuple[int, ...] = STRIDES, step: int = START_STEP
                ) -> list[tuple[int, int]]:
    """(start, stride) of every S-frame clip: temporal strides {1,2,4}, starts every `step` frames."""
    out = []
    for stride in strides:
        span = (S - 1) * stride + 1
        out += [(start, stride) for start in range(0, num_frames - span + 1, step)]
    return out


def read_frames(paths: list[Path]) -> np.ndarray:
    """Load RGB frames (S,H,W,3) uint8; a missing or unreadable file raises SkipItem naming it."""
    try:
        out = [read_rgb(p) for p in paths]
    except VideoError as e:  # "<path>: <why>" -> "unreadable frame (<name>: <why>)"
        path, _, why = str(e).rpartition(": ")
        raise SkipItem(f"unreadable frame ({Path(path).name}: {why})") from None
    if len({f.shape for f in out}) != 1:
        raise SkipItem("frames of different sizes")
    return np.stack(out)


def check_frame_sizes(scene: Scene) -> None:
    """SkipItem("frames of different sizes") unless every frame (and mask) has the first frame's size, and
    SkipItem when that size is beyond MAX_IMAGE_PIXELS (utils/video.py), before any is decoded.

    Only image headers are read. Without this, a clip whose frames agree with each other but not with the
    scene's masks fails with an IndexError, counted as a failure and retried on every run.
    """

    def size(p: Path) -> tuple[int, int] | None:
        try:
            with warnings.catch_warnings():  # Pillow's warning for a large image: the bound below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    return im.size
        except Image.DecompressionBombError:  # beyond Pillow's own bound, twice ours
            raise SkipItem(f"frames larger than {MAX_IMAGE_PIXELS} pixels") from None
        except Exception:  # unreadable: the clips that use it are rejected when their frames are read
            return None

    sizes = {s for s in map(size, scene.rgb_paths + (scene.mask_paths or [])) if s is not None}
    if len(sizes) > 1:
        raise SkipItem("frames of different sizes")
    if sizes and (wh := sizes.pop())[0] * wh[1] > MAX_IMAGE_PIXELS:
        raise SkipItem(f"frames of {wh[0]}x{wh[1]} pixels, larger than {MAX_IMAGE_PIXELS}")


def read_mask(path: Path) -> np.ndarray:
    """Palette-indexed label mask as an integer array (the palette indices, not colours). A damaged mask raises
    SkipItem naming it (Pillow's errors are OSErrors, which the export retried as this machine's failures on every
    run); its size is checked from its header before it is decoded."""
    try:
        image_file_wh(path)
        data = Path(path).read_bytes()
    except VideoError as e:
        raise SkipItem(f"unreadable mask ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipItem(f"unreadable mask ({path}: {e})") from None


def segmentation_edges(labels: np.ndarray, dilate: int = 3) -> np.ndarray:
    """Boolean map of label boundaries: Canny of the label mask, dilated."""
    lab = labels.astype(np.float32)
    lab = (lab * (255.0 / max(1.0, float(lab.max())))).astype(np.uint8)
    edges = cv2.Canny(lab, 1, 1)
    if dilate > 1:
        edges = cv2.dilate(edges, np.ones((dilate, dilate), np.uint8))
    return edges > 0


def filter_tracks(trajs: np.ndarray, visibs: np.ndarray, valids: np.ndarray, hw: tuple[int, int],
                  edges: np.ndarray | None = None) -> np.ndarray:
    """Indices of tracks passing the export filter (docs/FORMATS.md): visible at frames 0 and 1, enough visible
    frames, inside the image at frame 0, not on a segmentation edge, and plausible speed, acceleration and jerk."""
    S = trajs.shape[0]
    H, W = hw
    vv = visibs & valids
    ok = vv[0] & vv[1]
    ok &= vv.sum(0) >= max(math.sqrt(S), 2)
    x0, y0 = trajs[0, :, 0], trajs[0, :, 1]
    with np.errstate(invalid="ignore"):
        ok &= (x0 >= 0) & (x0 <= W - 1) & (y0 >= 0) & (y0 <= H - 1)
    if edges is not None:
        xi = np.clip(np.round(np.nan_to_num(x0)), 0, W - 1).astype(int)
        yi = np.clip(np.round(np.nan_to_num(y0)), 0, H - 1).astype(int)
        ok &= ~edges[yi, xi]
    # motion, normalised by the image size; only where consecutive frames are valid
    scale = float(max(H, W))
    p = np.where(valids[..., None], trajs, np.nan) / scale
    with np.errstate(invalid="ignore"):
        for order, limit in ((1, 0.4), (2, 0.3), (3, 0.1)):
            d = np.diff(p, n=order, axis=0)
            mag = np.linalg.norm(d, axis=-1)
            ok &= ~(np.nan_to_num(mag, nan=0.0) >= limit).any(0)
    return np.nonzero(ok)[0]


def farthest_point_sample(feats: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k rows of feats (M,D) chosen greedily far apart, starting from a random row."""
    M = len(feats)
    if k >= M:
        return np.arange(M)
    chosen = np.empty(k, int)
    chosen[0] = rng.integers(M)
    dist = np.linalg.norm(feats - feats[chosen[0]], axis=1)
    for i in range(1, k):
        chosen[i] = int(np.argmax(dist))
        dist = np.minimum(dist, np.linalg.norm(feats - feats[chosen[i]], axis=1))
    return chosen


def fps_features(trajs: np.ndarray, valids: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(x0, y0, mean velocity x, mean velocity y) per track, normalised so position and motion both count."""
    scale = float(max(hw))
    pos = trajs[0] / scale
    d = np.diff(trajs, axis=0)
    both = (valids[1:] & valids[:-1])[..., None]
    vel = np.where(both, d, 0).sum(0) / np.maximum(both.sum(0), 1)
    return np.concatenate([pos, vel / scale * 10], 1)


def choose_tracks(trajs: np.ndarray, valids: np.ndarray, N: int, rng: np.random.Generator,
                  hw: tuple[int, int]) -> np.ndarray:
    """min(N, M) of the M track indices by farthest-point sampling (never repeated); SkipItem if M < N//2."""
    M = trajs.shape[1]
    if M < N // 2 or M == 0:
        raise SkipItem("too few tracks")
    return farthest_point_sample(fps_features(trajs, valids, hw), min(N, M), rng)
