"""Training and evaluation throughput and peak memory on this machine (each job in its own process).

    python benchmarks/bench_pipeline.py --json_out=docs/bench_pipeline_cpu.json
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
from common import scratch_run

from pips2.datasets.synthetic import SceneConfig, generate_dataset
from pips2.nets.pips2 import Pips
from pips2.utils import checkpoint
from pips2.utils.golden import load_golden_weights

ROOT = Path(__file__).resolve().parents[1]


def run_measured(args: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MiB) of a child python process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None  # stdout=PIPE
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{out[-3000:]}")
    return out, time.perf_counter() - t0, usage.ru_maxrss / 1024


WINDOW_SCRIPT = """
import sys, torch
from pips2.nets.pips2 import Pips
from pips2.utils.golden import load_golden_weights
from pips2.tracking import ArrayFrames, track_windows
import numpy as np
S, N, H, W = {S}, {N}, {H}, {W}
video = (np.random.default_rng(0).random((S, H, W, 3)) * 255).astype(np.uint8)
model = load_golden_weights(Pips()).eval()
init = torch.rand(1, N, 2).mul(torch.tensor([W - 1.0, H - 1.0])).repeat(S, 1, 1)
track_windows(model, ArrayFrames(video, (H, W)), init, S=S, iters={iters})
"""


def main(steps: int = 12, json_out: str | None = None, window: bool = True) -> None:
    """Train steps/s and peak memory at a small size; evaluation frames/s and peak memory."""
    with scratch_run("bench_pipe_", json_out) as (work, res):
        generate_dataset(work / "pod", {"train": 3, "test": 2}, cfg=SceneConfig(W=320, H=256, T=64, n_points=600),
                         progress=False)
        subprocess.run([sys.executable, "export_mp4_dataset.py", f"--dataset_location={work / 'pod'}", "--S=8",
                        "--N=64", "--crop_size=128,192", f"--out_dir={work / 'exp'}", "--workers=2", "--max_clips=60",
                        "--quiet=True"], cwd=ROOT, check=True, capture_output=True)
        for amp in ("none", "bf16"):
            out, _, peak = run_measured(["train.py", f"--dataset_location={work / 'exp'}", "--B=2", "--S=8", "--N=32",
                                         "--crop_size=128,192", "--iters=4", f"--max_iters={steps}",
                                         f"--save_freq={steps}", f"--amp={amp}", f"--ckpt_dir={work / 'ck' / amp}",
                                         f"--log_dir={work / 'logs'}", "--workers=2"])
            itimes = [float(x) for x in re.findall(r"itime ([\d.]+)", out)][2:]  # skip warm-up steps
            res[f"train_{amp}"] = {"steps_per_s": 1 / float(np.mean(itimes)), "peak_rss_mib": peak,
                                   "setting": "B=2 S=8 N=32 128x192 iters=4"}
            print(f"train ({amp}): {1 / np.mean(itimes):.3f} steps/s, peak RSS {peak:.0f} MiB "
                  "(B=2 S=8 N=32 128x192 iters=4)", flush=True)

        checkpoint.save(work / "golden", 1, load_golden_weights(Pips()))
        out, wall, peak = run_measured(["test_on_pod.py", f"--dataset_location={work / 'pod'}", "--S=32", "--N=64",
                                        "--iters=6", "--image_size=256,320", f"--init_dir={work / 'golden'}"])
        m = re.search(r"([\d.]+) frames/s", out)
        if m is None:
            raise SystemExit(f"error: test_on_pod.py printed no frames/s:\n{out[-2000:]}")
        fps = float(m.group(1))
        res["eval_pod_small"] = {"frames_per_s": fps, "peak_rss_mib": peak,
                                 "setting": "2 sequences x 64 frames, 256x320, S=32 N=64 iters=6"}
        print(f"test_on_pod: {fps:.2f} frames/s, peak RSS {peak:.0f} MiB (256x320, S=32, N=64, iters=6)", flush=True)
        if window:
            script = work / "window.py"
            script.write_text(WINDOW_SCRIPT.format(root=str(ROOT), S=128, N=256, H=512, W=896, iters=1))
            _, wall, peak = run_measured([str(script)])
            res["eval_reference_window"] = {"seconds": wall, "peak_rss_mib": peak,
                                            "setting": "one window S=128 N=256 512x896 iters=1 (fp32)"}
            print(f"one reference-size window (S=128, N=256, 512x896, iters=1): peak RSS {peak:.0f} MiB, "
                  f"{wall:.0f} s", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
