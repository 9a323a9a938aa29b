"""train.py: step semantics, both stages, exact resume after kill -9, AMP, NaN handling, Kubric, DDP."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pips2.cli import train
from pips2.datasets.export import list_clips
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^(\S+); step (\d{6})/(\d+); rtime [\d.]+; itime [\d.]+; loss ([\d.naninf]+); "
                     r"loss_t ([\d.naninf]+); d_t ([\d.naninf]+); d_v [\d.naninf]+$")
TINY = ["--B=1", "--S=6", "--N=8", "--crop_size=128,192", "--iters=2", "--workers=0", "--log_freq=1"]


def _version(out):
    return next(p.name for p in Path(out).iterdir() if (p / "settings.json").is_file())


def _train_cmd(exported_dir, tmp, *args) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--dataset_location={exported_dir}",
            f"--dataset_version={_version(exported_dir)}", f"--log_dir={tmp / 'logs'}", f"--ckpt_dir={tmp / 'ck'}",
            *TINY, *args]


def _start(exported_dir, tmp, *args, **popen) -> subprocess.Popen[str]:
    """train.py started in the background, its stderr in its stdout."""
    return subprocess.Popen(_train_cmd(exported_dir, tmp, *args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _train(exported_dir, tmp, *args, check=True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(_train_cmd(exported_dir, tmp, *args), cwd=ROOT, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _losses(stdout):
    return {int(m.group(2)): float(m.group(4)) for line in stdout.splitlines() if (m := STEP_RE.match(line))}


def _running_means(stdout):
    """{step: (loss_t, d_t)} as printed (strings: the printed figures must match exactly)."""
    return {int(m.group(2)): (m.group(5), m.group(6)) for line in stdout.splitlines() if (m := STEP_RE.match(line))}


def test_init_estimates_semantics():
    g = torch.Generator().manual_seed(0)
    B, S, N = 2, 5, 400
    trajs = torch.rand(B, S, N, 2) * 100
    est = train.init_estimates(trajs, (128, 256), g)
    assert torch.equal(est[:, 0], trajs[:, 0])
    zero_vel = (est == trajs[:, :1]).all(-1).all(1)  # (B,N): every frame at the frame-0 truth
    assert 0.4 < zero_vel.float().mean() < 0.6
    others = est[:, 1:][~zero_vel.unsqueeze(1).expand(B, S - 1, N)]
    assert (others[:, 0] <= 255).all() and (others >= 0).all()
    assert not torch.equal(est[:, 1:], trajs[:, 1:])


def test_transpose_swaps_axes():
    g = torch.Generator().manual_seed(3)
    rgbs = torch.rand(1, 2, 3, 128, 160)
    trajs = torch.tensor([[[[5.0, 9.0]]]]).repeat(1, 2, 1, 1)
    seen = set()
    for _ in range(20):
        r, t = train.maybe_transpose(rgbs, trajs, g)
        seen.add(r.shape[-1])
        if r.shape[-1] == 128:
            assert torch.equal(r[..., 7, 3], rgbs[..., 3, 7]) and t[0, 0, 0].tolist() == [9.0, 5.0]
    assert seen == {128, 160}


def test_stage_defaults_and_flags():
    c2 = train.make_config(2, {})
    assert (c2.B, c2.S, c2.crop_hw, c2.max_steps) == (1, 64, (512, 896), 10_000)
    c1 = train.make_config(1, {"S": 8, "crop_size": "128,192"})
    assert (c1.B, c1.S, c1.crop_hw, c1.max_steps) == (4, 8, (128, 192), 200_000)
    with pytest.raises(ValueError, match="unknown flags"):
        train.make_config(1, {"bogus": 1})


def test_a_batch_is_bounded_by_memory_and_by_the_data(exported, tmp_path, monkeypatch, capsys):
    """--B=100000 built its first batch until the machine's memory was gone (22 GB), out of reach of SIGTERM: a
    batch's frames are bounded by MAX_BATCH_BYTES and half the machine's memory, and --B by the clips there are."""
    monkeypatch.setattr(train, "physical_memory", lambda: 64 * 2**30)
    with pytest.raises(ValueError, match=r"^stage 1: one batch of --B=100000 clips of --S=6 frames at "
                                         r"--crop_size=128,192 \(100000x6x3x128x192 float32, 164\.8 GiB\) exceeds "
                                         r"16\.0 GiB"):
        train.make_config(1, {"B": 100000, "S": 6, "crop_size": "128,192"})
    monkeypatch.setattr(train, "physical_memory", lambda: 2**30)  # a 1 GiB machine: batches of at most 512 MiB
    assert train.make_config(1, {"B": 4, "S": 36, "crop_size": "384,512"}).B == 4  # 340 MB: the authors' stage 1
    with pytest.raises(ValueError, match=r"exceeds 0\.5 GiB \(at most 16 GiB and half this machine's memory\)"):
        train.make_config(1, {"B": 8, "S": 36, "crop_size": "384,512"})
    with pytest.raises(ValueError, match=r"^stage 2: one batch of --B=1 clips of --S=100000 frames"):  # named --B
        train.make_config(2, {"S": 100000})
    # the batches --cache_len keeps: it grew by one a step until the machine's memory was gone
    assert train.make_config(1, {"B": 1, "S": 6, "crop_size": "128,192", "cache_len": 200}).cache_len == 200
    with pytest.raises(ValueError, match=r"^stage 1: --cache_len=1000000 batches of 1\.7 MiB \(1647\.9 GiB\) exceed "
                                         r"0\.5 GiB"):
        train.make_config(1, {"B": 1, "S": 6, "crop_size": "128,192", "cache_len": 1000000})
    monkeypatch.undo()
    out, _ = exported
    n = len(list_clips(Path(out) / _version(out)))
    with pytest.raises(SystemExit) as e:
        train.run_stage(train.make_config(1, {"dataset_location": str(out), "dataset_version": _version(out),
                                              "B": n + 1, "S": 4, "N": 4, "crop_size": "128,192", "workers": 0,
                                              "log_dir": str(tmp_path / "logs"), "ckpt_dir": str(tmp_path / "ck")}))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --B={n + 1}: a batch cannot hold more clips than the "
                                               f"training data has ({n} in {out}); use --B={n} or fewer")


def test_max_iters_is_an_alias_of_max_steps(capsys):
    assert train.make_config(1, {"max_iters": 7}).max_steps == 7
    assert train.make_config(1, {"max_iters": 7, "max_steps": 7}).max_steps == 7
    with pytest.raises(ValueError, match="--max_steps=8 and its alias --max_iters=7 disagree"):
        train.make_config(1, {"max_iters": 7, "max_steps": 8})
    with pytest.raises(SystemExit) as e:  # refused before any training starts
        train.main(max_steps=3, max_iters=4, dataset_location="/nonexistent")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --max_steps=3 and its alias --max_iters=4 disagree; give one of them"


def test_the_crop_flag_is_the_authors_crop_size(capsys):
    """Inside, the crop is Config.crop_hw; at the command line it stays --crop_size (per stage too), the only
    flag for it: --help lists --crop_size, and --crop_hw is an unknown flag."""
    assert train.make_config(1, {"crop_size": "128,160"}).crop_hw == (128, 160)
    assert "--crop_size=(256, 384)" in train.usage() and "crop_hw" not in train.usage()
    for flag in ("crop_hw", "stage2_crop_hw"):
        with pytest.raises(SystemExit) as e:  # refused before any training starts
            unknown: dict[str, Any] = {flag: "128,128"}  # any value: the flag's name is what is refused
            train.main(**unknown, dataset_location="/nonexistent")
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == f"error: unknown flags: ['{flag}'] (the flags are --crop_size)"


def test_two_stages_and_step_line(exported, tmp_path):
    out, _ = exported
    # a stage's own alias (--stage2_max_iters) overrides the common --max_steps
    res = _train(out, tmp_path, "--stages=1,2", "--max_steps=2", "--stage2_max_iters=1", "--stage2_S=7",
                 "--save_freq=1")
    lines = [ln for ln in res.stdout.splitlines() if STEP_RE.match(ln)]
    assert [m.group(1).split("_")[0] for ln in lines if (m := STEP_RE.match(ln))] == ["stage1", "stage1", "stage2"]
    assert "total params: 17.57 M" in res.stdout
    s1 = next((tmp_path / "ck").glob("stage1_*"))
    s2 = next((tmp_path / "ck").glob("stage2_*"))
    assert [s for s, _ in ck.list_checkpoints(s1)] == [1, 2] and [s for s, _ in ck.list_checkpoints(s2)] == [1]
    assert f"loaded {s1 / 'model-000000002.pth'}" in res.stdout
    # stage 2 alone, later, with a newer stage-1 folder beside: it picked that one as its start and was refused
    # as another --init_dir than its run's; the stage-2 run there resumes
    newer = shutil.copytree(s1, s1.with_name(s1.name + "_newer"))
    for p in (newer, *newer.iterdir()):
        os.utime(p)  # modified after s1
    more = _train(out, tmp_path, "--stage=2", "--max_steps=2", "--S=7", "--save_freq=1")
    assert f"loaded {s2 / 'model-000000001.pth'} (step 1); resuming at step 1" in more.stdout, more.stderr[-2000:]
    assert [s for s, _ in ck.list_checkpoints(s2)] == [1, 2]
    events = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    blob = b"".join(p.read_bytes() for p in events)
    for tag in (b"train/loss", b"train/d_avg", b"train/survival_16", b"train/median_l2", b"train/ate_vis",
                b"train/ate_occ", b"train/lr", b"train/tracks"):
        assert tag in blob, tag


def test_resume_after_kill_gives_the_same_losses(exported, tmp_path):
    out, _ = exported
    # a running-mean window longer than the run: loss_t/d_t after the resume average steps before it too;
    # the kill lands a whole step before the next save (4), so the run holds exactly the checkpoint of step 2
    args = ["--max_steps=4", "--save_freq=2", "--workers=2", "--log_freq=10", "--S=4", "--N=4", "--iters=1"]
    ref = _train(out, tmp_path / "ref", *args)
    ref_losses = _losses(ref.stdout)
    assert sorted(ref_losses) == [1, 2, 3, 4]
    proc = _start(out, tmp_path / "run", *args, start_new_session=True)
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if "step 000003/4" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    ckdir = next((tmp_path / "run" / "ck").iterdir())
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2], seen
    resumed = _train(out, tmp_path / "run", *args)
    assert "resuming at step 2" in resumed.stdout
    got = _losses(resumed.stdout)
    assert sorted(got) == [3, 4]
    assert got[3] == pytest.approx(ref_losses[3], abs=1e-6) and got[4] == pytest.approx(ref_losses[4], abs=1e-6)
    ref_means, got_means = _running_means(ref.stdout), _running_means(resumed.stdout)
    assert got_means[3] == ref_means[3] and got_means[4] == ref_means[4]
    assert ref_means[4][0] != f"{ref_losses[4]:.3f}"  # the mean spans several steps, not just the last
    assert "warning" not in resumed.stderr  # the same command resumes silently
    # another command that maps to the same run folder resumes it too, but says what differs, and that a run
    # already at its --max_steps trains nothing
    other = _train(out, tmp_path / "run", *[a for a in args if not a.startswith("--max_steps")], "--max_steps=3",
                   "--amp=bf16")
    warnings = [ln for ln in other.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2, other.stderr
    assert "saved with max_steps=4 (now 3), amp='none' (now 'bf16'); for a separate run give --exp_name" in warnings[0]
    assert "the run is at step 4, at or past --max_steps=3: nothing to train" in warnings[1]
    assert not _losses(other.stdout)
    # a run cannot go past its restored one-cycle schedule (--max_steps + 100 when it started: the scheduler
    # would fail there); its last step is 103: a run to 104 saved a negative rate its next resume refused
    for steps in (105, 104):
        longer = _train(out, tmp_path / "run", *[a for a in args if not a.startswith("--max_steps")],
                        f"--max_steps={steps}", check=False)
        assert longer.returncode == 2 and not _losses(longer.stdout)
        assert longer.stderr.strip().endswith(
            f"--max_steps={steps} runs past the end of the run's learning-rate schedule (step 104, set when it "
            f"started); resume with --max_steps=103 or less, or train on from its weights in a new run: "
            f"--exp_name=<name> --init_dir=<its folder>"), longer.stderr


def test_bf16_runs(exported, tmp_path):
    out, _ = exported
    res = _train(out, tmp_path, "--amp=bf16", "--max_steps=2", "--save_freq=2")
    losses = _losses(res.stdout)
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())


def test_fp16_steps_through_a_grad_scaler(tmp_path, monkeypatch, capsys):
    """--amp=fp16 trains through an enabled GradScaler (scale, unscale, step, update) with a finite loss. The
    smallest clip the model takes (2 frames of 128x128): this CPU emulates fp16 convolution backward slowly."""
    calls = []

    class Spy(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            calls.append(("enabled", self.is_enabled()))

        def scale(self, outputs):
            calls.append("scale")
            return super().scale(outputs)

        def unscale_(self, optimizer):
            calls.append("unscale_")
            return super().unscale_(optimizer)

        def step(self, optimizer, *a, **k):
            calls.append("step")
            return super().step(optimizer, *a, **k)

        def update(self, new_scale=None):
            calls.append("update")
            return super().update(new_scale)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    _kubric(tmp_path / "k", n_seq=1, frames=2, size=128)
    train.run_stage(train.make_config(1, dict(
        dataset="kubric", movi_f_root=str(tmp_path / "k"), B=1, S=2, N=4, crop_size="128,128", iters=1, amp="fp16",
        max_steps=1, workers=0, device="cpu", log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ck"))))
    losses = _losses(capsys.readouterr().out)
    assert sorted(losses) == [1] and np.isfinite(losses[1])
    assert calls == [("enabled", True), "scale", "unscale_", "step", "update"]


def _kubric(root: Path, n_seq=2, nan=False, frames=24, size=512):
    """MOVi-F-layout sequences: `frames` frames of size x size panning over one texture, 40 tracks."""
    rng = np.random.default_rng(0)
    for s in range(n_seq):
        seq = root / f"seq{s:04d}"
        (seq / "frames").mkdir(parents=True)
        base = (rng.random((size + 2 * frames, size + 2 * frames, 3)) * 255).astype(np.uint8)
        for t in range(frames):
            cv2.imwrite(str(seq / "frames" / f"{t:03d}.png"), base[2 * t:2 * t + size, t:t + size])
        start = rng.uniform(50, size - 62, (40, 2))
        coords = start[:, None] - np.arange(frames)[None, :, None] * np.array([1.0, 2.0])
        if nan:
            coords[:] = np.nan
        occluded = np.zeros((40, frames), bool)
        occluded[0, 5:] = True
        np.save(seq / f"seq{s:04d}.npy", np.array({"coords": coords.astype(np.float32), "visibility": occluded},
                                                   dtype=object), allow_pickle=True)


def test_kubric_layout_and_window(tmp_path):
    from pips2.datasets.kubric import KubricDataset

    _kubric(tmp_path)
    ds = KubricDataset(str(tmp_path), S=10, N=16, crop_hw=(512, 512))
    frames, coords, visible = ds.load(0)
    assert frames.shape == (24, 512, 512, 3) and coords.shape == (24, 40, 2)
    assert not visible[5, 0] and visible[4, 0] and visible[10, 3]  # the file's flag means occluded
    f, track = ds.sample(0, np.random.default_rng(1))
    assert f.shape == (10, 512, 512, 3) and track.shape == (10, 16, 4)
    assert (track[0, :, 2] == 1).all()
    # a whole-pixel crop: the track points at the same texture in the window's frames
    assert np.allclose(np.diff(track[:, :, :2], axis=0)[..., 1], -2.0, atol=1e-4)
    with pytest.raises(ValueError, match="24 frames"):
        KubricDataset(str(tmp_path), S=25)


def test_a_kubric_sequence_too_large_to_decode_is_refused_from_its_first_header(tmp_path, monkeypatch):
    """Every frame of a sequence is decoded before its sample is cut: 150 flat 1080p PNGs (1.4 MB of files) took
    2 GB. The decoded size is judged from the first frame's header and the frame count."""
    from pips2.datasets import kubric

    _kubric(tmp_path, n_seq=1, frames=12, size=128)
    monkeypatch.setattr(kubric, "MAX_SEQUENCE_BYTES", 12 * 128 * 128 * 3 - 1)
    with pytest.raises(ValueError, match=r"seq0000: 12 frames of 128x128 decode to more than 589823 bytes"):
        kubric.KubricDataset(str(tmp_path), S=10, N=16, crop_hw=(128, 128)).load(0)
    monkeypatch.setattr(kubric, "MAX_SEQUENCE_BYTES", 12 * 128 * 128 * 3)
    assert kubric.KubricDataset(str(tmp_path), S=10, N=16, crop_hw=(128, 128)).load(0)[0].shape == (12, 128, 128, 3)


def test_kubric_samples_get_the_occlusion_boxes_at_the_source_size(tmp_path, monkeypatch):
    from pips2.datasets.kubric import KubricDataset
    from pips2.utils import augment

    calls = []

    def hide_frame_1(frames, trajs, visibs, rng):
        calls.append(frames.shape)
        visibs = visibs.copy()
        visibs[1] = False
        return frames, visibs

    monkeypatch.setattr(augment, "erase_and_replace", hide_frame_1)
    _kubric(tmp_path, n_seq=1, frames=6, size=128)
    ds = KubricDataset(str(tmp_path), S=4, N=8, crop_hw=(64, 96), use_augs=True)
    _, track = ds.sample(0, np.random.default_rng(0))
    assert calls == [(4, 128, 128, 3)]  # the S-window, before the crop
    assert track[0, :, 2].all() and not track[1, :, 2].any()  # its hidden points stay hidden
    _, track = KubricDataset(str(tmp_path), S=4, N=8, crop_hw=(64, 96)).sample(0, np.random.default_rng(0))
    assert len(calls) == 1 and track[1, :, 2].any()  # no augmentation without use_augs


def test_kubric_training_and_nan_stop(tmp_path):
    _kubric(tmp_path / "ok")
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset=kubric", f"--movi_f_root={tmp_path / 'ok'}",
           f"--log_dir={tmp_path / 'logs'}", f"--ckpt_dir={tmp_path / 'ck'}", *TINY, "--max_steps=1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(_losses(res.stdout)) == [1]
    _kubric(tmp_path / "nan", nan=True)
    cmd = [c.replace(str(tmp_path / "ok"), str(tmp_path / "nan")).replace(str(tmp_path / "ck"), str(tmp_path / "ck2"))
           for c in cmd] + ["--max_steps=10", "--max_nan_steps=3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert "3 non-finite losses in a row at step 3" in res.stderr and "saved" in res.stderr
    assert res.stdout.count("non-finite loss, step skipped") == 3
    assert [s for s, _ in ck.list_checkpoints(next((tmp_path / "ck2").iterdir()))] == [3]


# the tail of a torchrun script that defined `cfg`: trains it, then rank 0 prints IDENTICAL <world> if all ranks agree
DDP_IDENTICAL = """
_, net = train.run_stage(cfg)
flat = torch.cat([p.detach().flatten() for p in net.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks differ"
    print("IDENTICAL", dist.get_world_size(), flush=True)
# as train.py does: every rank reaches the end before any tears down gloo, through the barrier that is safe
# as the last collective (a plain one after the all_gather above aborted a rank at exit, 1 run in ~15)
del net, gathered
trainer.barrier()
dist.destroy_process_group()
"""


def run_ddp_identical(script: Path, body: str, port: int, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run `body` (which defines cfg) + DDP_IDENTICAL as `script` on two torchrun ranks; assert that it exits 0
    and that the ranks end with identical weights."""
    script.write_text("import torch, torch.distributed as dist\nfrom pips2.cli import train\n"
                      "from pips2 import trainer\n" + body + DDP_IDENTICAL)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    res = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2",
                          f"--master_port={port}", str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "IDENTICAL 2" in res.stdout
    return res


def test_ddp_two_processes_keep_identical_weights(exported, tmp_path):
    out, _ = exported
    run_ddp_identical(tmp_path / "ddp.py", f"""
cfg = train.make_config(1, dict(dataset_location={str(out)!r}, dataset_version={_version(out)!r}, B=1, S=6, N=8,
                                crop_size=(128, 192), iters=2, max_steps=3, save_freq=3, workers=0, device="cpu",
                                log_dir={str(tmp_path / 'logs')!r}, ckpt_dir={str(tmp_path / 'ck')!r}, quiet=True))
""", 29531)
    assert [s for s, _ in ck.list_checkpoints(next((tmp_path / "ck").iterdir()))] == [3]


def test_torchrun_launch_of_train_py(exported, tmp_path):
    out, _ = exported
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1",
           "--master_port", "29533", str(ROOT / "train.py"), f"--dataset_location={out}",
           f"--dataset_version={_version(out)}", f"--log_dir={tmp_path / 'logs'}", f"--ckpt_dir={tmp_path / 'ck'}",
           *TINY, "--max_iters=2", "--save_freq=2", "--device=cpu"]  # the authors' flag name
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    steps = [m.group(2) for ln in res.stdout.splitlines() if (m := STEP_RE.match(ln))]
    assert steps == ["000001", "000002"]  # logged once, by rank 0
    assert "2 process(es)" in res.stdout
    assert [s for s, _ in ck.list_checkpoints(next((tmp_path / "ck").iterdir()))] == [2]


def test_tapvid_validation_while_training(exported, tmp_path):
    import pickle

    out, _ = exported
    rng = np.random.default_rng(0)
    video = (rng.random((8, 128, 192, 3)) * 255).astype(np.uint8)
    pts = np.repeat(rng.uniform(0.1, 0.9, (5, 1, 2)), 8, 1).astype(np.float32)
    with open(tmp_path / "davis.pkl", "wb") as f:
        pickle.dump({"v": {"video": video, "points": pts, "occluded": np.zeros((5, 8), bool)}}, f)
    res = _train(out, tmp_path, "--max_steps=1", f"--tapvid_root={tmp_path / 'davis.pkl'}", "--eval_dataset=davis",
                 "--val_freq=1")
    line = next(ln for ln in res.stdout.splitlines() if STEP_RE.match(ln))
    assert not line.endswith("d_v nan")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"davis/d_avg" in blob


def test_validation_on_exported_clips_and_grad_acc(exported, tmp_path):
    out, _ = exported
    res = _train(out, tmp_path, "--max_steps=2", "--grad_acc=2", f"--val_dataset_version={_version(out)}",
                 "--val_freq=1")
    lines = [ln for ln in res.stdout.splitlines() if STEP_RE.match(ln)]
    assert len(lines) == 2 and all(not ln.endswith("d_v nan") for ln in lines)
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"val/d_avg" in blob
    assert blob.count(b"val/curves") == 2 and b"\x89PNG" in blob  # the accuracy/survival figure at each validation


def test_init_dir_with_ignored_prefixes(exported, tmp_path):
    out, _ = exported
    model = Pips()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("delta_block.dense")}
    (tmp_path / "init").mkdir()
    torch.save({"model_state_dict": sd}, tmp_path / "init" / "model-000000050.pth")
    bad = _train(out, tmp_path, "--max_steps=1", f"--init_dir={tmp_path / 'init'}", check=False)
    assert bad.returncode != 0 and "missing keys ['delta_block.dense.weight', 'delta_block.dense.bias']" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    ok = _train(out, tmp_path, "--max_steps=1", f"--init_dir={tmp_path / 'init'}", "--ignore_load=delta_block.dense")
    assert "model-000000050.pth (step 50)" in ok.stdout and sorted(_losses(ok.stdout)) == [1]


def test_memory_flags_pick_the_plan():
    from pips2.trainer import Config, build_model

    base = dict(stage=1, B=1, S=6, N=8, crop_hw=(128, 192), iters=2, lr=1e-4, max_steps=1)
    def plan(**kw) -> ExecPlan:
        model = build_model(Config(**{**base, **kw}), torch.device("cpu"))
        assert isinstance(model, Pips)
        return model.plan

    small = plan()  # B*N = 8 points on a 128x192 crop: the small-batch choices
    assert not small.recompute_cheap and not small.checkpointing
    assert small.delta == "conv1d" and small.encoder_chunk == 0 and small.corr == "volume"
    many = plan(B=2, N=64)  # 128 points: the Winograd delta block; the crop alone decides the encoder chunks
    assert many.delta == "winograd" and many.encoder_chunk == 0
    large = plan(B=2, N=64, crop_hw=(256, 448))  # the stage-1 shape: one frame at a time
    assert large.delta == "winograd" and large.encoder_chunk == 1 and large.corr == "local"
    assert large.recompute_cheap and not plan(B=2, N=64, crop_hw=(256, 448), recompute_cheap=False).recompute_cheap
    assert plan(B=2, N=64, amp="bf16").delta == "winograd2"  # under bf16 F(2,3)
    assert plan(B=1, N=64, amp="bf16").delta == "conv1d"  # on fewer points the small-batch choice
    assert plan(recompute_cheap=True).recompute_cheap
    both = plan(recompute_cheap=True, grad_ckpt=True)  # whole-chunk checkpointing already stores less
    assert both.checkpointing and not both.recompute_cheap


def test_resume_warnings_name_what_changed():
    from dataclasses import asdict

    from pips2.trainer import resume_warnings

    cfg = train.make_config(1, {"B": 2, "max_steps": 100})
    saved = json.dumps(asdict(cfg))
    assert resume_warnings(cfg, saved, 50, world=2, saved_world=2) == []
    assert resume_warnings(cfg, None, 50) == []  # a checkpoint without a config (the authors')
    said = resume_warnings(replace(cfg, amp="bf16", use_augs=False), saved, 50, world=1, saved_world=2)
    assert said == ["resuming a run saved with amp='none' (now 'bf16'), use_augs=True (now False); for a separate "
                    "run give --exp_name",
                    "the run was trained by 2 process(es), now 1: its batch of 2 per process makes 2 clips per step "
                    "instead of 4"]
    shorter = resume_warnings(replace(cfg, max_steps=40), saved, 50)
    assert "max_steps=100 (now 40)" in shorter[0] and "at step 50, at or past --max_steps=40" in shorter[1]
    assert "max_steps=100 (now 200)" in resume_warnings(replace(cfg, max_steps=200), saved, 50)[0]
    assert resume_warnings(cfg, saved, 99) == [] and "at step 100, at or past" in resume_warnings(cfg, saved, 100)[0]
