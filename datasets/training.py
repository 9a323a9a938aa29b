"""Deterministic, resumable sample streams for training (any dataset with `sample(index, rng)`).

Sample k of the stream is a pure function of (seed, k): epoch k // n, item perm_epoch[k % n], RNG seeded
by (seed, k). Whichever DataLoader worker or DDP rank draws it, it is the same, so a resumed run that
restarts the stream at the right ordinal sees exactly the data a never-stopped run would have seen.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Sampler

from pips2.datasets.exportdataset import to_sample


class OrdinalDataset(Dataset):
    """Maps an ordinal k to a sample of `base`."""

    def __init__(self, base, seed: int = 0, shuffle: bool = True):
        self.base, self.seed, self.shuffle = base, seed, shuffle
        self.n = len(base)
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return 2**62

    def index_of(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, k: int) -> dict:
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
