"""Building one exported clip from a PointOdyssey scene: a pure function of (scene, candidate, settings, rng).

Clip k is fully determined by (settings, k): its candidate (scene, start, stride) comes from a fixed
enumeration and its augmentation RNG is seeded by (seed, k), so any process on any machine builds the same
clip k: the same track.npz and the same frames handed to the encoder (the mp4 bytes may differ, see
docs/FORMATS.md). Writing, claiming and verifying clips is datasets/export.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pips2.datasets import pointodyssey as pod
from pips2.datasets.clips import ClipSettings, Tracks
from pips2.utils import augment


@dataclass(frozen=True)
class Candidate:
    """One possible clip: S frames of `scene` from `start`, every `stride` frames."""

    scene: str
    start: int
    stride: int


def scene_frames(dataset_location: str | Path, split: str) -> dict[str, int]:
    """The frame count of every scene folder of the split that holds frames, by name in sorted order: all that
    the enumeration of candidates depends on. A folder without frames gives no clip and renumbers none, so it is
    left out: an empty `.ipynb_checkpoints` or `notes/` appearing in the split refused every later run."""
    counts = {scene.name: len(pod.frame_files(scene)) for scene in pod.list_scenes(dataset_location, split)}
    return {name: n for name, n in counts.items() if n}


def scene_fingerprints(dataset_location: str | Path, split: str, frames: dict[str, int] | None = None
                       ) -> dict[str, str]:
    """Each scene's content fingerprint (pointodyssey.content_fingerprint), by name, of the scenes that hold
    frames: a data set regenerated or re-released at the same path keeps its names and frame counts but not these.
    `frames`: the split's scene_frames, if already read."""
    names = scene_frames(dataset_location, split) if frames is None else frames
    root = Path(dataset_location) / split
    return {name: pod.content_fingerprint(root / name) for name in names}


def enumerate_candidates(dataset_location: str | Path, st: ClipSettings, frames: dict[str, int] | None = None
                         ) -> list[Candidate]:
    """Every (scene, start, stride) clip of the split, in a fixed order (shuffled by the seed if asked).
    `frames`: the split's scene_frames, if already read."""
    if frames is None:
        frames = scene_frames(dataset_location, st.split)
    cands = []
    for name, n in frames.items():
        cands += [Candidate(name, s, k) for s, k in pod.clip_starts(n, st.S)]
    if st.shuffle:
        order = np.random.default_rng(st.seed).permutation(len(cands))
        cands = [cands[i] for i in order]
    return cands


def _filtered(scene: pod.Scene, idx: np.ndarray, st: ClipSettings, rng: np.random.Generator
              ) -> tuple[np.ndarray, Tracks]:
    """Frames of the candidate (time-reversed half the time with augmentation) and its tracks that pass the
    export filter; SkipItem if fewer than N//2 do."""
    tracks = Tracks(scene.trajs[idx], scene.visibs[idx], scene.valids[idx])
    frames = pod.read_frames([scene.rgb_paths[i] for i in idx])
    mask_path = scene.mask_paths[idx[0]] if scene.mask_paths else None
    if st.use_augs and rng.random() < 0.5:
        frames, *arrays = augment.reverse_time(frames, tracks.trajs, tracks.visibs, tracks.valids)
        tracks = Tracks(*arrays)
        mask_path = scene.mask_paths[idx[-1]] if scene.mask_paths else None
    H, W = frames.shape[1:3]
    edges = pod.segmentation_edges(pod.read_mask(mask_path)) if mask_path is not None else None
    if edges is not None and edges.shape != (H, W):
        raise pod.SkipItem("frames of different sizes")
    keep = pod.filter_tracks(tracks.trajs, tracks.visibs, tracks.valids, (H, W), edges)
    if len(keep) < st.N // 2:
        raise pod.SkipItem("too few tracks")
    return frames, tracks.take(keep)


def build_clip(scene: pod.Scene, cand: Candidate, st: ClipSettings, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (S,H,W,3) uint8 and track_g (S,N,4) of one candidate; raises SkipItem with the reason.

    Fewer than N good tracks are padded with invalid ones, as the authors' loader does; the clip is then
    rejected if fewer than half of its S x N entries are valid (docs/FORMATS.md, step 10 of the export).
    """
    idx = cand.start + cand.stride * np.arange(st.S)
    frames, tracks = _filtered(scene, idx, st, rng)
    H, W = frames.shape[1:3]
    plan = augment.plan_spatial(st.S, H, W, st.crop_hw, rng, p=0.7 if st.use_augs else 0.0)
    frames = augment.warp_frames(frames, plan)
    trajs = augment.warp_tracks(tracks.trajs, plan)
    tracks = Tracks(trajs, *augment.crop_visibility(trajs, tracks.visibs, tracks.valids, st.crop_hw))
    keep = np.nonzero(tracks.visibs[0] & tracks.visibs[1])[0]  # queries must still be visible after the crop
    if len(keep) < st.N // 2:
        raise pod.SkipItem("too few tracks after crop")
    tracks = tracks.take(keep)
    if st.use_augs:
        frames, visibs = augment.add_occluders(frames, tracks.trajs, tracks.visibs, rng, p=0.2)
        tracks = Tracks(tracks.trajs, visibs, tracks.valids)
        frames = augment.color_augment(frames, rng)
    pick = pod.choose_tracks(tracks.trajs, tracks.valids, st.N, rng, st.crop_hw)
    tracks = tracks.take(pick).pad(st.N)
    if tracks.valids.mean() < 0.5:
        raise pod.SkipItem("fewer than half of the entries valid")
    return frames, tracks.finite().pack()
