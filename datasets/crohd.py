"""CroHD (HT21 / HT21Labels layout): head tracks from MOT-style boxes, cut into fixed-length clips.

<root>/HT21/<split>/<seq>/img1/000001.jpg ...; <root>/HT21Labels/<split>/<seq>/gt/gt.txt with rows
frame, id, left, top, width, height, conf, class, visibility. A head's point is its box centre.

A sequence that cannot be used raises `CroHDError` (one line naming the file and the problem), so a caller can
skip it and go on with the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pips2.utils.video import not_regular_file

# Bound on frames x head ids of one sequence (its arrays are allocated at that size, about 10 bytes an entry:
# ~335 MB): the HT21 sequences need at most a few million; a gt.txt asking for more is refused, not allocated.
MAX_TRACK_ENTRIES = 2**25
# gt.txt is parsed whole (np.loadtxt takes about 7 times its size): the HT21 files are at most ~40 MB (a few
# thousand frames of up to ~300 heads); a sparse 4 GB one made the reader run out of memory, and one just under
# an earlier 256 MiB bound took 1.8 GB
MAX_GT_BYTES = 64 << 20
MIN_COLUMNS = 6  # frame, id, left, top, width, height (conf, class and visibility may follow)


class CroHDError(ValueError):
    """A CroHD sequence that cannot be used; str(e) is one line naming the file or folder and the problem."""


@dataclass
class CroClip:
    name: str
    frame_paths: list[Path]
    trajs: np.ndarray  # (T,N,2) pixels, NaN where the head is not annotated
    visibs: np.ndarray  # (T,N) bool
    valids: np.ndarray  # (T,N) bool


def _gt_path(root: Path, split: str, seq: str) -> Path:
    for p in (root / "HT21Labels" / split / seq / "gt" / "gt.txt", root / "HT21" / split / seq / "gt" / "gt.txt"):
        if p.exists():  # a FIFO or folder there is refused by _read_gt, in its own words
            return p
    raise CroHDError(f"{root}: no gt.txt for {split}/{seq} under HT21Labels/ or HT21/")


def _read_gt(path: Path, T: int) -> np.ndarray:
    """The rows of a gt.txt as floats (rows, columns >= MIN_COLUMNS), checked before anything is built on them."""
    if not_regular_file(path):
        raise CroHDError(f"{path}: not a regular file")
    if path.is_file() and path.stat().st_size > MAX_GT_BYTES:
        raise CroHDError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_GT_BYTES} an annotation file of "
                         f"the benchmark needs (it is read whole)")
    try:
        with warnings.catch_warnings():  # an empty file is said below in one line, not as numpy's warning
            warnings.simplefilter("ignore")
            gt = np.loadtxt(path, delimiter=",", ndmin=2)
    except (ValueError, OSError) as e:
        raise CroHDError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    if gt.shape[0] == 0:
        raise CroHDError(f"{path}: no annotation rows")
    if gt.shape[1] < MIN_COLUMNS:
        raise CroHDError(f"{path}: {gt.shape[1]} columns, expected at least {MIN_COLUMNS} (frame, id, left, top, "
                         f"width, height)")
    if not np.isfinite(gt[:, :2]).all() or np.abs(gt[:, :2]).max() >= 2**31:
        raise CroHDError(f"{path}: frame and id columns must be finite integers below 2^31")
    _check_rows(path, gt)
    n_ids = len(np.unique(gt[:, 1].astype(np.int64)))
    if T * n_ids > MAX_TRACK_ENTRIES:
        raise CroHDError(f"{path}: {n_ids} head ids over {T} frames is more than {MAX_TRACK_ENTRIES} entries")
    return gt


def _line_of(path: Path, row: int) -> int:
    """The line number of path's row-th data row (0-based), as np.loadtxt counts rows: blank lines and # comments
    are not rows."""
    n = -1
    with open(path, encoding="latin-1") as f:
        for number, line in enumerate(f, 1):
            if line.split("#", 1)[0].strip():
                n += 1
                if n == row:
                    return number
    return row + 1


def _check_rows(path: Path, gt: np.ndarray) -> None:
    """CroHDError naming the line of the first row that parses but is wrong: a fractional frame or id (int() made
    ids 1.2 and 1.7 one head, the later row overwriting the earlier), a box width or height that is negative or not
    finite (-1e30 gave a centre at -5e29, scored as a visible head), or a (frame, id) given twice (the last box
    won, silently)."""
    fractional = np.nonzero((gt[:, :2] != np.round(gt[:, :2])).any(1))[0]
    if len(fractional):
        r = fractional[0]
        raise CroHDError(f"{path}: line {_line_of(path, r)}: frame {gt[r, 0]:g}, id {gt[r, 1]:g}: frame and id must be "
                         f"whole numbers")
    wh = gt[:, 4:6]
    bad_box = np.nonzero(~(np.isfinite(wh) & (wh >= 0)).all(1))[0]
    if len(bad_box):
        r = bad_box[0]
        raise CroHDError(f"{path}: line {_line_of(path, r)}: box of width {wh[r, 0]:g} and height {wh[r, 1]:g}; "
                         f"both must be finite and not negative")
    keys = gt[:, :2].astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: rows of one key keep their order in the file
    same = np.nonzero((keys[order[1:]] == keys[order[:-1]]).all(1))[0]
    if len(same):
        k = same[np.argmin(order[same + 1])]  # the duplicate that comes first in the file
        a, b = int(order[k]), int(order[k + 1])
        raise CroHDError(f"{path}: lines {_line_of(path, a)} and {_line_of(path, b)} both give frame {keys[a, 0]}, id "
                         f"{keys[a, 1]}: one box per head and frame")


def _runs(nums: list[int], most: int = 4) -> str:
    """Sorted numbers as runs, "1..4, 6..20" (the first `most` of them)."""
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs[:most])
    return text + (", ..." if len(runs) > most else "")


def _numbered_frames(img1: Path) -> list[Path]:
    """The frames of img1/ in the order of the number in their names, which must be 1..T without a gap (gt.txt
    names frames by that number; sorting by name puts 10.jpg before 2.jpg, and a gap shifts every later frame
    onto another frame's annotations); CroHDError naming the frame otherwise."""
    numbered: dict[int, Path] = {}
    for p in sorted(img1.glob("*.jpg")):
        if not (p.stem.isascii() and p.stem.isdigit()):
            raise CroHDError(f"{p}: not named by its frame number (000001.jpg, 000002.jpg, ...)")
        if (n := int(p.stem)) in numbered:
            raise CroHDError(f"{img1}: {numbered[n].name} and {p.name} are both frame {n}")
        numbered[n] = p
    if not numbered:
        raise CroHDError(f"{img1}: no frames")
    nums = sorted(numbered)
    if nums[0] != 1 or nums[-1] != len(nums):
        gap = next(n for n in range(1, nums[-1] + 2) if n not in numbered)
        width = len(numbered[nums[0]].stem)
        raise CroHDError(f"{img1}: frame {gap:0{width}d}.jpg missing (have {_runs(nums)})")
    frames = [numbered[n] for n in nums]
    # a FIFO (or a link to one) named like a frame would block the first open() of it forever
    if odd := next((p for p in frames if not_regular_file(p)), None):
        raise CroHDError(f"{odd}: not a regular file")
    return frames


def load_sequence(root: str | Path, split: str, seq: str) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """All frames of a sequence (img1/ numbered 1..T) with head centres (T,N,2), visibility and validity per track
    id; CroHDError when it cannot be used (a frame missing, gt.txt naming frames the folder lacks)."""
    root = Path(root)
    frames = _numbered_frames(root / "HT21" / split / seq / "img1")
    T = len(frames)
    gt_path = _gt_path(root, split, seq)
    gt = _read_gt(gt_path, T)
    # a row past the last frame file would be dropped unseen: the folder lacks frames (a partial copy)
    first, last = int(gt[:, 0].min()), int(gt[:, 0].max())
    if first < 1 or last > T:
        raise CroHDError(f"{gt_path}: names frame {last if last > T else first}, but img1/ holds frames 1..{T}")
    ids = np.unique(gt[:, 1]).astype(int)
    col = {i: k for k, i in enumerate(ids)}
    trajs = np.full((T, len(ids), 2), np.nan, np.float32)
    visibs = np.zeros((T, len(ids)), bool)
    for row in gt:
        t = int(row[0]) - 1
        if 0 <= t < T:
            k = col[int(row[1])]
            trajs[t, k] = [row[2] + row[4] / 2, row[3] + row[5] / 2]
            visibs[t, k] = row[8] > 0 if gt.shape[1] > 8 else True
    valids = np.asarray(np.isfinite(trajs).all(-1))
    return frames, trajs, visibs & valids, valids


def list_sequences(root: str | Path, split: str = "train") -> list[str]:
    """The sequence folders of a split, sorted; FileNotFoundError when the split's folder is missing."""
    seq_root = Path(root) / "HT21" / split
    if not seq_root.is_dir():
        raise FileNotFoundError(f"{seq_root}: no such folder (expected <root>/HT21/<split>/<seq>/img1)")
    return sorted(p.name for p in seq_root.iterdir() if p.is_dir())


def sequence_clips(root: str | Path, split: str, seq: str, clip_len: int = 1000) -> list[CroClip]:
    """One sequence cut into consecutive clips of clip_len frames (a shorter tail clip of 2 or more frames is
    kept); CroHDError when the sequence cannot be used."""
    if clip_len < 2:
        raise ValueError(f"clip_len must be at least 2, got {clip_len}")
    frames, trajs, visibs, valids = load_sequence(root, split, seq)
    clips = []
    for s in range(0, len(frames), clip_len):
        e = min(s + clip_len, len(frames))
        if e - s < 2:
            continue
        clips.append(CroClip(f"{seq}_{s:05d}", frames[s:e], trajs[s:e], visibs[s:e], valids[s:e]))
    return clips


def list_clips(root: str | Path, split: str = "train", clip_len: int = 1000) -> list[CroClip]:
    """Every sequence cut into consecutive clips of clip_len frames (a shorter tail clip is kept)."""
    return [c for seq in list_sequences(root, split) for c in sequence_clips(root, split, seq, clip_len)]
