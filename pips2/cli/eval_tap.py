"""Evaluate a PIPs++ or LBM checkpoint on TAP-Vid (DAVIS, Kinetics, RGB-Stacking pickles).

PIPs++: prints the authors' figures (points visible in frame 0, tracked to the end at 512x896: d_avg,
survival_16, median_l2) and the TAP-Vid benchmark's delta^x_avg over visible points at 256x256 in the
query-first and strided modes (strided needs backward tracking). PIPs++ predicts no visibility, so AJ
and OA are not reported.

LBM (--model=lbm): the full TAP-Vid metrics (AJ, delta^x_avg, OA) in both modes, from its own visibility,
with the authors' evaluation memory for the data set (DAVIS 20, Kinetics 36, RoboTAP 60, else 48; override
with --memory_size). As the authors do, each video is first resized to 256x256 (--resize_to_256=False keeps
the file's size); the model then resizes to its input size.

    python test_on_tap.py --dataset_location=/data/tapvid/tapvid_davis.pkl --init_dir=./reference_model
    python test_on_tap.py --dataset_location=/data/tapvid/tapvid_davis.pkl --model=lbm --init_dir=lbm.pt
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from pips2 import evaluation
from pips2.datasets.tapvid import TapVidError, load_tapvid
from pips2.tracking import is_lbm, load_tracker
from pips2.utils import metrics, plots
from pips2.utils.checkpoint import CheckpointError
from pips2.utils.cli import aliased, die, parse_hw, run_fire
from pips2.utils.paths import write_json


def videos_or_exit(videos: Iterator) -> Iterator:
    """Yield from load_tapvid; a data problem ends the run with `error: <one line>` and exit code 2."""
    while True:
        try:
            item = next(videos)
        except StopIteration:
            return
        except TapVidError as e:
            die(e)
        yield item


def main(dataset_location: str = "../datasets/tapvid/tapvid_davis.pkl", S: int = 128, iters: int = 16,
         image_size=None, init_dir: str | None = None, max_videos: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, modes: str = "first,strided",
         out_json: str | None = None, max_iters: int | None = None, model: str = "pips2",
         memory_size: int | None = None, resize_to_256: bool = True) -> None:
    """Score each video; print one line per video and tables of the means.

    --max_videos scores only the first videos; --max_iters is the authors' name for it. --image_size (PIPs++
    only, 512,896 by default) is the size the model sees; LBM runs at its checkpoint's input size."""
    try:
        max_videos = aliased("max_videos", max_videos, "max_iters", max_iters)
        if model == "lbm" and image_size is not None:
            raise ValueError("--image_size is PIPs++'s; LBM runs at the input size of its checkpoint")
        image_size = parse_hw((512, 896) if image_size is None else image_size, "image_size")
    except ValueError as e:
        die(e)
    amp = None if amp == "none" else amp
    modes = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m]
    videos = videos_or_exit(load_tapvid(dataset_location))
    videos = itertools.chain(list(itertools.islice(videos, 1)), videos)  # a bad file is reported before the model
    try:
        net = load_tracker(model, init_dir, device, amp or "none",
                           evaluation.lbm_memory_size(dataset_location) if memory_size is None else memory_size)
    except (ValueError, CheckpointError) as e:
        die(e)
    lbm = is_lbm(net)
    if lbm:
        print(f"LBM: memory of {net.memory_size} frames, input size {net.size[1]}x{net.size[0]}")
    # LBM: each video resized to 256x256 first, as its authors evaluate (--resize_to_256=False: the file's size)
    track_kw = (dict(size=evaluation.TAPVID_SIZE if resize_to_256 else None) if lbm else
                dict(S=S, iters=iters, image_size=image_size, point_batch=point_batch, amp=amp))
    rows, deltas, scored, skipped, curves = {}, {m: {} for m in modes}, [], [], {}
    t0 = time.time()
    for i, (name, video, points, occluded) in enumerate(tqdm(videos, desc="tapvid")):
        if max_videos is not None and i >= max_videos:
            break
        line = name
        if not lbm:  # the authors' protocol is PIPs++'s: windows from frame 0
            curves[name] = {}
            res = evaluation.evaluate_tapvid_video(net, video, points, occluded, image_size, S, iters, point_batch,
                                                   amp, curves[name])
            if res is None:
                skipped.append(name)
                tqdm.write(f"{name}: skipped (no point visible in frame 0)")
                continue
            rows[name] = res
            line = evaluation.format_row(name, rows[name])
        for m in modes:
            d = evaluation.tapvid_query_mode(net, video, points, occluded, m, **track_kw)
            if d:
                deltas[m][name] = d
                line += evaluation.format_tapvid(m, d)
        if lbm and line == name:
            skipped.append(name)
            tqdm.write(f"{name}: skipped (no query in any mode)")
            continue
        scored.append(name)
        tqdm.write(line)
    mean = None
    if not lbm:
        mean = metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows.values())
        print(metrics.metrics_table({"mean": mean}, title=f"authors' protocol, {len(rows)} videos"))
    tap = {m: metrics.average(d.values()) for m, d in deltas.items() if d}
    if tap:
        title = "TAP-Vid AJ, delta^x, OA (256x256)" if lbm else "TAP-Vid delta^x (visible points, 256x256)"
        print(metrics.metrics_table(tap, title=title))
    print(f"summary: {len(scored)} videos scored, {len(skipped)} skipped, {time.time() - t0:.1f} s")
    if out_json:
        write_json(out_json, {"mean": mean, "tapvid": tap, "per_video": rows, "tapvid_per_video": deltas,
                                         "skipped": skipped})
        print(f"results -> {out_json}")
        series = plots.mean_series(curves, Path(str(init_dir or "reference_model")).name)
        if series:
            png = plots.save_png({Path(dataset_location).stem: series}, plots.png_path(out_json),
                                 title=f"{init_dir} on {Path(dataset_location).name}: {len(rows)} videos")
            print(f"curves -> {png}")


def cli() -> None:
    """The `pips2-eval-tap` command (and `python test_on_tap.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
