"""Video I/O: H.264 mp4 writing by piping frames to imageio-ffmpeg's bundled ffmpeg, fast decoding, checks."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

# libav inside OpenCV prints its own lines for damaged files ("moov atom not found"), without the file's name;
# every failure here is raised as one VideoError naming the file, so libav stays quiet unless the user sets it
# (OpenCV reads this when it first opens a video, not at import)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
cv2.setNumThreads(1)  # we parallelise over clips/processes; cv2's own threads only oversubscribe


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


def image_size_problem(data: bytes) -> str | None:
    """Why an encoded image may not be decoded, from its header alone: its size is beyond MAX_IMAGE_PIXELS, or
    no header can be read (a format whose size cannot be known before decoding); None if it may."""
    try:
        with warnings.catch_warnings():  # Pillow's own, higher, bound warns or raises: the one here decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return f"image larger than {MAX_IMAGE_PIXELS} pixels"
    except Exception:
        return "unreadable image"
    if w * h > MAX_IMAGE_PIXELS:
        return f"image of {w}x{h} pixels, larger than {MAX_IMAGE_PIXELS}"
    return None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 (H,W,3); an unreadable, truncated or oversized (MAX_IMAGE_PIXELS, from its
    header) one raises VideoError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VideoError(f"{path}: unreadable image ({e.strerror or e})") from None
    if not data:
        raise VideoError(f"{path}: empty image file (0 bytes)")
    why = _truncation(io.BytesIO(data), len(data)) or image_size_problem(data)
    if why:
        raise VideoError(f"{path}: {why}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise VideoError(f"{path}: unreadable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray] | np.ndarray, fps: int = 24, crf: int = 20,
              preset: str = "medium") -> None:
    """Encode uint8 RGB frames (H,W,3) to H.264/yuv420p mp4 through a pipe: no temporary images."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write")
    h, w = first.shape[:2]
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise VideoError(f"{path}: frames must be uint8 HxWx3, got {first.dtype} {first.shape}")
    if h % 2 or w % 2:
        raise VideoError(f"{path}: yuv420p needs even sizes, got {w}x{h}")
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", str(crf), "-preset", preset],
    )
    writer.send(None)
    try:
        writer.send(np.ascontiguousarray(first))
        for f in frames:
            if f.shape != first.shape:
                raise VideoError(f"{path}: frame of shape {f.shape} after frames of {first.shape}")
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()


def iter_frames(path: str | os.PathLike, backend: str = "imageio") -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames of any video one at a time (bounded memory), decoded by imageio-ffmpeg's
    bundled ffmpeg (any codec it knows) or by OpenCV (`backend="cv2"`)."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: no such video file")
    if backend == "cv2":
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise VideoError(f"{path}: cannot open video")
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()
        return
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoError(f"{path}: cannot decode ({msg})") from None
    w, h = meta["size"]
    try:
        for buf in reader:
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    finally:
        reader.close()


def read_video(path: str | os.PathLike, backend: str = "cv2") -> np.ndarray:
    """Decode a whole video to (T,H,W,3) uint8 RGB with 'cv2' (default: measured faster, docs/BENCHMARKS.md)
    or 'imageio'."""
    frames = list(iter_frames(path, backend))
    if not frames:
        raise VideoError(f"{path}: no decodable frames")
    return np.stack(frames)


def video_info(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) read by imageio-ffmpeg (frames are counted by decoding headers only)."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: no such video file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        reader.close()
        n, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoError(f"{path}: cannot read video ({msg})") from None
    w, h = meta["size"]
    return int(n), int(h), int(w), float(meta.get("fps") or 24.0)


def read_clip(path: str | os.PathLike, S: int, H: int, W: int, backend: str = "cv2") -> np.ndarray:
    """Decode an exported clip and insist on exactly S frames of HxW; anything else is corrupt."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: missing")
    try:
        frames = read_video(path, backend)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path}: cannot decode ({type(e).__name__})") from None
    if frames.shape != (S, H, W, 3):
        raise VideoError(f"{path}: corrupt clip, decoded {frames.shape[0]} frames of "
                         f"{frames.shape[1]}x{frames.shape[2]}, expected {S} of {H}x{W}")
    return frames
