"""Video I/O: pipe encoding, both decoders, strict clip checks, one-line errors."""

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from pips2.utils.video import (
    VideoError,
    ffmpeg_file,
    ffmpeg_said,
    frame_rate,
    image_truncation,
    iter_frames,
    mp4_truncation,
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
    with pytest.raises(VideoError, match="corrupt clip, more than 8 frames, expected 8 of 128x160"):
        read_clip(path, 8, 128, 160)
    for h, w in ((128, 162), (160, 128)):  # the frame size is checked too, not only the count
        with pytest.raises(VideoError, match=f"its header declares frames of 128x160, expected 9 of {h}x{w}"):
            read_clip(path, 9, h, w)


@pytest.mark.parametrize("backend", ["cv2", "imageio"])
def test_read_clip_decodes_no_more_than_it_needs(tmp_path, monkeypatch, backend):
    """A few KB of grey frames may hold thousands of frames or large ones: read_clip refuses a size other than the
    clip's from the header, before any frame is decoded, and stops at the (S+1)-th frame (all of them were
    decoded first: 11 KB of 1280x720 frames took 1.6 GB)."""
    import cv2
    import imageio_ffmpeg

    decoded = []
    real_capture, real_read_frames = cv2.VideoCapture, imageio_ffmpeg.read_frames

    class Counting:  # cv2.VideoCapture counting the frames it decodes
        def __init__(self, *a):
            self.cap = real_capture(*a)

        def read(self):
            ok, frame = self.cap.read()
            decoded.extend([1] if ok else [])
            return ok, frame

        def __getattr__(self, name):
            return getattr(self.cap, name)

    def counting_read_frames(*a, **k):
        gen = real_read_frames(*a, **k)
        try:
            yield next(gen)  # the header
            for buf in gen:
                decoded.append(1)
                yield buf
        finally:
            gen.close()

    long, large = tmp_path / "long.mp4", tmp_path / "large.mp4"
    write_mp4(long, (np.full((64, 96, 3), 128, np.uint8) for _ in range(120)), crf=30, preset="ultrafast")
    write_mp4(large, (np.full((720, 1280, 3), 128, np.uint8) for _ in range(3)), crf=30, preset="ultrafast")
    monkeypatch.setattr(cv2, "VideoCapture", Counting)
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", counting_read_frames)
    with pytest.raises(VideoError, match=f"^{long}: corrupt clip, more than 8 frames, expected 8 of 64x96$"):
        read_clip(long, 8, 64, 96, backend=backend)
    assert len(decoded) == 9
    decoded.clear()
    with pytest.raises(VideoError, match=f"^{large}: corrupt clip, its header declares frames of 720x1280, "
                                         "expected 8 of 128x192$"):
        read_clip(large, 8, 128, 192, backend=backend)
    assert decoded == []
    assert read_clip(long, 120, 64, 96, backend=backend).shape == (120, 64, 96, 3) and len(decoded) == 120


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
    bgr = cv2.imread(str(whole))
    assert bgr is not None
    np.testing.assert_array_equal(read_rgb(whole), bgr[..., ::-1])
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
    data = path.read_bytes()  # its second half (the frames' end and the header) zeroed: whole in size, not readable
    bad.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
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


# --- files that decode to something other than what they declare, or to nothing ------------------------------------

def _ffmpeg(*args):
    """The bundled ffmpeg (the one the project decodes with), quiet, failing loudly."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A 48-frame mp4 as write_mp4 makes it (header at the end) and the same frames with the header first
    ("faststart", as made for streaming)."""
    d = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(1)
    base = (rng.random((128, 400, 3)) * 255).astype(np.uint8)  # noise: every frame's data is large, none dominates
    write_mp4(d / "end.mp4", (np.roll(base, t, 1)[:, :160] for t in range(48)))
    _ffmpeg("-i", d / "end.mp4", "-c", "copy", "-movflags", "+faststart", d / "first.mp4")
    return d / "end.mp4", d / "first.mp4"


def test_an_mp4_cut_short_is_refused_saying_how_many_frames_decode(tmp_path, long_clip):
    """A download cut in half still decodes its first frames; without a check the rest is silently missing."""
    end, first = long_clip
    for whole in long_clip:
        assert mp4_truncation(whole) is None and video_info(whole)[0] == 48
    cut = tmp_path / "cut.mp4"
    data = first.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    assert 0 < sum(1 for _ in read_video_frames_unchecked(cut)) < 48  # what a decoder makes of it: some frames
    with pytest.raises(VideoError) as e:
        video_info(cut)
    msg = str(e.value)
    assert msg.startswith(f"{cut}: cut short (the file ends at byte {len(data) // 2}, inside its 'mdat' box")
    assert " of the 48 frames its header declares decode; re-download" in msg and "\n" not in msg
    with pytest.raises(VideoError, match=r"cut short .*its header declares 48 frames\); re-download"):
        next(iter_frames(cut))
    # the header at the end: cut off with the frames, so nothing declares a count, and nothing decodes
    cut_end = tmp_path / "cut_end.mp4"
    cut_end.write_bytes(end.read_bytes()[:len(end.read_bytes()) // 2])
    with pytest.raises(VideoError, match=r"cut short \(the file ends at byte \d+, inside its 'mdat' box.*\): 0 frames "
                                         r"decode; re-download or re-copy it$"):
        video_info(cut_end)
    # the remedy the message gives works: what decodes, re-muxed, is a whole file
    fixed = tmp_path / "fixed.mp4"
    _ffmpeg("-i", cut, "-c", "copy", fixed)
    assert mp4_truncation(fixed) is None and 0 < video_info(fixed)[0] < 48


def read_video_frames_unchecked(path):
    """Frames as ffmpeg decodes them, without the project's checks."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)
    yield from reader


def test_a_fragmented_mp4_is_whole(tmp_path, long_clip):
    """Fragments (moof + mdat pairs, an empty sample table in the header) walk to the end: not cut."""
    frag = tmp_path / "frag.mp4"
    _ffmpeg("-i", long_clip[0], "-c", "copy", "-movflags", "frag_keyframe+empty_moov", frag)
    assert mp4_truncation(frag) is None and video_info(frag)[0] == 48


def test_no_video_stream_or_a_folder_is_one_line(tmp_path, long_clip):
    audio = tmp_path / "sound.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=d=0.5", audio)
    empty = tmp_path / "empty.mp4"  # zero frames: ffmpeg keeps a container without streams
    _ffmpeg("-i", long_clip[0], "-frames:v", "0", "-c", "copy", empty)
    os.mkfifo(tmp_path / "fifo.mp4")
    for path, why in ((audio, "no video stream in it (only audio)"),
                      (empty, "no video stream in it (no streams at all: an empty video)"),
                      (tmp_path, "is a folder, not a video file"),
                      (tmp_path / "fifo.mp4", "not a regular file")):
        for fn in (video_info, lambda p: next(iter_frames(p))):
            with pytest.raises(VideoError) as e:
                fn(path)
            assert str(e.value) == f"{path}: {why}"


def test_a_variable_frame_rate_video_is_read_frame_by_frame(tmp_path):
    """Each decoded frame once, as many as video_info counts: ffmpeg's default would repeat frames to make a
    constant rate (here 144 frames out of 48)."""
    vfr = tmp_path / "vfr.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=160x128:r=24:d=2", "-vf", "setpts='if(lt(N,20),N,N*3)/24/TB'",
            "-fps_mode", "vfr", "-c:v", "libx264", vfr)
    n = video_info(vfr)[0]
    assert n == 48 and sum(1 for _ in iter_frames(vfr)) == n == len(read_video(vfr, "cv2"))


def test_write_mp4_refuses_what_ffmpeg_cannot_encode(tmp_path):
    """ffmpeg fails on frames of 0 or 1 pixel and only prints it; write_mp4 said nothing and left no file."""
    for shape in ((0, 0, 3), (1, 2, 3), (2, 1, 3)):
        with pytest.raises(VideoError, match="too small to encode"):
            write_mp4(tmp_path / "tiny.mp4", np.zeros((3, *shape), np.uint8))
        assert not (tmp_path / "tiny.mp4").exists()


def _declared_rate(path) -> tuple[str, float]:
    """What ffmpeg prints as the stream's frame rate ('29.97 fps'), and what OpenCV reads from the container."""
    import cv2
    import imageio_ffmpeg

    err = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                         text=True).stderr
    cap = cv2.VideoCapture(str(path))
    try:
        return next(p.strip() for p in err.split(",") if p.strip().endswith(" fps")), cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()


@pytest.mark.parametrize("fps,exact,shown", [
    (Fraction(30000, 1001), Fraction(30000, 1001), "29.97 fps"),  # NTSC
    (Fraction(24000, 1001), Fraction(24000, 1001), "23.98 fps"),
    (12.5, Fraction(25, 2), "12.50 fps"),
    (Fraction(25, 2), Fraction(25, 2), "12.50 fps"),
    (29.97, Fraction(2997, 100), "29.97 fps"),  # a float is the fraction it is
    (np.float32(25), Fraction(25), "25 fps"),  # imageio-ffmpeg refused numpy floats other than float64
])
def test_write_mp4_keeps_the_frame_rate_exactly_and_reads_it_back(tmp_path, fps, exact, shown):
    """The rate goes to ffmpeg as a fraction (30000/1001, not a rounded 29.97) and the file declares it back."""
    path = tmp_path / "v.mp4"
    write_mp4(path, np.zeros((6, 16, 16, 3), np.uint8), fps=fps)
    assert frame_rate(path) == exact and isinstance(frame_rate(path), Fraction)
    assert _declared_rate(path) == (shown, float(exact))


def test_frame_rate_of_other_containers_and_of_no_video(tmp_path):
    """A variable-rate video gives its frames over its duration; a file that is no video, None."""
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=30000/1001:d=1", "-c:v", "mpeg4", tmp_path / "ntsc.avi")
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=24:d=2", "-vf", "setpts='if(lt(N,20),N,N*3)/24/TB'",
            "-fps_mode", "vfr", "-c:v", "libx264", tmp_path / "vfr.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    assert frame_rate(tmp_path / "ntsc.avi") == Fraction(30000, 1001)
    assert frame_rate(tmp_path / "vfr.mp4") == Fraction(192, 23)  # 48 frames in 5.75 s
    assert frame_rate(tmp_path / "text.mp4") is None and frame_rate(tmp_path / "missing.mp4") is None


def _dash_manifest(path, target) -> None:
    """XML that passes for an MP4 to the sniff (its first 8 bytes read as a 'skip' box) and is a DASH manifest
    to ffmpeg's probe, naming `target` as its one segment."""
    path.write_text(
        f'\t\t<?skip x?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" '
        f'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011" type="static" mediaPresentationDuration="PT1S" '
        f'minBufferTime="PT1S"><Period><AdaptationSet mimeType="video/mp4" contentType="video">'
        f'<Representation id="1" bandwidth="100000" width="160" height="128" mimeType="video/mp4">'
        f'<BaseURL>file:{target}</BaseURL></Representation></AdaptationSet></Period></MPD>\n' + " " * 600 + "\n")


def test_a_manifest_that_names_other_files_is_never_read_as_one(tmp_path, clip):
    """An upload of this XML named itself .mp4 by the sniff, and ffmpeg's probe chose its DASH demuxer, which
    opened the file: segment it names: the web demo decoded and served another video of the server's disk. Every
    ffmpeg read now names the demuxers it may use (FFMPEG_INPUT)."""
    import imageio_ffmpeg

    from pips2.utils.video import FFMPEG_INPUT, container_suffix, count_frames
    from pips2.webapp import video_header

    path, _ = clip
    manifest = tmp_path / "holiday.mp4"
    _dash_manifest(manifest, path)
    assert container_suffix(manifest.read_bytes()[:512]) == ".mp4"  # the sniff alone is fooled
    plain = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(manifest), "-f", "null", "-"],
                           capture_output=True, text=True)
    assert f"Opening 'file:{path}'" in plain.stderr  # this ffmpeg has the DASH demuxer: the file is live
    with pytest.raises(VideoError, match="holiday.mp4: cannot read video"):
        video_header(manifest)
    with pytest.raises(RuntimeError, match="Invalid argument|not on whitelist"):
        count_frames(manifest)
    with pytest.raises(VideoError):
        list(iter_frames(manifest))
    assert FFMPEG_INPUT[0] == "-format_whitelist" and count_frames(path) == 9  # a real video still reads


def test_an_image_file_larger_than_any_frame_is_refused_before_it_is_read(tmp_path):
    """read_rgb read the whole file before its header: a sparse 6 GB rgb_00003.jpg (0 bytes on disk) took 6.3 GB
    of memory, in every export worker, and failed as an empty "MemoryError:"."""
    from pips2.utils.video import MAX_IMAGE_FILE_BYTES

    big = tmp_path / "rgb_00003.jpg"
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(6 << 30)
    with pytest.raises(VideoError, match=rf"rgb_00003.jpg: {6 << 30} bytes, more than the {MAX_IMAGE_FILE_BYTES} an "):
        read_rgb(big)


def exif_oriented(rgb: np.ndarray, orientation: int, ext: str = ".jpg") -> bytes:
    """rgb encoded (losslessly for .png, at top quality for .jpg) with an EXIF Orientation tag, as a camera or a
    tool copying EXIF writes it: viewers show it turned, the stored pixels are rgb."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG" if ext == ".png" else "JPEG", exif=exif.tobytes(), quality=100)
    return buf.getvalue()


def stored_test_pixels(h: int = 64, w: int = 96) -> np.ndarray:
    """A frame whose white 8x8 square at the top left shows where its stored origin is."""
    rgb = np.full((h, w, 3), 40, np.uint8)
    rgb[:8, :8] = 255
    return rgb


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", [3, 6])
def test_a_frame_is_read_as_stored_whatever_its_exif_orientation(tmp_path, ext, orientation):
    """cv2.IMREAD_COLOR turned a frame by its EXIF tag (3: 180 degrees at the same size, 6: 90 degrees), while
    the annotations refer to the stored pixels: tracks were scored and exported on a turned image, no word."""
    rgb = stored_test_pixels()
    path = tmp_path / f"rgb_00000{ext}"
    path.write_bytes(exif_oriented(rgb, orientation, ext))
    got = read_rgb(path)
    assert got.shape == rgb.shape
    white = np.argwhere(got.min(-1) > 200)
    assert (white.min(0) == 0).all() and (white.max(0) == 7).all(), white  # the square where it is stored
    if ext == ".png":
        np.testing.assert_array_equal(got, rgb)


def test_a_video_stored_rotated_is_read_upright_without_a_stray_line(tmp_path, clip):
    """A phone video stored 160x128 with a display rotation of 90 degrees is read 128x160 by both decoders, as
    players show it; imageio-ffmpeg also printed "The frame size for reading ... is different from the source
    frame size ..." at every read, a line demo.py's user could do nothing about."""
    import imageio_ffmpeg

    path, frames = clip
    rot = tmp_path / "rot.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(path),
                    "-c", "copy", str(rot)], check=True, timeout=60)
    np.save(tmp_path / "frames.npy", frames)
    code = ("import numpy as np\nfrom pips2.utils.video import read_video\n"
            f"a, b = read_video({str(rot)!r}, 'imageio'), read_video({str(rot)!r}, 'cv2')\n"
            f"f = np.load({str(tmp_path / 'frames.npy')!r})\n"
            "turned = min(abs(np.rot90(f, k, (1, 2)).astype(int) - a).mean() for k in (1, 3))\n"
            "print(a.shape, b.shape, abs(a.astype(int) - b).mean() < 3, turned < 3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip() == "(9, 160, 128, 3) (9, 160, 128, 3) True True", res.stdout


def test_write_mp4_says_when_ffmpeg_could_not_finish_and_leaves_no_broken_file(tmp_path):
    """A disk filling as ffmpeg wrote the trailer left an mp4 without its index (unplayable), which demo.py and the
    web demo then installed as written: ffmpeg's failure was printed by ffmpeg and never seen. write_mp4 now reads
    ffmpeg's exit status: a full disk is OSError(ENOSPC), any other failure a VideoError with ffmpeg's reason, and
    the broken file is removed (never a device or a link in its place)."""
    import errno

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (24, 128, 160, 3), dtype=np.uint8)  # noise: far over the size limit below
    code = ("import resource, sys, numpy as np\nfrom pips2.utils.video import VideoError, write_mp4\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # what a nearly full disk allows\n"
            f"frames = np.load({str(tmp_path / 'f.npy')!r})\n"
            "try:\n"
            f"    write_mp4({str(tmp_path / 'big.mp4')!r}, frames)\n"
            "except (VideoError, OSError) as e:\n    print('refused:', e)\n")
    np.save(tmp_path / "f.npy", frames)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    want = f"refused: {tmp_path / 'big.mp4'}: ffmpeg could not write the video ("
    assert res.stdout.startswith(want), (res.stdout, res.stderr)
    assert not (tmp_path / "big.mp4").exists()
    if os.path.exists("/dev/full"):  # a full disk, as ffmpeg meets it
        link = tmp_path / "full.mp4"
        link.symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            write_mp4(link, frames[:4])
        assert e.value.errno == errno.ENOSPC and link.is_symlink(), e.value


@pytest.mark.parametrize("name", ["x:1.mp4", "pipe:1.mp4"])
def test_names_ffmpeg_reads_as_protocols_are_files(name, tmp_path, monkeypatch):
    """ffmpeg takes a relative name with a colon for a protocol (`x:1.mp4` is protocol `x`, `pipe:1.mp4` standard
    output). Before, writing one failed after the work (or wrote to standard output), and a good file of that name
    was 'cannot read video'. Every path now reaches ffmpeg as the file it names."""
    monkeypatch.chdir(tmp_path)
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    write_mp4(name, frames, fps=10)
    assert (tmp_path / name).stat().st_size > 0
    for backend in ("cv2", "imageio"):
        assert read_video(name, backend=backend).shape == (5, 32, 48, 3)
    assert video_info(name)[:3] == (5, 32, 48)
    assert frame_rate(name) == 10
    assert len(list(iter_frames(name))) == 5
    # and ffmpeg's words about the file name it as the user did, not as it was given to ffmpeg
    said = f"[in#0 @ 0x1] {ffmpeg_file(name)}: Invalid data found when processing input"
    assert ffmpeg_said(said, name) == f"[in#0 @ 0x1] {name}: Invalid data found when processing input"
