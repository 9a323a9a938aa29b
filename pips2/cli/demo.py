"""Track points through any video and write plain files: tracks.npz, tracks.csv and an mp4 with trails.

    ./get_reference_model.sh
    python demo.py --video=clip.mp4 --grid_size=16                     # a grid on frame 0
    python demo.py --video=clip.mp4 --points=points.csv --backward=True # (t, x, y) rows, any frame
    python demo.py                                                      # a synthetic video, made on the spot
    python demo.py --init_dir=pips2 --video=clip.mp4                   # the authors' model, fetched once
    python demo.py --model=lbm --init_dir=lbm --video=clip.mp4 --numbers=True   # LBM: occluded points hollow
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np

from pips2.datasets.synthetic import write_synthetic_video
from pips2.hub import DEFAULT_PIPS, check_options, load_model
from pips2.tracking import (
    MAX_POINTS,
    check_frames_space,
    check_grid_size,
    check_queries,
    check_track_args,
    check_video_size,
    default_model_hw,
    grid_queries,
    resolve_model_hw,
    track,
)
from pips2.utils.checkpoint import CheckpointError, resolve_device
from pips2.utils.cli import run_fire
from pips2.utils.paths import (
    make_dirs,
    output_folder_problem,
    pinned_folder,
    remove_empty_dirs,
    same_file,
    unpin,
    unpinned_text,
)
from pips2.utils.procs import (
    Stopped,
    owned_tempdir,
    remove_owned,
    remove_stale_tempdirs,
    stopping_on_signals,
)
from pips2.utils.safe_load import not_regular_problem
from pips2.utils.video import VideoError, image_file_wh, video_info
from pips2.utils.vis import OUTPUT_NAMES, write_outputs

# a points file is read whole: MAX_POINTS rows take under 1 MB even as indented JSON of 17-digit numbers, and
# 64 MB of rows parsed cost 3 GB of memory and 20 s before the count was checked
MAX_POINTS_FILE_BYTES = 4 << 20


def _too_many(path: Path) -> str:
    return f"{path}: more than {MAX_POINTS} points; at most {MAX_POINTS} are tracked at once (split them into " \
        "several runs)"


def read_points(path: str | Path, query_frame: int = 0) -> np.ndarray:
    """(N,3) queries (t, x, y) from a CSV (t,x,y or x,y rows; one header line allowed) or JSON (lists or dicts)."""
    return read_point_rows(path, query_frame)[0]


def read_point_rows(path: str | Path, query_frame: int = 0) -> tuple[np.ndarray, list[int]]:
    """(N,3) queries and, per query, its row in the file (CSV line or 1-based JSON item) for error messages.

    A row that is not 2 or 3 numbers is an error naming the file and row: silently dropping it would track
    fewer points than the user asked for. The file must be a regular file of at most MAX_POINTS_FILE_BYTES (it is
    read whole; /dev/zero or a FIFO would be read forever).
    """
    path = Path(path)
    rows, where = [], []
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ValueError(f"{path}: cannot read points (not a regular file)")
    if path.is_file() and path.stat().st_size > MAX_POINTS_FILE_BYTES:
        raise ValueError(f"{path}: cannot read points (a file of {path.stat().st_size} bytes; a points file is read "
                         f"whole, at most {MAX_POINTS_FILE_BYTES} bytes)")
    try:
        if path.suffix.lower() == ".json":
            # integers parsed as floats: a coordinate is one anyway, and int() refuses numbers of over 4300 digits
            # with advice about Python internals instead of naming the file
            items = json.loads(path.read_text(), parse_int=float)
            if not isinstance(items, list):
                raise ValueError(f"{path}: expected a JSON list of points, got {type(items).__name__}")
            if len(items) > MAX_POINTS:
                raise ValueError(_too_many(path))
            for n, item in enumerate(items, 1):
                try:
                    if isinstance(item, dict):
                        vals = [float(item.get("t", query_frame)), float(item["x"]), float(item["y"])]
                    else:
                        if any(isinstance(v, bool) for v in item):
                            raise ValueError("true/false is not a coordinate")
                        vals = [float(v) for v in item]
                        if len(vals) not in (2, 3):
                            raise ValueError(f"{len(vals)} values")
                        vals = [query_frame, *vals] if len(vals) == 2 else vals
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}: item {n}: expected [t,x,y], [x,y] or {{x,y[,t]}} ({e})") from None
                rows.append(vals)
                where.append(n)
        else:
            seen_data = False
            with open(path, newline="") as f:
                for line_no, rec in enumerate(csv.reader(f), 1):
                    if not rec or not "".join(rec).strip() or rec[0].strip().startswith("#"):
                        continue
                    try:
                        vals = [float(v) for v in rec]
                    except ValueError:
                        if not seen_data:  # the first line may be a header
                            seen_data = True
                            continue
                        raise ValueError(f"{path}: row {line_no}: not numbers: {','.join(rec)!r}") from None
                    seen_data = True
                    if len(vals) not in (2, 3):
                        raise ValueError(f"{path}: row {line_no}: expected t,x,y or x,y, got {len(vals)} values")
                    if len(rows) == MAX_POINTS:  # stop here: the rest would only be parsed to be refused
                        raise ValueError(_too_many(path))
                    rows.append([query_frame, *vals] if len(vals) == 2 else vals)
                    where.append(line_no)
    except OSError as e:
        raise ValueError(f"{path}: cannot read points ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: cannot read points (not a text file)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: cannot read points (invalid JSON: {e})") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot read points (JSON nested too deeply)") from None
    except csv.Error as e:
        raise ValueError(f"{path}: cannot read points (CSV: {e})") from None
    if not rows:
        raise ValueError(f"{path}: no points (expected rows of t,x,y or x,y)")
    # float32 as tracked: a coordinate too large for it turns inf here and is refused, not tracked
    with np.errstate(over="ignore"):
        return np.asarray(rows, np.float32), where


def read_mask(path: str, src_hw: tuple[int, int]) -> np.ndarray:
    """A grayscale mask image of exactly the video's size (a stretched mask would select the wrong points)."""
    if not Path(path).exists():
        raise ValueError(f"--mask {path}: no such file")
    if problem := not_regular_problem(Path(path).stat().st_mode):  # a FIFO's open() would wait for a writer
        raise ValueError(f"--mask {path}: {problem}")
    H, W = src_hw
    try:  # the size from the header first: a small PNG may declare gigabytes of pixels
        w, h = image_file_wh(path)
    except VideoError as e:
        raise ValueError(f"--mask {e}") from None
    if (h, w) != (H, W):
        raise ValueError(f"--mask {path}: mask is {w}x{h} but the video is {W}x{H}")
    # as stored, as the header check read it (an EXIF orientation tag would turn it)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if m is None or m.shape[:2] != (H, W):
        raise ValueError(f"--mask {path}: unreadable image")
    return m


def check_outputs_spare_inputs(out: Path, **inputs: str | None) -> None:
    """ValueError when an output would replace an input file (`--video=<dir>/tracks.mp4 --out_dir=<dir>` replaced
    the user's video with the drawn one, exit 0), under its own name, a link or another hard link."""
    for flag, given in inputs.items():
        if not given or not Path(given).is_file():
            continue
        for name in OUTPUT_NAMES:
            if same_file(out / name, given):
                raise ValueError(f"--out_dir={out} would overwrite the input --{flag}={given} (its {name}); give "
                                 f"another --out_dir")


def check_out_dir(out: Path) -> list[Path]:
    """Create --out_dir and prove it writable now, not after minutes of tracking; returns the folders made."""
    if problem := output_folder_problem(out, "--out_dir", (*OUTPUT_NAMES, SYNTHETIC_NAME)):
        raise ValueError(problem)
    made: list[Path] = []
    try:
        made = make_dirs(out)
        with tempfile.NamedTemporaryFile(dir=os.path.realpath(out), prefix=".write_test."):
            pass
        # the folder the outputs go to, whatever is put at its name while tracking (write_outputs)
        pinned_folder(out, follow=True)
    except OSError as e:
        remove_empty_dirs(made)
        raise OSError(f"--out_dir {out}: not writable ({e.strerror or type(e).__name__})") from None
    return made


SYNTHETIC_NAME, SYNTHETIC_TEMP_HEAD = "synthetic.mp4", ".synthetic.tmp"


def synthetic_video(path: Path, seed: int = 3, frames: int = 48) -> Path:
    """An mp4 of a synthetic scene (moving textured layers) at path, for trying the demo without data."""
    return write_synthetic_video(path, seed, frames, (256, 384))


def prepare(video_path: Path, points: str | None, grid_size: int, query_frame: int,
            mask: str | None) -> tuple[np.ndarray, int, int, int, float]:
    """Check the video and the queries before any model or tracking work: (queries, frames, H, W, fps)."""
    num_frames, H, W, fps = video_info(video_path)
    check_video_size((H, W), str(video_path))
    if points:
        queries, rows = read_point_rows(points, query_frame)
        check_queries(queries, num_frames, (H, W), points, rows,
                      warn=lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    else:
        if not 0 <= query_frame <= num_frames - 1:
            raise ValueError(f"--query_frame {query_frame} is outside the video's frames 0..{num_frames - 1}")
        m = read_mask(mask, (H, W)) if mask else None
        queries = grid_queries((H, W), grid_size, query_frame, m)
        if not len(queries):
            raise ValueError(f"--mask {mask}: no grid point falls inside the mask (nonzero pixels)")
    return queries.astype(np.float32), num_frames, H, W, fps


def main(video: str | None = None, init_dir: str | None = None, points: str | None = None,
         grid_size: int = 16, query_frame: int = 0, mask: str | None = None, backward: bool = False, S: int = 128,
         iters: int = 16, image_size=None, point_batch: int = 256, device: str = "auto", amp: str = "none",
         out_dir: str = "./demo_out/track", model: str = "pips2", memory_size: int | None = None,
         numbers: bool = False) -> None:
    """Track points (from --points, or a grid on --query_frame limited by --mask) and write the outputs.

    --init_dir: a checkpoint file or folder, or a hub name (pips2, lbm: the authors' weights, fetched once);
    pips2.hub's rules, docs/MODELS.md. --model=lbm tracks online with LBM (--memory_size resamples its memory,
    S/iters/point_batch are PIPs++'s) and records its visibility; --numbers labels each point with its index (the
    csv's `point`).

    The flags are checked before anything is created or loaded, then --out_dir, the video and the points before
    the model is loaded. Any refusal or failure is one line (exit 2); SIGTERM or Ctrl-C stops the run with one
    line (exit 128 + the signal). Either way what the run made is removed: the decoded video's temp file, partial
    outputs, a synthetic video and an --out_dir it created."""
    out = Path(out_dir)
    made: list[Path] = []  # folders this run created: removed on failure
    # the synthetic video is made under a temp name of this run and renamed with the outputs: a failed run
    # replaces nothing, and a synthetic.mp4 that is a link is replaced, not the file it names
    synthetic: Path | None = None
    synth_dir: Path | None = None
    writing, code, done = False, 2, False
    installed: list[bool] = []  # the outputs are all in place (write_outputs says so before a held stop)
    late = 0  # the exit code of a stop that came once the outputs were in place
    files: list[Path] = []
    with stopping_on_signals():
        try:
            S, iters, point_batch, model_hw = check_track_args(S, iters, point_batch, image_size, flag="--",
                                                               lbm=model == "lbm")
            check_options(model, amp, memory_size, init_dir)
            dev = resolve_device(device)
            if not points:
                check_grid_size(grid_size, flag="--")
            check_outputs_spare_inputs(out, video=video, points=points, mask=mask, init_dir=init_dir)
            made = check_out_dir(out)
            if video:
                video_path = shown_video = Path(video)
            else:
                remove_stale_tempdirs(SYNTHETIC_TEMP_HEAD, out)
                # in a private folder (0700, a random name): a predictable name in a folder others may write to
                # could be a planted link, which ffmpeg would write through
                synth_dir = owned_tempdir(SYNTHETIC_TEMP_HEAD, out)
                synthetic = synth_dir / SYNTHETIC_NAME
                video_path, shown_video = synthetic_video(synthetic), out / SYNTHETIC_NAME
            queries, num_frames, H, W, fps = prepare(video_path, points, grid_size, query_frame, mask)
            if model == "pips2":  # a video too large to track at its size, or for TMPDIR at it: refused now
                hw = model_hw or default_model_hw((H, W), str(video_path))
                check_frames_space(video_path, num_frames, hw)
            net = load_model(init_dir, dev, kind=model, amp=amp, memory_size=memory_size)
            mh, mw = resolve_model_hw(net, (H, W), model_hw)  # the time per frame grows with this size
            if model != "pips2":  # LBM's size is its weights'
                check_frames_space(video_path, num_frames, (mh, mw))
            t0 = time.time()
            print(f"tracking {len(queries)} points through {shown_video} ({num_frames} frames, {W}x{H}; the model runs "
                  f"at {mw}x{mh}) with {init_dir or DEFAULT_PIPS}", flush=True)
            with warnings.catch_warnings():  # prepare said it in one line, naming the file and its row
                warnings.filterwarnings("ignore", message=r"queries: row \d+: .* outside the", category=UserWarning)
                res = track(net, str(video_path), queries, S=S, iters=iters, backward=backward,
                            model_hw=model_hw, point_batch=point_batch, amp=None if amp == "none" else amp,
                            progress=True)
            dt = time.time() - t0
            writing = True
            installs = [(synthetic, shown_video)] if synthetic is not None else []
            files = [out / name for name in OUTPUT_NAMES] + [dest for _, dest in installs]
            write_outputs(out, video_path, queries, res["tracks"], res["estimated"], fps, res["visibility"],
                          bool(numbers), with_them=installs, on_installed=lambda: installed.append(True))
            done = True
        except Stopped as e:
            code = 128 + e.signum
            msg = f"stopped by {signal.Signals(e.signum).name}: no outputs written, temp files removed"
            if installed:  # the stop came as the outputs were renamed, held until the last: they are all new
                done = True
                msg = (f"stopped by {signal.Signals(e.signum).name} as the outputs were written; they are complete: "
                       + ", ".join(str(f) for f in files))
                late = code
        except (ValueError, VideoError, OSError, CheckpointError) as e:
            msg = unpinned_text(f"cannot write the outputs to --out_dir {out}: {e}" if writing else str(e))
            if isinstance(e, CheckpointError) and e.local:  # this machine (its memory), not the file
                code = 1
        finally:
            if synth_dir is not None:  # the video renamed out of it, or not wanted: the folder goes
                remove_owned(synth_dir)
            unpin(out)
            if not done:  # a run refused or stopped leaves nothing of its own behind
                remove_empty_dirs(made)
    if not done:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(code)
    if late:
        print(msg, file=sys.stderr, flush=True)
        sys.exit(late)
    T = res["tracks"].shape[0]
    passes = "forward and backward" if backward else "forward"
    print(f"summary: {len(queries)} points x {T} frames in {dt:.1f} s ({dt / T:.2f} s per frame, {passes}) at "
          f"{mw}x{mh}, the model's input size (the video is {W}x{H}); wrote " + ", ".join(str(f) for f in files))


def cli() -> None:
    """The `pips2-demo` command (and `python demo.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
