"""The exported clip format in one place (docs/FORMATS.md): settings, folder names, tracks, checks, manifest.

    <out_dir>/<version>/settings.json      (the settings of ClipSettings, and the source: data set and scenes)
    <out_dir>/<version>/manifest.jsonl
    <out_dir>/<version>/<k:06d>/{rgb.mp4, track.npz}

The exporter writes it and the training reader reads it through these functions only. `STAGE_CLIPS` holds
the clip sizes of the two training stages; the exporter's defaults are stage 1's, so exporting with the
defaults gives the clips that stage-1 training with its defaults looks for.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pips2.utils.cli import parse_hw
from pips2.utils.paths import temp_beside, write_json
from pips2.utils.procs import open_lock_file
from pips2.utils.safe_load import UnsafeFileError, load_npz
from pips2.utils.video import VideoError, read_clip

# the README's recipe: export at the resolution training crops at (docs/MODEL.md, the training recipe)
STAGE_CLIPS = {1: dict(S=36, N=128, crop_hw=(256, 384)), 2: dict(S=64, N=128, crop_hw=(512, 896))}
AUTHORS_EXPORT_HW = (384, 512)  # the clip size of exports without settings.json (the authors' exporter)
CLIP_DIGITS = 6
SETTINGS = "settings.json"
# settings.json keeps the exporter's flag names (docs/FORMATS.md); inside, the fields are named for what they hold
JSON_KEYS = {"split": "dset", "crop_hw": "crop_size"}
SOURCE_KEY = "source"  # in settings.json: the data set its clips come from (export.check_source)
MANIFEST = "manifest.jsonl"
TRACK_MARGIN_FACTOR = 2


@dataclass(frozen=True)
class ClipSettings:
    """Everything that changes the content of the clips (and so names the version folder)."""

    split: str = "train"  # the PointOdyssey split the clips come from: the exporter's --dset
    S: int = STAGE_CLIPS[1]["S"]
    N: int = STAGE_CLIPS[1]["N"]
    crop_hw: tuple[int, int] = STAGE_CLIPS[1]["crop_hw"]  # the clips' size: the exporter's --crop_size
    use_augs: bool = True
    shuffle: bool = True
    seed: int = 0
    preset: str = "medium"  # x264 speed/size trade-off at CRF 20 (the authors' ffmpeg default is medium)

    def version(self) -> str:
        """The version folder's name, e.g. train_S36_N128_256x384_aug_seed0."""
        h, w = self.crop_hw
        name = f"{self.split}_S{self.S}_N{self.N}_{h}x{w}_{'aug' if self.use_augs else 'noaug'}_seed{self.seed}"
        # shuffling changes which candidate becomes clip k, so an unshuffled export must not share the folder
        name += "" if self.shuffle else "_noshuffle"
        return name + ("" if self.preset == "medium" else f"_x264{self.preset}")

    def to_dict(self) -> dict:
        """The settings' JSON form, keyed as settings.json is (JSON_KEYS)."""
        return {JSON_KEYS.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ClipSettings:
        """Settings from their JSON form (`to_dict`; the crop comes back as a list)."""
        fields = {k: d[key] for k, key in JSON_KEYS.items()}
        rest = {k: v for k, v in d.items() if k not in JSON_KEYS.values()}
        return cls(**{**rest, **fields, "crop_hw": tuple(fields["crop_hw"])})


def write_settings(version_dir: Path, st: ClipSettings, source: dict | None = None) -> bool:
    """settings.json of a version folder, created once: True if this call created it, False if it was there
    (a folder's settings never change). `source` is where its clips come from (SOURCE_KEY; the exporter's
    dataset_location and scenes). Created as a whole (temp file, then a hard link that fails if another exporter
    created it first)."""
    path = Path(version_dir) / SETTINGS
    if path.exists():
        return False
    tmp = temp_beside(path)
    try:
        write_json(tmp, {**st.to_dict(), **({SOURCE_KEY: source} if source is not None else {})})
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def record_source(version_dir: Path, source: dict) -> None:
    """Add the source to the settings.json of a folder exported before settings recorded it (temp + rename)."""
    path = Path(version_dir) / SETTINGS
    write_json(path, {**_settings_dict(path), SOURCE_KEY: source})


def _settings_dict(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise TypeError("not an object")
        return d
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a clip settings file ({type(e).__name__})") from None


def read_settings(version_dir: Path) -> ClipSettings | None:
    """The settings of a version folder; None without settings.json; ValueError naming the file if unusable."""
    path = Path(version_dir) / SETTINGS
    if not path.is_file():
        return None
    d = {k: v for k, v in _settings_dict(path).items() if k != SOURCE_KEY}
    try:
        return ClipSettings.from_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a clip settings file ({type(e).__name__})") from None


def read_source(version_dir: Path) -> dict | None:
    """Where a version folder's clips come from ({"dataset_location": resolved path, "scenes": {name: frame
    count}}); None for a folder whose settings.json predates the record (or has none)."""
    path = Path(version_dir) / SETTINGS
    if not path.is_file():
        return None
    src = _settings_dict(path).get(SOURCE_KEY)
    if src is None:
        return None
    if not (isinstance(src, dict) and isinstance(src.get("dataset_location"), str)
            and isinstance(src.get("scenes"), dict)):
        raise ValueError(f"{path}: its {SOURCE_KEY!r} is not a dataset_location and a scene list")
    return src


# ---------------------------------------------------------------------------------------------------------
# Tracks and track.npz.


@dataclass(frozen=True)
class Tracks:
    """N point tracks over S frames: trajs (S,N,2) pixels, visibs and valids (S,N) bool."""

    trajs: np.ndarray
    visibs: np.ndarray
    valids: np.ndarray

    @property
    def N(self) -> int:
        return self.trajs.shape[1]

    def take(self, idx: np.ndarray) -> Tracks:
        """The tracks at indices idx (along N)."""
        return Tracks(self.trajs[:, idx], self.visibs[:, idx], self.valids[:, idx])

    def pad(self, N: int) -> Tracks:
        """Up to N tracks by appending invalid, invisible tracks at (0, 0), as the authors' loader does."""
        extra = N - self.N
        if extra <= 0:
            return self
        S = self.trajs.shape[0]
        return Tracks(np.concatenate([self.trajs, np.zeros((S, extra, 2), self.trajs.dtype)], 1),
                      np.concatenate([self.visibs, np.zeros((S, extra), bool)], 1),
                      np.concatenate([self.valids, np.zeros((S, extra), bool)], 1))

    def finite(self) -> Tracks:
        """Non-finite positions set to 0 and made invalid and invisible (what track.npz may hold)."""
        finite = np.isfinite(self.trajs)
        ok = finite[..., 0] & finite[..., 1]
        trajs = np.where(ok[..., None], self.trajs, 0).astype(self.trajs.dtype)
        return Tracks(trajs, self.visibs & ok, self.valids & ok)

    def pack(self) -> np.ndarray:
        """(S,N,4) float32 of x, y, visible, valid (track.npz's track_g); values as they are (see finite)."""
        track = np.zeros(self.trajs.shape[:2] + (4,), np.float32)
        track[..., :2] = self.trajs
        track[..., 2] = self.visibs
        track[..., 3] = self.valids
        return track

    @classmethod
    def unpack(cls, track: np.ndarray) -> Tracks:
        """The inverse of pack: (S,N,4) -> trajs float32, visibs and valids bool."""
        return cls(np.ascontiguousarray(track[..., :2], np.float32), track[..., 2] > 0, track[..., 3] > 0)


def track_problem(track: np.ndarray, clip_hw: tuple[int, int]) -> str | None:
    """Why an (S,N,4) track of an HxW clip cannot come from a legitimate export, or None if it can.

    The export marks a point more than 64 px outside the crop invalid (utils.augment.crop_visibility), so a
    valid point of a legitimate clip lies within the crop plus 64 px. Valid points up to
    TRACK_MARGIN_FACTOR * max(H, W) px outside (at least 256 px, as crops are at least 128 px) are accepted,
    which no export produces; flags must be 0 or 1.
    """
    flags = track[..., 2:4]
    if not np.isin(flags, (0.0, 1.0)).all():
        odd = flags[~np.isin(flags, (0.0, 1.0))]
        return f"visible/valid flags must be 0 or 1, found {odd.flat[0]:g}"
    H, W = clip_hw
    margin = TRACK_MARGIN_FACTOR * max(H, W)
    xy = track[..., :2][track[..., 3] > 0]
    if len(xy):
        far = (xy[:, 0] < -margin) | (xy[:, 0] > W + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > H + margin)
        if far.any():
            x, y = xy[far][0]
            return (f"valid point at ({x:g}, {y:g}) lies far outside the {W}x{H} frame "
                    f"(allowed: {margin} px beyond its edges)")
    return None


def write_track(path: Path, track: np.ndarray) -> None:
    """track.npz with its one key, track_g, float32 (S,N,4)."""
    np.savez(path, track_g=track.astype(np.float32))


def read_track(path: Path, S: int, N: int, clip_hw: tuple[int, int]) -> np.ndarray:
    """track_g of a clip of S frames, N tracks, clip_hw (H, W); VideoError naming the file unless it is usable.

    The one check of track.npz, for the exporter's verification and the training reader alike.
    """
    def expect(key: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        # from the header, before numpy allocates what it declares
        if key == "track_g" and (shape != (S, N, 4) or dtype != np.float32):
            return f"track_g is {dtype} {shape}, expected float32 {(S, N, 4)}"
        return None

    try:
        track = load_npz(path, keys=("track_g",), expect=expect).get("track_g")
    except UnsafeFileError as e:
        raise VideoError(f"{path}: {e.problem.removeprefix('member track_g: ')}") from None
    if track is None:
        raise VideoError(f"{path}: no track_g")
    if not np.isfinite(track).all():
        raise VideoError(f"{path}: track_g has non-finite values")
    problem = track_problem(track, clip_hw)
    if problem:
        raise VideoError(f"{path}: {problem}")
    return track


# ---------------------------------------------------------------------------------------------------------
# Clip folders and the manifest.


def clip_name(k: int) -> str:
    """The six-digit name of clip k (also of its claim and rejection files)."""
    return f"{k:0{CLIP_DIGITS}d}"


def clip_dir(version_dir: Path, k: int) -> Path:
    """Folder of clip k in a version folder."""
    return Path(version_dir) / clip_name(k)


def is_clip_dir(p: Path, links: bool = True) -> bool:
    """A finished clip: a six-digit folder holding rgb.mp4 and track.npz (temp folders never match); with
    `links=False` not a link to one (the exporter's view of the clips it wrote)."""
    return (links or not p.is_symlink()) and p.is_dir() and p.name.isdigit() and len(p.name) == CLIP_DIGITS \
        and (p / "rgb.mp4").is_file() and (p / "track.npz").is_file()


def list_clips(version_dir: Path) -> list[Path]:
    """Finished clip folders of a version, sorted."""
    if not Path(version_dir).is_dir():
        return []
    return sorted(p for p in Path(version_dir).iterdir() if is_clip_dir(p))


def read_clip_folder(folder: Path, S: int, N: int, clip_hw: tuple[int, int], backend: str = "cv2"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (S,H,W,3) uint8 and track_g (S,N,4) of a clip folder; VideoError naming the bad file."""
    frames = read_clip(folder / "rgb.mp4", S, *clip_hw, backend=backend)
    return frames, read_track(folder / "track.npz", S, N, clip_hw)


def verify_clip(folder: Path, S: int, N: int, clip_hw: tuple[int, int]) -> None:
    """Decode rgb.mp4 (exactly S frames of clip_hw) and check track.npz, both regular files (a link there was
    written through and read back through); raises VideoError naming the file."""
    for name in ("rgb.mp4", "track.npz"):
        if not stat.S_ISREG(os.lstat(Path(folder) / name).st_mode):
            raise VideoError(f"{Path(folder) / name}: not a regular file (a link?)")
    read_clip_folder(folder, S, N, clip_hw)


def check_manifest(version_dir: Path) -> None:
    """NotARegularFile if something other than a regular file (a link, a FIFO) holds the manifest's name: every
    clip's line would fail to be written (`append_manifest` refuses to write through it)."""
    try:
        os.close(open_lock_file(Path(version_dir) / MANIFEST))  # the check append_manifest's open makes
    except FileNotFoundError:
        return


def append_manifest(version_dir: Path, k: int, meta: dict) -> None:
    """One manifest.jsonl line for clip k, in one O_APPEND write (lines of concurrent writers never mix)."""
    data = (json.dumps({"clip": k, **meta}) + "\n").encode()
    path = Path(version_dir) / MANIFEST
    # never through a link or into a FIFO planted under the name in a shared export folder
    fd = open_lock_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        n = os.write(fd, data)
        if n < len(data):  # a full disk took part of the line: take it back unless another line follows already
            end = os.lseek(fd, 0, os.SEEK_CUR)
            if os.fstat(fd).st_size == end:
                os.ftruncate(fd, end - n)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Which export serves a training run.


def _fits(st: ClipSettings, S: int, N: int, crop_hw: tuple[int, int] | None) -> bool:
    h, w = crop_hw or (0, 0)
    return st.S >= S and st.N >= N and st.crop_hw[0] >= h and st.crop_hw[1] >= w


def _describe(name: str, st: ClipSettings) -> str:
    return f"{name} (S={st.S}, N={st.N}, {st.crop_hw[0]}x{st.crop_hw[1]})"


def find_version(root: Path, S: int, N: int, crop_hw: tuple[int, int] | None, split: str = "train") -> str:
    """The version folder under root whose clips serve training with S frames, N tracks and crops of crop_hw.

    An export with exactly these sizes comes first (the one the exporter's defaults name, if there are
    several); else the one export whose clips are at least this long, many and large. Anything else is one
    ValueError naming root and the candidates.
    """
    root = Path(root)
    crop = parse_hw(crop_hw, "crop_size") if crop_hw is not None else None
    found = {}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        st = read_settings(p) if p.is_dir() else None
        if st is not None:
            found[p.name] = st
    fits = {n: st for n, st in found.items() if st.split == split and _fits(st, S, N, crop)}
    exact = [n for n, st in fits.items() if (st.S, st.N) == (S, N) and crop in (None, st.crop_hw)]
    if crop is not None:
        named = ClipSettings(split=split, S=S, N=N, crop_hw=crop).version()
        if named in exact:
            return named
    pool = exact or list(fits)
    if len(pool) == 1:
        return pool[0]
    want = f"{split} clips of at least S={S}, N={N}" + (f", {crop[0]}x{crop[1]}" if crop else "")
    if pool:
        listed = ", ".join(_describe(n, fits[n]) for n in pool)
        raise ValueError(f"{root}: several exports hold {want}: {listed}; name one with dataset_version")
    listed = ", ".join(_describe(n, st) for n, st in found.items()) or "none"
    raise ValueError(f"{root}: no export holds {want} (found: {listed})")
