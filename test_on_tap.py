"""Evaluate a PIPs++ checkpoint on TAP-Vid (DAVIS, Kinetics, RGB-Stacking pickles).

Prints the authors' figures (points visible in frame 0, tracked to the end at 512x896: d_avg,
survival_16, median_l2) and the TAP-Vid benchmark's delta^x_avg over visible points at 256x256 in the
query-first and strided modes (strided needs backward tracking). PIPs++ predicts no visibility, so AJ
and OA are not reported.

    python test_on_tap.py --dataset_location=/data/tapvid/tapvid_davis.pkl --init_dir=./reference_model
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import fire
import numpy as np
from tqdm import tqdm

from pips2.datasets.tapvid import TapVidError, first_queries, load_tapvid, strided_queries
from pips2.utils import evaluation, metrics
from pips2.utils.cli import aliased, die, load_pips_or_exit, parse_hw
from pips2.utils.tracking import track


def tapvid_delta(model, video: np.ndarray, points: np.ndarray, occluded: np.ndarray, mode: str, S: int, iters: int,
                 image_size: tuple[int, int], point_batch: int, amp: str | None) -> dict[str, float]:
    """delta^x_avg of one video in the TAP-Vid 'first' or 'strided' query mode."""
    idx, qf = first_queries(occluded) if mode == "first" else strided_queries(occluded)
    if len(idx) == 0:
        return {}
    queries = np.concatenate([qf[:, None], points[idx, qf]], 1).astype(np.float32)
    res = track(model, video, queries, S=S, iters=iters, backward=(mode == "strided"), image_size=image_size,
                point_batch=point_batch, amp=amp)
    pred = res["tracks"].transpose(1, 0, 2)
    return metrics.tapvid_metrics(pred, points[idx], occluded[idx], qf, video.shape[1:3],
                                  evaluate_before_query=(mode == "strided"))


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
         image_size=(512, 896), init_dir: str = "./reference_model", max_videos: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, modes: str = "first,strided",
         out_json: str | None = None, max_iters: int | None = None) -> None:
    """Score each video; print one line per video and tables of the means.

    --max_videos scores only the first videos; --max_iters is the authors' name for it."""
    image_size = parse_hw(image_size, "image_size")
    try:
        max_videos = aliased("max_videos", max_videos, "max_iters", max_iters)
    except ValueError as e:
        die(e)
    amp = None if amp == "none" else amp
    modes = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m]
    videos = videos_or_exit(load_tapvid(dataset_location))
    videos = itertools.chain(list(itertools.islice(videos, 1)), videos)  # a bad file is reported before the model
    model = load_pips_or_exit(init_dir, device, amp=amp)
    rows, deltas, skipped = {}, {m: {} for m in modes}, []
    t0 = time.time()
    for i, (name, video, points, occluded) in enumerate(tqdm(videos, desc="tapvid")):
        if max_videos is not None and i >= max_videos:
            break
        res = evaluation.evaluate_tapvid_video(model, video, points, occluded, image_size, S, iters, point_batch, amp)
        if res is None:
            skipped.append(name)
            tqdm.write(f"{name}: skipped (no point visible in frame 0)")
            continue
        rows[name] = res
        line = evaluation.format_row(name, rows[name])
        for m in modes:
            d = tapvid_delta(model, video, points, occluded, m, S, iters, image_size, point_batch, amp)
            if d:
                deltas[m][name] = d
                line += f"; delta_avg ({m}) {d['delta_avg']:.1f}"
        tqdm.write(line)
    mean = metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows.values())
    print(metrics.metrics_table({"mean": mean}, title=f"authors' protocol, {len(rows)} videos"))
    tap = {m: metrics.average(d.values()) for m, d in deltas.items() if d}
    if tap:
        print(metrics.metrics_table(tap, title="TAP-Vid delta^x (visible points, 256x256)"))
    print(f"summary: {len(rows)} videos scored, {len(skipped)} skipped, {time.time() - t0:.1f} s")
    if out_json:
        Path(out_json).write_text(json.dumps({"mean": mean, "tapvid": tap, "per_video": rows,
                                              "tapvid_per_video": deltas, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
