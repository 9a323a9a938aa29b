"""Learning check: train from scratch on synthetic scenes, then score held-out scenes against zero-velocity.

    python benchmarks/learning_check.py --out=./learning_check --max_iters=500     # ~20 CPU minutes
    python benchmarks/learning_check.py --out=./demo_out --max_iters=30 --quick=True  # the demo's short version
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire

from pips2.datasets.synthetic import SceneConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(out: str = "./learning_check", max_iters: int = 500, train_scenes: int = 8, test_scenes: int = 4,
         B: int = 2, S: int = 8, N: int = 32, iters: int = 4, crop_size: str = "128,192", workers: int = 2,
         quick: bool = False, seed: int = 0) -> None:
    """Synthetic scenes -> export -> train stage 1 -> test_on_pod (model and zero-velocity); prints both."""
    out_dir = Path(out).resolve()
    T = 24 if quick else 48
    cfg = SceneConfig(W=320, H=256, T=T, n_points=600)
    generate_dataset(out_dir / "pod", {"train": train_scenes, "test": test_scenes}, seed=seed, cfg=cfg)
    _run(["export_mp4_dataset.py", f"--dataset_location={out_dir / 'pod'}", "--dset=train", f"--S={S}", "--N=64",
          f"--crop_size={crop_size}", f"--out_dir={out_dir / 'export'}", f"--workers={workers}", "--quiet=True"])
    t0 = time.time()
    _run(["train.py", f"--dataset_location={out_dir / 'export'}", f"--B={B}", f"--S={S}", f"--N={N}",
          f"--crop_size={crop_size}", f"--iters={iters}", f"--max_steps={max_iters}", f"--save_freq={max_iters}",
          f"--log_dir={out_dir / 'logs'}", f"--ckpt_dir={out_dir / 'checkpoints'}", f"--workers={workers}",
          f"--log_freq={max(1, max_iters // 10)}", f"--seed={seed}"])
    train_min = (time.time() - t0) / 60
    ckpt = next((out_dir / "checkpoints").iterdir())
    res = {}
    for label, extra in (("model", [f"--init_dir={ckpt}"]), ("zero_velocity", ["--zero_vel=True"])):
        js = out_dir / f"test_{label}.json"
        _run(["test_on_pod.py", f"--dataset_location={out_dir / 'pod'}", "--dset=test", "--S=16", f"--iters={iters}",
              "--image_size=256,320", "--N=64", f"--out_json={js}", *extra])
        res[label] = json.loads(js.read_text())["mean"]
    model, zero = res["model"], res["zero_velocity"]
    summary = {"train_minutes": train_min, "max_iters": max_iters, "checkpoint": str(ckpt),
               "d_avg_model": model["d_avg"], "d_avg_zero_velocity": zero["d_avg"],
               "median_l2_model": model["median_l2"], "median_l2_zero_velocity": zero["median_l2"]}
    (out_dir / "learning_check.json").write_text(json.dumps(summary, indent=2))
    print(f"learning check: trained {max_iters} steps in {train_min:.1f} min; held-out d_avg "
          f"{model['d_avg']:.1f} (model) vs {zero['d_avg']:.1f} (zero-velocity)"
          + (" -- a demo-length run; the 20-minute check in docs/BENCHMARKS.md is where training beats "
             "zero-velocity" if quick else ""))


if __name__ == "__main__":
    fire.Fire(main)
