"""Exported clips for training (docs/FORMATS.md): <dataset_location>/<dataset_version>/<k:06d>/{rgb.mp4,track.npz}.

A clip that does not decode to exactly S frames of the crop size, or whose track.npz is unusable, is
skipped with a warning and counted; the dataset then returns another clip, never a zero sample. Every
sample names the clips skipped while producing it (`corrupt_ids`), because a DataLoader worker's counters
never reach the training process.

Absurd track values are corrupt too: the export marks a point more than 64 px outside the crop invalid
(utils.augment.crop_visibility), so a valid point of a legitimate clip lies within the crop plus 64 px. The
reader accepts valid points up to TRACK_MARGIN_FACTOR * max(H, W) px outside (at least 256 px, as crops are
at least 128 px), which no export produces, and rejects anything beyond; visible/valid flags must be 0 or 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.export import list_clips
from utils import augment
from utils.video import VideoError, read_clip

TRACK_MARGIN_FACTOR = 2


class CorruptClipWarning(UserWarning):
    """An exported clip could not be used and was skipped."""


class ExportDataset(Dataset):
    """Exported clips as dicts: rgbs (S,3,H,W) float in [0,255], trajs (S,N,2), visibs, valids (S,N)."""

    def __init__(self, dataset_location: str = "./pod_export", dataset_version: str | None = None, S: int = 36,
                 N: int = 128, crop_size: tuple[int, int] | None = None, use_augs: bool = False,
                 backend: str = "cv2", max_retries: int = 20, seed: int = 0):
        root = Path(dataset_location)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such dataset folder (--dataset_location)")
        if dataset_version is None:
            found = root.iterdir() if root.is_dir() else []
            versions = sorted(p.name for p in found if (p / "settings.json").is_file())
            if len(versions) != 1:
                raise ValueError(f"{root}: name a dataset_version, found {versions or 'none'}")
            dataset_version = versions[0]
        self.dir = root / dataset_version
        self.clips = list_clips(self.dir)
        if not self.clips:
            raise FileNotFoundError(f"{self.dir}: no exported clips (run export_mp4_dataset.py first)")
        settings = self.dir / "settings.json"
        st = json.loads(settings.read_text()) if settings.is_file() else {}
        self.S_export = int(st.get("S", S))
        self.N_export = int(st.get("N", N))
        self.hw = tuple(st.get("crop_size", crop_size or (384, 512)))
        if crop_size is not None and tuple(crop_size) != self.hw:
            raise ValueError(f"{self.dir}: clips are {self.hw[0]}x{self.hw[1]}, crop_size asks {crop_size}")
        if S > self.S_export:
            raise ValueError(f"{self.dir}: clips have {self.S_export} frames, S={S} asks for more")
        if N > self.N_export:
            raise ValueError(f"{self.dir}: clips have {self.N_export} tracks, N={N} asks for more")
        self.S, self.N, self.use_augs, self.backend = S, N, use_augs, backend
        self.max_retries, self.seed = max_retries, seed
        self.bad: set[int] = set()
        self.skipped = 0
        self.last_skipped: list[int] = []  # clips skipped by the latest sample() call

    def __len__(self) -> int:
        return len(self.clips)

    def _rng(self, index: int, attempt: int) -> np.random.Generator:
        # torch seeds each DataLoader worker differently per epoch; fold that in so workers never repeat
        return np.random.default_rng([self.seed, index, attempt, torch.initial_seed() % (2**63)])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded frames (S_export,H,W,3) and track_g (S_export,N_export,4) of clip `index`, or VideoError."""
        folder = self.clips[index]
        frames = read_clip(folder / "rgb.mp4", self.S_export, *self.hw, backend=self.backend)
        try:
            with np.load(folder / "track.npz", allow_pickle=False) as z:
                track = z["track_g"]
        except Exception as e:
            raise VideoError(f"{folder / 'track.npz'}: unreadable ({type(e).__name__})") from None
        if track.shape != (self.S_export, self.N_export, 4) or not np.isfinite(track).all():
            raise VideoError(f"{folder / 'track.npz'}: track_g has shape {track.shape} or non-finite values")
        problem = track_problem(track, self.hw)
        if problem:
            raise VideoError(f"{folder / 'track.npz'}: {problem}")
        return frames, track

    def sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Frames (S,H,W,3) uint8 and track (S,N,4) of clip `index` (another clip if it is corrupt)."""
        self.last_skipped = []
        for attempt in range(self.max_retries):
            i = index if attempt == 0 else int(rng.integers(len(self.clips)))
            if i in self.bad:
                continue
            try:
                frames, track = self.load(i)
            except VideoError as e:
                self.bad.add(i)
                self.skipped += 1
                self.last_skipped.append(i)
                warnings.warn(f"skipping corrupt clip: {e}", CorruptClipWarning, stacklevel=2)
                continue
            return self._window(frames, track, rng)
        raise RuntimeError(f"{self.dir}: {self.max_retries} clips in a row were corrupt")

    def __getitem__(self, index: int) -> dict:
        frames, track = self.sample(index, self._rng(index, 0))
        return to_sample(frames, track, self.last_skipped, self.max_retries)

    def _window(self, frames: np.ndarray, track: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        t0 = int(rng.integers(0, self.S_export - self.S + 1))
        frames, track = frames[t0:t0 + self.S], track[t0:t0 + self.S]
        vis0 = track[0, :, 2] > 0
        # queries must be visible in the first frame of the (possibly shifted) window
        pool = np.nonzero(vis0)[0] if vis0.sum() >= self.N else np.arange(track.shape[1])
        pick = rng.choice(pool, self.N, replace=False) if len(pool) >= self.N else rng.choice(pool, self.N)
        track = track[:, pick]
        if self.use_augs:
            frames = augment.color_augment(frames, rng)
        return frames, track


def track_problem(track: np.ndarray, hw: tuple[int, int]) -> str | None:
    """Why an (S,N,4) track of an HxW clip cannot come from a legitimate export, or None if it can."""
    flags = track[..., 2:4]
    if not np.isin(flags, (0.0, 1.0)).all():
        odd = flags[~np.isin(flags, (0.0, 1.0))]
        return f"visible/valid flags must be 0 or 1, found {odd.flat[0]:g}"
    H, W = hw
    margin = TRACK_MARGIN_FACTOR * max(H, W)
    xy = track[..., :2][track[..., 3] > 0]
    if len(xy):
        far = (xy[:, 0] < -margin) | (xy[:, 0] > W + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > H + margin)
        if far.any():
            x, y = xy[far][0]
            return (f"valid point at ({x:g}, {y:g}) lies far outside the {W}x{H} frame "
                    f"(allowed: {margin} px beyond its edges)")
    return None


def to_sample(frames: np.ndarray, track: np.ndarray, skipped: list[int] | tuple[int, ...] = (),
              width: int = 0) -> dict:
    """(S,H,W,3) uint8 frames and (S,N,4) tracks -> the training dict of tensors.

    `corrupt_ids` lists the clips skipped while producing this sample, padded with -1 to `width` entries so
    that samples of one dataset collate into a batch.
    """
    ids = np.full(max(width, len(skipped)), -1, np.int64)
    ids[:len(skipped)] = skipped
    return {
        "rgbs": torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float(),
        "trajs": torch.from_numpy(np.ascontiguousarray(track[..., :2])),
        "visibs": torch.from_numpy(np.ascontiguousarray(track[..., 2])),
        "valids": torch.from_numpy(np.ascontiguousarray(track[..., 3])),
        "corrupt_ids": torch.from_numpy(ids),
    }
