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
    python test_on_tap.py --dataset_location=/data/tapvid/tapvid_davis.pkl --model=lbm --init_dir=lbm

--init_dir is a checkpoint file or folder, or a hub name (pips2, lbm: the authors' weights, fetched once into a
cache); the rules are pips2.hub's (docs/MODELS.md).

A pickle of a folder that cannot be read, an entry that is not TAP-Vid shaped or a video with an undecodable
frame is skipped with its reason and counted in the summary; when nothing at all can be read the run stops in
one line (exit 2) before the model is loaded. --out_json is written (temp file, then rename) at the end and
also on Ctrl-C (exit 130), SIGTERM (exit 143) or an unexpected error (exit 1), with the videos scored so far;
the JSON layout is docs/EVALUATION.md's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from pips2 import evaluation
from pips2.datasets import tapvid
from pips2.hub import check_options, load_model
from pips2.nets.lbm import LBM
from pips2.tracking import is_lbm
from pips2.utils.checkpoint import CheckpointError, resolve_device
from pips2.utils.cli import aliased, die, run_fire

MODES = ("first", "strided")
# (name, problem or None, decode): one entry of a pickle, or a whole pickle that cannot be read
Entry = tuple[str, str | None, Callable[[], tuple] | None]


def _entries(files: list[Path]) -> Iterator[Entry]:
    """Every entry of the pickles in order, each pickle read when its turn comes (they can be gigabytes)."""
    for f in files:
        try:
            entries = tapvid.read_tapvid_file(f)
        except tapvid.TapVidError as e:
            yield f.name, str(e), None
            continue
        for name, item, problem in entries:
            yield name, problem, (None if item is None else partial(tapvid.decode_entry, f, name, item))


def first_usable(entries: Iterator[Entry], where: str) -> Iterator[Entry]:
    """entries with those up to the first usable one read now: a location where nothing can be read ends the
    run in one line (exit 2) before the model is loaded."""
    head = []
    for e in entries:
        head.append(e)
        if e[1] is None:
            return itertools.chain(head, entries)
    if len(head) == 1 and head[0][1]:
        die(head[0][1])
    die(f"{where}: no usable TAP-Vid video ({len(head)} entries or files refused"
        + (f"; first: {head[0][1]})" if head else ")"))


def score_video(net, lbm: bool, name: str, problem: str | None, decode: Callable[[], tuple] | None,
                modes: list[str], model_hw: tuple[int, int], S: int, iters: int, point_batch: int,
                amp: str | None, track_kw: dict) -> evaluation.Scored:
    """One video for the evaluation frame: the authors' protocol (PIPs++) and the TAP-Vid query modes."""
    if problem is not None or decode is None:
        raise evaluation.Skip(problem or "unreadable")
    try:
        _, video, points, occluded = decode()
    except tapvid.TapVidError as e:
        raise evaluation.Skip(str(e)) from None
    figures: dict = {}
    line, curves = name, None
    if not lbm:  # the authors' protocol is PIPs++'s: windows from frame 0
        curves = {}
        res = evaluation.evaluate_tapvid_video(net, video, points, occluded, model_hw, S, iters, point_batch,
                                               amp, curves)
        if res is None:
            raise evaluation.Skip("no point visible in frame 0")
        figures.update(res)
        line = evaluation.format_row(name, res)
    scores = {}
    for m in modes:
        d = evaluation.tapvid_query_mode(net, video, points, occluded, m, **track_kw)
        if d:
            scores[m] = d
            line += evaluation.format_tapvid(m, d)
    if lbm and not scores:
        raise evaluation.Skip("no query in any mode")
    if scores:
        figures["tapvid"] = scores
    return evaluation.Scored(figures, line, int(video.shape[0]), curves)


def main(dataset_location: str = "../datasets/tapvid/tapvid_davis.pkl", S: int = 128, iters: int = 16,
         image_size=None, init_dir: str | None = None, max_videos: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, modes: str = "first,strided",
         out_json: str | None = None, max_iters: int | None = None, model: str = "pips2",
         memory_size: int | None = None, resize_to_256: bool = True) -> None:
    """Score each video; print one line per video and tables of the means.

    --max_videos scores only the first videos; --max_iters is the authors' name for it. --image_size (PIPs++
    only, 512,896 by default) is the size the model sees; LBM runs at its checkpoint's input size."""
    try:
        evaluation.check_counts(S=S, iters=iters, point_batch=point_batch, max_videos=max_videos,
                                max_iters=max_iters, memory_size=memory_size)
        max_videos = aliased("max_videos", max_videos, "max_iters", max_iters)
        if model == "lbm" and image_size is not None:
            raise ValueError("--image_size is PIPs++'s; LBM runs at the input size of its checkpoint")
        if model != "lbm" and memory_size is not None:  # as hub.check_options says it, before any data is read
            check_options(model, memory_size=memory_size)
        model_hw = evaluation.check_image_size((512, 896) if image_size is None else image_size)
        mode_list = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m]
        if any(m not in MODES for m in mode_list) or len(set(mode_list)) != len(mode_list):  # first,first: twice
            raise ValueError(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {modes!r}")
        if model == "lbm" and not mode_list:
            raise ValueError("--modes is empty: LBM is scored in the TAP-Vid query modes only")
        dev = resolve_device(device)
        autocast = evaluation.check_amp(amp)
        evaluation.check_out_json(out_json, dataset_location=dataset_location, init_dir=init_dir)
        files = tapvid.tapvid_files(dataset_location)
    except ValueError as e:
        die(e)
    entries = first_usable(_entries(files), str(dataset_location))  # a bad file is reported before the model
    try:
        if model == "lbm" and memory_size is None:
            memory_size = evaluation.lbm_memory_size(dataset_location)
        net = load_model(init_dir, dev, kind=model, amp=amp, memory_size=memory_size)
    except (ValueError, CheckpointError) as e:
        die(e)
    lbm = is_lbm(net)
    if isinstance(net, LBM):
        print(f"LBM: memory of {net.memory_size} frames, input size {net.input_hw[1]}x{net.input_hw[0]}")
    # LBM: each video resized to 256x256 first, as its authors evaluate (--resize_to_256=False: the file's size)
    track_kw = (dict(eval_hw=evaluation.TAPVID_HW if resize_to_256 else None) if lbm else
                dict(S=S, iters=iters, model_hw=model_hw, point_batch=point_batch, amp=autocast))
    settings = dict(dataset_location=str(dataset_location), model=model, init_dir=init_dir, S=S, iters=iters,
                    image_size=None if lbm else list(model_hw), modes=mode_list, max_videos=max_videos, amp=amp,
                    point_batch=point_batch, device=str(dev),
                    memory_size=net.memory_size if lbm else None, resize_to_256=resize_to_256 if lbm else None,
                    checkpoint=evaluation.checkpoint_of(init_dir))
    title = "TAP-Vid AJ, delta^x, OA (256x256)" if lbm else "TAP-Vid delta^x (visible points, 256x256)"
    run = evaluation.Evaluation(Path(dataset_location).stem, "videos", Path(str(init_dir or "reference_model")).name,
                                settings, out_json, tapvid_title=title)
    items = ((name, partial(score_video, net, lbm, name, problem, decode, mode_list, model_hw, S, iters, point_batch,
                            autocast, track_kw))
             for name, problem, decode in itertools.islice(entries, max_videos))
    run.run(items, desc="tapvid", unit="video")


def cli() -> None:
    """The `pips2-eval-tap` command (and `python test_on_tap.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
