"""Write synthetic scenes in the PointOdyssey v1.2 layout (the built-in data of the demo and the tests).

    python make_synthetic_pod.py --out=./synthetic_pod --train=8 --val=1 --test=2 --W=512 --H=384 --T=80
"""

from __future__ import annotations

import errno
import math
import shutil
import signal
import sys
from pathlib import Path

from pips2.datasets.pointodyssey import MAX_TRACK_ENTRIES, MAX_TRACKS
from pips2.datasets.synthetic import SceneConfig, SceneInTheWay, generate_dataset, record_settings, scene_dir
from pips2.utils.cli import die, run_fire
from pips2.utils.paths import output_folder_problem, printable
from pips2.utils.procs import Stopped, exit_code, is_space_error, stopping_on_signals
from pips2.utils.video import MAX_IMAGE_PIXELS

MIN_SIDE = 8  # pixels: an object is at least 8 px; the export crops and the models resize, so any size loads
MIN_T = 2  # frames: a track needs two; the scripts' windows overlap by one frame
MIN_POINTS = 3  # 2/5 of the points go to the background: fewer give no tracked point at all
MAX_OBJECTS = 250  # the scene's label map is uint8, background and objects each one label
MAX_SEED = 2**32 - 1  # numpy's generators take seeds from 0
MAX_SCENES = 10000  # per split: scenes are named synth_0000 to synth_9999
# the least a scene takes on disk: its JPEG frames (a default scene's take 0.45 bytes a pixel, its masks, depths
# and normals 0.1 more) and its tracks (float32 x, y and a visibility byte a point and frame)
MIN_SCENE_BYTES_PER_PIXEL, MIN_SCENE_BYTES_PER_TRACK_ENTRY = 0.1, 9


def check_flags(W: int, H: int, T: int, n_points: int, n_objects: int, counts: dict[str, int],
                cam_speed: float = 3.0, obj_speed: float = 4.0, seed: int = 0, out: str | None = None) -> None:
    """ValueError naming the first flag out of range: a scene the project's loader accepts, with frames and
    tracks (sizes within utils/video.MAX_IMAGE_PIXELS, tracks within datasets/pointodyssey's bounds)."""
    if min(W, H) < MIN_SIDE or W * H > MAX_IMAGE_PIXELS:
        raise ValueError(f"--W and --H must be at least {MIN_SIDE} pixels and W x H at most {MAX_IMAGE_PIXELS}, "
                         f"got {W}x{H}")
    if T < MIN_T:
        raise ValueError(f"--T must be at least {MIN_T} frames, got {T}")
    if not MIN_POINTS <= n_points <= MAX_TRACKS:
        raise ValueError(f"--n_points must be between {MIN_POINTS} and {MAX_TRACKS}, got {n_points}")
    if T * n_points > MAX_TRACK_ENTRIES:
        raise ValueError(f"--T x --n_points must be at most {MAX_TRACK_ENTRIES} (what a scene may hold), "
                         f"got {T} x {n_points}")
    if not 0 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"--n_objects must be from 0 to {MAX_OBJECTS}, got {n_objects}")
    # pixels per frame: beyond the frame's size every frame is unrelated to the last, and OpenCV's reflected
    # border folded a 1e9-pixel shift pixel by pixel (it never finished)
    for name, speed in (("cam_speed", cam_speed), ("obj_speed", obj_speed)):
        if not (math.isfinite(speed) and abs(speed) <= max(W, H)):
            raise ValueError(f"--{name} must be a number of pixels per frame from -{max(W, H)} to {max(W, H)} (the "
                             f"frame's larger side), got {speed:g}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be from 0 to {MAX_SEED}, got {seed}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out={out} is not a folder")
    for name, count in counts.items():
        if not 0 <= count <= MAX_SCENES:
            raise ValueError(f"--{name} must be from 0 to {MAX_SCENES} scenes, got {count}")
    if not any(counts.values()):
        raise ValueError(f"nothing to write: --{', --'.join(counts)} are all 0")
    if out is not None:  # the scenes still to make: a rerun completing a stopped one needs room for those only
        todo = sum(not (scene_dir(out, split, i) / "anno.npz").is_file()
                   for split, count in counts.items() for i in range(count))
        check_room(Path(out), todo, W, H, T, n_points)


def check_room(out: Path, scenes: int, W: int, H: int, T: int, n_points: int) -> None:
    """ValueError when `scenes` scenes could not fit in the free space of --out's disk, counting the least a scene
    takes (a lower bound: a run refused here could not have finished)."""
    need = scenes * (T * W * H * MIN_SCENE_BYTES_PER_PIXEL + T * n_points * MIN_SCENE_BYTES_PER_TRACK_ENTRY)
    folder = next((p for p in (out, *out.absolute().parents) if p.is_dir()), None)
    if folder is None:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise ValueError(f"{scenes} scenes of {T} frames {W}x{H} take at least {need / 2**30:.1f} GB, and {folder} "
                         f"has {free / 2**30:.1f} GB free; write fewer or smaller scenes")


def main(out: str = "./synthetic_pod", train: int = 8, val: int = 0, test: int = 2, sample: int = 0, W: int = 512,
         H: int = 384, T: int = 48, n_objects: int = 4, n_points: int = 1024, cam_speed: float = 3.0,
         obj_speed: float = 4.0, seed: int = 0) -> None:
    """Scenes <out>/<split>/synth_%04d/ for each split with a count > 0; existing complete scenes are kept, so
    <out>/settings.json records the settings and another set of them into the same --out is refused."""
    counts = dict(train=train, val=val, test=test, sample=sample)
    try:
        check_flags(W, H, T, n_points, n_objects, counts, cam_speed, obj_speed, seed, out)
        if problem := output_folder_problem(out, "--out"):
            raise ValueError(problem)
        cfg = SceneConfig(W=W, H=H, T=T, n_objects=n_objects, n_points=n_points, cam_speed=cam_speed,
                          obj_speed=obj_speed)
        record_settings(out, dict(W=W, H=H, T=T, n_objects=n_objects, n_points=n_points, cam_speed=cam_speed,
                                  obj_speed=obj_speed, seed=seed))
    except (ValueError, OSError) as e:
        die(e)
    splits = {k: v for k, v in counts.items() if v > 0}

    try:
        with stopping_on_signals():
            paths = generate_dataset(out, splits, seed=seed, cfg=cfg)
    except Stopped as e:  # each scene is written whole (temp, rename): what is done stays
        name = signal.Signals(e.signum).name
        print(f"stopped by {name}: the scenes written so far are kept; the same command writes the rest",
              file=sys.stderr, flush=True)
        sys.exit(exit_code(name))
    except SceneInTheWay as e:
        die(e)
    except OSError as e:  # a full disk: this machine, not the settings; the scene being made was removed
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # which room would not cure: named where it was
            where = f" ({e.filename})" if isinstance(e.filename, str) else ""
            said = (f"cannot write the scenes in {out}{where}: {(e.strerror or str(e)).lower()}; the scenes finished "
                    f"are kept")
        else:
            why = "no space left on device" if is_space_error(e) else (e.strerror or str(e)).lower()
            said = (f"cannot write the scenes in {out} ({why}); the scenes finished are kept, the same command "
                    f"writes the rest once there is room")
        print(printable(f"error: {said}"), file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"summary: {len(paths)} scenes ({', '.join(f'{k} {v}' for k, v in splits.items())}) of {T} frames "
          f"{W}x{H} in {out}")


def cli() -> None:
    """The `pips2-synthetic` command (and `python make_synthetic_pod.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
