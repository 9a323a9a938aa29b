"""Evaluate a PIPs++ checkpoint on CroHD head tracking (HT21 / HT21Labels layout), 1000-frame clips.

    python test_on_cro.py --dataset_location=/data/crohd --init_dir=./reference_model
"""

from __future__ import annotations

import time

from tqdm import tqdm

from pips2 import evaluation
from pips2.cli import load_pips_or_exit
from pips2.datasets.crohd import list_clips
from pips2.tracking import FileFrames
from pips2.utils import metrics
from pips2.utils.cli import aliased, die, parse_hw, run_fire
from pips2.utils.paths import write_json


def main(dataset_location: str = "../datasets/crohd", dset: str = "train", clip_len: int = 1000, S: int = 128,
         N: int = 256, iters: int = 16, image_size=(512, 896), init_dir: str = "./reference_model",
         max_clips: int | None = None, device: str = "auto", amp: str = "none", point_batch: int = 256,
         out_json: str | None = None, max_iters: int | None = None) -> None:
    """Score each clip with the authors' protocol; one line per clip and a final table.

    --max_clips scores only the first clips; --max_iters is the authors' name for it."""
    image_size = parse_hw(image_size, "image_size")
    try:
        max_clips = aliased("max_clips", max_clips, "max_iters", max_iters)
    except ValueError as e:
        die(e)
    model = load_pips_or_exit(init_dir, device, amp=amp)
    clips = list_clips(dataset_location, dset, clip_len)[:max_clips]
    rows, skipped = {}, []
    t0 = time.time()
    for clip in tqdm(clips, desc="crohd", unit="clip"):
        frames = FileFrames(clip.frame_paths, image_size)
        # heads leave the view (NaN positions there), so the motion rule is left out
        tr, _, val = evaluation.select_points(clip.trajs, clip.visibs, clip.valids, frames.src_hw, N,
                                              max_motion=None)
        if tr.shape[1] == 0:
            skipped.append(clip.name)
            tqdm.write(f"{clip.name}: skipped (no usable head)")
            continue
        rows[clip.name] = evaluation.evaluate_points(model, frames, tr, val, S, iters, point_batch,
                                                     None if amp == "none" else amp)
        tqdm.write(evaluation.format_row(clip.name, rows[clip.name]))
    mean = metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows.values())
    print(metrics.metrics_table({"mean": mean}, title=f"CroHD {dset}: {len(rows)} clips"))
    print(f"summary: {len(rows)} clips scored, {len(skipped)} skipped, {time.time() - t0:.1f} s")
    if out_json:
        write_json(out_json, {"mean": mean, "per_clip": rows, "skipped": skipped})
        print(f"results -> {out_json}")


def cli() -> None:
    """The `pips2-eval-cro` command (and `python test_on_cro.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
