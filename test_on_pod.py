"""Evaluate a PIPs++ checkpoint on PointOdyssey with the authors' protocol (SPEC section 5).

    ./get_reference_model.sh
    python test_on_pod.py --dataset_location=/data/pointodyssey --dset=test --init_dir=./reference_model
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
from tqdm import tqdm

from datasets import pointodyssey as pod
from utils import evaluation, metrics
from utils.checkpoint import resolve_device
from utils.cli import load_pips_or_exit, parse_hw
from utils.tracking import FileFrames


def evaluate_scene(model, scene: pod.Scene, S: int, N: int, iters: int, image_size: tuple[int, int],
                   point_batch: int = 256, amp: str | None = None) -> dict[str, float] | None:
    """Metrics of one sequence, or None when it has no usable point. model=None scores zero-velocity."""
    frames = FileFrames(scene.rgb_paths, image_size)
    trajs, _, valids = evaluation.select_points(scene.trajs, scene.visibs, scene.valids, frames.src_hw, N)
    if trajs.shape[1] == 0:
        return None
    return evaluation.evaluate_points(model, frames, trajs, valids, S, iters, point_batch, amp)


def main(dataset_location: str = "../datasets/pointodyssey", dset: str = "test", S: int = 128, N: int = 256,
         iters: int = 16, image_size=(512, 896), init_dir: str = "./reference_model", max_iters: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, out_json: str | None = None,
         zero_vel: bool = False) -> None:
    """Print one line per sequence and a final table; --zero_vel=True scores the zero-velocity baseline."""
    image_size = parse_hw(image_size, "image_size")
    dev = resolve_device(device)
    model = None
    if not zero_vel:
        model = load_pips_or_exit(init_dir, dev)
    scenes = pod.list_scenes(dataset_location, dset)[:max_iters]
    rows, skipped = {}, {}
    t0 = time.time()
    n_frames = 0
    for path in tqdm(scenes, desc=f"pod {dset}", unit="seq"):
        try:
            scene = pod.load_scene(path, require_masks=False, require_3d=False)
        except pod.SkipItem as e:
            skipped[path.name] = str(e)
            tqdm.write(f"{path.name}: skipped ({e})")
            continue
        res = evaluate_scene(model, scene, S, N, iters, image_size, point_batch, None if amp == "none" else amp)
        if res is None:
            skipped[path.name] = "no usable point"
            tqdm.write(f"{path.name}: skipped (no usable point)")
            continue
        rows[path.name] = res
        n_frames += int(res["frames"])
        tqdm.write(evaluation.format_row(path.name, res))
    dt = time.time() - t0
    mean = metrics.average({k: v for k, v in r.items() if k in metrics.METRIC_NAMES} for r in rows.values())
    name = "zero-velocity" if zero_vel else str(init_dir)
    print(metrics.metrics_table({"mean": mean}, title=f"{name} on PointOdyssey {dset}: {len(rows)} sequences"))
    print(f"summary: {len(rows)} sequences scored, {len(skipped)} skipped; {n_frames / max(dt, 1e-9):.1f} frames/s")
    if out_json:
        Path(out_json).write_text(json.dumps({"mean": mean, "per_sequence": rows, "skipped": skipped,
                                              "init_dir": None if zero_vel else str(init_dir)}, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
