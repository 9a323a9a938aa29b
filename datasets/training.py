"""Deterministic, resumable sample streams for training (any dataset with `sample(index, rng)`).

Sample k of the stream is a pure function of (seed, k): epoch k // n, item perm_epoch[k % n], RNG seeded
by (seed, k). Whichever DataLoader worker or DDP rank draws it, it is the same, so a resumed run that
restarts the stream at the right ordinal sees exactly the data a never-stopped run would have seen.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pips2.datasets.clips import Tracks


class DataGoneError(RuntimeError):
    """So many unusable clips in a row that the data itself is gone or broken (deleted underneath a run, a
    failed mount); str(e) is one line naming the folder."""

    def __init__(self, message: str):
        # raised in a DataLoader worker, it comes back to the training process as this type with the worker's
        # whole traceback as its message: keep the original line, the last one
        lines = message.strip().splitlines() or [""]
        super().__init__(lines[-1].split(f"{type(self).__name__}: ", 1)[-1])


class Sample(NamedTuple):
    """One training clip, or a batch of them (the DataLoader collates field by field into a Sample)."""

    rgbs: torch.Tensor  # (S,3,H,W) float in [0,255]
    trajs: torch.Tensor  # (S,N,2) pixels
    visibs: torch.Tensor  # (S,N) float 0/1
    valids: torch.Tensor  # (S,N) float 0/1
    corrupt_ids: torch.Tensor  # dataset indices of clips skipped while producing it, -1 padded

    def to(self, device: torch.device | str) -> Sample:
        """The same sample with every tensor on `device`."""
        return Sample(*(t.to(device) for t in self))


def to_sample(frames: np.ndarray, track: np.ndarray, skipped: list[int] | tuple[int, ...] = (),
              width: int = 0) -> Sample:
    """(S,H,W,3) uint8 frames and (S,N,4) packed tracks -> a Sample of tensors.

    `corrupt_ids` is padded with -1 to `width` entries so that samples of one dataset collate into a batch.
    """
    ids = np.full(max(width, len(skipped)), -1, np.int64)
    ids[:len(skipped)] = skipped
    tr = Tracks.unpack(track)
    return Sample(rgbs=torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float(),
                  trajs=torch.from_numpy(tr.trajs), visibs=torch.from_numpy(tr.visibs.astype(np.float32)),
                  valids=torch.from_numpy(tr.valids.astype(np.float32)), corrupt_ids=torch.from_numpy(ids))


class OrdinalDataset(Dataset):
    """Maps an ordinal k to a sample of `base`."""

    def __init__(self, base, seed: int = 0, shuffle: bool = True):
        self.base, self.seed, self.shuffle = base, seed, shuffle
        self.n = len(base)
        self._perm_epoch, self._perm = -1, None  # the permutation of the epoch _perm_epoch, made when first asked

    def __len__(self) -> int:
        return 2**62

    def index_of(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos
        perm = self._perm
        if perm is None or epoch != self._perm_epoch:
            perm = self._perm = np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
            self._perm_epoch = epoch
        return int(perm[pos])

    def __getitem__(self, k: int) -> Sample:
        frames, track = self.base.sample(self.index_of(k), np.random.default_rng([self.seed, k]))
        # bases that skip corrupt items say which (ExportDataset); the width keeps a batch collatable
        return to_sample(frames, track, getattr(self.base, "last_skipped", ()), getattr(self.base, "max_retries", 0))


class OrdinalSampler(Sampler):
    """Ordinals of one rank: (start + i) * world + rank for i = 0, 1, 2, ..."""

    def __init__(self, start: int = 0, rank: int = 0, world: int = 1):
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        i = self.start
        while True:
            yield i * self.world + self.rank
            i += 1

    def __len__(self) -> int:
        return 2**62
