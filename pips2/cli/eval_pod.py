"""Evaluate a PIPs++ checkpoint on PointOdyssey with the authors' protocol (docs/EVALUATION.md).

    ./get_reference_model.sh
    python test_on_pod.py --dataset_location=/data/pointodyssey --dset=test --init_dir=./reference_model

--init_dir is a checkpoint file or folder, or the hub name pips2 (the authors' model, fetched once into a
cache); the rules are pips2.hub's (docs/MODELS.md).

A sequence that cannot be read (missing or unreadable frames, frames of different sizes, bad annotations)
is skipped with its reason and counted in the summary. --out_json is written (temp file, then rename) at the
end and also on Ctrl-C (exit 130), SIGTERM (exit 143) or an unexpected error (exit 1), with the sequences
scored so far; beside it, <name>_curves.png plots accuracy vs threshold and survival over time, the model beside
zero-velocity. The JSON layout is docs/EVALUATION.md's (the same for the three evaluation scripts).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pips2 import evaluation
from pips2.datasets import pointodyssey as pod
from pips2.hub import load_model
from pips2.tracking import FileFrames
from pips2.utils.checkpoint import CheckpointError, resolve_device
from pips2.utils.cli import aliased, die, run_fire


def evaluate_scene(model, scene: pod.Scene, S: int, N: int, iters: int, model_hw: tuple[int, int],
                   point_batch: int = 256, amp: str | None = None) -> dict | None:
    """Metrics of one sequence, or None when it has no usable point. model=None scores zero-velocity.

    Its "curves" entry holds the plotted curves (plots.Curves) of the model and of zero-velocity.
    """
    frames = FileFrames(scene.rgb_paths, model_hw)
    trajs, _, valids = evaluation.select_points(scene.trajs, scene.visibs, scene.valids, frames.src_hw, N)
    if trajs.shape[1] == 0:
        return None
    curves: dict = {}
    out: dict = evaluation.evaluate_points(model, frames, trajs, valids, S, iters, point_batch, amp, curves)
    out["curves"] = curves
    return out


def load_scene(path: Path) -> pod.Scene:
    """The scene at path for scoring; whatever the loader refuses it with becomes that scene's skip reason."""
    try:
        return pod.load_scene(path, require_masks=False, require_3d=False)
    except evaluation.SKIP_ERRORS:
        raise
    except Exception as e:  # the loader's own checks may raise other errors for a damaged scene: its data
        raise evaluation.Skip(f"unusable scene ({type(e).__name__}: {evaluation.skip_reason(e)})") from None


def score_scene(model, path: Path, S: int, N: int, iters: int, model_hw: tuple[int, int], point_batch: int,
                amp: str | None) -> evaluation.Scored:
    """One sequence for the evaluation frame: loaded, its frames checked, scored."""
    scene = load_scene(path)
    evaluation.check_frames(scene.rgb_paths)
    res = evaluate_scene(model, scene, S, N, iters, model_hw, point_batch, amp)
    if res is None:
        raise evaluation.Skip("no usable point")
    curves = res.pop("curves", None)
    return evaluation.Scored(res, evaluation.format_row(path.name, res), int(res["frames"]), curves)


def main(dataset_location: str = "../datasets/pointodyssey", dset: str = "test", S: int = 128, N: int = 256,
         iters: int = 16, image_size=(512, 896), init_dir: str = "./reference_model", max_scenes: int | None = None,
         device: str = "auto", amp: str = "none", point_batch: int = 256, out_json: str | None = None,
         zero_vel: bool = False, max_iters: int | None = None) -> None:
    """Print one line per sequence and a final table; --zero_vel=True scores the zero-velocity baseline.

    --max_scenes scores only the first sequences; --max_iters is the authors' name for it."""
    try:
        model_hw = evaluation.check_image_size(image_size)
        evaluation.check_counts(S=S, N=N, iters=iters, point_batch=point_batch, max_scenes=max_scenes,
                                max_iters=max_iters)
        max_scenes = aliased("max_scenes", max_scenes, "max_iters", max_iters)
        dev = resolve_device(device)
        autocast = evaluation.check_amp(amp)
        evaluation.check_out_json(out_json, dataset_location=dataset_location, init_dir=None if zero_vel else init_dir)
        scenes = pod.list_scenes(dataset_location, dset)
    except (ValueError, OSError) as e:
        die(e)
    if not scenes:
        die(f"{Path(dataset_location) / dset}: no scene folders in this split")
    scenes = scenes[:max_scenes]
    try:
        model = None if zero_vel else load_model(init_dir, dev, kind="pips2", amp=amp)
    except (ValueError, CheckpointError) as e:
        die(e)
    settings = dict(dataset_location=str(dataset_location), dset=dset, S=S, N=N, iters=iters,
                    image_size=list(model_hw), init_dir=None if zero_vel else str(init_dir), zero_vel=zero_vel,
                    max_scenes=max_scenes, amp=amp, point_batch=point_batch, device=str(dev),
                    checkpoint=None if zero_vel else evaluation.checkpoint_of(init_dir))
    run = evaluation.Evaluation(f"PointOdyssey {dset}", "sequences",
                                "zero-velocity" if zero_vel else Path(str(init_dir)).name or str(init_dir),
                                settings, out_json)
    items = [(p.name, partial(score_scene, model, p, S, N, iters, model_hw, point_batch, autocast))
             for p in scenes]
    run.run(items, len(items), desc=f"pod {dset}", unit="seq")


def cli() -> None:
    """The `pips2-eval-pod` command (and `python test_on_pod.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
