"""CroHD (HT21 / HT21Labels layout): head tracks from MOT-style boxes, cut into fixed-length clips.

<root>/HT21/<split>/<seq>/img1/000001.jpg ...; <root>/HT21Labels/<split>/<seq>/gt/gt.txt with rows
frame, id, left, top, width, height, conf, class, visibility. A head's point is its box centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The most track ids one sequence's gt.txt may declare: CroHD annotates a few thousand heads per sequence, and
# each id costs T x 10 bytes in the arrays below (T: the frames on disk), which a few rows of text would declare.
MAX_TRACKS = 20_000


@dataclass
class CroClip:
    name: str
    frame_paths: list[Path]
    trajs: np.ndarray  # (T,N,2) pixels, NaN where the head is not annotated
    visibs: np.ndarray  # (T,N) bool
    valids: np.ndarray  # (T,N) bool


def _gt_path(root: Path, split: str, seq: str) -> Path:
    for p in (root / "HT21Labels" / split / seq / "gt" / "gt.txt", root / "HT21" / split / seq / "gt" / "gt.txt"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{root}: no gt.txt for {split}/{seq} under HT21Labels/ or HT21/")


def load_sequence(root: str | Path, split: str, seq: str) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """All frames of a sequence with head centres (T,N,2), visibility and validity per track id."""
    root = Path(root)
    frames = sorted((root / "HT21" / split / seq / "img1").glob("*.jpg"))
    if not frames:
        raise FileNotFoundError(f"{root / 'HT21' / split / seq / 'img1'}: no frames")
    try:
        gt = np.loadtxt(_gt_path(root, split, seq), delimiter=",", ndmin=2)
    except ValueError as e:
        raise ValueError(f"{_gt_path(root, split, seq)}: unreadable ({e})") from None
    T = len(frames)
    ids = np.unique(gt[:, 1]).astype(int)
    if len(ids) > MAX_TRACKS:
        raise ValueError(f"{_gt_path(root, split, seq)}: {len(ids)} track ids, more than {MAX_TRACKS}")
    col = {i: k for k, i in enumerate(ids)}
    trajs = np.full((T, len(ids), 2), np.nan, np.float32)
    visibs = np.zeros((T, len(ids)), bool)
    for row in gt:
        t = int(row[0]) - 1
        if 0 <= t < T:
            k = col[int(row[1])]
            trajs[t, k] = [row[2] + row[4] / 2, row[3] + row[5] / 2]
            visibs[t, k] = row[8] > 0 if gt.shape[1] > 8 else True
    valids = np.isfinite(trajs).all(-1)
    return frames, trajs, visibs & valids, valids


def list_clips(root: str | Path, split: str = "train", clip_len: int = 1000) -> list[CroClip]:
    """Every sequence cut into consecutive clips of clip_len frames (a shorter tail clip is kept)."""
    seq_root = Path(root) / "HT21" / split
    if not seq_root.is_dir():
        raise FileNotFoundError(f"{seq_root}: no such folder (expected <root>/HT21/<split>/<seq>/img1)")
    clips = []
    for seq in sorted(p.name for p in seq_root.iterdir() if p.is_dir()):
        frames, trajs, visibs, valids = load_sequence(root, split, seq)
        for s in range(0, len(frames), clip_len):
            e = min(s + clip_len, len(frames))
            if e - s < 2:
                continue
            clips.append(CroClip(f"{seq}_{s:05d}", frames[s:e], trajs[s:e], visibs[s:e], valids[s:e]))
    return clips
