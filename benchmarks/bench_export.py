"""Export and loading speed, side by side in one run.

1. Encoding one clip: our pipe into imageio-ffmpeg's ffmpeg against the authors' method (write JPEG files,
   then run an ffmpeg process on them), same codec settings (H.264, yuv420p, CRF 20, 24 fps).
2. Decoding one clip: OpenCV against imageio-ffmpeg (the loader keeps the faster).
3. The exporter end to end with 1 and 2 workers (clips/s), and the training loader (clips/s per worker).

    python benchmarks/bench_export.py --json_out=docs/bench_export_cpu.json
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import fire
import imageio_ffmpeg
import numpy as np
from common import best_time, scratch_run

from pips2.datasets.exportdataset import ExportDataset
from pips2.datasets.synthetic import SceneConfig, generate_dataset, generate_scene
from pips2.utils.video import read_rgb, read_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]


def authors_encode(frames: np.ndarray, out: Path, fps: int = 24, crf: int = 20, preset: str = "medium") -> None:
    """The authors' way: JPEG files in a folder, then an ffmpeg process reads them back."""
    tmp = Path(tempfile.mkdtemp(prefix="jpgs_"))
    try:
        for i, f in enumerate(frames):
            cv2.imwrite(str(tmp / f"{i:03d}.jpg"), f[..., ::-1])
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-framerate", str(fps), "-i",
               str(tmp / "%03d.jpg"), "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               str(out)]
        subprocess.run(cmd, check=True)
    finally:
        shutil.rmtree(tmp)


def x264_alone(raw: Path, shape: tuple[int, int, int], out: Path, fps: int = 24, crf: int = 20,
               preset: str = "medium") -> None:
    """ffmpeg reading raw RGB frames from a file: the encoder's own cost, a floor for any way of feeding it."""
    S, H, W = shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{W}x{H}", "-framerate", str(fps), "-i", str(raw), "-c:v", "libx264", "-preset", preset,
           "-crf", str(crf), "-pix_fmt", "yuv420p", str(out)]
    subprocess.run(cmd, check=True)


def main(S: int = 36, H: int = 384, W: int = 512, repeats: int = 3, scenes: int = 4, clips: int = 24,
         json_out: str | None = None) -> None:
    """Print the encode/decode comparison and the exporter/loader throughput."""
    with scratch_run("bench_export_", json_out) as (work, res):
        res.update({"S": S, "H": H, "W": W, "cpus": os.cpu_count()})
        scene = generate_scene(work / "scene", 1, SceneConfig(W=W + 64, H=H + 64, T=S, n_points=64))
        frames = np.stack([read_rgb(p)[:H, :W]
                           for p in sorted((scene / "rgbs").glob("*.jpg"))])
        raw = work / "frames.rgb"
        raw.write_bytes(frames.tobytes())
        floor = best_time(lambda: x264_alone(raw, (S, H, W), work / "floor.mp4"), repeats)
        res["x264_alone_medium_s"] = floor
        for preset in ("medium", "veryfast"):
            ours = best_time(lambda p=preset: write_mp4(work / f"ours_{p}.mp4", frames, preset=p), repeats)
            theirs = best_time(lambda p=preset: authors_encode(frames, work / f"theirs_{p}.mp4", preset=p), repeats)
            res[f"encode_{preset}"] = {"pipe_s": ours, "jpeg_then_ffmpeg_s": theirs, "ratio": theirs / ours,
                                       "pipe_kib": (work / f"ours_{preset}.mp4").stat().st_size / 1024,
                                       "jpeg_kib": (work / f"theirs_{preset}.mp4").stat().st_size / 1024}
            print(f"encode {S} frames {W}x{H}, x264 preset {preset}: pipe {ours:.3f} s, JPEG files + ffmpeg "
                  f"{theirs:.3f} s -> {theirs / ours:.2f}x per writer", flush=True)
        for preset in ("medium", "veryfast"):  # fidelity to the frames, and the headline ratio
            for name in ("ours", "theirs"):
                v = read_video(work / f"{name}_{preset}.mp4")
                res[f"encode_{preset}"][f"{name}_psnr_db"] = float(np.mean([cv2.PSNR(v[i], frames[i])
                                                                          for i in range(len(v))]))
        authors_medium = res["encode_medium"]["jpeg_then_ffmpeg_s"]
        print(f"x264 alone (ffmpeg reading the raw frames from a file), medium: {floor:.3f} s -> at these x264 "
              f"settings no way of feeding the encoder can be more than {authors_medium / floor:.2f}x faster "
              f"than the authors' method on this machine", flush=True)
        pipe_fast = res["encode_veryfast"]["pipe_s"]
        authors = res["encode_medium"]["jpeg_then_ffmpeg_s"]
        res["pipe_veryfast_vs_authors_medium"] = authors / pipe_fast
        print(f"pipe (veryfast, {res['encode_veryfast']['ours_psnr_db']:.2f} dB) vs the authors' JPEG + ffmpeg "
              f"(medium, {res['encode_medium']['theirs_psnr_db']:.2f} dB): {authors / pipe_fast:.2f}x per writer",
              flush=True)
        psnr = cv2.PSNR(read_video(work / "ours_medium.mp4")[5], frames[5])
        res["pipe_psnr_db"] = psnr
        dec_cv2 = best_time(lambda: read_video(work / "ours_medium.mp4", "cv2"), repeats)
        dec_iio = best_time(lambda: read_video(work / "ours_medium.mp4", "imageio"), repeats)
        res["decode"] = {"cv2_s": dec_cv2, "imageio_s": dec_iio}
        print(f"decode one clip: cv2 {dec_cv2:.3f} s, imageio {dec_iio:.3f} s -> cv2 {dec_iio / dec_cv2:.2f}x; "
              f"PSNR of the CRF-20 clip {psnr:.1f} dB", flush=True)

        # the exporter end to end on synthetic scenes (real PointOdyssey frames are 960x540)

        generate_dataset(work / "pod", {"train": scenes}, cfg=SceneConfig(W=640, H=480, T=S + 16, n_points=800),
                         progress=False)
        for workers, preset in ((1, "medium"), (2, "medium"), (1, "veryfast"), (2, "veryfast")):
            out = work / f"exp{workers}{preset}"
            cmd = [sys.executable, str(ROOT / "export_mp4_dataset.py"), f"--dataset_location={work / 'pod'}",
                   "--dset=train", f"--S={S}", "--N=128", f"--crop_size={H},{W}", f"--out_dir={out}",
                   f"--workers={workers}", f"--max_clips={clips}", "--quiet=True", f"--preset={preset}"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            dt = time.perf_counter() - t0
            written = int(p.stdout.split("written ")[1].split(",")[0])
            res[f"export_{workers}_workers_{preset}"] = {"clips": written, "seconds": dt, "clips_per_s": written / dt}
            print(f"export with {workers} worker(s), x264 {preset}: {written} clips in {dt:.1f} s -> "
                  f"{written / dt:.2f} clips/s (including start-up)", flush=True)

        ds = ExportDataset(str(work / "exp1medium"), None, S=S, N=64, crop_hw=(H, W))
        n = min(len(ds), 12)
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        dt = time.perf_counter() - t0
        res["loader_clips_per_s_per_worker"] = n / dt
        print(f"loader: {n / dt:.2f} clips/s per worker (decode + track subset)", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
