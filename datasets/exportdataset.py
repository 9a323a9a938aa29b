"""Exported clips for training (docs/FORMATS.md): <dataset_location>/<dataset_version>/<k:06d>/{rgb.mp4,track.npz}.

The clip format (settings, folders, the track.npz check) is datasets/clips.py's. Clips larger than the
training crop are cropped at random (tracks shifted with the pixels); clips smaller than it are one clear
error. A clip that does not decode to exactly S frames of the export's size, or whose track.npz is unusable
(datasets.clips.read_track), is skipped with a warning and counted; the dataset then returns another clip,
never a zero sample. Every sample names the clips skipped while producing it (`corrupt_ids`), because a
DataLoader worker's counters never reach the training process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pips2.datasets.clips import (
    AUTHORS_EXPORT_HW,
    ClipSettings,
    Tracks,
    find_version,
    list_clips,
    read_clip_folder,
    read_settings,
)
from pips2.datasets.clips import track_problem as track_problem  # re-exported: the reader's corruption rule
from pips2.datasets.training import DataGoneError, Sample, to_sample
from pips2.utils import augment
from pips2.utils.cli import parse_hw
from pips2.utils.video import VideoError


class CorruptClipWarning(UserWarning):
    """An exported clip could not be used and was skipped."""


class ExportDataset(Dataset):
    """Exported clips as dicts: rgbs (S,3,H,W) float in [0,255], trajs (S,N,2), visibs, valids (S,N)."""

    def __init__(self, dataset_location: str = "./pod_export", dataset_version: str | None = None, S: int = 36,
                 N: int = 128, crop_hw: tuple[int, int] | None = None, use_augs: bool = False,
                 backend: str = "cv2", max_retries: int = 20, seed: int = 0):
        root = Path(dataset_location)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such dataset folder (--dataset_location)")
        if dataset_version is None:
            dataset_version = find_version(root, S, N, crop_hw)
        self.dir = root / dataset_version
        self.clips = list_clips(self.dir)
        if not self.clips:
            raise FileNotFoundError(f"{self.dir}: no exported clips (run export_mp4_dataset.py first)")
        # an export without settings.json (the authors' exporter) is taken to hold what is asked for
        st = read_settings(self.dir) or ClipSettings(S=S, N=N, crop_hw=parse_hw(crop_hw or AUTHORS_EXPORT_HW))
        # clip_hw: the clips' size (the export's crop); crop_hw: training's crop of them (train.py's --crop_size)
        self.S_export, self.N_export, self.clip_hw = st.S, st.N, st.crop_hw
        self.crop_hw = parse_hw(crop_hw, "crop_size") if crop_hw is not None else self.clip_hw
        if self.crop_hw[0] > self.clip_hw[0] or self.crop_hw[1] > self.clip_hw[1]:
            raise ValueError(f"{self.dir}: clips are {self.clip_hw[0]}x{self.clip_hw[1]}, smaller than crop_size "
                             f"{self.crop_hw[0]}x{self.crop_hw[1]} (export at the training crop size or larger)")
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
        return read_clip_folder(self.clips[index], self.S_export, self.N_export, self.clip_hw, self.backend)

    def problem(self, index: int) -> str:
        """Why clip `index` was skipped as corrupt: its error line, naming the file."""
        try:
            self.load(index)
        except VideoError as e:
            return str(e)
        return f"{self.clips[index]}: unreadable once, reads now (a passing read error?)"

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
        raise DataGoneError(f"{self.dir}: {self.max_retries} clips in a row were corrupt")

    def __getitem__(self, index: int) -> Sample:
        frames, track = self.sample(index, self._rng(index, 0))
        return to_sample(frames, track, self.last_skipped, self.max_retries)

    def _window(self, frames: np.ndarray, track: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        t0 = int(rng.integers(0, self.S_export - self.S + 1))
        frames, track = frames[t0:t0 + self.S], track[t0:t0 + self.S]
        if self.crop_hw != self.clip_hw:  # drawn only for larger clips: same-size clips keep their random stream
            frames, track = self._crop(frames, track, rng)
        vis0 = track[0, :, 2] > 0
        # queries must be visible in the first frame of the (possibly shifted) window
        pool = np.nonzero(vis0)[0] if vis0.sum() >= self.N else np.arange(track.shape[1])
        pick = rng.choice(pool, self.N, replace=False) if len(pool) >= self.N else rng.choice(pool, self.N)
        track = track[:, pick]
        if self.use_augs:
            frames = augment.color_augment(frames, rng)
        return frames, track

    def _crop(self, frames: np.ndarray, track: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random crop_hw window of the clip; tracks move with it and follow the export's visibility rules
        (within 1 px of the border invisible, more than 64 px outside invalid)."""
        (H, W), (h, w) = self.clip_hw, self.crop_hw
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        tr = Tracks.unpack(track)
        trajs = tr.trajs - np.array([x0, y0], np.float32)
        visibs, valids = augment.crop_visibility(trajs, tr.visibs, tr.valids, (h, w))
        return np.ascontiguousarray(frames[:, y0:y0 + h, x0:x0 + w]), Tracks(trajs, visibs, valids).pack()
