"""Learning check: train from scratch on synthetic scenes, then score held-out scenes against zero-velocity.

    python benchmarks/learning_check.py --out=./learning_check --max_iters=500     # ~20 CPU minutes
    python benchmarks/learning_check.py --out=./demo_out --quick=True --max_iters=120 --iters=3 --lr=1e-3 \
        --train_scenes=4 --test_scenes=2 --crop_size=128,128                          # make demo (docs/BENCHMARKS.md)
    python benchmarks/learning_check.py --model=lbm --out=./learning_check_lbm --max_iters=1000  # LBM, tiny size

LBM mode trains a small LBM (input 64x96, embed_dim 64, memory 8) with train.py --model=lbm on 64x96 crops of
128x192 training clips, then tracks 64x96 crops of clips exported from the held-out test scenes (queries: the
points visible at frame 0) and reports the position error against zero-velocity and the occlusion accuracy
against the majority class.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

from pips2.datasets.exportdataset import ExportDataset
from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.datasets.training import Sample, to_sample
from pips2.hub import load_model
from pips2.nets.lbm import LBM, VIS_THRESHOLD
from pips2.utils import metrics
from pips2.utils.cli import parse_hw
from pips2.utils.paths import output_folder_problem

ROOT = Path(__file__).resolve().parents[1]
EXPORT_HW = "128,192"


def _run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


STEP_LINE = re.compile(r"; step (\d+)/\d+;.*; loss ([-+0-9.einfa]+);")


def _run_logged(args: list[str]) -> list[tuple[int, float]]:
    """_run that echoes the output and returns the (step, loss) of every step line train.py printed."""
    print("$", " ".join(args), flush=True)
    curve = []
    with subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            print(line, end="", flush=True)
            if m := STEP_LINE.search(line):
                curve.append((int(m.group(1)), float(m.group(2))))
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args)
    return curve


def _out_folder(out: str) -> Path:
    """--out judged as given (a link or folder of another user's at its name or on its way: the scenes, clips and
    checkpoints would go where they chose), then resolved for the steps' own flags."""
    if problem := output_folder_problem(out, "--out"):
        raise SystemExit(f"error: {problem}")
    return Path(out).resolve()


def _scenes_and_export(out_dir: Path, train_scenes: int, test_scenes: int, S: int, crop_size: str, workers: int,
                       quick: bool, seed: int) -> None:
    """The synthetic scenes under out/pod and their training clips under out/export."""
    T = 24 if quick else 48
    cfg = SceneConfig(W=320, H=256, T=T, n_points=600)
    generate_dataset(out_dir / "pod", {"train": train_scenes, "test": test_scenes}, seed=seed, cfg=cfg)
    _run(["export_mp4_dataset.py", f"--dataset_location={out_dir / 'pod'}", "--dset=train", f"--S={S}", "--N=64",
          f"--crop_size={crop_size}", f"--out_dir={out_dir / 'export'}", f"--workers={workers}", "--quiet=True"])


def main(out: str = "./learning_check", max_iters: int = 500, train_scenes: int = 8, test_scenes: int = 4,
         B: int = 2, S: int = 8, N: int | None = None, iters: int = 4, crop_size: str | None = None, workers: int = 2,
         quick: bool = False, seed: int = 0, model: str = "pips2", embed_dim: int = 64, memory_size: int = 8,
         eval_clips: int = 24, lr: float | None = None, amp: str = "none") -> None:
    """Synthetic scenes -> export -> train stage 1 -> test_on_pod (model and zero-velocity); prints both.

    --model=lbm trains LBM instead (N 16 and crop 64x96 unless given; --embed_dim, --memory_size) and scores
    --eval_clips clips of the test scenes itself (lbm_check). --amp trains under autocast (train.py --amp);
    `compare` puts two runs' loss curves side by side. --max_iters (the authors' name) counts training steps."""
    max_steps = max_iters  # train.py's --max_steps; learning_check.json keeps the flag's name as its key
    if model == "lbm":
        if amp != "none":
            raise SystemExit("error: --amp is for --model=pips2 (the LBM check trains in float32)")
        lbm_check(out, max_steps, train_scenes, test_scenes, B, S, N or 16, crop_size or "64,96", workers, quick,
                  seed, embed_dim, memory_size, eval_clips)
        return
    if model != "pips2":
        raise SystemExit(f"error: --model must be pips2 or lbm, got {model!r}")
    N, crop_size = N or 32, crop_size or EXPORT_HW
    out_dir = _out_folder(out)
    _scenes_and_export(out_dir, train_scenes, test_scenes, S, crop_size, workers, quick, seed)
    t0 = time.time()
    curve = _run_logged(["train.py", f"--dataset_location={out_dir / 'export'}", f"--B={B}", f"--S={S}", f"--N={N}",
          f"--crop_size={crop_size}", f"--iters={iters}", f"--max_steps={max_steps}", f"--save_freq={max_steps}",
          f"--log_dir={out_dir / 'logs'}", f"--ckpt_dir={out_dir / 'checkpoints'}", f"--workers={workers}",
          f"--log_freq={max(1, max_steps // 10)}", f"--seed={seed}", f"--amp={amp}", *([f"--lr={lr}"] if lr else [])])
    train_min = (time.time() - t0) / 60
    if not curve or curve[0][0] != 1:  # train.py resumed a finished run in this folder instead of training
        raise SystemExit(f"error: {out_dir / 'checkpoints'} already holds a run that train.py resumed; "
                         f"give a new --out for each learning check")
    ckpt = next((out_dir / "checkpoints").iterdir())
    res = {}
    for label, extra in (("model", [f"--init_dir={ckpt}"]), ("zero_velocity", ["--zero_vel=True"])):
        js = out_dir / f"test_{label}.json"
        _run(["test_on_pod.py", f"--dataset_location={out_dir / 'pod'}", "--dset=test", "--S=16", f"--iters={iters}",
              "--image_size=256,320", "--N=64", f"--out_json={js}", *extra])
        res[label] = json.loads(js.read_text())["mean"]
    ours, zero = res["model"], res["zero_velocity"]
    summary = {"train_minutes": train_min, "max_iters": max_steps, "amp": amp, "checkpoint": str(ckpt),
               "loss_curve": curve,
               "d_avg_model": ours["d_avg"], "d_avg_zero_velocity": zero["d_avg"],
               "median_l2_model": ours["median_l2"], "median_l2_zero_velocity": zero["median_l2"]}
    (out_dir / "learning_check.json").write_text(json.dumps(summary, indent=2))
    verdict = (f"the model beats zero-velocity ({ours['d_avg'] / max(zero['d_avg'], 1e-9):.1f}x its d_avg)"
               if ours["d_avg"] > zero["d_avg"] else "the model does NOT beat zero-velocity yet (train longer)")
    print(f"learning check: trained {max_steps} steps in {train_min:.1f} min; held-out d_avg "
          f"{ours['d_avg']:.1f} (model) vs {zero['d_avg']:.1f} (zero-velocity), median_l2 "
          f"{ours['median_l2']:.1f} vs {zero['median_l2']:.1f} px: {verdict}")


def lbm_check(out: str, max_steps: int, train_scenes: int, test_scenes: int, B: int, S: int, N: int, crop_size: str,
              workers: int, quick: bool, seed: int, embed_dim: int, memory_size: int, eval_clips: int) -> dict:
    """Train LBM from scratch on the synthetic training clips, score held-out clips; the summary (also json)."""
    out_dir = _out_folder(out)
    # the exporter's smallest clips are 128 px high; training and scoring crop them to LBM's input size
    _scenes_and_export(out_dir, train_scenes, test_scenes, S, EXPORT_HW, workers, quick, seed)
    _run(["export_mp4_dataset.py", f"--dataset_location={out_dir / 'pod'}", "--dset=test", f"--S={S}", "--N=64",
          f"--crop_size={EXPORT_HW}", f"--out_dir={out_dir / 'export_test'}", "--use_augs=False", "--shuffle=False",
          f"--max_clips={eval_clips}", f"--workers={workers}", "--quiet=True"])
    t0 = time.time()
    _run(["train.py", "--model=lbm", f"--dataset_location={out_dir / 'export'}", f"--B={B}", f"--S={S}", f"--N={N}",
          f"--crop_size={crop_size}", f"--embed_dim={embed_dim}", f"--memory_size={memory_size}",
          f"--max_steps={max_steps}", f"--save_freq={max_steps}", f"--log_dir={out_dir / 'logs'}",
          f"--ckpt_dir={out_dir / 'checkpoints'}", f"--workers={workers}", f"--log_freq={max(1, max_steps // 10)}",
          f"--seed={seed}"])
    train_min = (time.time() - t0) / 60
    run = next(p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith("lbm_"))
    crop_hw = parse_hw(crop_size, "crop_size")  # LBM trains at its input size: the crop
    net = load_model(run, kind="lbm", input_size=crop_hw, embed_dim=embed_dim, memory_size=memory_size)
    version = next(p.name for p in (out_dir / "export_test").iterdir() if p.is_dir())
    test = ExportDataset(str(out_dir / "export_test"), version, S, 64, crop_hw)
    rng = np.random.default_rng(seed)
    scores = [score_lbm_clip(net, to_sample(*test.sample(i, rng))) for i in range(len(test))]
    scores = [s for s in scores if s is not None]
    pooled = lambda key: float(sum(s[key][0] for s in scores) / max(1.0, sum(s[key][1] for s in scores)))
    summary = {"model": "lbm", "train_minutes": train_min, "max_iters": max_steps, "checkpoint": str(run),
               "clips": len(scores), "d_avg_model": float(np.mean([s["d_avg_model"] for s in scores])),
               "d_avg_zero_velocity": float(np.mean([s["d_avg_zero"] for s in scores])),
               "err_px_model": pooled("err_model"), "err_px_zero_velocity": pooled("err_zero"),
               "occlusion_accuracy": pooled("oa"), "occlusion_accuracy_at_0.5": pooled("oa_half"),
               "occlusion_chance": pooled("visible_frac"),
               "visibility_auc": metrics.roc_auc([p for s in scores for p in s["vis_prob"]],
                                                 [g for s in scores for g in s["vis_gt"]])}
    summary["occlusion_chance"] = max(summary["occlusion_chance"], 1.0 - summary["occlusion_chance"])
    (out_dir / "learning_check.json").write_text(json.dumps(summary, indent=2))
    print(f"learning check (LBM): trained {max_steps} steps in {train_min:.1f} min; on {len(scores)} held-out clips "
          f"position error {summary['err_px_model']:.2f} px (model) vs {summary['err_px_zero_velocity']:.2f} px "
          f"(zero-velocity), d_avg {summary['d_avg_model']:.1f} vs {summary['d_avg_zero_velocity']:.1f}; "
          f"occlusion accuracy {summary['occlusion_accuracy']:.3f} at the model's threshold "
          f"({VIS_THRESHOLD}), {summary['occlusion_accuracy_at_0.5']:.3f} at 0.5, vs {summary['occlusion_chance']:.3f} "
          f"(majority class); visibility AUC {summary['visibility_auc']:.3f} (chance 0.5)")
    return summary


@torch.no_grad()
def score_lbm_clip(net: LBM, clip: Sample) -> dict | None:
    """One clip's figures, queries at frame 0 for the points visible there, scored from frame 1 on: d_avg of the
    model and of zero-velocity, and (sum, count) pairs of the visible points' pixel error, of right visibility
    calls and of visible ground truth (over valid points). None when no point is visible at frame 0."""
    keep = (clip.visibs[0] * clip.valids[0]) > 0
    if not keep.any():
        return None
    trajs, visibs, valids = clip.trajs[:, keep], clip.visibs[:, keep] > 0, clip.valids[:, keep]
    queries = torch.cat([torch.zeros(trajs.shape[1], 1), trajs[0]], dim=-1)
    res = net.inference(clip.rgbs[None], queries[None], with_raw=True)
    pred, pvis, prob = res["points"][0], res["visibility"][0], torch.sigmoid(res["vis_logit"][0])
    zero = trajs[:1].expand_as(trajs)
    hw = (clip.rgbs.shape[-2], clip.rgbs.shape[-1])
    valid, seen = valids[1:] > 0, (valids[1:] > 0) & visibs[1:]
    err = lambda est: ((est[1:] - trajs[1:]).norm(dim=-1)[seen].sum().item(), seen.sum().item())  # noqa: E731
    return {"d_avg_model": metrics.track_metrics(pred, trajs, valids, hw)["d_avg"],
            "d_avg_zero": metrics.track_metrics(zero, trajs, valids, hw)["d_avg"],
            "err_model": err(pred), "err_zero": err(zero),
            "oa": ((pvis[1:] == visibs[1:])[valid].sum().item(), valid.sum().item()),
            "oa_half": (((prob[1:] > 0.5) == visibs[1:])[valid].sum().item(), valid.sum().item()),
            "visible_frac": (visibs[1:][valid].sum().item(), valid.sum().item()),
            "vis_prob": prob[1:][valid].tolist(), "vis_gt": visibs[1:][valid].tolist()}


def compare(runs: str, png: str | None = None, points: int = 10) -> None:
    """Two or more learning-check runs (their --out folders, comma-separated): held-out scores and the training
    loss (mean over each tenth of the steps) side by side; with --png, the loss curves drawn."""
    names = [str(r) for r in (runs.split(",") if isinstance(runs, str) else runs) if r]  # fire: a,b -> tuple
    if absent := [r for r in names if not (Path(r) / "learning_check.json").is_file()]:
        raise SystemExit(f"error: {', '.join(str(Path(r) / 'learning_check.json') for r in absent)}: not found "
                         f"(not a finished learning check's --out)")
    res = {r: json.loads((Path(r) / "learning_check.json").read_text()) for r in names}
    if missing := [r for r in names if not res[r].get("loss_curve")]:
        raise SystemExit(f"error: no loss curve in {', '.join(missing)} (a run older than the curves, or LBM's)")
    for r, v in res.items():
        print(f"{r}: amp {v.get('amp', 'none')}, {v['max_iters']} steps in {v['train_minutes']:.1f} min; held-out "
              f"d_avg {v['d_avg_model']:.1f} vs zero-velocity {v['d_avg_zero_velocity']:.1f} "
              f"({v['d_avg_model'] / max(v['d_avg_zero_velocity'], 1e-9):.2f}x), median_l2 {v['median_l2_model']:.1f} "
              f"vs {v['median_l2_zero_velocity']:.1f} px")
    curves = {r: np.array(v["loss_curve"], dtype=float) for r, v in res.items()}
    print("mean training loss per span of steps:")
    labels = [f"{Path(r).name} ({res[r].get('amp', 'none')})" for r in names]
    print(f"{'steps':>13s} " + " ".join(f"{lab:>16s}" for lab in labels))
    n = min(len(c) for c in curves.values())  # the spans of the shortest run
    for chunk in np.array_split(np.arange(n), points):
        if len(chunk):
            span = f"{int(curves[names[0]][chunk[0], 0])}-{int(curves[names[0]][chunk[-1], 0])}"
            print(f"{span:>13s} " + " ".join(f"{np.nanmean(curves[r][chunk, 1]):16.3f}" for r in names))
    if png:
        from pips2.utils.plots import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for r, label in zip(names, labels, strict=True):
            c = curves[r]
            k = max(1, len(c) // 40)  # running mean over a fortieth of the run
            smooth = np.convolve(c[:, 1], np.ones(k) / k, mode="valid")
            ax.plot(c[k - 1:, 0], smooth, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (running mean)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        print(f"wrote {png}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        fire.Fire(compare, sys.argv[2:])
    else:
        try:
            fire.Fire(main)
        except subprocess.CalledProcessError as e:  # the step said why in its own lines, above
            step = next((str(a) for a in e.cmd if str(a).endswith(".py")), "a step")
            raise SystemExit(f"error: learning check: {step} failed (exit {e.returncode}); its lines are above") \
                from None
