"""Video I/O: pipe encoding, both decoders, strict clip checks, one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pips2.utils.video import (
    VideoError,
    image_truncation,
    iter_frames,
    read_clip,
    read_rgb,
    read_video,
    video_info,
    write_mp4,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = cv_smooth(rng.random((140, 200, 3)))
    frames = np.stack([np.roll(base, 3 * t, 1)[:128, :160] for t in range(9)])
    path = tmp_path_factory.mktemp("v") / "c.mp4"
    write_mp4(path, frames)
    return path, frames


def cv_smooth(a):
    import cv2

    return (cv2.GaussianBlur(a.astype(np.float32), (0, 0), 2) * 255).clip(0, 255).astype(np.uint8)


def test_round_trip_and_backends_agree(clip):
    path, frames = clip
    a, b = read_video(path, "cv2"), read_video(path, "imageio")
    assert a.shape == b.shape == frames.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
    assert np.abs(a.astype(int) - frames.astype(int)).mean() < 4.0  # CRF 20 is close to lossless here
    assert video_info(path)[:3] == (9, 128, 160)
    assert sum(1 for _ in iter_frames(path)) == 9


def test_read_clip_insists_on_the_exact_shape(clip):
    path, _ = clip
    assert read_clip(path, 9, 128, 160).shape == (9, 128, 160, 3)
    with pytest.raises(VideoError, match="decoded 9 frames of 128x160, expected 10 of 128x160"):
        read_clip(path, 10, 128, 160)
    for h, w in ((128, 162), (160, 128)):  # the frame size is checked too, not only the count
        with pytest.raises(VideoError, match=f"decoded 9 frames of 128x160, expected 9 of {h}x{w}"):
            read_clip(path, 9, h, w)


def test_bad_files_give_one_line(tmp_path, clip):
    path, _ = clip
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(path.read_bytes()[:300])
    for fn in (lambda: read_video(bad, "imageio"), lambda: read_clip(bad, 9, 128, 160), lambda: video_info(tmp_path)):
        with pytest.raises(VideoError) as e:
            fn()
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(VideoError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_a_frame_cut_short_is_refused_naming_it(tmp_path, clip, ext):
    """A decoder fills a truncated image's missing rows with grey and only warns; read_rgb refuses it."""
    import cv2

    _, frames = clip
    whole = tmp_path / f"whole.{ext}"
    cv2.imwrite(str(whole), np.ascontiguousarray(frames[0][..., ::-1]))
    assert image_truncation(whole) is None
    np.testing.assert_array_equal(read_rgb(whole), cv2.imread(str(whole))[..., ::-1])
    padded = tmp_path / f"padded.{ext}"  # bytes after the end marker, as some writers leave: still whole
    padded.write_bytes(whole.read_bytes() + b"\0" * 100)
    np.testing.assert_array_equal(read_rgb(padded), read_rgb(whole))
    cut = tmp_path / f"cut.{ext}"
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    if ext == "jpg":
        assert cv2.imread(str(cut)) is not None  # what libjpeg makes of it: an image, grey below the cut
    why = image_truncation(cut)
    assert why and why.startswith(f"truncated {'JPEG' if ext == 'jpg' else 'PNG'}")
    with pytest.raises(VideoError) as e:
        read_rgb(cut)
    assert str(e.value) == f"{cut}: {why}"
    empty = tmp_path / f"empty.{ext}"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty image file"):
        read_rgb(empty)


def test_a_damaged_mp4_is_one_line_without_libav_chatter(tmp_path, clip):
    """OpenCV's libav prints its own lines for a damaged file, without its name; only our error is said."""
    path, _ = clip
    bad = tmp_path / "half.mp4"
    bad.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    code = ("import sys\nfrom pips2.utils.video import VideoError, read_clip\ntry:\n"
            f"    read_clip({str(bad)!r}, 9, 128, 160, backend='cv2')\n"
            "except VideoError as e:\n    print(e, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"})
    assert res.stderr.strip().splitlines() == [f"{bad}: cannot open video"], res.stderr


def test_truncation_reads_segments_not_guesses(tmp_path, clip):
    """Whole files padded past their end marker pass; a cut file whose only FF D9 is an embedded thumbnail's (a
    JPEG inside a header segment, as EXIF keeps it) is caught; PNG chunks are walked to IEND."""
    import cv2

    _, frames = clip
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(frames[0][..., ::-1]))
    main = enc.tobytes()
    ok, thumb = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    thumb = thumb.tobytes()
    com = b"\xff\xfe" + (len(thumb) + 2).to_bytes(2, "big") + thumb  # a comment segment holding a whole JPEG
    with_thumb = main[:2] + com + main[2:]
    cases = {
        "padded.jpg": (main + b"\0" * 5000, None),
        "thumb.jpg": (with_thumb, None),
        "thumb_cut.jpg": (with_thumb[:len(com) + 2 + (len(main) - 2) // 2], "truncated JPEG (no end-of-image marker)"),
        "headers_cut.jpg": (with_thumb[:len(com) // 2], "truncated JPEG (its headers end early)"),
    }
    ok, png = cv2.imencode(".png", np.ascontiguousarray(frames[0][..., ::-1]))
    png = png.tobytes()
    cases["padded.png"] = (png + b"x" * 5000, None)
    cases["cut.png"] = (png[:len(png) - 20], "truncated PNG (a chunk runs past the end)")
    cases["signature_only.png"] = (png[:8], "truncated PNG (no IEND chunk)")
    for name, (data, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert image_truncation(path) == why, name
        if why is None:
            assert read_rgb(path).shape == frames[0].shape, name
        else:
            with pytest.raises(VideoError, match=why.replace("(", r"\(").replace(")", r"\)")):
                read_rgb(path)
