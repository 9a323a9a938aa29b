"""Write synthetic scenes in the PointOdyssey v1.2 layout (the built-in data of the demo and the tests).

    python make_synthetic_pod.py --out=./synthetic_pod --train=8 --val=1 --test=2 --W=512 --H=384 --T=80
"""

from __future__ import annotations

from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.utils.cli import run_fire


def main(out: str = "./synthetic_pod", train: int = 8, val: int = 0, test: int = 2, sample: int = 0, W: int = 512,
         H: int = 384, T: int = 48, n_objects: int = 4, n_points: int = 1024, cam_speed: float = 3.0,
         obj_speed: float = 4.0, seed: int = 0) -> None:
    """Scenes <out>/<split>/synth_%04d/ for each split with a count > 0; existing complete scenes are kept."""
    cfg = SceneConfig(W=W, H=H, T=T, n_objects=n_objects, n_points=n_points, cam_speed=cam_speed, obj_speed=obj_speed)
    splits = {k: v for k, v in dict(train=train, val=val, test=test, sample=sample).items() if v > 0}
    paths = generate_dataset(out, splits, seed=seed, cfg=cfg)
    print(f"summary: {len(paths)} scenes ({', '.join(f'{k} {v}' for k, v in splits.items())}) of {T} frames "
          f"{W}x{H} in {out}")


def cli() -> None:
    """The `pips2-synthetic` command (and `python make_synthetic_pod.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
