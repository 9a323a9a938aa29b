"""Evaluate a PIPs++ checkpoint on PointOdyssey with the authors' protocol (docs/EVALUATION.md).

    ./get_reference_model.sh
    python test_on_pod.py --dataset_location=/data/pointodyssey --dset=test --init_dir=./reference_model

A sequence that cannot be read (missing or unreadable frames, frames of different sizes, bad annotations)
is skipped with its reason and counted in the summary. --out_json is written (temp file, then rename) at the
end and also on Ctrl-C (exit 130) or an unexpected error (exit 1), with the sequences scored so far; beside it,
<name>_curves.png plots accuracy vs threshold and survival over time, the model beside zero-velocity.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pips2 import evaluation
from pips2.cli import load_pips_or_exit
from pips2.datasets import pointodyssey as pod
from pips2.tracking import FileFrames
from pips2.utils import metrics, plots
from pips2.utils.checkpoint import resolve_device
from pips2.utils.cli import aliased, die, parse_hw, run_fire
from pips2.utils.paths import write_json
from pips2.utils.video import VideoError, image_truncation


def check_frames(scene: pod.Scene) -> None:
    """SkipItem unless every frame opens, ends with its end marker and has the first frame's size (only each
    file's ends are read: cheap)."""
    first = None
    for p in scene.rgb_paths:
        try:
            with Image.open(p) as im:
                size = im.size
        except Exception:
            raise pod.SkipItem(f"unreadable frame ({p.name})") from None
        if image_truncation(p):
            raise pod.SkipItem(f"truncated frame ({p.name})")
        if first is None:
            first = (p, size)
        elif size != first[1]:
            raise pod.SkipItem(f"frames of different sizes ({p.name} is {size[0]}x{size[1]}, "
                               f"{first[0].name} is {first[1][0]}x{first[1][1]})")


def evaluate_scene(model, scene: pod.Scene, S: int, N: int, iters: int, image_size: tuple[int, int],
                   point_batch: int = 256, amp: str | None = None) -> dict | None:
    """Metrics of one sequence, or None when it has no usable point. model=None scores zero-velocity.

    Its "curves" entry holds the plotted curves (plots.Curves) of the model and of zero-velocity.
    """
    frames = FileFrames(scene.rgb_paths, image_size)
    trajs, _, valids = evaluation.select_points(scene.trajs, scene.visibs, scene.valids, frames.src_hw, N)
    if trajs.shape[1] == 0:
        return None
    curves: dict = {}
    out: dict = evaluation.evaluate_points(model, frames, trajs, valids, S, iters, point_batch, amp, curves)
    out["curves"] = curves
    return out


def _skip_reason(e: Exception) -> str:
    """A short reason: a VideoError's file is named by its file name, not its whole path."""
    if isinstance(e, VideoError):
        path, _, what = str(e).partition(": ")
        return f"{what or 'unreadable'} ({Path(path).name})"
    return str(e)


def main(dataset_location: str = "../datasets/pointodyssey", dset: str = "test", S: int = 128, N: int = 256,
         iters: int = 16, image_size=(512, 896), init_dir: str = "./reference_model", max_scenes: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, out_json: str | None = None,
         zero_vel: bool = False, max_iters: int | None = None) -> None:
    """Print one line per sequence and a final table; --zero_vel=True scores the zero-velocity baseline.

    --max_scenes scores only the first sequences; --max_iters is the authors' name for it."""
    try:
        image_size = parse_hw(image_size, "image_size")
        max_scenes = aliased("max_scenes", max_scenes, "max_iters", max_iters)
        scenes = pod.list_scenes(dataset_location, dset)
    except (ValueError, OSError) as e:
        die(e)
    if not scenes:
        die(f"{Path(dataset_location) / dset}: no scene folders in this split")
    scenes = scenes[:max_scenes]
    dev = resolve_device(device)
    model = None
    if not zero_vel:
        model = load_pips_or_exit(init_dir, dev, amp=amp)
    rows, skipped, curves = {}, {}, {}
    t0 = time.time()
    n_frames = 0
    status = "interrupted"

    def finish() -> None:
        """Table, summary and --out_json of what was done, whatever ended the run."""
        dt = time.time() - t0
        mean = metrics.average({k: v for k, v in r.items() if k in metrics.METRIC_NAMES} for r in rows.values())
        name = "zero-velocity" if zero_vel else str(init_dir)
        print(metrics.metrics_table({"mean": mean}, title=f"{name} on PointOdyssey {dset}: {len(rows)} sequences"))
        reasons = Counter(r.split(" (")[0] for r in skipped.values())
        why = f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})" if reasons else ""
        left = len(scenes) - len(rows) - len(skipped)
        print(f"summary: {len(rows)} sequences scored, {len(skipped)} skipped{why}"
              + (f", {left} not done ({status})" if status != "done" else "")
              + f"; {n_frames / max(dt, 1e-9):.1f} frames/s", flush=True)
        if out_json:
            series = plots.mean_series(curves, Path(str(init_dir)).name or str(init_dir))
            write_json(out_json, {"mean": mean, "per_sequence": rows, "skipped": skipped, "status": status,
                                  "complete": status == "done", "init_dir": None if zero_vel else str(init_dir),
                                  "curves": series})
            print(f"results -> {out_json}" + ("" if status == "done" else " (partial)"), flush=True)
            if series:
                try:
                    png = plots.save_png({f"PointOdyssey {dset}": series}, plots.png_path(out_json),
                                         title=f"{name} on PointOdyssey {dset}: {len(rows)} sequences")
                    print(f"curves -> {png}", flush=True)
                except ImportError as e:  # the figures above are the results; the picture is a convenience
                    print(f"curves not drawn ({e}); pip install matplotlib", flush=True)

    try:
        for path in tqdm(scenes, desc=f"pod {dset}", unit="seq"):
            try:
                scene = pod.load_scene(path, require_masks=False, require_3d=False)
                check_frames(scene)
                res = evaluate_scene(model, scene, S, N, iters, image_size, point_batch,
                                     None if amp == "none" else amp)
                if res is None:
                    raise pod.SkipItem("no usable point")
            except (pod.SkipItem, VideoError) as e:  # this sequence's data: skip it and go on
                skipped[path.name] = _skip_reason(e)
                tqdm.write(f"{path.name}: skipped ({skipped[path.name]})")
                continue
            curves[path.name] = res.pop("curves", None) or {}
            rows[path.name] = res
            n_frames += int(res["frames"])
            tqdm.write(evaluation.format_row(path.name, res))
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        finish()
        sys.exit(130)
    except Exception as e:  # a bug, not bad data: keep the scores, then fail loudly
        status = f"error: {type(e).__name__}: {e}"
        finish()
        raise
    finish()


def cli() -> None:
    """The `pips2-eval-pod` command (and `python test_on_pod.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
