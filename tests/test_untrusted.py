"""Untrusted data files never run code: crafted pickles, .npy and .npz are refused with one line naming the file."""

import collections
import io
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pips2.datasets import pointodyssey as pod
from pips2.datasets import tapvid
from pips2.datasets.kubric import KubricDataset
from pips2.utils.safe_load import UnsafeFileError, load_npy, load_npz, load_pickle

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `how` (a shell command, builtins.open or builtins.eval) that creates `marker`."""

    def __init__(self, marker: Path, how: str = "system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "open":
            return open, (self.marker, "w")
        return eval, (f"open({self.marker!r}, 'w')",)


HOWS = ["system", "open", "eval"]
WANTS = {"system": "posix.system", "open": "io.open", "eval": "builtins.eval"}


def _one_line(e: BaseException, name: str) -> str:
    text = str(e)
    assert "\n" not in text and name in text, text
    return text


@pytest.mark.parametrize("how", HOWS)
def test_payload_is_live(tmp_path, how):
    """The payloads below really run code under a plain pickle.loads, so their refusal is what saves us."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker, how)))
    assert marker.exists()


# --- PointOdyssey ----------------------------------------------------------------------------------------

def _frames(scene: Path, T: int = 5) -> None:
    """T frame files in scene/rgbs (the loaders count them by name: their bytes are not read here)."""
    (scene / "rgbs").mkdir(parents=True, exist_ok=True)
    for t in range(T):
        (scene / "rgbs" / f"rgb_{t:05d}.jpg").touch()


def _anno(T=5, N=4, trajs_3d=None) -> dict:
    rng = np.random.default_rng(0)
    return {"trajs_2d": rng.uniform(0, 50, (T, N, 2)).astype(np.float32),
            "trajs_3d": np.zeros((T, N, 3), np.float32) if trajs_3d is None else trajs_3d,
            "visibs": np.ones((T, N), bool), "valids": np.ones((T, N), bool)}


@pytest.mark.parametrize("how", HOWS)
def test_pickle_saved_as_anno_npz_is_refused(tmp_path, how):
    marker = tmp_path / "ran"
    with open(tmp_path / "anno.npz", "wb") as f:
        pickle.dump(Payload(marker, how), f)
    for require_3d in (True, False):
        with pytest.raises(pod.SkipItem) as e:
            pod.load_annotations(tmp_path, require_3d)
        assert _one_line(e.value, "anno.npz").startswith("anno.npz: refused: not a zip archive")
    with pytest.raises(UnsafeFileError, match="refused: not a zip archive"):
        load_npz(tmp_path / "anno.npz")
    assert not marker.exists()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("fname", ["anno.npz", "annotations.npz"])
def test_npz_with_payload_in_trajs_3d_is_refused(tmp_path, how, fname):
    marker = tmp_path / "ran"
    _frames(tmp_path)
    z = _anno(trajs_3d=np.array(Payload(marker, how), dtype=object))  # shaped as the pickled None it stands for
    if fname == "annotations.npz":
        z["visibilities"] = np.ones(z.pop("visibs").shape, np.uint8)
    np.savez(tmp_path / fname, **z)
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path, require_3d=True)
    text = _one_line(e.value, fname)
    assert text == (f"{fname}: refused: member trajs_3d: pickle wants {WANTS[how]} "
                    f"(only plain data and numpy arrays are allowed)")
    with pytest.raises(UnsafeFileError) as e:
        load_npz(tmp_path / fname)
    assert _one_line(e.value, str(tmp_path / fname)) == f"{tmp_path / fname}: {text.split(': ', 1)[1]}"
    # the default (2D) loader never reads trajs_3d, so the same file loads without running anything
    trajs, _, _ = pod.load_annotations(tmp_path)
    assert trajs.shape == (5, 4, 2)
    # an object member of any other shape is refused from its header, before its pickle is read
    np.savez(tmp_path / fname, allow_pickle=True, **dict(z, trajs_3d=np.array([Payload(marker, how)], dtype=object)))
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path, require_3d=True)
    assert _one_line(e.value, fname) == f"{fname}: member trajs_3d: is object, expected a float array"
    assert not marker.exists()


def test_legitimate_anno_npz_still_loads(tmp_path):
    _frames(tmp_path)
    np.savez(tmp_path / "anno.npz", **_anno(trajs_3d=np.array(None, dtype=object)))
    with pytest.raises(pod.SkipItem, match="^trajs_3d is None$"):
        pod.load_annotations(tmp_path, require_3d=True)
    trajs, visibs, valids = pod.load_annotations(tmp_path, require_3d=False)
    assert trajs.shape == (5, 4, 2) and visibs.all() and valids.all()
    z = load_npz(tmp_path / "anno.npz")
    assert z["trajs_3d"].dtype == object and z["trajs_3d"].item() is None
    np.savez_compressed(tmp_path / "anno.npz", **_anno())
    trajs, _, _ = pod.load_annotations(tmp_path, require_3d=True)
    assert np.array_equal(trajs, _anno()["trajs_2d"])


def test_damaged_npz_is_one_line(tmp_path):
    np.savez(tmp_path / "anno.npz", **_anno())
    data = (tmp_path / "anno.npz").read_bytes()
    (tmp_path / "anno.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path)
    _one_line(e.value, "anno.npz")


def _npz_members(path: Path, members: dict) -> None:
    """An .npz (deflated) of name -> array, or -> (header dict, data bytes) for a member whose header says what
    the test wants whatever its data holds."""
    import zipfile

    from numpy.lib import format as npformat

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, what in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                if isinstance(what, tuple):
                    header, data = what
                    npformat.write_array_header_1_0(f, header)
                    f.write(data)
                else:
                    npformat.write_array(f, what)


def _peak_bytes(fn) -> int:
    """Peak memory traced while fn() runs (numpy's allocations are traced too, even before they are touched)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("shape,msg", [
    ((3, 50_000_000, 2), "declares 50000000 tracks, more than 131072"),
    ((400_000_000, 4, 2), "3 frames on disk but 400000000 in the annotations"),
])
def test_anno_npz_declaring_a_huge_shape_is_refused_from_its_header(tmp_path, shape, msg):
    _frames(tmp_path, 3)
    head = {"descr": "<f4", "fortran_order": False, "shape": shape}
    _npz_members(tmp_path / "anno.npz", {"trajs_2d": (head, bytes(1 << 16)), **{
        k: v[:3] for k, v in _anno().items() if k != "trajs_2d"}})

    def load():
        with pytest.raises(pod.SkipItem) as e:
            pod.load_annotations(tmp_path)
        assert _one_line(e.value, "anno.npz") == f"anno.npz: member trajs_2d: {msg}"

    assert _peak_bytes(load) < 32 << 20  # numpy would allocate the declared 1.2 or 3.2 GB before reading


@pytest.mark.parametrize("where", ["npy", "npz"])
def test_an_npy_header_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, where):
    """An .npy header declares its own length in four bytes (version 2), and numpy reads all of it before it
    compares it with its 10,000-byte limit: a 4 KB Kubric .npy (or an 8 KB track.npz member) cost 4 GB of memory
    and then blamed memory, not the file."""
    import zipfile

    import numpy.lib.format as npformat

    stream = npformat.MAGIC_PREFIX + bytes([2, 0]) + (0xFFFFFFF0).to_bytes(4, "little") + b"{'descr': '<f4'"
    if where == "npy":
        path = tmp_path / "ann.npy"
        path.write_bytes(stream)
        load = lambda: load_npy(path)  # noqa: E731
    else:
        path = tmp_path / "track.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("track_g.npy", stream)
        load = lambda: load_npz(path)  # noqa: E731
    member = "member track_g: " if where == "npz" else ""

    def refused():
        with pytest.raises(UnsafeFileError) as e:
            load()
        assert _one_line(e.value, path.name) == (f"{path}: {member}not an .npy array (its header declares "
                                                 f"4294967280 bytes (at most 65536))")

    assert _peak_bytes(refused) < 32 << 20


def test_an_npy_of_an_unknown_format_version_says_so(tmp_path):
    path = tmp_path / "ann.npy"
    np.save(path, np.zeros(3, np.float32))
    raw = bytearray(path.read_bytes())
    raw[6] = 9  # version 9.0
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsafeFileError, match=r"not an \.npy array \(\.npy format version 9\.0 is not one numpy "
                                              r"writes\)$"):
        load_npy(path)


def test_anno_npz_declaring_more_entries_than_the_bound_is_refused_from_its_header(tmp_path):
    head = {"descr": "<f4", "fortran_order": False, "shape": (2000, 100_000, 2)}
    _npz_members(tmp_path / "anno.npz", {"trajs_2d": (head, bytes(1 << 16))})
    with pytest.raises(pod.SkipItem, match="^anno.npz: member trajs_2d: declares 100000 tracks over 2000 frames, "
                                           "more than 134217728 entries$"):
        pod.load_annotations(tmp_path, num_frames=2000)


def test_a_scene_of_2_frames_may_not_declare_more_tracks_than_real_scenes_have(tmp_path):
    # within the entry bound (2 x 2^18 of 2^27) and every member really there: the loader took it, while at
    # 2^25 tracks of deflated zeros a 2 MB file cost 2.9 GB and half a minute to load
    _frames(tmp_path, 2)
    N = 1 << 18
    np.savez_compressed(tmp_path / "anno.npz", trajs_2d=np.zeros((2, N, 2)), visibs=np.ones((2, N)),
                        valids=np.ones((2, N)))
    with pytest.raises(pod.SkipItem, match=f"^anno.npz: member trajs_2d: declares {N} tracks, more than 131072$"):
        pod.load_annotations(tmp_path)
    _frames(tmp_path / "ok", 2)
    np.savez_compressed(tmp_path / "ok" / "anno.npz", trajs_2d=np.zeros((2, N // 2, 2)),
                        visibs=np.ones((2, N // 2)), valids=np.ones((2, N // 2)))
    assert pod.load_annotations(tmp_path / "ok")[0].shape == (2, N // 2, 2)


def test_anno_npz_bytes_are_bounded_counting_each_member_dtype(tmp_path, monkeypatch):
    # the bound is on bytes: float64 positions and bool flags (18 bytes an entry) fit, float64 flags (32) do not
    T, N = 5, 4
    monkeypatch.setattr(pod, "MAX_ANNO_BYTES", T * N * 18)
    _frames(tmp_path, T)
    a = _anno(T, N)
    for trajs, flags, problem in ((np.float32, bool, None), (np.float64, bool, None),
                                  (np.float64, np.float64, "member visibs: is float64 (5, 4): with the members "
                                                           "before it, 480 bytes of 2D tracks, more than 360")):
        np.savez(tmp_path / "anno.npz", trajs_2d=a["trajs_2d"].astype(trajs), visibs=a["visibs"].astype(flags),
                 valids=a["valids"].astype(flags))
        if problem is None:
            assert pod.load_annotations(tmp_path)[0].shape == (T, N, 2)
        else:
            with pytest.raises(pod.SkipItem, match=re.escape(f"anno.npz: {problem} (float64 positions")):
                pod.load_annotations(tmp_path)


def test_a_deflated_member_inflating_more_than_100_to_1_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from pips2.utils import safe_load

    monkeypatch.setattr(safe_load, "DEFLATE_RATIO_FLOOR", 1 << 20)  # 256 MiB in use: the test keeps it small
    zeros = np.zeros((1 << 18, 2))  # 4 MiB, deflating ~1000 to 1
    np.savez_compressed(tmp_path / "bomb.npz", a=zeros)
    read = []
    with monkeypatch.context() as m, pytest.raises(UnsafeFileError) as e:
        m.setattr(safe_load.npformat, "read_array", lambda *a, **k: read.append(1))
        load_npz(tmp_path / "bomb.npz")
    assert re.fullmatch(r".*bomb\.npz: member a: 4194432 bytes compressed into \d+, more than 100 to 1 "
                        r"\(a zip bomb\?\); store it uncompressed \(np\.savez\)", _one_line(e.value, "bomb.npz"))
    assert not read
    # what real files are: the same zeros stored, real floats compressed (2-3 to 1), flags under the floor
    np.savez(tmp_path / "stored.npz", a=zeros)
    floats = np.random.default_rng(0).uniform(0, 960, (1 << 18, 2))
    np.savez_compressed(tmp_path / "floats.npz", a=floats, flags=np.ones(1 << 19, bool))
    assert load_npz(tmp_path / "stored.npz")["a"].shape == zeros.shape
    assert (load_npz(tmp_path / "floats.npz")["a"] == floats).all()


def test_a_member_declaring_more_data_than_it_holds_is_refused_before_it_is_allocated(tmp_path):
    head = {"descr": "<f8", "fortran_order": True, "shape": (100_000, 10_000)}
    _npz_members(tmp_path / "x.npz", {"a": (head, bytes(800))})
    with open(tmp_path / "x.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (9999999999,)})
        f.write(bytes(24))

    def load():
        with pytest.raises(UnsafeFileError) as e:
            load_npz(tmp_path / "x.npz")
        assert _one_line(e.value, "x.npz").endswith("member a: header declares float64 (100000, 10000) "
                                                    "(8000000000 bytes) but the data is 800 bytes")
        with pytest.raises(UnsafeFileError, match=r"declares float64 \(9999999999,\) \(79999999992 bytes\) but "
                                                  r"the data is 24 bytes"):
            load_npy(tmp_path / "x.npy")

    assert _peak_bytes(load) < 32 << 20


def test_npz_with_thousands_of_members_or_one_twice_is_refused(tmp_path):
    _frames(tmp_path)
    _npz_members(tmp_path / "anno.npz", {**_anno(), **{f"pad{i}": np.zeros(1) for i in range(3000)}})
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path)
    assert _one_line(e.value, "anno.npz") == "anno.npz: refused: it holds 3004 members (at most 64)"
    import zipfile

    np.savez(tmp_path / "anno.npz", **_anno())
    with zipfile.ZipFile(tmp_path / "anno.npz", "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        with zf.open("visibs.npy", "w") as f:  # a second visibs, all invisible, after the first
            np.lib.format.write_array(f, np.zeros((5, 4), bool))
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path)
    assert _one_line(e.value, "anno.npz") == "anno.npz: refused: it holds the member visibs.npy twice"


BAD_MEMBERS = {
    "visibs as strings": ("visibs", np.full((5, 4), "0"), "member visibs: is <U1, expected a bool, 0/1 or 0./1. array"),
    "visibs of 0.1": ("visibs", np.full((5, 4), 0.1), "member visibs holds np.float64(0.1) at frame 0, track 0; "
                                                     "only 0, 1 are allowed"),
    "valids of 7": ("valids", np.full((5, 4), 7, np.int64), "member valids holds np.int64(7) at frame 0, track 0"),
    "valids of NaN": ("valids", np.full((5, 4), np.nan), "member valids holds np.float64(nan)"),
    "visibs of objects": ("visibs", np.full((5, 4), None, object), "member visibs: is object, expected"),
    "trajs as strings": ("trajs_2d", np.full((5, 4, 2), "1.5"), "member trajs_2d: is <U3, expected a float array"),
    # loaded without a word, every position rounded to 0.25-0.5 px at 1000-2000 px
    "trajs in float16": ("trajs_2d", np.zeros((5, 4, 2), np.float16), "member trajs_2d: is float16, expected float32 "
                                                                      "or float64 positions"),
    "trajs of 3 columns": ("trajs_2d", np.zeros((5, 4, 3), np.float32), "member trajs_2d: has shape (5, 4, 3), "
                                                                         "expected (T, N, 2)"),
    "visibs of other tracks": ("visibs", np.ones((5, 7), bool), "member visibs has shape (5, 7), trajs_2d (5, 4, 2)"),
    "valids of other frames": ("valids", np.ones((6, 4), bool), "member valids: 5 frames on disk but 6 in the"),
    "legacy visibilities of 3": ("visibilities", np.full((5, 4), 3, np.uint8), "member visibilities holds np.uint8(3)"),
}


@pytest.mark.parametrize("case", list(BAD_MEMBERS))
def test_anno_npz_that_loads_but_is_wrong_is_refused_naming_the_member(tmp_path, case):
    key, value, msg = BAD_MEMBERS[case]
    _frames(tmp_path)
    z = _anno()
    if key == "visibilities":
        del z["visibs"]
    z[key] = value
    fname = "annotations.npz" if key == "visibilities" else "anno.npz"
    np.savez(tmp_path / fname, **z)
    with pytest.raises(pod.SkipItem) as e:
        pod.load_annotations(tmp_path)
    assert _one_line(e.value, fname).startswith(f"{fname}: {msg}")


def test_flags_as_0_1_ints_or_floats_still_load(tmp_path):
    _frames(tmp_path)
    z = _anno()
    z["visibs"] = np.ones((5, 4), np.float32)
    z["visibs"][2, 1] = 0.0
    z["valids"] = np.ones((5, 4), np.uint8)
    np.savez(tmp_path / "anno.npz", **z)
    trajs, visibs, valids = pod.load_annotations(tmp_path)
    assert valids.all() and visibs.sum() == 19 and not visibs[2, 1]


# --- Kubric ----------------------------------------------------------------------------------------------

def _kubric_seq(root: Path, ann) -> KubricDataset:
    seq = root / "seq0000"
    (seq / "frames").mkdir(parents=True)
    for t in range(3):
        cv2.imwrite(str(seq / "frames" / f"{t:03d}.png"), np.full((16, 16, 3), 40 * t, np.uint8))
    np.save(seq / "seq0000.npy", ann, allow_pickle=True)
    return KubricDataset(str(root), S=3, N=2, crop_hw=(16, 16))


@pytest.mark.parametrize("how", HOWS)
def test_kubric_npy_with_payload_is_refused(tmp_path, how):
    marker = tmp_path / "ran"
    ds = _kubric_seq(tmp_path / "k", {"coords": Payload(marker, how), "visibility": np.zeros((2, 3), bool)})
    path = tmp_path / "k" / "seq0000" / "seq0000.npy"
    with pytest.raises(UnsafeFileError) as e:
        ds.load(0)
    assert _one_line(e.value, str(path)) == (f"{path}: refused: pickle wants {WANTS[how]} "
                                             f"(only plain data and numpy arrays are allowed)")
    assert isinstance(e.value, ValueError)  # what train.py reports as a one-line data error
    assert not marker.exists()


def test_kubric_npy_that_is_a_bare_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    ds = _kubric_seq(tmp_path / "k", {})
    path = tmp_path / "k" / "seq0000" / "seq0000.npy"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFileError, match="not an .npy array") as e:
        ds.load(0)
    _one_line(e.value, str(path))
    assert not marker.exists()


def test_legitimate_kubric_npy_still_loads(tmp_path):
    occluded = np.zeros((2, 3), bool)
    occluded[1, 2] = True
    coords = np.arange(12, dtype=np.float64).reshape(2, 3, 2)
    ds = _kubric_seq(tmp_path / "k", {"coords": coords, "visibility": occluded})
    frames, c, visible = ds.load(0)
    assert frames.shape == (3, 16, 16, 3) and c.shape == (3, 2, 2) and c.dtype == np.float32
    assert np.array_equal(c, coords.transpose(1, 0, 2))
    assert not visible[2, 1] and visible[1, 1] and visible[:, 0].all()  # the file's flag means occluded


@pytest.mark.parametrize("ann,msg", [({"coords": np.zeros((2, 3, 2))}, "not a Kubric annotation"),
                                     ({"coords": np.zeros((2, 3)), "visibility": np.zeros((2, 3), bool)}, "(N,T,2)"),
                                     ([1, 2], "not a Kubric annotation")])
def test_kubric_npy_of_the_wrong_shape_is_one_line(tmp_path, ann, msg):
    ds = _kubric_seq(tmp_path / "k", ann)
    with pytest.raises(ValueError, match=msg) as e:
        ds.load(0)
    _one_line(e.value, "seq0000.npy")


@pytest.mark.parametrize("ann,msg", [
    ({"visibility": np.full((2, 3), "0")}, "visibility is <U1, expected a bool or 0/1 array"),  # "0" casts to True
    ({"visibility": np.full((2, 3), 0.1)}, "visibility holds np.float64(0.1), only 0 and 1 are allowed"),
    ({"coords": np.full((2, 3, 2), "1.5")}, "coords is <U3, expected a numeric array"),
    ({"coords": [[[0.0, 0.0]] * 3] * 2}, "coords is list, expected a numeric array"),
])
def test_kubric_npy_that_loads_but_is_wrong_is_one_line(tmp_path, ann, msg):
    ds = _kubric_seq(tmp_path / "k", {"coords": np.zeros((2, 3, 2)), "visibility": np.zeros((2, 3), bool), **ann})
    with pytest.raises(ValueError) as e:
        ds.load(0)
    assert _one_line(e.value, "seq0000.npy").endswith(f"seq0000.npy: {msg}")


def test_kubric_frame_count_is_checked_before_any_frame_is_decoded(tmp_path, monkeypatch):
    from pips2.datasets import kubric

    ds = _kubric_seq(tmp_path / "k", {"coords": np.zeros((2, 5, 2)), "visibility": np.zeros((2, 5), bool)})
    decoded = []
    monkeypatch.setattr(kubric, "read_rgb", lambda p: decoded.append(p))
    with pytest.raises(ValueError, match="seq0000: 3 frames but 5 in the annotations"):
        ds.load(0)
    assert decoded == []


@pytest.mark.parametrize("case", ["larger frames after a small first one", "a header that cannot be read"])
def test_every_kubric_frame_header_is_checked_before_any_frame_is_decoded(tmp_path, monkeypatch, case):
    """The sequence bound was judged from the first frame's header alone: a 16x16 first frame, then 23 flat
    4000x4000 PNGs (1.3 MB of files) were decoded whole (1.34 GB) before "all input arrays must have the same
    shape", a line naming nothing. Every header is read first, the refusal names the frame, nothing is decoded."""
    from pips2.datasets import kubric

    ds = _kubric_seq(tmp_path / "k", {"coords": np.zeros((2, 3, 2)), "visibility": np.zeros((2, 3), bool)})
    frame = tmp_path / "k" / "seq0000" / "frames" / "001.png"
    if case == "a header that cannot be read":
        frame.write_bytes(b"not an image at all")
        why = "001.png: unreadable image"
    else:
        for name in ("001.png", "002.png"):  # flat: a few hundred bytes each, whatever their size
            cv2.imwrite(str(frame.parent / name), np.full((320, 480, 3), 128, np.uint8))
        why = "001.png: frame of 480x320, the first frame (000.png) is 16x16"
    decoded = []
    real = kubric.read_rgb
    monkeypatch.setattr(kubric, "read_rgb", lambda p: decoded.append(Path(p).name) or real(p))
    with pytest.raises(ValueError) as e:
        ds.load(0)
    assert _one_line(e.value, "001.png").endswith(why) and decoded == []
    monkeypatch.setattr(kubric, "read_rgb", real)
    for name in ("001.png", "002.png"):  # the same sequence of one frame size loads, into one array
        cv2.imwrite(str(frame.parent / name), np.full((16, 16, 3), 7, np.uint8))
    frames = ds.load(0)[0]
    assert frames.shape == (3, 16, 16, 3) and (frames[1:] == 7).all()


# --- TAP-Vid ---------------------------------------------------------------------------------------------

def _entry(T=4, H=24, W=32, N=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    occ = np.zeros((N, T), bool)
    occ[0, 1] = True
    return {"video": (rng.random((T, H, W, 3)) * 255).astype(np.uint8),
            "points": rng.random((N, T, 2)).astype(np.float32), "occluded": occ}


def _dump(path: Path, obj, protocol=pickle.HIGHEST_PROTOCOL) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("where", ["top", "video", "points"])
def test_tapvid_pickle_with_payload_is_refused(tmp_path, how, where):
    marker = tmp_path / "ran"
    bomb = Payload(marker, how)
    obj = bomb if where == "top" else {"clip": dict(_entry(), **{where: bomb})}
    path = _dump(tmp_path / "davis.pkl", obj)
    with pytest.raises(tapvid.TapVidError) as e:
        list(tapvid.load_tapvid(path))
    assert _one_line(e.value, str(path)) == (f"{path}: refused: pickle wants {WANTS[how]} "
                                             f"(only plain data and numpy arrays are allowed)")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_legitimate_tapvid_pickles_still_load(tmp_path, protocol):
    a, b = _entry(seed=0), _entry(seed=1)
    (name, video, pts, occ), = tapvid.load_tapvid(_dump(tmp_path / "d.pkl", {"clipA": a}, protocol))
    assert name == "clipA" and np.array_equal(video, a["video"]) and np.array_equal(occ, a["occluded"])
    assert np.allclose(pts, a["points"] * [31, 23])
    got = list(tapvid.load_tapvid(_dump(tmp_path / "r.pkl", [a, b], protocol)))
    assert [g[0] for g in got] == ["r_0000", "r_0001"] and np.array_equal(got[1][1], b["video"])
    # Kinetics: the video is a list of encoded frames (PNG here, so the round trip is exact)
    kin = dict(a, video=[cv2.imencode(".png", fr[..., ::-1])[1].tobytes() for fr in a["video"]])
    (_, video, _, _), = tapvid.load_tapvid(_dump(tmp_path / "k.pkl", [kin], protocol))
    assert np.array_equal(video, a["video"])
    jpg = dict(a, video=[cv2.imencode(".jpg", fr[..., ::-1])[1].tobytes() for fr in a["video"]])
    (_, video, _, _), = tapvid.load_tapvid(_dump(tmp_path / "j.pkl", [jpg], protocol))
    assert video.shape == a["video"].shape and video.dtype == np.uint8


BAD_SHAPES = {
    "dict of ints": ({"a": 1, "b": 2}, "entry a is int, expected a dict"),
    "list of strings": (["x", "y"], "entry bad_0000 is str, expected a dict"),
    "an int": (7, "holds int, expected a dict or list of videos"),
    "empty": ({}, "holds no videos"),
    "missing keys": ({"a": {"video": _entry()["video"]}}, "entry a lacks video/points/occluded"),
    "points 2-D": ({"a": dict(_entry(), points=np.zeros((3, 4)))}, "points is float64 (3, 4), expected"),
    "points strings": ({"a": dict(_entry(), points=np.full((3, 4, 2), "x"))}, "points is <U1"),
    "points a list": ({"a": dict(_entry(), points=[[0.0, 0.0]])}, "points is list"),
    "occluded float": ({"a": dict(_entry(), occluded=np.zeros((3, 4)))}, "occluded is float64 (3, 4)"),
    "occluded shape": ({"a": dict(_entry(), occluded=np.zeros((3, 5), bool))}, "occluded is bool (3, 5)"),
    "video float": ({"a": dict(_entry(), video=np.zeros((4, 8, 8, 3)))}, "video is float64 (4, 8, 8, 3)"),
    "video dict": ({"a": dict(_entry(), video={"x": 1})}, "video is dict"),
    "frame count": ({"a": dict(_entry(), video=np.zeros((5, 8, 8, 3), np.uint8))}, "video has 5 frames"),
    "bad jpeg": ({"a": dict(_entry(), video=[b"notajpeg"] * 4)}, "frame 0: unreadable image"),
    "occluded of 2": ({"a": dict(_entry(), occluded=np.full((3, 4), 2))}, "occluded holds np.int64(2), only 0 and 1"),
    "points NaN": ({"a": dict(_entry(), points=np.full((3, 4, 2), np.nan, np.float32))}, "non-finite point"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_tapvid_pickle_of_the_wrong_shape_is_one_line(tmp_path, case):
    obj, msg = BAD_SHAPES[case]
    path = _dump(tmp_path / "bad.pkl", obj)
    with pytest.raises(tapvid.TapVidError) as e:
        list(tapvid.load_tapvid(path))
    assert msg in _one_line(e.value, str(path))


def test_tapvid_position_of_an_occluded_point_may_be_nan(tmp_path):
    """Only a visible point's position is scored or queried: NaN where the point is occluded loads."""
    entry = _entry()
    entry["points"][0, 1] = np.nan  # point 0 is occluded in frame 1
    name, _, points, occluded = next(tapvid.load_tapvid(_dump(tmp_path / "ok.pkl", {"a": entry})))
    assert name == "a" and np.isnan(points[0, 1]).all() and occluded[0, 1]
    entry["points"][1, 1] = np.nan  # point 1 is visible there
    with pytest.raises(tapvid.TapVidError, match=r"visible \(point 1, frame 1; 1 such entries\)"):
        list(tapvid.load_tapvid(_dump(tmp_path / "bad.pkl", {"a": entry})))


def _run_tap(pkl: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # no checkpoint exists: a data error must come first, before the model is looked for
    return subprocess.run([sys.executable, str(ROOT / "test_on_tap.py"), f"--dataset_location={pkl}",
                           f"--init_dir={tmp_path / 'no_model'}"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_test_on_tap_reports_bad_data_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    cases = {"shape.pkl": ({"a": 1}, "entry a is int"), "evil.pkl": (Payload(marker), "refused: pickle wants"),
             "trunc.pkl": (None, "not a readable pickle")}
    for name, (obj, msg) in cases.items():
        path = _dump(tmp_path / name, obj)
        if obj is None:
            path.write_bytes(pickle.dumps({"a": _entry()})[:100])
        res = _run_tap(path, tmp_path)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert str(path) in res.stderr and msg in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()
    res = _run_tap(tmp_path / "nothing_here", tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "nothing_here" in res.stderr


# --- images ----------------------------------------------------------------------------------------------

def _png_header_only(w: int, h: int) -> bytes:
    """A well-formed PNG declaring w x h grey pixels whose data holds one row: a decoder allocates w x h first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(w + 1))) + chunk(b"IEND", b""))


def test_an_image_declaring_a_huge_size_is_refused_from_its_header(tmp_path, monkeypatch):
    from pips2.utils import video

    decoded = []
    monkeypatch.setattr(video.cv2, "imdecode", lambda *a: decoded.append(a))
    # 9000 x 9000 is within Pillow's own bound; 20000 x 20000 beyond it (Pillow refuses to say more)
    for (w, h), msg in (((9000, 9000), "image of 9000x9000 pixels, larger than 33177600"),
                        ((20000, 20000), "image larger than 33177600 pixels")):
        (tmp_path / "big.png").write_bytes(_png_header_only(w, h))
        with pytest.raises(video.VideoError) as e:
            video.read_rgb(tmp_path / "big.png")
        assert _one_line(e.value, "big.png").endswith(f"big.png: {msg}")
    assert decoded == []  # refused before the decoder saw it
    # TAP-Vid's Kinetics frames are encoded images inside the pickle: the same check before decoding
    path = _dump(tmp_path / "k.pkl", [dict(_entry(), video=[_png_header_only(20000, 20000)] * 4)])
    with pytest.raises(tapvid.TapVidError, match="frame 0: image larger than 33177600 pixels"):
        list(tapvid.load_tapvid(path))
    assert decoded == []


def test_a_scene_of_huge_frames_is_refused_from_their_headers(tmp_path):
    scene = tmp_path / "s"
    (scene / "rgbs").mkdir(parents=True)
    (scene / "masks").mkdir()
    for t in range(2):
        (scene / "rgbs" / f"rgb_{t:05d}.png").write_bytes(_png_header_only(9000, 9000))
        (scene / "masks" / f"mask_{t:05d}.png").write_bytes(_png_header_only(9000, 9000))
    np.savez(scene / "anno.npz", **{k: v[:2] for k, v in _anno().items()})
    with pytest.raises(pod.SkipItem, match="^frames of 9000x9000 pixels, larger than 33177600$"):
        pod.check_frame_sizes(pod.load_scene(scene))


def test_track_npz_is_checked_from_its_header(tmp_path):
    from pips2.datasets.clips import read_track
    from pips2.utils.video import VideoError

    head = {"descr": "<f4", "fortran_order": False, "shape": (36, 128, 4)}
    _npz_members(tmp_path / "track.npz", {"track_g": (head, bytes(36 * 128 * 4 * 4))})
    assert read_track(tmp_path / "track.npz", 36, 128, (256, 384)).shape == (36, 128, 4)
    head["shape"] = (36, 50_000_000, 4)
    _npz_members(tmp_path / "track.npz", {"track_g": (head, bytes(1 << 16))})

    def load():
        with pytest.raises(VideoError) as e:
            read_track(tmp_path / "track.npz", 36, 128, (256, 384))
        assert _one_line(e.value, "track.npz").endswith(
            "track.npz: track_g is float32 (36, 50000000, 4), expected float32 (36, 128, 4)")

    assert _peak_bytes(load) < 32 << 20


# --- the loaders themselves ------------------------------------------------------------------------------

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((2, 2), bool), np.array([b"ab", b"c"]),
          np.array(["x", "yy"]), np.array(None, dtype=object), np.array([1, "a", None, b"jpeg", 2.5], dtype=object),
          np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), np.zeros(3, ">f4"), np.arange(6.0).reshape(2, 3).T,
          np.array([np.zeros(2), np.ones(3)], dtype=object), np.array(["2020-01-01"], "datetime64[D]"),
          np.array([1 + 2j], np.complex64), np.zeros(3, np.float16)]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_load_pickle_rebuilds_plain_data_and_arrays(tmp_path, protocol):
    obj = {"arrays": ARRAYS, "scalars": [np.float32(1.5), np.int64(3), np.bool_(True), np.str_("s")],
           "dtype": np.dtype("f4"), "plain": [None, True, 1, 2.5, 1 + 1j, "s", b"b", b"", bytearray(b"x"), (1, 2),
                                              {1, 2}, frozenset([3])]}
    got = load_pickle(_dump(tmp_path / "x.pkl", obj, protocol))
    ref = pickle.loads(pickle.dumps(obj, protocol))
    assert repr(got["plain"]) == repr(ref["plain"]) and repr(got["scalars"]) == repr(ref["scalars"])
    assert got["dtype"] == ref["dtype"]
    for g, r in zip(got["arrays"], ref["arrays"], strict=True):
        assert type(g) is np.ndarray and g.dtype == r.dtype and g.shape == r.shape
        assert repr(list(g.flat)) == repr(list(r.flat)) if r.dtype == object else g.tobytes() == r.tobytes()


def test_load_npy_and_npz_round_trip(tmp_path):
    for i, a in enumerate(ARRAYS):
        np.save(tmp_path / f"{i}.npy", a, allow_pickle=True)
        g = load_npy(tmp_path / f"{i}.npy")
        assert g.dtype == a.dtype and g.shape == a.shape
    np.savez_compressed(tmp_path / "z.npz", **{f"a{i}": a for i, a in enumerate(ARRAYS)})
    z = load_npz(tmp_path / "z.npz")
    assert sorted(z) == sorted(f"a{i}" for i in range(len(ARRAYS)))
    assert list(load_npz(tmp_path / "z.npz", keys=["a0"])) == ["a0"]


@pytest.mark.parametrize("what", ["builtins.getattr", "subprocess.Popen", "numpy.load", "numpy.lib.npyio.load",
                                  "pickle.loads", "copyreg._reconstructor"])
def test_anything_beyond_numpy_arrays_is_refused(tmp_path, what):
    module, name = what.rsplit(".", 1)
    # a hand-made protocol-0 pickle calling module.name("x")
    (tmp_path / "g.pkl").write_bytes(f"c{module}\n{name}\n(S'x'\ntR.".encode())
    with pytest.raises(UnsafeFileError) as e:
        load_pickle(tmp_path / "g.pkl")
    assert _one_line(e.value, "g.pkl").endswith(f"g.pkl: refused: pickle wants {what} "
                                                f"(only plain data and numpy arrays are allowed)")


class _Allocates:
    """Unpickles as numpy's array constructor asked for an array of 200 M objects (1.6 GB)."""

    def __reduce__(self):
        from numpy._core import multiarray

        return multiarray._reconstruct, (np.ndarray, (200_000_000,), np.dtype(object))


def test_a_pickle_cannot_make_numpy_allocate_at_its_word(tmp_path):
    path = _dump(tmp_path / "a.pkl", {"x": _Allocates()})
    assert len(path.read_bytes()) < 200
    with pytest.raises(UnsafeFileError) as e:
        load_pickle(path)
    assert _one_line(e.value, "a.pkl").endswith("a.pkl: refused: pickle wants numpy _reconstruct of ndarray "
                                                "(200000000,) (numpy writes an empty ndarray there) (only plain "
                                                "data and numpy arrays are allowed)")


def test_codecs_other_than_latin1_are_refused(tmp_path):
    (tmp_path / "c.pkl").write_bytes(b"c_codecs\nencode\n(S'x'\nS'zlib'\ntR.")
    with pytest.raises(UnsafeFileError, match="refused: pickle wants _codecs.encode with 'zlib'"):
        load_pickle(tmp_path / "c.pkl")


def test_missing_file_is_one_line(tmp_path):
    for fn in (load_pickle, load_npy, load_npz):
        with pytest.raises(UnsafeFileError, match="cannot open") as e:
            fn(tmp_path / "nope")
        _one_line(e.value, "nope")


# --- checkpoints -----------------------------------------------------------------------------------------

def test_checkpoint_with_payload_is_refused_without_bad_advice(tmp_path):
    import torch

    from pips2.utils.checkpoint import CheckpointError, read_checkpoint

    marker = tmp_path / "ran"
    torch.save({"model_state_dict": Payload(marker)}, tmp_path / "model-000000001.pth")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "model-000000001.pth")
    text = _one_line(e.value, "model-000000001.pth")
    assert "refused: it holds more than tensors and plain data" in text and "posix.system" in text
    assert "weights_only" not in text  # torch's own message suggests turning the protection off
    (tmp_path / "junk.pth").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable checkpoint") as e:
        read_checkpoint(tmp_path / "junk.pth")
    assert "weights_only" not in _one_line(e.value, "junk.pth")
    assert not marker.exists()


def _small_lbm_state(**sizes) -> dict:
    import torch

    from pips2.nets.lbm import LBM

    torch.manual_seed(0)
    return LBM(**{"input_size": (64, 64), "embed_dim": 32, "num_layers": 2, **sizes}).state_dict()


def _lbm_keys_only(num_layers: int, embed_dim: int = 32) -> dict:
    """The keys an LBM state_dict's sizes are read from, for a model of num_layers (each layer a tiny tensor)."""
    import torch

    return {"backbone.frame_pos_embedding": torch.zeros(1, embed_dim, 16, 16),
            "transformer.layers.0.collision_time_emb": torch.zeros(1, 13, embed_dim),
            "transformer.layers.0.lattice_attention.sampling_offsets.weight": torch.zeros(288, embed_dim),
            **{f"transformer.layers.{i}.norm.weight": torch.zeros(1) for i in range(num_layers)}}


def test_a_stride_0_or_overlapping_tensor_is_refused_before_anything_copies_it(tmp_path):
    import torch

    from pips2.hub import load_model
    from pips2.utils.checkpoint import CheckpointError, read_checkpoint

    state = _small_lbm_state()
    # 2 KB declaring a 600 x 600 position embedding (368 MB): the model built for it would allocate that
    state["backbone.frame_pos_embedding"] = torch.zeros(1).expand(1, 32, 600, 600)
    torch.save({"model": state}, tmp_path / "lbm.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "lbm.pt", kind="lbm")
    assert _one_line(e.value, "lbm.pt").endswith(
        "lbm.pt: refused: model.backbone.frame_pos_embedding declares shape (1, 32, 600, 600) with strides "
        "(0, 0, 0, 0) (46080000 bytes) over 4 bytes of storage")
    sd = {"w": torch.zeros(1999).as_strided((1000, 1000), (1, 1))}  # rows overlapping by all but one element
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000001.pth")
    with pytest.raises(CheckpointError, match=r"refused: model_state_dict.w declares shape \(1000, 1000\) with "
                                              r"strides \(1, 1\) \(4000000 bytes\) over 7996 bytes of storage"):
        read_checkpoint(tmp_path / "model-000000001.pth")
    with warnings.catch_warnings():  # torch warns that it checks no sparse tensor's indices: nor does it load
        warnings.simplefilter("ignore")
        sparse = torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (10**6, 10**6))
    torch.save({"model_state_dict": {"w": sparse}}, tmp_path / "model-000000002.pth")
    with pytest.raises(CheckpointError, match="refused: model_state_dict.w is a torch.sparse_coo tensor"):
        read_checkpoint(tmp_path / "model-000000002.pth")


@pytest.mark.parametrize("sizes,msg", [
    ({"num_layers": 40}, r"declares an LBM of 40 transformer layers, more than 12"),
    ({"num_layers": 6, "embed_dim": 512}, r"declares an LBM of 8\d{7} weights, more than 71308168"),
])
def test_lbm_sizes_read_from_the_weights_are_bounded_before_a_model_is_built(tmp_path, sizes, msg):
    import torch

    from pips2.hub import load_model
    from pips2.utils.checkpoint import CheckpointError

    # a few hundred bytes of keys: the model their sizes ask for would be built before the strict key check
    torch.save({"model": _lbm_keys_only(**sizes)}, tmp_path / "lbm.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "lbm.pt", kind="lbm")
    assert re.fullmatch(f"{re.escape(str(tmp_path / 'lbm.pt'))}: {msg}", _one_line(e.value, "lbm.pt"))


def test_a_compressed_or_many_record_checkpoint_is_refused_before_torch_reads_it(tmp_path):
    import torch
    from helpers import compressed_checkpoint

    from pips2.utils.checkpoint import MAX_RECORDS, CheckpointError, read_checkpoint

    # 64 MB of zeros in a 64 KB file: torch would inflate the record whole before comparing its size
    compressed_checkpoint(tmp_path / "model-000000001.pth", {"model_state_dict": {"w": torch.zeros(16 << 20)}})
    assert (tmp_path / "model-000000001.pth").stat().st_size < 1 << 20
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "model-000000001.pth")
    assert _one_line(e.value, "model-000000001.pth").endswith(
        "model-000000001.pth: refused: record archive/data/0 is compressed (torch.save never compresses)")
    torch.save({"model_state_dict": {f"w{i}": torch.zeros(1) for i in range(MAX_RECORDS + 1)}},
               tmp_path / "model-000000002.pth")
    with pytest.raises(CheckpointError, match=r"refused: it holds 1000\d members \(at most 10000\)"):
        read_checkpoint(tmp_path / "model-000000002.pth")


def test_a_quantized_checkpoint_is_one_line_without_torchs_warnings(tmp_path):
    """A checkpoint of quantized weights was refused in the right line, after two of torch's deprecation warnings
    (five lines on stderr)."""
    import torch

    from pips2.hub import load_model
    from pips2.utils.checkpoint import CheckpointError

    state = _small_lbm_state()
    key = "backbone.frame_pos_embedding"
    state[key] = torch.quantize_per_tensor(state[key].float(), 0.1, 0, torch.qint8)
    torch.save({"model": state}, tmp_path / "lbm.pt")
    with warnings.catch_warnings(record=True) as seen, pytest.raises(CheckpointError) as e:
        warnings.simplefilter("always")
        load_model(tmp_path / "lbm.pt", kind="lbm")
    assert "is torch.qint8, the model's is torch.float32" in str(e.value)
    assert not [str(w.message) for w in seen]


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "int64", "bool", "float8_e4m3fn", "float_counter"])
def test_a_checkpoint_that_loads_but_is_wrong_is_refused_naming_the_key(tmp_path, kind):
    import torch

    from pips2.hub import load_model
    from pips2.utils.checkpoint import CheckpointError

    state = _small_lbm_state()
    key = "transformer.layers.1.collision_time_emb"
    if kind in ("int64", "bool", "float8_e4m3fn"):  # float8: torch has no isfinite for it (a traceback before)
        state = {k: v.to(getattr(torch, kind)) if v.is_floating_point() else v for k, v in state.items()}
        key, msg = "backbone.frame_pos_embedding", f"is torch.{kind}, the model's is torch.float32"
    elif kind == "float_counter":  # a counter the model keeps as an integer
        key = next(k for k in state if k.endswith("num_batches_tracked"))
        state[key] = state[key].float()
        msg = "is torch.float32, the model's is torch.int64"
    else:
        state[key][0, 3, 5] = float(kind)
        msg = "holds 1 NaN or infinite value"
    torch.save({"model": state}, tmp_path / "lbm.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "lbm.pt", kind="lbm")
    assert _one_line(e.value, "lbm.pt") == f"{tmp_path / 'lbm.pt'}: {key} {msg}; refusing it"


def test_pips_checkpoint_with_a_nan_weight_is_refused_and_half_precision_loads(tmp_path):
    import torch

    from pips2.hub import load_into
    from pips2.nets.pips2 import Pips
    from pips2.utils import checkpoint as ck

    torch.manual_seed(0)
    model = Pips()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fnet.conv1.weight"][0, 0, 0, 0] = float("nan")
    ck.save(tmp_path, 1, model)
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000002.pth")
    fresh = Pips()
    before = fresh.state_dict()["fnet.conv1.weight"].clone()
    with pytest.raises(ck.CheckpointError) as e:
        load_into(fresh, tmp_path, "pips2")
    assert _one_line(e.value, "model-000000002.pth").endswith(
        "model-000000002.pth: fnet.conv1.weight holds 1 NaN or infinite value; refusing it")
    assert torch.equal(fresh.state_dict()["fnet.conv1.weight"], before)  # nothing copied
    # another float dtype is the same kind of weight: it loads (cast to the model's)
    torch.save({"model_state_dict": {k: v.half() for k, v in model.state_dict().items()}},
               tmp_path / "model-000000003.pth")
    assert load_into(fresh, tmp_path, "pips2")[0].name == "model-000000003.pth"
    assert torch.equal(fresh.state_dict()["norm.bias"], model.state_dict()["norm.bias"].half().float())


def test_npy_format_3_with_and_without_objects(tmp_path):
    # non-latin-1 field names make numpy write format 3.0, whose header only a private numpy function reads
    for dt in ([("测", "f4")], [("测", "O")]):
        a = np.zeros(2, dtype=dt)
        with pytest.warns(UserWarning):
            np.save(tmp_path / "v3.npy", a, allow_pickle=True)
        assert (tmp_path / "v3.npy").read_bytes()[6:8] == b"\x03\x00"
        if a.dtype.hasobject:  # read from its header, then refused: a structure holding objects is not plain data
            with pytest.raises(UnsafeFileError, match="a structured dtype with (an object field|the object flags)"):
                load_npy(tmp_path / "v3.npy")
            continue
        g = load_npy(tmp_path / "v3.npy")
        assert g.dtype == a.dtype and g.shape == (2,)


def test_unsafe_file_error_survives_a_process_boundary(tmp_path):
    e = UnsafeFileError(tmp_path / "a.npz", "refused: not a zip archive\n(detail)")
    assert str(e) == f"{tmp_path / 'a.npz'}: refused: not a zip archive (detail)"
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.path == e.path and back.problem == e.problem
    again = UnsafeFileError(str(e))  # how torch's DataLoader rebuilds a worker's exception
    assert str(again) == str(e) and again.path == e.path


# --- pickles that load but would crash or never end -------------------------------------------------------

class _ArrayState:
    """Pickles as numpy pickles an array (an empty one, then its state) with the state given."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        from numpy._core import multiarray
        return multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


def _load_in_child(path: Path) -> subprocess.CompletedProcess:
    # numpy's own __setstate__ reads past a short item list: on code without the check this crashes the process
    code = ("import sys\nfrom pips2.utils.safe_load import UnsafeFileError, load_pickle\n"
            "try:\n    load_pickle(sys.argv[1])\nexcept UnsafeFileError as e:\n    print(e)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("state, why", [
    ((1, (3,), np.dtype("O"), False, []), "an object ndarray of 3 items whose state lists 0 items"),
    ((1, (1 << 20,), np.dtype("O"), False, [None]), "an object ndarray of 1048576 items whose state lists 1 "
                                                    "items"),
    ((1, (4,), np.dtype("f8"), False, b"\0" * 8), "an ndarray of 4 float64 values whose state holds 8 bytes, not 32"),
    ((1, (2,), np.dtype("f8"), False, [1.0, 2.0]), "an ndarray of 2 float64 values whose state holds no bytes, not 16"),
    ((2, (2,)), "an ndarray state that is not numpy's: version 1, shape, dtype, order, data"),
])
def test_an_array_state_that_does_not_fit_its_shape_is_refused(tmp_path, state, why):
    path = _dump(tmp_path / "v.pkl", {"video": _ArrayState(state)}, 2)
    res = _load_in_child(path)
    assert res.returncode == 0, f"the reader died ({res.returncode}): {res.stderr[-300:]}"
    assert res.stdout.strip() == f"{path}: refused: pickle holds {why}"


def _laughs(levels: int, width: int):
    inner: object = [1]
    for _ in range(levels):
        inner = [inner] * width  # one object referenced `width` times: pickled once, then by memo reference
    return inner


def test_a_pickle_of_shared_references_that_expands_beyond_the_bound_is_refused_from_its_opcodes(tmp_path):
    path = _dump(tmp_path / "laughs.pkl", {"points": _laughs(12, 40)}, 2)
    assert path.stat().st_size < 4096  # 40^12 objects when walked, from a few kilobytes
    with pytest.raises(UnsafeFileError) as e:
        load_pickle(path)
    assert _one_line(e.value, str(path)) == (f"{path}: refused: its pickle builds more than 10000000 objects "
                                             "(shared references counted)")
    assert isinstance(load_pickle(_dump(tmp_path / "ok.pkl", _laughs(3, 40), 2)), list)  # 64,000: fine


def test_a_dict_key_whose_hash_would_never_end_is_refused_before_unpickling(tmp_path):
    t: object = (1,)
    for _ in range(40):
        t = (t, t)  # hashing it visits 2^40 tuples; so would unpickling a dict with it as a key
    body = pickle.dumps(t, 2)[2:-1]  # the tuple's opcodes, without the protocol header and STOP
    path = tmp_path / "key.pkl"
    path.write_bytes(b"\x80\x02}" + body + b"K\x01s.")  # {t: 1}
    with pytest.raises(UnsafeFileError, match="refused: its pickle builds more than"):
        load_pickle(path)


def test_a_key_nested_a_million_deep_is_refused_before_it_crashes_the_reader(tmp_path):
    """A 1 MB pickle: {((((...),),),): None}, a tuple nested 1,000,000 deep as a dict key. Hashing it recursed in C
    and killed the process (SIGSEGV): a TAP-Vid run lost every score it had."""
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns.")
    res = _load_in_child(path)
    assert res.returncode == 0, f"the reader died ({res.returncode}): {res.stderr[-300:]}"
    assert res.stdout.strip() == f"{path}: refused: its pickle nests objects more than 64 deep"
    nested: object = "leaf"
    for _ in range(30):  # 60 containers, one in the next: within the bound
        nested = {"k": [nested]}
    assert isinstance(load_pickle(_dump(tmp_path / "ok.pkl", nested, 2)), dict)
    with pytest.raises(UnsafeFileError, match="nests objects more than 64 deep"):
        load_pickle(_dump(tmp_path / "deeper.pkl", {"k": [{"k": [nested]}, {"k": [nested]}]}, 2))


@pytest.mark.parametrize("keys", ["large ints", "floats", "int tuples", "a set", "a frozenset", "an OrderedDict"])
def test_keys_whose_hashes_collide_are_refused_before_unpickling(tmp_path, keys):
    """Dict keys i * (2^61 - 1) all hash to 0: inserting 40,000 took 8.5 s, quadratic in their number (a
    15 MB file: about two hours). Text keys (salted hashes) and small ints (their own hash) are not bounded."""
    big = [i * (2**61 - 1) for i in range(10_200)]  # just past the bound: building them is quadratic here too
    make = {"large ints": lambda: dict.fromkeys(big), "floats": lambda: dict.fromkeys(float(i) for i in range(10_200)),
            "int tuples": lambda: dict.fromkeys((i, 1) for i in range(10_200)), "a set": lambda: set(big),
            "a frozenset": lambda: frozenset(big), "an OrderedDict": lambda: collections.OrderedDict.fromkeys(big)}
    obj = make[keys]()
    for protocol in (2, 4):
        path = _dump(tmp_path / f"keys{protocol}.pkl", {"v": obj} if keys != "an OrderedDict" else obj, protocol)
        with pytest.raises(UnsafeFileError, match="hashes more than 10000 dict keys or set items that are not text"):
            from pips2.utils.safe_load import pickle_objects_problem

            problem = pickle_objects_problem(path.read_bytes())
            raise UnsafeFileError(path, problem or "loaded")
    if keys == "large ints":
        fine = {"text": dict.fromkeys(str(i) for i in range(20_000)), "ints": dict.fromkeys(range(20_000)),
                "text tuples": dict.fromkeys((str(i), "x") for i in range(20_000))}
        assert load_pickle(_dump(tmp_path / "fine.pkl", fine, 4)) == fine


def _stale_set_pickle(n: int) -> bytes:
    """set(*args) where args = (L,) was built while the list L was empty, and n large ints were appended to L
    afterwards: a count taken when args was built saw none of them."""
    body = b"".join(pickle.dumps(2**40 + i, 2)[2:-1] for i in range(n))  # LONG1 ops, not text or small ints
    return (b"\x80\x02]q\x01\x85q\x020"  # L = [] (memo 1), args = (L,) (memo 2), popped
            b"h\x01(" + body + b"e0"  # L filled by APPENDS, then popped
            b"c__builtin__\nset\nh\x02R.")  # set(*args)


# Keys a file can make collide, counted however they are made. The keys below need not collide to be counted (a
# count that depended on the hashes would have to compute them): 10,200 of them load in no time without the bound.
_COLLIDABLE_KEY_PICKLES = {
    # complex(a, b) hashes as hash(a) + 1000003 * hash(b): builtins.complex called (REDUCE) for each key
    "complex keys": lambda: pickle.dumps(dict.fromkeys(complex(i, 0.5) for i in range(10_200)), 2),
    # numpy scalars hash as their value: numpy's scalar() called for each key
    "numpy scalar keys": lambda: pickle.dumps(dict.fromkeys(np.float64(i + 0.5) for i in range(10_200)), 2),
    "a list filled after set's arguments were built": lambda: _stale_set_pickle(10_200),
    # protocol 0's INST op calling set, which the pre-scan did not look at
    "set called by INST": lambda: (b"(" + pickle.dumps([2**40 + i for i in range(10_200)], 2)[2:-1]
                                   + b"i__builtin__\nset\n."),
    # the memo is a dict too: a text PUT names any integer as its index
    "memo indices": lambda: b"N" + b"".join(b"p%d\n" % (2**40 + i) for i in range(10_200)) + b".",
}


@pytest.mark.parametrize("case", list(_COLLIDABLE_KEY_PICKLES))
def test_collidable_keys_are_counted_however_the_pickle_makes_them(tmp_path, case):
    """20,000 complex keys of one hash (460 KB) took 2.8 s to load, quadratic in their number (a 15 MB
    file: about 50 minutes), and so did a set(L) whose list was filled after its arguments were counted: the
    pre-scan counted only ints, floats and tuples, and only what a container held when it was first referenced.
    Both the pre-scan and the unpickler now count every key that is not text or a small int where it is hashed."""
    data = _COLLIDABLE_KEY_PICKLES[case]()
    path = tmp_path / "keys.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafeFileError) as e:
        load_pickle(path)
    why = ("refused: its pickle hashes more than 10000 dict keys or set items that are not text or small integers "
           "(their hashes can be made to collide, which makes loading take hours)")
    assert _one_line(e.value, str(path)) == f"{path}: {why}"
    from pips2.utils.safe_load import _RestrictedUnpickler, _TooManyKeys, pickle_objects_problem

    assert pickle_objects_problem(data, strict=True) == why
    with pytest.raises(_TooManyKeys):  # the unpickler counts on its own, where it hashes
        _RestrictedUnpickler(io.BytesIO(data)).load()


def test_collidable_values_and_arrays_are_not_keys(tmp_path, monkeypatch):
    """What is only stored, never hashed, is not bounded: a list of floats or complex numbers, arrays (numpy
    rebuilds each from a state tuple holding its shape and dtype), a set just under the bound (lowered here to 50,
    so that a few hundred objects would pass it if they counted)."""
    from pips2.utils import safe_load

    monkeypatch.setattr(safe_load, "MAX_COLLIDABLE_KEYS", 50)
    fine = {"floats": [i + 0.5 for i in range(200)], "arrays": [np.zeros(2, np.float32) for _ in range(200)],
            "set": {i + 0.5 for i in range(50)}, "complex": [complex(i, 1) for i in range(200)]}
    for protocol in (2, 4):
        got = load_pickle(_dump(tmp_path / f"fine{protocol}.pkl", fine, protocol))
        assert got["floats"] == fine["floats"] and got["set"] == fine["set"] and len(got["arrays"]) == 200
        with pytest.raises(UnsafeFileError, match="hashes more than"):  # one more set item is one too many
            load_pickle(_dump(tmp_path / f"over{protocol}.pkl", {**fine, "set": {i + 0.5 for i in range(51)}},
                              protocol))


# numpy.ndarray called by the file: REDUCE and NEWOBJ forms
_NDARRAY_CALLS = {
    # 28 bytes: ndarray((2**29,)) by NEWOBJ, a 4 GiB uninitialised array at once
    "newobj": b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x20\x85\x81.",
    "reduce": b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x20\x85R.",
    # ndarray((), dtype('O8'), b'AAAAAAAA'): an object array whose item pointer is the file's bytes
    "object over bytes": (b"\x80\x02cnumpy\nndarray\n)cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
                          b"C\x08AAAAAAAA\x87R."),
    # dtype with other arguments than numpy's own ('f8', False, True): here a 10-digit void size
    "dtype call": b"\x80\x02cnumpy\ndtype\nX\x0b\x00\x00\x00V1000000000\x89\x88\x87R.",
}


@pytest.mark.parametrize("case", list(_NDARRAY_CALLS))
def test_a_pickle_cannot_call_numpy_ndarray_or_dtype(tmp_path, case):
    """numpy's pickles only name ndarray as _reconstruct's argument and call dtype('f8', False, True); the real
    class, callable by the file, allocated any shape uninitialised, or laid an object dtype over the file's bytes
    (a crash on first access: the item pointer 0x4141414141414141)."""
    path = tmp_path / "x.pkl"
    path.write_bytes(_NDARRAY_CALLS[case])
    res = _load_in_child(path)
    assert res.returncode == 0, f"the reader died ({res.returncode}): {res.stderr[-300:]}"
    line = res.stdout.strip()
    assert line.startswith(f"{path}: refused: pickle wants ") and "\n" not in line, line
    want = {"newobj": "NEWOBJ", "dtype call": "numpy.dtype("}.get(case, "numpy.ndarray called")
    assert want in line


def test_a_kubric_npy_of_a_forged_object_array_is_refused(tmp_path):
    """A 90-byte .npy: an object-dtype header, then a pickle calling ndarray over 8 bytes of the file; the training
    loader's arr.item() dereferenced them (SIGSEGV)."""
    import numpy.lib.format as fmt

    buf = io.BytesIO()
    fmt.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    path = tmp_path / "seq0.npy"
    path.write_bytes(buf.getvalue() + _NDARRAY_CALLS["object over bytes"])
    code = ("import sys\nfrom pips2.utils.safe_load import UnsafeFileError, load_npy\n"
            "try:\n    print(load_npy(sys.argv[1]).item())\nexcept UnsafeFileError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"the reader died ({res.returncode}): {res.stderr[-300:]}"
    assert "refused" in res.stdout and "numpy.ndarray called" in res.stdout, res.stdout
    legit = tmp_path / "ok.npy"
    np.save(legit, np.array({"coords": np.zeros((2, 3), np.float32)}, dtype=object), allow_pickle=True)
    assert load_npy(legit).item()["coords"].shape == (2, 3)


@pytest.mark.parametrize("case", ["object dtype without its flags", "INT in text that pickletools cannot read"])
def test_round_four_ways_around_the_pickle_checks_are_refused(tmp_path, case):
    """dtype('O8') whose BUILD set its flags to 0: the array check took it for plain bytes and laid the file's
    bytes under an object array (a crash on the pointer 0x4141414141414141). And six bytes, "I0x0\\n0", that
    pickle reads but pickletools does not: the opcode pre-scan gave up and left the file, a key nested a million
    deep, to the unpickler (SIGSEGV)."""
    if case.startswith("object"):
        data = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
                b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.")
        why = "refused: pickle holds the dtype object with the flags 0, not its own 63"
    else:
        data = b"I0x0\n0" + b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns."
        why = "not a readable pickle (invalid literal for int() with base 10: b'0x0')"
    path = tmp_path / "x.pkl"
    path.write_bytes(data)
    res = _load_in_child(path)
    assert res.returncode == 0, f"the reader died ({res.returncode}): {res.stderr[-300:]}"
    assert res.stdout.strip() == f"{path}: {why}"


class _DtypeState:
    """Pickles as numpy pickles a dtype, dtype(spec, False, True), with the BUILD state given."""

    def __init__(self, spec: str, state: tuple):
        self.spec, self.state = spec, state

    def __reduce__(self):
        return np.dtype, (self.spec, False, True), self.state


# (spec, dtype state, array shape, array data): numpy writes itemsize and alignment -1 for a fixed-size type, and
# only the byte order a type has ('|' for bytes, voids and objects)
_FORGED_DTYPES = {
    "V8 of itemsize -8": ("V8", (3, "|", None, None, None, -8, 1, 0), (0,), b"",
                          "the dtype |V8 with the itemsize -8, not its own 8"),
    # a 0-byte array of shape (10**9,): astype(float32) asked 3.7 GB, astype(bool) allocated 1 GB
    "V8 of itemsize 0": ("V8", (3, "|", None, None, None, 0, 1, 0), (10**9,), b"",
                         "the dtype |V8 with the itemsize 0, not its own 8"),
    "U1 of itemsize 5": ("U1", (3, "<", None, None, None, 5, 4, 8), (3,), b"A" * 15,
                         "the dtype <U1 with the itemsize 5, not its own 4"),
    "big-endian objects": ("O8", (3, ">", None, None, None, -1, -1, 63), (2,), [1, "x"],
                           "the dtype object with the byte order '>'"),
    "f8 of claimed itemsize": ("f8", (3, ">", None, None, None, 8, 8, 0), (1,), b"\x3f\xf0" + b"\0" * 6,
                               "the dtype float64 with the itemsize 8, not its own -1; alignment 8, not its own -1"),
}


@pytest.mark.parametrize("case", list(_FORGED_DTYPES))
def test_a_dtype_state_numpy_never_writes_is_refused(tmp_path, case):
    """BUILD set a plain dtype's itemsize, alignment or byte order at will as long as its flags were
    numpy's: 'V8' became V-8 or V0, 'U1' an item of 5 bytes (tolist() then failed), 'O' big-endian (copy() failed
    inside numpy). A plain dtype's state must now be numpy's own for it, in any byte order the type has."""
    spec, dstate, shape, data, why = _FORGED_DTYPES[case]
    path = _dump(tmp_path / "d.pkl", _ArrayState((1, shape, _DtypeState(spec, dstate), False, data)), 2)
    with pytest.raises(UnsafeFileError) as e:
        load_pickle(path)
    assert _one_line(e.value, str(path)) == f"{path}: refused: pickle holds {why}"
    own = np.dtype(spec).newbyteorder(dstate[1]).__reduce__()[2]  # numpy's own state, in that byte order
    assert load_pickle(_dump(tmp_path / "ok.pkl", _DtypeState(spec, own), 2)) == np.dtype(spec).newbyteorder(own[1])


# --- files that are not regular files ------------------------------------------------------------------------

def _refused_without_blocking(fifo: Path, call, seconds: float = 10) -> Any:
    """Run call() in a thread: what it raised, or its result. A call still waiting after `seconds` (an open() of
    the FIFO waiting for a writer) fails the test: a writer's open and close then lets it end."""
    import threading

    out: dict = {}

    def run():
        try:
            out["result"] = call()
        except BaseException as e:  # the test judges it
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the waiting open() returns; its read sees the end
        t.join(seconds)
        pytest.fail(f"still waiting on the FIFO {fifo} after {seconds} s")
    return out.get("error", out.get("result"))


def test_every_safe_loader_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    """Load_pickle, load_npz, load_npy and load_weights_only each waited forever in open() for a writer
    of a FIFO (a TAP-Vid pickle, a Kubric .npy, an --init_dir checkpoint), and train.py's resume ignored SIGTERM
    there. Each now opens without waiting and refuses anything but a regular file in one line."""
    from pips2.utils.checkpoint import CheckpointError, load_weights_only, looks_like_torch_file

    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    for load, kind in ((load_pickle, UnsafeFileError), (load_npz, UnsafeFileError), (load_npy, UnsafeFileError),
                       (load_weights_only, CheckpointError)):
        e = _refused_without_blocking(fifo, lambda load=load: load(fifo))
        assert isinstance(e, kind), e
        assert _one_line(e, str(fifo)) == f"{fifo}: not a regular file (a FIFO)"
    assert _refused_without_blocking(fifo, lambda: looks_like_torch_file(fifo)) is False
    e = _refused_without_blocking(fifo, lambda: load_pickle(tmp_path))  # a folder: named, not "Is a directory"
    assert str(e) == f"{tmp_path}: not a regular file (a folder)"


def test_a_fifo_named_like_a_checkpoint_is_no_checkpoint(tmp_path):
    """A FIFO model-000000002.pth beside a real step-1 checkpoint hung the resume, demo.py --init_dir and
    pips2.load_model on the folder; it is now not listed, so the real one is read, and a FIFO named as the
    checkpoint itself is refused in one line."""
    import torch

    import pips2
    from pips2.utils import checkpoint as ck

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "model-000000002.pth")
    assert ck.list_checkpoints(run) == []
    e = _refused_without_blocking(run / "model-000000002.pth", lambda: pips2.load_model(run))
    assert f"{run}: no checkpoint in this folder" in _one_line(e, str(run))
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, run / "model-000000001.pth")
    assert ck.list_checkpoints(run) == [(1, run / "model-000000001.pth")]
    assert ck.find_checkpoint(run) == run / "model-000000001.pth"
    found = _refused_without_blocking(run / "model-000000002.pth", lambda: ck.read_newest(run, rename=False))
    assert found[0] == run / "model-000000001.pth"
    with pytest.raises(ck.CheckpointError) as e:
        ck.find_checkpoint(run / "model-000000002.pth")
    assert str(e.value) == f"{run / 'model-000000002.pth'}: not a regular file (a FIFO)"


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a link another user's uid")
def test_every_writer_refuses_a_link_another_user_planted_on_its_output_path(tmp_path, synth_root, capsys):
    """export_onnx.py --out, export_mp4_dataset.py --out_dir, make_synthetic_pod.py --out and
    get_reference_model.sh's REF_MODEL_DEST followed a link another user planted in a team's folder: an earlier
    ONNX export of the user's elsewhere was replaced, clips and scenes were mixed into another folder of theirs.
    Each now refuses it in one line before anything is written, as train.py and demo.py do."""
    from helpers import run_main

    from pips2.cli import export as export_cli
    from pips2.cli import export_onnx, synthetic
    from pips2.utils import download

    mine = tmp_path / "mine"
    mine.mkdir()
    team = tmp_path / "team"
    team.mkdir()
    link = team / "out"
    link.symlink_to(mine)
    os.lchown(link, 2002, 2002)
    said = f"is a link of uid 2002's (to {mine}), not this user's: its maker chose where this program's files would go"
    for main, kw in ((export_onnx.main, dict(out=str(link / "pips2.onnx"), init_dir=str(tmp_path / "none"))),
                     (synthetic.main, dict(out=str(link / "synth"), train=1, test=0, W=128, H=128, T=8)),
                     (export_cli.main, dict(dataset_location=str(synth_root), out_dir=str(link), S=8, N=32,
                                            crop_size=(128, 192), quiet=True, max_clips=1))):
        res = run_main(main, capsys, **kw)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip() == f"error: {'--out_dir' if main is export_cli.main else '--out'}: {link} {said}; " \
            f"remove it, or give another {'--out_dir' if main is export_cli.main else '--out'}", res.stderr
    assert download.main(["file:///nowhere.tar.gz", str(tmp_path / "work"), "", str(link / "reference_model")]) == 1
    assert capsys.readouterr().err.strip() == (f"get_reference_model.sh: REF_MODEL_DEST: {link} {said}; remove it, or "
                                               f"give another REF_MODEL_DEST; nothing replaced")
    assert list(mine.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a folder another user's uid")
def test_every_writer_refuses_a_folder_another_user_made_at_or_around_its_output(tmp_path, synth_root, capsys):
    """A folder another user made first (not a link) at an output's name, or the folder an output would be made in
    (demo.py's default ./demo_out in a shared folder), was written into: its owner could then move the user's
    results away and put others in their place. Every writer refuses it in one line before anything is written;
    the same folder placed by root (its parent root's and closed to others) is trusted."""
    from helpers import run_main

    from pips2 import evaluation
    from pips2.cli import demo, export_onnx, synthetic
    from pips2.cli import export as export_cli
    from pips2.utils import download

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    theirs = shared / "demo_out"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, 2002, 2002)
    said = "is a folder of uid 2002, not this user's: its owner could move what this program writes there and put " \
           "other files in its place"
    inside = " (the folder it would be made or written in)"
    as_root = " (this program runs as root: run it as that user, or give a folder of root's)"
    for main, kw, flag, where in (
            (export_onnx.main, dict(out=str(theirs / "pips2.onnx"), init_dir=str(tmp_path / "none")), "--out", inside),
            (synthetic.main, dict(out=str(theirs), train=1, test=0, W=128, H=128, T=8), "--out", ""),
            (export_cli.main, dict(dataset_location=str(synth_root), out_dir=str(theirs), S=8, N=32,
                                   crop_size=(128, 192), quiet=True, max_clips=1), "--out_dir", inside)):
        res = run_main(main, capsys, **kw)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip() == f"error: {flag}: {theirs}{where} {said}; give another {flag}{as_root}", res.stderr
    with pytest.raises(ValueError) as e:
        demo.check_out_dir(theirs / "track")
    assert str(e.value) == f"--out_dir: {theirs}{inside} {said}; give another --out_dir{as_root}"
    with pytest.raises(ValueError) as e:
        evaluation.check_out_json(str(theirs / "pod.json"))
    assert str(e.value) == f"--out_json: {theirs}{inside} {said}; give another --out_json{as_root}"
    assert download.main(["file:///nowhere.tar.gz", str(tmp_path / "work"), "", str(theirs / "reference_model")]) == 1
    assert capsys.readouterr().err.strip() == (f"get_reference_model.sh: REF_MODEL_DEST: {theirs}{inside} {said}; "
                                               f"give another REF_MODEL_DEST{as_root}; nothing replaced")
    assert sorted(p.name for p in theirs.iterdir()) == []
    # their own folder in the user's: its placement is the user's choice, as a container's mount of its host user's
    placed = tmp_path / "placed"
    placed.mkdir()
    os.chown(placed, 2002, 2002)
    assert demo.check_out_dir(placed / "track") == [placed / "track"]
    evaluation.check_out_json(str(placed / "pod.json"))


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files another user's uid")
def test_inside_a_shared_out_another_user_s_split_scene_or_settings_are_not_taken(tmp_path, capsys):
    """In the user's --out that others may add to (sticky, 1777), another user's `train/` folder, a whole scene of
    theirs in it, or their settings.json were taken in without a word: the user's data set held their scenes, or
    the user's scenes went into their folder. Each is refused in one line before anything is written."""
    from helpers import run_main

    from pips2.cli import synthetic

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o1777)
    kw = dict(out=str(out), train=1, test=0, W=128, H=96, T=8, n_points=20, n_objects=2)
    (out / "train").mkdir()
    os.chown(out / "train", 2002, 2002)
    res = run_main(synthetic.main, capsys, **kw)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'train'} is a folder of uid 2002, not this user's: its owner could move the scenes made in "
        f"it and put others in their place; give another --out"), res.stderr
    assert list((out / "train").iterdir()) == []
    os.chown(out / "train", os.geteuid(), os.getegid())
    assert run_main(synthetic.main, capsys, **kw).returncode == 0
    scene = out / "train" / "synth_0000"
    os.chown(scene, 2002, 2002)  # as if theirs, copied in complete
    res = run_main(synthetic.main, capsys, **kw)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: {scene} is a folder of uid 2002, not this user's: a scene another user put there is not taken as "
        f"one this generator made; remove it, or give another --out"), res.stderr
    os.chown(scene, os.geteuid(), os.getegid())
    os.chown(out / "settings.json", 2002, 2002)
    res = run_main(synthetic.main, capsys, **kw)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'settings.json'}: a file of uid 2002, not this user's: another user's record of the "
        f"settings is not taken; remove it, or give another --out"), res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files another user's uid")
def test_another_user_s_file_at_an_output_s_name_is_refused_before_the_work(tmp_path):
    """In a folder of root's that all may add to (/tmp: sticky), another user's file at an output's name passed
    the start check; the job did all its work, then could not rename its output over that file: the evaluation's
    JSON and curves, the demo's CSV and video were lost. Such a file is refused before any work."""
    from pips2 import evaluation
    from pips2.cli import demo

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    as_root = " (this program runs as root"
    for name in ("tracks.csv", "synthetic.mp4"):
        (shared / name).write_text("theirs")
        os.chown(shared / name, 2002, 2002)
        with pytest.raises(ValueError) as e:
            demo.check_out_dir(shared)
        assert str(e.value) == (f"--out_dir: {shared / name} is a file of uid 2002, not this user's, at the name of an "
                                f"output: it may not be replaceable here, and its owner chose what it holds; remove "
                                f"it, or give another --out_dir") and as_root not in str(e.value)
        (shared / name).unlink()
    demo.check_out_dir(shared)
    for name in ("pod.json", "pod_curves.png"):
        (shared / name).write_text('{"benchmark": "pod", "status": "complete"}')
        os.chown(shared / name, 2002, 2002)
        with pytest.raises(ValueError) as e:
            evaluation.check_out_json(str(shared / "pod.json"))
        assert str(e.value).startswith(f"--out_json: {shared / name} is a file of uid 2002, not this user's, at the "
                                       f"name of an output"), str(e.value)
        (shared / name).unlink()
    evaluation.check_out_json(str(shared / "pod.json"))


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files another user's uid")
def test_an_onnx_export_meeting_another_user_s_file_at_its_names_leaves_nothing_stray(tmp_path, capsys, monkeypatch):
    """export_onnx.py checked --out at the start only: another user's file put at the graph's name during the
    export (in /tmp, whose sticky bit then refuses the rename over it) lost the export, left its 70 MB weights
    beside their "graph", and the line said an earlier export was kept when there was none. Their file at
    <out>.data at the start got a line that did not say whose it was."""
    from helpers import run_main
    from test_onnx import golden_model

    from pips2.cli import export_onnx
    from pips2.utils import checkpoint

    ck = checkpoint.save(tmp_path / "ck", 1, golden_model())
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    out = shared / "m.onnx"
    (shared / "m.onnx.data").write_text("theirs")
    os.chown(shared / "m.onnx.data", 2002, 2002)
    kw = dict(init_dir=str(ck), out=str(out), S=4, H=128, W=128, iters=1, verify=False)
    res = run_main(export_onnx.main, capsys, **kw)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: --out: {shared / 'm.onnx.data'} is a file of uid 2002, not this user's, at the name of an output: "
        f"it may not be replaceable here, and its owner chose what it holds; remove it, or give another --out")
    (shared / "m.onnx.data").unlink()
    real = export_onnx.torch.onnx.export

    def planted_meanwhile(*args, **kwargs):
        got = real(*args, **kwargs)
        out.write_text("theirs")
        os.chown(out, 2002, 2002)
        return got

    monkeypatch.setattr(export_onnx.torch.onnx, "export", planted_meanwhile)
    res = run_main(export_onnx.main, capsys, **kw)
    assert res.returncode == 1, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {out} and its weights ({out} is a file of uid 2002") and \
        line.endswith("; nothing written"), line
    assert sorted(p.name for p in shared.iterdir()) == ["m.onnx"] and out.read_text() == "theirs"


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files another user's uid")
def test_benchmarks_write_results_by_the_rules_and_run_only_the_user_s_checkouts(tmp_path):
    """The benchmarks wrote --json_out through another user's link (over a file of the user's) and through a
    predictable `<json_out>.tmp`; their --authors_repo was imported from whatever folder it named, so another user
    who owned it (docs once put it in /tmp) ran code as the user."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    from pips2.utils.paths import code_folder_problem

    precious = tmp_path / "precious.txt"
    precious.write_text("my thesis")
    (tmp_path / "bc.json").symlink_to(precious)
    os.lchown(tmp_path / "bc.json", 2002, 2002)
    with pytest.raises(SystemExit) as e:
        common.save_results(tmp_path / "bc.json", {"a": 1})
    assert str(e.value).startswith(f"error: --json_out: {tmp_path / 'bc.json'} is a link of uid 2002's") and \
        str(e.value).endswith("; the results are printed above")
    assert precious.read_text() == "my thesis"
    common.save_results(tmp_path / "ok.json", {"a": 1})
    assert (tmp_path / "ok.json").read_text() == '{\n  "a": 1\n}'
    # the authors' checkout: every folder on the way, every folder and .py in it, the user's or root's, closed
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: open to all, but sticky
    repo = shared / "lbm"
    (repo / "lbm").mkdir(parents=True)
    (repo / "lbm" / "x.py").write_text("")
    assert code_folder_problem(repo, "--authors_repo") is None
    os.chown(repo, 2002, 2002)
    assert code_folder_problem(repo, "--authors_repo") == (
        f"--authors_repo: {repo} is uid 2002's: whoever may change it could put their own code where this program "
        f"imports it; keep the checkout in a folder of your own (chmod -R go-w for your own)")
    os.chown(repo, 0, 0)
    (repo / "lbm" / "x.py").chmod(0o666)
    assert "x.py is writable by others (mode 666)" in str(code_folder_problem(repo, "--authors_repo"))
    (repo / "lbm" / "x.py").chmod(0o644)
    shared.chmod(0o777)  # open to all without the sticky bit: anybody may swap the checkout
    assert f"{shared}, a folder on the way to {repo}, is open to others (mode 777)" in \
        str(code_folder_problem(repo, "--authors_repo"))
    shared.chmod(0o1777)
    # the user's own links inside the checkout: what they lead to is what is imported
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "evil.py").write_text("")
    os.chown(theirs, 2002, 2002)
    (repo / "lbm" / "nets").symlink_to(theirs)
    assert str(code_folder_problem(repo, "--authors_repo")).startswith(
        f"--authors_repo: {repo / 'lbm' / 'nets'} is a link out of the checkout (to {theirs})")
    (repo / "lbm" / "nets").unlink()
    # diff_authors.py --out: never through a link of another user's, nor a predictable temp name
    import diff_authors

    (tmp_path / "d.npz").symlink_to(precious)
    os.lchown(tmp_path / "d.npz", 2002, 2002)
    with pytest.raises(SystemExit):
        diff_authors.write_npz(tmp_path / "d.npz", {"a": np.zeros(2)})
    assert precious.read_text() == "my thesis"
    (tmp_path / ".ok.npz.tmp").symlink_to(precious)  # the old fixed temp name
    diff_authors.write_npz(tmp_path / "ok.npz", {"a": np.zeros(2)})
    assert precious.read_text() == "my thesis" and np.load(tmp_path / "ok.npz")["a"].shape == (2,)
