"""Kubric MOVi-F as laid out for LBM (docs/FORMATS.md): <root>/<seq>/frames/000.png.., <root>/<seq>/<seq>.npy.

The .npy is a pickled dict with `coords` (N,T,2) pixels at 512x512 and `visibility` (N,T) bool, which in
fact marks *occluded* points (True = occluded). Samples come out in the same format as exported clips. A
sequence that cannot be read (a bad .npy, missing or broken frames) is skipped with a warning, as a corrupt
exported clip is, and named in the sample's `corrupt_ids`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pips2.datasets.clips import Tracks
from pips2.datasets.exportdataset import CorruptClipWarning
from pips2.datasets.training import DataGoneError
from pips2.utils import augment
from pips2.utils.cli import parse_hw
from pips2.utils.safe_load import load_npy
from pips2.utils.video import VideoError, image_file_wh, read_rgb

# A sequence is decoded whole before its S-frame sample is cut: MOVi-F's are 24 frames of 512x512 (19 MB). 150
# flat 1080p PNGs (1.4 MB of files) took 2 GB, in every loader worker that drew them. The bound is judged from
# the first frame's header, and every other frame's header must declare the same size before any is decoded.
MAX_SEQUENCE_BYTES = 1 << 30

KUBRIC_FRAMES = 24


class KubricDataset:
    """MOVi-F sequences as training samples: a random S-window, N tracks visible at its first frame."""

    def __init__(self, movi_f_root: str, S: int = 24, N: int = 128, crop_hw: tuple[int, int] = (384, 512),
                 use_augs: bool = False, max_retries: int = 20):
        if S > KUBRIC_FRAMES:
            raise ValueError(f"Kubric MOVi-F sequences have {KUBRIC_FRAMES} frames; S={S} asks for more")
        root = Path(movi_f_root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such Kubric folder")
        self.seqs = sorted(p for p in root.iterdir() if (p / f"{p.name}.npy").is_file() and (p / "frames").is_dir())
        if not self.seqs:
            raise FileNotFoundError(f"{root}: no <seq>/frames + <seq>/<seq>.npy sequences")
        self.S, self.N, self.crop_hw, self.use_augs = S, N, parse_hw(crop_hw, "crop_size"), use_augs
        self.max_retries = max_retries
        self.bad: set[int] = set()  # sequences found unreadable (per process: each DataLoader worker has its own)
        self.last_skipped: list[int] = []  # sequences skipped by the latest sample() call

    def __len__(self) -> int:
        return len(self.seqs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames (T,H,W,3), coords (T,N,2) and visible (T,N) of one sequence."""
        seq = self.seqs[index]
        path = seq / f"{seq.name}.npy"
        arr = load_npy(path)  # a pickled dict, rebuilt without running code; UnsafeFileError names the file
        ann = arr.item() if arr.dtype == object and arr.ndim == 0 else None
        if not isinstance(ann, dict) or not {"coords", "visibility"} <= set(ann):
            raise ValueError(f"{path}: not a Kubric annotation (expected a dict with coords and visibility)")
        coords, occluded = ann["coords"], ann["visibility"]  # the file's flag means occluded
        if not isinstance(coords, np.ndarray) or coords.dtype.kind not in "fiu":
            got = coords.dtype if isinstance(coords, np.ndarray) else type(coords).__name__
            raise ValueError(f"{path}: coords is {got}, expected a numeric array")
        if not isinstance(occluded, np.ndarray) or occluded.dtype.kind not in "biuf":
            got = occluded.dtype if isinstance(occluded, np.ndarray) else type(occluded).__name__
            raise ValueError(f"{path}: visibility is {got}, expected a bool or 0/1 array")
        if coords.ndim != 3 or coords.shape[2] != 2 or occluded.shape != coords.shape[:2]:
            raise ValueError(f"{path}: coords {coords.shape} and visibility {occluded.shape} are not (N,T,2) and (N,T)")
        if occluded.dtype != bool and not np.isin(occluded, (0, 1)).all():  # "0" or 0.1 is not "visible"
            raise ValueError(f"{path}: visibility holds {occluded[~np.isin(occluded, (0, 1))][0]!r}, only 0 and 1 "
                             f"are allowed")
        coords, visible = coords.astype(np.float32).transpose(1, 0, 2), ~occluded.astype(bool).T
        files = sorted((seq / "frames").glob("*.png"))
        if len(files) != coords.shape[0]:  # counted before any is decoded
            raise ValueError(f"{seq}: {len(files)} frames but {coords.shape[0]} in the annotations")
        if not files:
            raise ValueError(f"{seq}: no frames (frames/*.png)")
        try:  # every frame's header before any frame is decoded: a small first frame hid large ones behind it
            W, H = image_file_wh(files[0])
            if len(files) * W * H * 3 > MAX_SEQUENCE_BYTES:
                raise ValueError(f"{seq}: {len(files)} frames of {W}x{H} decode to more than {MAX_SEQUENCE_BYTES} "
                                 f"bytes (Kubric's MOVi sequences take ~20 MB)")
            for p in files[1:]:
                w, h = image_file_wh(p)
                if (w, h) != (W, H):
                    raise ValueError(f"{p}: frame of {w}x{h}, the first frame ({files[0].name}) is {W}x{H}")
            frames = np.empty((len(files), H, W, 3), np.uint8)
            for t, p in enumerate(files):
                frame = read_rgb(p)
                if frame.shape != frames.shape[1:]:  # its header said otherwise
                    raise ValueError(f"{p}: decodes to {frame.shape[1]}x{frame.shape[0]}, its header says {W}x{H}")
                frames[t] = frame
        except VideoError as e:
            raise ValueError(str(e)) from None
        return frames, coords, visible

    def problem(self, index: int) -> str:
        """Why sequence `index` was skipped as unreadable: its error line, naming the file."""
        try:
            self.load(index)
        except (ValueError, OSError) as e:
            return str(e)
        return f"{self.seqs[index]}: unreadable once, reads now (a passing read error?)"

    def load_readable(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """load(index), or of a random other sequence while it is unreadable; each one skipped is remembered."""
        self.last_skipped = []
        tries = 0
        while tries < self.max_retries:
            tries += 1
            if index not in self.bad:
                try:
                    return self.load(index)
                except (ValueError, OSError) as e:  # UnsafeFileError and VideoError problems are ValueErrors
                    self.bad.add(index)
                    self.last_skipped.append(index)
                    warnings.warn(f"skipping corrupt clip: {e}", CorruptClipWarning, stacklevel=3)
            index = int(rng.integers(len(self.seqs)))
        raise DataGoneError(f"{self.seqs[0].parent}: {self.max_retries} sequences in a row were unreadable")

    def sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Frames (S,h,w,3) uint8 and track (S,N,4) of x, y, visible, valid, like an exported clip."""
        frames, coords, visible = self.load_readable(index, rng)
        T = frames.shape[0]
        t0 = int(rng.integers(0, T - self.S + 1))
        frames, coords, visible = frames[t0:t0 + self.S], coords[t0:t0 + self.S], visible[t0:t0 + self.S]
        H, W = frames.shape[1:3]
        if self.use_augs:  # at the source size, before the crop, as the authors' MOVi-F loader
            frames, visible = augment.erase_and_replace(frames, coords, visible, rng)
        plan = augment.plan_spatial(self.S, H, W, self.crop_hw, rng, p=0.7 if self.use_augs else 0.0)
        frames = augment.warp_frames(frames, plan)
        coords = augment.warp_tracks(coords, plan)
        valids = np.ones_like(visible)
        visible, valids = augment.crop_visibility(coords, visible, valids, self.crop_hw)
        pool = np.nonzero(visible[0])[0]
        if len(pool) == 0:
            pool = np.arange(coords.shape[1])
        pick = rng.choice(pool, self.N, replace=len(pool) < self.N)
        track = Tracks(coords, visible, valids).take(pick).pack()
        if self.use_augs:
            frames = augment.color_augment(frames, rng)
        return frames, track
