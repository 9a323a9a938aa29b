"""train.py --model=lbm: flags, query sampling, schedule, a step on Kubric and on an export, the checkpoint format,
exact resume, AMP, non-finite and corrupt-clip skipping, validation on held-out clips (tiny LBM, in-process)."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_train import _kubric, run_ddp_identical
from test_train_robust import _corrupt_copy

from pips2 import trainer
from pips2.cli import train
from pips2.hub import load_model
from pips2.nets.lbm import LBM
from pips2.train_step import warmup_cosine
from pips2.utils import checkpoint as ck

# input_size 64x96 (whole stride-32 cells), a narrow transformer, a short memory: ~0.3 s a step on one thread
TINY = dict(model="lbm", B=1, S=4, N=8, crop_size="64,96", embed_dim=32, memory_size=4, workers=0, device="cpu",
            log_freq=1, quiet=True)
MODEL_KW: dict[str, Any] = dict(input_size=(64, 96), embed_dim=32, memory_size=4, N=8, T=4)


def _version(out) -> str:
    return next(p.name for p in Path(out).iterdir() if (p / "settings.json").is_file())


def _cfg(tmp: Path, **kw) -> train.Config:
    return train.make_config(1, {**TINY, "log_dir": str(tmp / "logs"), "ckpt_dir": str(tmp / "ck"), **kw})


def _kubric_cfg(tmp: Path, **kw) -> train.Config:
    if not (tmp / "kubric").is_dir():
        _kubric(tmp / "kubric", n_seq=2, frames=6, size=128)
    return _cfg(tmp, dataset="kubric", movi_f_root=str(tmp / "kubric"), **kw)


def _export_cfg(exported, tmp: Path, **kw) -> train.Config:
    out, _ = exported
    return _cfg(tmp, dataset_location=str(out), dataset_version=_version(out), **kw)


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_lbm_defaults_are_the_authors_recipe_and_pips_is_unchanged():
    c = train.make_config(1, {"model": "lbm"})
    assert (c.B, c.S, c.N, c.crop_hw, c.lr, c.wd, c.grad_clip, c.memory_size, c.embed_dim) == \
        (4, 24, 256, (384, 512), 5e-4, 1e-5, 1.0, 12, 256)
    assert c.max_steps == 150 * 687 and c.lbm and c.layout is ck.LBM_LAYOUT and c.name().startswith("lbm_4x24x256")
    p = train.make_config(1, {})
    assert (p.model, p.wd, p.grad_clip, p.layout) == ("pips2", 1e-6, 5.0, ck.PIPS_LAYOUT)
    assert p.name() == "stage1_4x36x128_256x384_i6_lr0.0005"
    for flags, msg in [({"crop_size": "64,80"}, "multiple of 32"), ({"eval_dataset": "kinetics"}, "must be davis"),
                       ({"eval_dataset": "davis"}, "needs --tapvid_root"),
                       ({"eval_dataset": "davis", "tapvid_root": "d.pkl", "eval_videos": 0}, "at least 1"),
                       ({"model": "cotracker"}, "--model must be")]:
        with pytest.raises(ValueError, match=msg):
            train.make_config(1, {"model": "lbm", **flags})
    with pytest.raises(ValueError, match="one stage"):
        train.make_config(2, {"model": "lbm"})


def test_lbm_refuses_stages_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(stages="1,2", model="lbm", dataset_location="/nonexistent")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --model=lbm trains in one stage; drop --stage/--stages (got 1,2)"


def test_queries_are_visible_frames_a_quarter_of_them_random():
    g = torch.Generator().manual_seed(0)
    B, S, N = 2, 10, 400
    trajs = torch.rand(B, S, N, 2) * 100
    vis = torch.rand(B, S, N) < 0.5
    vis[:, :, -1] = False  # never visible: frame 0
    q = train.sample_queries(trajs, vis, g)
    t = q[..., 0].long()
    assert q.shape == (B, N, 3)
    assert torch.equal(q[..., 1:], trajs.gather(1, t.view(B, 1, N, 1).expand(B, 1, N, 2)).squeeze(1))
    has = vis.any(1)
    assert vis.gather(1, t.unsqueeze(1)).squeeze(1)[has].all() and (t[~has] == 0).all()
    first = vis.to(torch.uint8).argmax(1)
    assert torch.equal(t[:, N // 4:], first[:, N // 4:])
    assert (t[:, :N // 4] != first[:, :N // 4]).float().mean() > 0.5  # random frames, mostly not the first


def test_schedule_equals_the_authors_sequential_lr():
    total = 200
    opt_a = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    opt_b = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    warm = int(total * 0.01)
    theirs = torch.optim.lr_scheduler.SequentialLR(opt_a, [
        torch.optim.lr_scheduler.LinearLR(opt_a, start_factor=1e-5, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=total - warm)], milestones=[warm])
    ours = torch.optim.lr_scheduler.LambdaLR(opt_b, warmup_cosine(total))
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-6, abs=1e-12)
        opt_a.step()
        opt_b.step()
        theirs.step()
        ours.step()
    assert warmup_cosine(total)(0) == 1e-5 and math.isclose(warmup_cosine(total)(warm), 1.0)


def test_a_step_on_kubric_changes_the_weights_and_saves_the_authors_format(tmp_path, capsys):
    # warm-up step 1: lr x 1e-5; no augmentations: in this tiny sample the occlusion boxes hide all 8 points
    # after frame 0, which makes the authors' loss 0/0 (a skipped step)
    cfg = _kubric_cfg(tmp_path, max_steps=1, lr=1.0, quiet=False, use_augs=False)
    torch.manual_seed(cfg.seed)  # the fresh model TrainState builds
    before = _weights(LBM(**MODEL_KW))
    ckdir, net = train.run_stage(cfg)
    after = _weights(net)
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > 100
    stdout = capsys.readouterr().out
    assert "lbm_1x4x8_64x96_m4_c32" in stdout and "loss_t" in stdout
    path = ck.find_checkpoint(ckdir)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # the authors' loader reads raw['model']
    assert {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(raw) and "model_state_dict" not in raw
    assert list(raw["model"]) == list(net.state_dict())
    loaded = load_model(path, kind="lbm", **MODEL_KW)  # strict
    assert all(torch.equal(v, after[k]) for k, v in loaded.state_dict().items())
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    for tag in (b"train/classification_loss", b"train/occ_acc", b"train/d_avg", b"train/lr"):
        assert tag in blob, tag


def test_init_dir_takes_the_authors_ddp_prefixed_weights(tmp_path, capsys):
    src = LBM(**MODEL_KW)
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "lbm.pt")
    cfg = _kubric_cfg(tmp_path, max_steps=1, init_dir=str(tmp_path / "lbm.pt"), lr=1e-30, quiet=False)
    _, net = train.run_stage(cfg)
    assert f"loaded {tmp_path / 'lbm.pt'}" in capsys.readouterr().out
    # lr 1e-30: the weights are the file's (batch-norm running statistics move with the step)
    got = net.state_dict()
    kept = [k for k in got if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.allclose(got[k], src.state_dict()[k]) for k in kept)
    torch.save({"model": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit):
        train.run_stage(_kubric_cfg(tmp_path / "b", max_steps=1, init_dir=str(tmp_path / "bad.pt")))
    assert "unexpected keys ['bogus']" in capsys.readouterr().err


class Stop(Exception):
    pass


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped after the step-2 save and resumed, a 3-step run ends with the uninterrupted run's weights
    exactly (dropout on, warm-up/cosine schedule, AdamW moments, data stream all restored)."""
    _, ref = train.run_stage(_kubric_cfg(tmp_path / "ref", max_steps=3, save_freq=2))
    real = trainer.train_step

    def stop_at_3(state, data, cfg):
        if state.step == 3:
            raise Stop
        return real(state, data, cfg)

    monkeypatch.setattr(trainer, "train_step", stop_at_3)
    with pytest.raises(Stop):
        train.run_stage(_kubric_cfg(tmp_path / "run", max_steps=3, save_freq=2))
    ckdir = next((tmp_path / "run" / "ck").iterdir())
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    monkeypatch.setattr(trainer, "train_step", real)
    _, resumed = train.run_stage(_kubric_cfg(tmp_path / "run", max_steps=3, save_freq=2))
    want, got = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # and the comparison can fail: the step-2 weights differ from the final ones
    at2 = load_model(ck.find_checkpoint(ckdir, 2), kind="lbm", **MODEL_KW).state_dict()
    assert not all(torch.equal(at2[k], want[k]) for k in want)


@pytest.mark.parametrize("why", ["a stop", "data gone"])
def test_a_step_abandoned_after_a_micro_batch_resumes_as_the_run_uninterrupted(tmp_path, monkeypatch, why):
    """A stop (or a batch that cannot be read) while step 3 waits for its second micro-batch abandons that step:
    the first micro-batch's forward had moved the encoder's batch-norm statistics and the dropout RNG, and the
    step-2 checkpoint then held them, so the resumed run differed from one never stopped. The saved step is the
    step 2 of the run uninterrupted."""
    from pips2.datasets.training import DataGoneError

    ref_dir = tmp_path / "ref"
    train.run_stage(_kubric_cfg(ref_dir, max_steps=3, save_freq=2, grad_acc=2))
    real = trainer.TrainData.next

    def stop_in_step_3(self, step, micro):
        if (step, micro) == (3, 1):
            if why == "data gone":
                raise DataGoneError("/data: 20 clips in a row were corrupt")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # a loader that no longer answers: the handler cuts this short
        return real(self, step, micro)

    monkeypatch.setattr(trainer.TrainData, "next", stop_in_step_3)
    with pytest.raises(SystemExit):  # TrainingStopped (exit 0) for the stop, exit 2 for the data
        train.run_stage(_kubric_cfg(tmp_path / "run", max_steps=3, save_freq=100, grad_acc=2))
    ckdir = next((tmp_path / "run" / "ck").iterdir())
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    want = ck.read_checkpoint(ck.find_checkpoint(next((ref_dir / "ck").iterdir()), 2), layout=ck.LBM_LAYOUT)
    got = ck.read_checkpoint(ck.find_checkpoint(ckdir, 2), layout=ck.LBM_LAYOUT)
    assert any("running_mean" in k for k in want["model"])
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    assert torch.equal(want["rng"]["torch"], got["rng"]["torch"]) and want["rng"]["numpy"] == got["rng"]["numpy"]


def test_a_step_on_an_export_with_held_out_validation_and_a_corrupt_clip(exported, tmp_path, capsys):
    out, _ = exported
    _corrupt_copy(out, tmp_path / "copy")
    cfg = _cfg(tmp_path, dataset_location=str(tmp_path / "copy"), dataset_version=_version(out), max_steps=2,
               shuffle=False, val_dataset_version=_version(out), val_freq=1, lr=1.0, quiet=False)
    torch.manual_seed(cfg.seed)
    before = _weights(LBM(**MODEL_KW))
    ckdir, net = train.run_stage(cfg)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if v.is_floating_point())
    stdout = capsys.readouterr().out
    steps = [ln for ln in stdout.splitlines() if "; step 00000" in ln]
    assert len(steps) == 2 and not any(ln.endswith("d_v nan") for ln in steps)
    assert "2 corrupt clips skipped" in stdout  # clip 0, met by the training and the validation stream
    saved = ck.read_checkpoint(ck.find_checkpoint(ckdir), layout=ck.LBM_LAYOUT)
    assert saved["corrupt_clips"] == [0] and saved["corrupt_val_clips"] == [0]
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"val/regression_loss" in blob and b"val/occ_acc" in blob


def _davis(path: Path) -> None:
    """A TAP-Vid-format pickle of two short textured videos whose points drift and hide now and then."""
    import pickle

    rng = np.random.default_rng(1)
    videos = {}
    for name, T in (("a", 6), ("b", 5)):
        video = (rng.random((T, 96, 128, 3)) * 255).astype(np.uint8)
        start = rng.uniform(0.2, 0.8, (6, 1, 2))
        points = (start + 0.01 * np.arange(T)[None, :, None]).astype(np.float32)
        occluded = rng.random((6, T)) < 0.3
        occluded[:, 0] = False
        videos[name] = {"video": video, "points": points, "occluded": occluded}
    with open(path, "wb") as f:
        pickle.dump(videos, f)


def test_tapvid_davis_validation_while_training(tmp_path):
    _davis(tmp_path / "davis.pkl")
    cfg = _kubric_cfg(tmp_path, max_steps=1, val_freq=1, tapvid_root=str(tmp_path / "davis.pkl"),
                      eval_dataset="davis", eval_videos=1, use_augs=False)  # a step that is not skipped
    _, net = train.run_stage(cfg)
    blob = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.tfevents*"))
    assert b"davis/AJ" in blob and b"davis/OA" in blob and b"davis/d_avg" in blob
    # the figures are test_on_tap.py's query-first ones (at 256x256) of the first video only (--eval_videos=1)
    unused: Any = None  # tapvid() reads neither the ranks nor the training data
    figs = trainer.Validator(cfg, unused, unused).tapvid(net)
    assert net.training and figs is not None
    from pips2 import evaluation
    from pips2.datasets.tapvid import load_tapvid

    _, video, points, occluded = next(iter(load_tapvid(tmp_path / "davis.pkl")))
    net.eval()
    with torch.no_grad():
        ref = evaluation.tapvid_query_mode(net, video, points, occluded, "first", eval_hw=(256, 256))
    assert figs == {"AJ": ref["average_jaccard"], "d_avg": ref["delta_avg"], "OA": ref["occlusion_accuracy"]}
    assert all(0.0 <= v <= 100.0 for v in figs.values())
    cfg2 = _kubric_cfg(tmp_path, tapvid_root=str(tmp_path / "davis.pkl"), eval_dataset="davis", eval_videos=2)
    assert trainer.Validator(cfg2, unused, unused).tapvid(net) != figs  # the second video counts too


def test_non_finite_losses_are_skipped_then_the_run_stops(tmp_path, capsys):
    _kubric(tmp_path / "nan", n_seq=1, frames=6, size=128, nan=True)
    cfg = _cfg(tmp_path, dataset="kubric", movi_f_root=str(tmp_path / "nan"), max_steps=10, max_nan_steps=2,
               quiet=False)
    with pytest.raises(SystemExit, match="2 non-finite losses in a row at step 2"):
        train.run_stage(cfg)
    assert capsys.readouterr().out.count("non-finite loss, step skipped") == 2
    ckdir = next((tmp_path / "ck").iterdir())
    assert [s for s, _ in ck.list_checkpoints(ckdir)] == [2]
    load_model(ck.find_checkpoint(ckdir), kind="lbm", **MODEL_KW)


@pytest.mark.parametrize("grad_acc", [1, 2])
def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(tmp_path, monkeypatch, grad_acc):
    """A step skipped for a non-finite loss had still run its forward passes in training mode: the NaNs went
    into the encoder's batch-norm running statistics, every later checkpoint carried them, and demo.py and a
    resume refused those checkpoints. The skipped step now leaves the statistics as the step before left them."""
    real = trainer.TrainData.next

    def inf_pixel_in_step_2(self, step, micro):
        batch = real(self, step, micro)
        if step == 2 and micro == grad_acc - 1:  # the step's last micro-batch: one bad pixel
            rgbs = batch.rgbs.clone()
            rgbs[..., 0, 0, 0] = float("inf")
            batch = batch._replace(rgbs=rgbs)
        return batch

    monkeypatch.setattr(trainer.TrainData, "next", inf_pixel_in_step_2)
    _, net = train.run_stage(_kubric_cfg(tmp_path, max_steps=3, save_freq=1, grad_acc=grad_acc, quiet=False))
    ckdir = next((tmp_path / "ck").iterdir())
    at = {s: ck.read_checkpoint(p, layout=ck.LBM_LAYOUT)["model"] for s, p in ck.list_checkpoints(ckdir)}
    stats = [k for k in at[1] if "running_" in k]
    assert stats and all(torch.isfinite(at[s][k]).all() for s in at for k in stats)
    assert all(torch.equal(at[1][k], at[2][k]) for k in stats)  # step 2 was skipped: its statistics are step 1's


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps(tmp_path, monkeypatch, amp):
    """bf16 and fp16 autocast steps with a finite loss; fp16 through an enabled GradScaler whose state is saved.
    A small input (64x64, 2 frames): this CPU emulates fp16 convolution backward slowly."""
    scalers = []

    class Spy(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    _kubric(tmp_path / "k", n_seq=1, frames=2, size=128)
    cfg = _cfg(tmp_path, dataset="kubric", movi_f_root=str(tmp_path / "k"), S=2, N=4, crop_size="64,64", amp=amp,
               max_steps=1)
    ckdir, net = train.run_stage(cfg)
    state = torch.load(ck.find_checkpoint(ckdir), weights_only=True)
    assert np.isfinite(state["loss_t"]).all() and len(state["loss_t"]) == 1
    assert scalers[0].is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert state["scaler"]["scale"] == scalers[0].get_scale()


def test_an_unreadable_kubric_sequence_is_skipped_and_counted(tmp_path, capsys):
    _kubric(tmp_path / "kubric", n_seq=2, frames=6, size=128)
    (tmp_path / "kubric" / "seq0000" / "seq0000.npy").write_bytes(b"not a numpy file")
    ckdir, _ = train.run_stage(_kubric_cfg(tmp_path, max_steps=1, shuffle=False, quiet=False))
    out = capsys.readouterr()
    assert "1 corrupt clips skipped" in out.out
    warned = [ln for ln in out.err.splitlines() if "corrupt clip" in ln]
    assert len(warned) == 1 and re.match(r"warning: skipping corrupt clip: .*seq0000\.npy", warned[0]), warned
    assert ck.read_checkpoint(ck.find_checkpoint(ckdir), layout=ck.LBM_LAYOUT)["corrupt_clips"] == [0]


@pytest.mark.slow
def test_ddp_two_processes_train_lbm_with_identical_weights(tmp_path):
    """Two gloo ranks, three steps: the last layer's reference head gets no gradient (as the authors'), which
    DDP only accepts with find_unused_parameters; the ranks end with the same weights."""
    _kubric(tmp_path / "kubric", n_seq=2, frames=6, size=128)
    cfg = {**TINY, "dataset": "kubric", "movi_f_root": str(tmp_path / "kubric"), "max_steps": 3, "save_freq": 3,
           "log_dir": str(tmp_path / "logs"), "ckpt_dir": str(tmp_path / "ck")}
    run_ddp_identical(tmp_path / "ddp.py", f"cfg = train.make_config(1, {cfg!r})\n", 29541, threads=1)
    assert [s for s, _ in ck.list_checkpoints(next((tmp_path / "ck").iterdir()))] == [3]


@pytest.mark.slow
def test_ddp_a_non_finite_loss_on_one_rank_skips_the_step_on_both(tmp_path):
    """Rank 1's second loss is made NaN: both ranks must skip that step (agreeing before backward, where a lone
    skipping rank would leave the other waiting in DDP's gradient all-reduce) and end with identical weights."""
    _kubric(tmp_path / "kubric", n_seq=2, frames=6, size=128)
    cfg = {**TINY, "dataset": "kubric", "movi_f_root": str(tmp_path / "kubric"), "max_steps": 3, "save_freq": 3,
           "log_dir": str(tmp_path / "logs"), "ckpt_dir": str(tmp_path / "ck"), "use_augs": False, "quiet": False}
    res = run_ddp_identical(tmp_path / "ddp_nan.py", f"""
from pips2 import trainer
real, calls = trainer.lbm_forward_loss, []
def poisoned(*a, **k):
    loss, out, seen = real(*a, **k)
    calls.append(1)
    if dist.get_rank() == 1 and len(calls) == 2:
        loss = loss * float("nan")
    return loss, out, seen
trainer.lbm_forward_loss = poisoned
cfg = train.make_config(1, {cfg!r})
""", 29543, threads=1)
    assert "step 000002/3; non-finite loss, step skipped (1 so far)" in res.stdout  # said by rank 0


def test_load_optimizer_past_the_end_of_lbm_schedule_is_refused(tmp_path, capsys):
    """LBM's cosine schedule is 0 from --max_steps on: continuing a finished run with --init_dir and its optimizer
    would have trained the whole new run at a learning rate of 0, exit 0. Refused before training, one line."""
    cfg = _kubric_cfg(tmp_path, max_steps=2, save_freq=2)
    ckdir, _ = train.run_stage(cfg)
    more = _kubric_cfg(tmp_path, max_steps=2, init_dir=str(ckdir), load_optimizer=True, exp_name="more")
    with pytest.raises(SystemExit) as e:
        train.run_stage(more)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("its learning-rate schedule (--load_optimizer) is at step 1 and ends at step 3: the 2 steps of this run "
            "go past its end; give --max_steps=1 or less, or --load_optimizer=False") in err, err


def test_out_of_memory_in_a_step_is_one_line_and_a_bug_still_raises(tmp_path, monkeypatch, capsys):
    """Under a memory limit (`ulimit -v`, a cgroup) a step ended in torch's allocator or oneDNN traceback; it is now
    one line naming memory and the checkpoint the same command resumes from, exit 1. A bug is not taken for it."""
    real = trainer.train_step
    failure: list[Exception] = [RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't "
                                             "allocate memory: you tried to allocate 1073741824 bytes.\nmore")]

    def fail_at_3(state, data, cfg):
        if state.step == 3:
            raise failure[0]
        return real(state, data, cfg)

    monkeypatch.setattr(trainer, "train_step", fail_at_3)
    for oom in (failure[0], MemoryError(), RuntimeError("could not create a primitive")):
        failure[0] = oom
        with pytest.raises(SystemExit) as e:
            train.run_stage(_kubric_cfg(tmp_path / "run", max_steps=4, save_freq=2))
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "out of memory on this machine (" in err[0], err
        assert "; the same command resumes from " in err[0] and "model-000000002.pth once more memory" in err[0], err
        assert "Traceback" not in err[0], err
    failure[0] = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train.run_stage(_kubric_cfg(tmp_path / "run", max_steps=4, save_freq=2))


@pytest.mark.parametrize("where", ["thread", "close", "hung"])
def test_a_full_log_disk_costs_the_logs_not_the_run(tmp_path, where):
    """The disk of --log_dir filling killed TensorBoard's writing thread; ten events later the step waited for ever
    on that thread's queue (0 % CPU, deaf to SIGTERM, the lock's heartbeat still beating). Logging now stops with
    one warning and the run finishes and saves. The same when the disk fills as the log is closed at the end (its
    last flush raised through the run's end, and tensorboardX's exit hook flushed it again into a traceback). (In
    a process of its own, killed if it hangs.)"""
    code = f"""if True:
        import errno, os, sys, threading
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tensorboardX import event_file_writer
        real, written = event_file_writer.EventsWriter.write_event, []

        def full_after_three(self, event):
            written.append(event)
            if len(written) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, event)

        def hung_after_three(self, event):
            written.append(event)
            if len(written) > 3:  # a log folder that stopped answering (a hard NFS mount, its server gone)
                threading.Event().wait()
            return real(self, event)

        if {where!r} == "thread":
            event_file_writer.EventsWriter.write_event = full_after_three
        elif {where!r} == "hung":
            event_file_writer.EventsWriter.write_event = hung_after_three
            import pips2.trainer
            pips2.trainer.LOG_CLOSE_S = pips2.trainer.LOG_WAIT_S = 2.0
        else:
            def full(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            event_file_writer.EventsWriter.flush = full
        from test_train_lbm import _kubric_cfg, train
        cfg = _kubric_cfg(Path({str(tmp_path)!r}), max_steps=30, save_freq=30, log_freq=1)
        train.run_stage(cfg)
        print(cfg.name())
    """
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                             cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("training hung once TensorBoard's writing thread had died")
    assert res.returncode == 0, res.stderr[-3000:]
    name = res.stdout.strip().splitlines()[-1]
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ck" / name)] == [30]
    warned = [ln for ln in res.stderr.splitlines() if "TensorBoard logging" in ln]
    why = "its folder has not taken an event for 2 s" if where == "hung" else "no space left on device"
    assert warned == [f"warning: TensorBoard logging in {tmp_path / 'logs' / name} stopped ({why}); training goes "
                      f"on"], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Exception" not in res.stderr, res.stderr[-2000:]
