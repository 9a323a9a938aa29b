"""Video I/O: H.264 mp4 writing by piping frames to imageio-ffmpeg's bundled ffmpeg, fast decoding, checks."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, cast

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

# libav inside OpenCV prints its own lines for damaged files ("moov atom not found"), without the file's name;
# every failure here is raised as one VideoError naming the file, so libav stays quiet unless the user sets it
# (OpenCV reads this when it first opens a video, not at import)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
cv2.setNumThreads(1)  # we parallelise over clips/processes; cv2's own threads only oversubscribe


def _not_rotation_notice(record: logging.LogRecord) -> bool:
    """imageio-ffmpeg warns at every read of a video stored rotated ("The frame size for reading (128, 192) is
    different from the source frame size (192, 128)."): every reader here takes the displayed size, as ffmpeg
    gives it, so the line only puzzles the user of demo.py or the web demo."""
    return not str(record.msg).startswith("The frame size for reading")


logging.getLogger("imageio_ffmpeg").addFilter(_not_rotation_notice)


class VideoError(RuntimeError):
    """A video that cannot be used; the message names the file and the problem."""


_TAIL = 4096  # bytes at a JPEG's end searched first for its end marker (some writers pad after it)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_scan_start(f: BinaryIO) -> int | None:
    """Offset where a JPEG's first scan (its entropy-coded data) begins, found by walking the header segments by
    their lengths (so an EXIF thumbnail, a whole JPEG inside APP1, is stepped over); None if the headers end
    early or are not JPEG segments."""
    f.seek(2)
    while True:
        b = f.read(2)
        if len(b) < 2 or b[0] != 0xFF:
            return None
        if b[1] == 0xFF:  # fill byte before a marker
            f.seek(-1, os.SEEK_CUR)
            continue
        if 0xD0 <= b[1] <= 0xD8 or b[1] == 0x01:  # markers without a length
            continue
        n = f.read(2)
        if len(n) < 2:
            return None
        length = int.from_bytes(n, "big")
        if b[1] == 0xDA:  # start of scan: its header, then the data
            return f.tell() + length - 2
        f.seek(length - 2, os.SEEK_CUR)


def _jpeg_truncation(f: BinaryIO, size: int) -> str | None:
    """Why a JPEG ends early, or None. After its first scan begins, FF D9 can only be the end-of-image marker
    (an FF inside entropy-coded data is followed by 00): look for it in the last _TAIL bytes, then, for files
    padded after it, in the whole scan."""
    start = _jpeg_scan_start(f)
    if start is None or start > size:
        return "truncated JPEG (its headers end early)"
    pos = max(start, size - _TAIL)
    f.seek(pos)
    if b"\xff\xd9" in f.read():
        return None
    f.seek(start)
    prev = b""
    while chunk := f.read(1 << 20):
        if b"\xff\xd9" in prev + chunk:
            return None
        prev = chunk[-1:]
    return "truncated JPEG (no end-of-image marker)"


def _png_truncation(f: BinaryIO, size: int) -> str | None:
    """Why a PNG ends early, or None: its chunks, walked by their lengths, must reach IEND within the file."""
    pos = len(_PNG_SIGNATURE)
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return "truncated PNG (no IEND chunk)"
        pos += 12 + int.from_bytes(head[:4], "big")  # length, type, data, CRC
        if pos > size:
            return "truncated PNG (a chunk runs past the end)"
        if head[4:] == b"IEND":
            return None


def _truncation(f: BinaryIO, size: int) -> str | None:
    """Why a JPEG or PNG file ends early, or None (other formats too). Decoders fill a cut image's missing rows
    with grey and only warn, without the file's name."""
    f.seek(0)
    sig = f.read(8)
    if sig[:2] == b"\xff\xd8":
        return _jpeg_truncation(f, size)
    if sig == _PNG_SIGNATURE:
        return _png_truncation(f, size)
    return None


def image_truncation(path: str | os.PathLike) -> str | None:
    """Why a JPEG or PNG file ends early (an end marker missing or a chunk cut), or None. Reads its headers and
    end, so it is cheap on whole files; only a JPEG padded after its marker is read through."""
    with open(path, "rb") as f:
        return _truncation(f, f.seek(0, os.SEEK_END))


# The largest image read_rgb decodes, its size read from the header first: 8K UHD, 7680x4320 (100 MB as RGB).
# The frames the project reads are far smaller (PointOdyssey 960x540, Kubric 512x512, CroHD 1920x1080), while a
# 20000x20000 header in a few hundred bytes of PNG would make the decoder allocate 1.2 GB.
MAX_IMAGE_PIXELS = 7680 * 4320
# An image file is read whole before its header is judged: no encoding of MAX_IMAGE_PIXELS needs more than an
# uncompressed RGBA 8K frame (133 MB). A sparse 6 GB rgb_00003.jpg (0 bytes on disk) cost 6.3 GB of memory.
MAX_IMAGE_FILE_BYTES = 256 << 20


def _header_size(data: bytes | BinaryIO) -> tuple[int, int] | str:
    """(width, height) of an encoded image (its bytes, or an open file) from its header (Pillow, nothing
    decoded), or why it has none."""
    try:
        with warnings.catch_warnings():  # Pillow's own, higher, bound warns or raises: the one here decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                return im.size
    except Image.DecompressionBombError:
        return f"image larger than {MAX_IMAGE_PIXELS} pixels"
    except Exception:
        return "unreadable image"


def image_wh(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image from its header, or None if it has no readable one."""
    size = _header_size(data)
    return None if isinstance(size, str) else size


def image_pixels_problem(data: bytes) -> str | None:
    """Why an encoded image may not be decoded, from its header alone: its size is beyond MAX_IMAGE_PIXELS, or
    no header can be read (a format whose size cannot be known before decoding); None if it may."""
    size = _header_size(data)
    if isinstance(size, str):
        return size
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        return f"image of {w}x{h} pixels, larger than {MAX_IMAGE_PIXELS}"
    return None


MIN_VIDEO_SIDE = 8  # a video smaller than one cell of the trackers' 8-pixel feature grid holds nothing to track

# How frames are decoded from files and bytes: in colour, and as their pixels are stored. Plain IMREAD_COLOR turns
# an image by its EXIF orientation tag, while the annotations of every data set (PointOdyssey, TAP-Vid, Kubric,
# CroHD) are positions in the stored pixels, and the size checks read the stored size from the header: a tag of 3
# turned every frame 180 degrees at the same size, and the tracks were scored and exported on the turned image.
IMREAD_STORED_COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def header_wh(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's or JPEG's header, without decoding it; None for anything else."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(raw):  # JPEG segments: find the start-of-frame, which holds the size
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(raw[i + 2:i + 4], "big")
        if marker in (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)):
            if i + 9 > len(raw):
                return None
            return int.from_bytes(raw[i + 7:i + 9], "big"), int.from_bytes(raw[i + 5:i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def not_regular_file(path: str | os.PathLike) -> bool:
    """True if path exists (its symlinks followed) but is not a regular file: a FIFO, a device, a socket or a
    folder, whose open() may block forever or read without end; a missing path is False (its reader says so)."""
    p = Path(path)
    return p.exists() and not p.is_file()


def _image_file_bytes(path: str | os.PathLike) -> int:
    """The size of an image file, or VideoError naming it: not a regular file, unreadable, or larger than any
    encoding of MAX_IMAGE_PIXELS needs (MAX_IMAGE_FILE_BYTES)."""
    if not_regular_file(path):  # a FIFO's open() waits for a writer: forever in a scene folder
        raise VideoError(f"{path}: not a regular file")
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise VideoError(f"{path}: unreadable image ({e.strerror or e})") from None
    if size > MAX_IMAGE_FILE_BYTES:
        raise VideoError(f"{path}: {size} bytes, more than the {MAX_IMAGE_FILE_BYTES} an image file of at most "
                         f"{MAX_IMAGE_PIXELS} pixels needs")
    return size


def image_file_wh(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header, nothing decoded (the stored size: an EXIF orientation
    is not applied, as read_rgb does not apply it); VideoError naming the file when it is not a regular file,
    cannot be read, has no header Pillow reads, or declares more than MAX_IMAGE_PIXELS."""
    if not _image_file_bytes(path):
        raise VideoError(f"{path}: empty image file (0 bytes)")
    try:
        with open(path, "rb") as f:
            size = _header_size(f)
    except OSError as e:
        raise VideoError(f"{path}: unreadable image ({e.strerror or e})") from None
    if isinstance(size, str):
        raise VideoError(f"{path}: {size}")
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise VideoError(f"{path}: image of {size[0]}x{size[1]} pixels, larger than {MAX_IMAGE_PIXELS}")
    return size


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 (H,W,3), its pixels as stored (an EXIF orientation tag is not applied); an
    unreadable, truncated or oversized (MAX_IMAGE_PIXELS, from its header) one raises VideoError naming it."""
    _image_file_bytes(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VideoError(f"{path}: unreadable image ({e.strerror or e})") from None
    if not data:
        raise VideoError(f"{path}: empty image file (0 bytes)")
    why = _truncation(io.BytesIO(data), len(data)) or image_pixels_problem(data)
    if why:
        raise VideoError(f"{path}: {why}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), IMREAD_STORED_COLOR)
    if img is None:
        raise VideoError(f"{path}: unreadable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _remove_partial(path: str | os.PathLike) -> None:
    """Remove what ffmpeg left at `path` after a failure, if it is a regular file: never a device or a link (an
    output named /dev/full, or a link to it, must stay what it is)."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def ffmpeg_file(path: str | os.PathLike) -> str:
    """A path as ffmpeg must be given it to read or write that file: ffmpeg takes a name such as `a:b.mp4`
    (relative, with a colon) as the protocol `a`, and `-` or `pipe:` as a stream, so it gets `file:` and the
    absolute path."""
    return "file:" + physical_absolute(path)


def physical_absolute(path: str | os.PathLike) -> str:
    """`path` made absolute without collapsing `..` by its text: the kernel resolves `link/..` as the link
    target's parent, abspath as the link's own folder (another folder, maybe none)."""
    text = os.fspath(path)
    return text if os.path.isabs(text) else os.path.join(os.getcwd(), text)


def ffmpeg_said(text: str, path: str | os.PathLike) -> str:
    """ffmpeg's words about `path` with the file named as the user named it, not as ffmpeg_file gave it."""
    return text.replace(ffmpeg_file(path), str(path))


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray] | np.ndarray, fps: float | Fraction = 24,
              crf: int = 20, preset: str = "medium") -> None:
    """Encode uint8 RGB frames (H,W,3) to H.264/yuv420p mp4 through a pipe: no temporary images. fps may be a
    Fraction (30000/1001 for NTSC's 29.97), which ffmpeg is given exactly and the file declares back
    (`frame_rate`); a float is taken as the fraction it is exactly (29.97 as 2997/100)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write")
    h, w = first.shape[:2]
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise VideoError(f"{path}: frames must be uint8 HxWx3, got {first.dtype} {first.shape}")
    if h < 2 or w < 2:  # ffmpeg would fail on its own and only print it: no file, and no error here
        raise VideoError(f"{path}: frames of {w}x{h} are too small to encode (at least 2x2)")
    if h % 2 or w % 2:
        raise VideoError(f"{path}: yuv420p needs even sizes, got {w}x{h}")
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator()
    # the command imageio-ffmpeg's write_frames builds for these settings, run here so that ffmpeg's exit status
    # and its error are seen: a disk filling as it writes the trailer left an mp4 without its index (unplayable),
    # which write_frames closed without a word
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}",
           "-pix_fmt", "rgb24", "-r", str(rate), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-v", "error", "-crf", str(crf), "-preset", preset, ffmpeg_file(path)]
    with tempfile.TemporaryFile() as log:
        # its own session: a Ctrl-C at the terminal reaches this program only, which then stops ffmpeg itself
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
        stdin = cast(BinaryIO, proc.stdin)
        try:
            try:
                stdin.write(np.ascontiguousarray(first).data)
                for f in frames:
                    if f.shape != first.shape or f.dtype != first.dtype:
                        raise VideoError(f"{path}: frame of {f.dtype} {f.shape} after frames of {first.shape}")
                    stdin.write(np.ascontiguousarray(f).data)
                stdin.close()
            except BrokenPipeError:  # ffmpeg ended before all frames were sent: its log says why
                pass
            code = proc.wait()
        except BaseException:  # a frame refused, or a stop: no half-written video is left
            proc.kill()
            proc.wait()
            _remove_partial(path)
            raise
        if code != 0:
            _remove_partial(path)
            log.seek(0)
            said = [ln.strip() for ln in log.read()[-4096:].decode(errors="replace").splitlines() if ln.strip()]
            if any("No space left" in ln for ln in said):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            why = ffmpeg_said(said[-1], path) if said else f"exit status {code}"
            raise VideoError(f"{path}: ffmpeg could not write the video ({why})")
    if not Path(path).is_file() or Path(path).stat().st_size == 0:  # ffmpeg failed and only printed why
        raise VideoError(f"{path}: ffmpeg wrote no video")


# ISO base media files (mp4, mov, m4v, 3gp) are a chain of boxes, each starting with its size and type; these are
# the types such a file starts with
_ISO_FIRST = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
_MAX_BOXES = 1_000_000  # boxes walked at one level (a fragmented mp4 has two per fragment): bounds a hostile file


def _boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes from `start`, walked by their declared sizes up to `end`; a box
    may end past `end` (a cut file: the caller decides). Stops at a malformed size or a header cut short."""
    pos = start
    for _ in range(_MAX_BOXES):
        if pos + 8 > end:
            return
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return
        size, kind, payload = int.from_bytes(head[:4], "big"), head[4:], pos + 8
        if size == 1:  # a 64-bit size follows the type
            big = f.read(8)
            if len(big) < 8:
                return
            size, payload = int.from_bytes(big, "big"), pos + 16
        elif size == 0:  # the box runs to the end of its parent
            size = end - pos
        if size < payload - pos:
            return
        yield kind, payload, pos + size
        pos += size


def _find_box(f: BinaryIO, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(payload start, end) of the first box of this type between start and end, or None."""
    for k, payload, stop in _boxes(f, start, end):
        if k == kind:
            return payload, min(stop, end)
    return None


def _declared_frames(f: BinaryIO, size: int) -> int | None:
    """The number of frames an mp4's header declares for its first video track (the sample count of its stsz or
    stz2 box), or None when there is no such header."""
    moov = _find_box(f, 0, size, b"moov")
    if moov is None:
        return None
    for kind, payload, stop in _boxes(f, *moov):
        if kind != b"trak":
            continue
        mdia = _find_box(f, payload, min(stop, size), b"mdia")
        hdlr = mdia and _find_box(f, *mdia, b"hdlr")
        if not hdlr:
            continue
        f.seek(hdlr[0] + 8)  # version and flags, pre_defined, then the handler type
        if f.read(4) != b"vide":
            continue
        box = mdia
        for k in (b"minf", b"stbl"):
            box = box and _find_box(f, *box, k)
        for k in (b"stsz", b"stz2"):
            found = box and _find_box(f, *box, k)
            if found:
                f.seek(found[0] + 8)  # version and flags, sample size (stz2: field size), then the count
                count = f.read(4)
                return int.from_bytes(count, "big") if len(count) == 4 else None
        return None
    return None


def declared_frames(path: str | os.PathLike) -> int | None:
    """The number of frames an mp4/mov file's header declares for its first video track (what a decoder will
    give for a whole file), or None for another format, no such header, or a file that cannot be read."""
    if not Path(path).is_file():  # a FIFO's open() would wait for a writer; its reader says what is wrong
        return None
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            if len(head := f.read(8)) < 8 or head[4:] not in _ISO_FIRST:
                return None
            return _declared_frames(f, size)
    except OSError:
        return None


def _mp4_cut(path: str | os.PathLike) -> tuple[str, int | None] | None:
    """(where an mp4/mov file is cut, the frames its header declares or None), or None for a whole file or another
    format. Its top-level boxes, walked by their sizes, must end within the file: a download or copy cut short
    leaves the last one (usually the frames, 'mdat') running past the end. Reads only box headers."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if len(head := f.read(8)) < 8 or head[4:] not in _ISO_FIRST:
            return None
        last = 0
        for kind, _, end in _boxes(f, 0, size):
            if end > size:
                return (f"the file ends at byte {size}, inside its '{kind.decode('latin-1')}' box, which runs to byte "
                        f"{end}", _declared_frames(f, size))
            last = end
        if 0 < size - last < 8:
            return f"the file ends at byte {size}, inside a box header", _declared_frames(f, size)
    return None


def mp4_truncation(path: str | os.PathLike) -> str | None:
    """Why an mp4/mov file ends early, or None (also for other formats): decoders stop at the cut without a word.
    Reads only the headers of its boxes."""
    cut = _mp4_cut(path)
    if cut is None:
        return None
    where, declared = cut
    return f"cut short ({where}; its header declares {declared} frames)" if declared else f"cut short ({where})"


REMUX_HINT = "re-download or re-copy it, or keep the frames that decode with: ffmpeg -i IN -c copy OUT.mp4"

# The demuxers ffmpeg may read a video with (before every -i). ffmpeg picks one by probing the content, and
# some read other files: a DASH manifest (XML that can also pass for an MP4 box) opens the file: or http:
# segments it names, so an upload could make the web demo decode and serve any video on the server's disk. The
# containers of CONTAINER_NAMES and still images, nothing that reads another file.
FFMPEG_DEMUXERS = "mov,matroska,avi,gif,ogg,flv,mpeg,mpegts,png_pipe,jpeg_pipe,image2"
FFMPEG_INPUT = ["-format_whitelist", FFMPEG_DEMUXERS]


def count_frames(path: str | os.PathLike, timeout: float | None = None) -> int:
    """The frames of a video's first video stream, counted by decoding them (ffmpeg, FFMPEG_INPUT); RuntimeError
    with ffmpeg's last line if it cannot read the file."""
    res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *FFMPEG_INPUT, "-i",
                          ffmpeg_file(path), "-map", "0:v:0", "-vf", "null", "-f", "null", "-"],
                         capture_output=True, text=True, errors="replace", timeout=timeout)
    counts = re.findall(r"frame=\s*(\d+)", res.stderr)
    if res.returncode != 0 or not counts:
        lines = res.stderr.strip().splitlines()
        raise RuntimeError(ffmpeg_said(lines[-1], path) if lines else f"ffmpeg exited with {res.returncode}")
    return int(counts[-1])


def _check_video_path(path: str | os.PathLike) -> None:
    """VideoError unless path is an existing file (not a folder)."""
    p = Path(path)
    if p.is_dir():
        raise VideoError(f"{path}: is a folder, not a video file")
    if not_regular_file(p):  # a FIFO or a device: ffmpeg could wait on it forever
        raise VideoError(f"{path}: not a regular file")
    if not p.is_file():
        raise VideoError(f"{path}: no such video file")


def _stream_kinds(path: str | os.PathLike) -> set[str] | None:
    """The kinds of stream ffmpeg finds in a file ({'Video', 'Audio', ...}), or None if it cannot open it."""
    try:
        res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *FFMPEG_INPUT, "-i",
                              ffmpeg_file(path)],
                             capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "Input #0" not in res.stderr:
        return None
    return set(re.findall(r"^\s*Stream #\d+:\d+\S*: (\w+):", res.stderr, re.MULTILINE))


def _open_problem(path: str | os.PathLike, e: Exception, verb: str) -> str:
    """One line for a video ffmpeg could not start decoding: it has no video stream (an audio file, an empty
    video), else "<verb> (ffmpeg's last line)"."""
    kinds = _stream_kinds(path)
    if kinds is not None and "Video" not in kinds:
        others = ", ".join(sorted(k.lower() for k in kinds))
        return f"no video stream in it ({f'only {others}' if others else 'no streams at all: an empty video'})"
    return f"{verb} ({ffmpeg_said(str(e).strip().splitlines()[-1], path) if str(e).strip() else type(e).__name__})"


# Containers recognised from their first bytes, each with the suffix its file gets. An uploaded file is named by
# what it is, never by the name the client sent: ffmpeg picks a demuxer by name and content, and a playlist
# (an .m3u8 naming file: or http: segments, an ffconcat list) would make it read other files or addresses.
_CONTAINERS: tuple[tuple[Callable[[bytes], bool], str], ...] = (
    (lambda b: b[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"), ".mp4"),  # MP4, QuickTime, 3GP
    (lambda b: b[:4] == b"\x1a\x45\xdf\xa3", ".mkv"),  # Matroska, WebM
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"AVI ", ".avi"),
    (lambda b: b[:6] in (b"GIF87a", b"GIF89a"), ".gif"),
    (lambda b: b[:4] == b"OggS", ".ogv"),
    (lambda b: b[:3] == b"FLV", ".flv"),
    (lambda b: b[:4] == b"\x00\x00\x01\xba", ".mpg"),  # MPEG program stream
    (lambda b: len(b) > 376 and b[0] == b[188] == b[376] == 0x47, ".ts"),  # MPEG transport stream packets
    (lambda b: b[:8] == b"\x89PNG\r\n\x1a\n", ".png"),  # still images: opened, then refused as one frame
    (lambda b: b[:3] == b"\xff\xd8\xff", ".jpg"),
)
CONTAINER_NAMES = "MP4/MOV, MKV/WebM, AVI, GIF, Ogg, FLV, MPEG-PS/TS"


def container_suffix(head: bytes) -> str | None:
    """The suffix of the video container (or still image) whose first bytes (at least 512) are `head`, or None
    for anything else (a playlist, a text file, an unknown format)."""
    for test, suffix in _CONTAINERS:
        if test(head):
            return suffix
    return None


def _frames(path: str | os.PathLike, backend: str) -> Generator[tuple[int, int] | np.ndarray, None, None]:
    """A generator yielding first the (height, width) its stream's header declares, read before any frame is
    decoded, then the RGB uint8 frames one at a time; closing it stops the decoder."""
    _check_video_path(path)
    why = mp4_truncation(path)
    if why:
        raise VideoError(f"{path}: {why}; {REMUX_HINT}")
    if backend == "cv2":
        cap = cv2.VideoCapture(physical_absolute(path))
        try:
            if not cap.isOpened():
                raise VideoError(f"{path}: cannot open video")
            yield int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()
        return
    # each decoded frame once, as OpenCV and the frame count of video_info see them: by default ffmpeg would repeat
    # or drop frames of a variable-frame-rate video (a phone's) to make a constant rate
    reader = imageio_ffmpeg.read_frames(ffmpeg_file(path), pix_fmt="rgb24", input_params=FFMPEG_INPUT,
                                        output_params=["-fps_mode", "passthrough"])
    try:
        try:
            meta = next(reader)
        except Exception as e:
            raise VideoError(f"{path}: {_open_problem(path, e, 'cannot decode')}") from None
        w, h = meta["size"]
        yield h, w
        for buf in reader:
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    finally:
        reader.close()


def iter_frames(path: str | os.PathLike, backend: str = "imageio") -> Generator[np.ndarray, None, None]:
    """Yield RGB uint8 frames of any video one at a time (bounded memory), decoded by imageio-ffmpeg's
    bundled ffmpeg (any codec it knows) or by OpenCV (`backend="cv2"`). An mp4 cut short is refused
    (`mp4_truncation`): decoders would stop early without a word."""
    frames = _frames(path, backend)
    try:
        next(frames)  # the header's size
        yield from cast("Iterator[np.ndarray]", frames)  # after the header, only frames
    finally:
        frames.close()


def read_video(path: str | os.PathLike, backend: str = "cv2") -> np.ndarray:
    """Decode a whole video to (T,H,W,3) uint8 RGB with 'cv2' (default: measured faster, docs/BENCHMARKS.md)
    or 'imageio'."""
    frames = list(iter_frames(path, backend))
    if not frames:
        raise VideoError(f"{path}: no decodable frames")
    return np.stack(frames)


def video_info(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """(frames, height, width, fps): the size and fps from the header, the frames counted by decoding them.

    One VideoError line naming the file for a folder, a missing file, a file without a video stream (audio only,
    an empty video), one whose frames do not decode, and an mp4 cut short (with how many of the frames it
    declares decode)."""
    _check_video_path(path)
    cut = _mp4_cut(path)
    if cut:  # said first: a cut file may not open at all (an mp4 keeping its header at the end loses it)
        try:
            n = count_frames(path)
        except Exception:
            n = 0
        where, declared = cut
        of = f"{n} of the {declared} frames its header declares decode" if declared else f"{n} frames decode"
        raise VideoError(f"{path}: cut short ({where}): {of}; {REMUX_HINT if n else 're-download or re-copy it'}")
    try:
        reader = imageio_ffmpeg.read_frames(ffmpeg_file(path), pix_fmt="rgb24", input_params=FFMPEG_INPUT)
        meta = next(reader)
        reader.close()
    except Exception as e:
        raise VideoError(f"{path}: {_open_problem(path, e, 'cannot read video')}") from None
    try:
        n = count_frames(path)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoError(f"{path}: cannot read video ({msg})") from None
    if not n:
        raise VideoError(f"{path}: no frames decode")
    w, h = meta["size"]
    return int(n), int(h), int(w), float(meta.get("fps") or 24.0)


# A frame rate is read as the fraction nearest the container's value with at most this denominator: above the
# time scales containers use for one frame's duration (30000 for 30000/1001, 90000 for MPEG), so 30000/1001
# comes back as itself rather than as the float 29.97 that ffmpeg prints.
MAX_RATE_DENOMINATOR = 100_000


def frame_rate(path: str | os.PathLike) -> Fraction | None:
    """The average frame rate of a video's first video stream as its container gives it, exactly as a fraction
    (30000/1001, 25/2; for a variable-rate video its frames over its duration), or None when it gives none (or
    the file cannot be opened)."""
    cap = cv2.VideoCapture(physical_absolute(path))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    finally:
        cap.release()
    if not (np.isfinite(fps) and fps > 0):
        return None
    return Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)


def read_clip(path: str | os.PathLike, S: int, H: int, W: int, backend: str = "cv2") -> np.ndarray:
    """Decode an exported clip and insist on exactly S frames of HxW; anything else is corrupt. The size is
    checked from the stream's header before any frame is decoded, and at most S+1 frames are decoded, so a small
    file of thousands of large frames costs no more memory than a good clip."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: missing")
    expected = f"expected {S} of {H}x{W}"
    decoded: list[np.ndarray] = []
    try:
        frames = _frames(path, backend)
        try:
            h, w = next(frames)
            if (h, w) != (H, W):
                raise VideoError(f"{path}: corrupt clip, its header declares frames of {h}x{w}, {expected}")
            for frame in cast("Iterator[np.ndarray]", frames):  # after the header, only frames
                if frame.shape != (H, W, 3):  # a stream changing size midway
                    raise VideoError(f"{path}: corrupt clip, frame {len(decoded)} is "
                                     f"{frame.shape[0]}x{frame.shape[1]}, {expected}")
                if len(decoded) == S:
                    raise VideoError(f"{path}: corrupt clip, more than {S} frames, {expected}")
                decoded.append(frame)
        finally:
            frames.close()
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path}: cannot decode ({type(e).__name__})") from None
    if len(decoded) != S:
        what = f"decoded {len(decoded)} frames of {H}x{W}" if decoded else "no decodable frames"
        raise VideoError(f"{path}: corrupt clip, {what}, {expected}")
    return np.stack(decoded)
