"""Train PIPs++ (docs/MODEL.md): stage 1 (S=36, 256x384) and stage 2 (S=64, 512x896), on CPU, GPU or torchrun.

    python train.py --dataset_location=./pod_export                       # stage 1 defaults
    python train.py --stage=2 --dataset_location=./pod_export --dataset_version=<S64 512x896 export>
    python train.py --stages=1,2 ...                                       # both, stage 2 from stage 1
    torchrun --nproc_per_node 8 --nnodes 2 --node_rank 0 --master_addr host --master_port 29500 train.py ...
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NoReturn

import fire
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from datasets.training import OrdinalDataset, OrdinalSampler
from nets.pips2 import Pips
from utils import checkpoint as ck
from utils import metrics
from utils.amp import amp_dtype, autocast
from utils.cli import parse_hw
from utils.procs import is_space_error

STAGE_DEFAULTS = {
    1: dict(B=4, S=36, N=128, crop_size=(256, 384), iters=6, lr=5e-4, max_iters=200_000),
    2: dict(B=1, S=64, N=128, crop_size=(512, 896), iters=6, lr=5e-4, max_iters=10_000),
}


@dataclass
class Config:
    """Every flag of a training run (stage defaults fill what the user leaves unset)."""

    stage: int = 1
    B: int = 4
    S: int = 36
    N: int = 128
    crop_size: tuple[int, int] = (256, 384)
    iters: int = 6
    lr: float = 5e-4
    max_iters: int = 200_000
    use_augs: bool = True
    shuffle: bool = True
    dataset: str = "pod_export"
    dataset_location: str = "./pod_export"
    dataset_version: str | None = None
    val_dataset_version: str | None = None
    movi_f_root: str | None = None
    tapvid_root: str | None = None
    eval_dataset: str | None = None
    log_dir: str = "./logs_train"
    log_freq: int = 100
    val_freq: int = 1000
    ckpt_dir: str = "./checkpoints"
    save_freq: int = 1000
    keep_latest: int = 3
    init_dir: str | None = None
    load_optimizer: bool = False
    load_step: bool = False
    ignore_load: str | None = None
    resume: bool = True
    grad_acc: int = 1
    cache_len: int = 0
    amp: str = "none"
    grad_ckpt: bool = False
    max_nan_steps: int = 20
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    exp_name: str = ""
    quiet: bool = False

    def name(self) -> str:
        h, w = self.crop_size
        base = f"stage{self.stage}_{self.B}x{self.S}x{self.N}_{h}x{w}_i{self.iters}_lr{self.lr:g}"
        return base + (f"_{self.exp_name}" if self.exp_name else "")


def fail(msg: str) -> NoReturn:
    """One error line on stderr, exit code 2 (bad input or a run that cannot go on safely)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------
# The step's semantics.


def init_estimates(trajs_g: torch.Tensor, hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Initial estimates: per point a random mix of truth and uniform noise over the image; half of the
    points zero-velocity instead; frame 0 always the truth (docs/MODEL.md)."""
    B, S, N, _ = trajs_g.shape
    H, W = hw
    dev = trajs_g.device
    # drawn on the CPU generator whatever the device, so a step's randomness is the same everywhere
    noise = (torch.rand(B, S, N, 2, generator=gen) * torch.tensor([W - 1.0, H - 1.0])).to(dev)
    mix = torch.rand(B, 1, N, 1, generator=gen).to(dev)
    zero_vel = (torch.rand(B, 1, N, 1, generator=gen) < 0.5).to(dev)
    est = mix * trajs_g + (1 - mix) * noise
    est = torch.where(zero_vel, trajs_g[:, :1].expand(B, S, N, 2), est)
    return torch.cat([trajs_g[:, :1], est[:, 1:]], 1)


def maybe_transpose(rgbs: torch.Tensor, trajs: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability 0.5 swap x and y (frames transposed H<->W)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        return rgbs.transpose(-1, -2), trajs.flip(-1)
    return rgbs, trajs


def forward_loss(model, batch: dict, device: torch.device, iters: int, gen: torch.Generator, amp: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch with the training semantics (random transpose, initial estimates, loss) on `device`.

    Returns (loss, final estimate, the batch's tensors as the model saw them: rgbs, trajs, visibs, valids).
    """
    rgbs, trajs_g = maybe_transpose(batch["rgbs"].to(device), batch["trajs"].to(device), gen)
    seen = dict(rgbs=rgbs, trajs=trajs_g, visibs=batch["visibs"].to(device), valids=batch["valids"].to(device))
    trajs_e0 = init_estimates(trajs_g, tuple(rgbs.shape[-2:]), gen)
    with autocast(device.type, amp):
        preds, _, _, loss = model(trajs_e0, rgbs, iters=iters, trajs_g=trajs_g, vis_g=seen["visibs"],
                                  valids=seen["valids"])
    return loss, preds[-1], seen


def optimizer_update(model, optimizer, scheduler, scaler, max_norm: float = 5.0) -> None:
    """Unscale, clip the gradient norm, step optimizer, scaler and schedule, clear the gradients."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank)


def batch_figures(trajs_e: torch.Tensor, trajs_g: torch.Tensor, visibs: torch.Tensor, valids: torch.Tensor,
                  hw: tuple[int, int]) -> dict[str, float]:
    """Metrics of a batch (mean over clips) plus ATE on visible and occluded valid points (pixels)."""
    rows = [metrics.track_metrics(trajs_e[b], trajs_g[b], valids[b], hw) for b in range(trajs_g.shape[0])]
    out = metrics.average(rows)
    err = (trajs_e - trajs_g).float().norm(dim=-1)
    vis, occ = valids * visibs, valids * (1 - visibs)
    out["ate_vis"] = float((err * vis).sum() / (1e-6 + vis.sum()))
    out["ate_occ"] = float((err * occ).sum() / (1e-6 + occ.sum()))
    return out


# ---------------------------------------------------------------------------------------------------------
# Data.


def build_dataset(cfg: Config, version: str | None):
    if cfg.dataset == "kubric":
        from datasets.kubric import KubricDataset

        if not cfg.movi_f_root:
            raise ValueError("--dataset=kubric needs --movi_f_root=<folder of MOVi-F sequences>")
        return KubricDataset(cfg.movi_f_root, cfg.S, cfg.N, cfg.crop_size, cfg.use_augs)
    if cfg.dataset != "pod_export":
        raise ValueError(f"--dataset must be pod_export or kubric, got {cfg.dataset!r}")
    from datasets.exportdataset import ExportDataset

    return ExportDataset(cfg.dataset_location, version, cfg.S, cfg.N, cfg.crop_size, cfg.use_augs, seed=cfg.seed)


def make_loader(base, cfg: Config, start_ordinal: int, rank: int, world: int, seed_offset: int = 0) -> DataLoader:
    data = OrdinalDataset(base, cfg.seed + seed_offset, cfg.shuffle)
    sampler = OrdinalSampler(start_ordinal, rank, world)
    return DataLoader(data, batch_size=cfg.B, sampler=sampler, num_workers=cfg.workers,
                      persistent_workers=cfg.workers > 0, prefetch_factor=2 if cfg.workers > 0 else None)


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers.


def dist_setup(device: str) -> tuple[int, int, int, torch.device]:
    """(rank, world, local_rank, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = ck.resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, local, dev


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rng_state() -> dict:
    """Global RNG states in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------------------------------------
# One stage.


def validate(model, loader_iter, cfg: Config, device, on_batch=None) -> dict[str, float]:
    """One validation batch with twice the training iterations (on_batch sees the batch first)."""
    batch = next(loader_iter)
    if on_batch is not None:
        on_batch(batch)
    rgbs, trajs_g = batch["rgbs"].to(device), batch["trajs"].to(device)
    visibs, valids = batch["visibs"].to(device), batch["valids"].to(device)
    init = trajs_g[:, :1].expand_as(trajs_g).contiguous()
    net = model.module if hasattr(model, "module") else model
    net.eval()
    with torch.no_grad(), autocast(device.type, cfg.amp):
        preds = net(init, rgbs, iters=cfg.iters * 2)[0]
    net.train()
    return batch_figures(preds[-1].float(), trajs_g, visibs, valids, tuple(rgbs.shape[-2:]))


def validate_tapvid(model, cfg: Config, device) -> dict[str, float]:
    """Authors'-protocol figures on the first TAP-Vid videos (LBM-style validation while training)."""
    from datasets.tapvid import load_tapvid
    from utils import evaluation

    net = model.module if hasattr(model, "module") else model
    net.eval()
    rows = []
    for i, (_, video, points, occluded) in enumerate(load_tapvid(cfg.tapvid_root)):
        if i >= 5:
            break
        res = evaluation.evaluate_tapvid_video(net, video, points, occluded, cfg.crop_size, S=cfg.S,
                                               iters=cfg.iters * 2)
        if res is not None:
            rows.append(res)
    net.train()
    return metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows)


def run_stage(cfg: Config) -> tuple[Path, torch.nn.Module]:
    """Train one stage; returns its checkpoint folder and the trained model.

    Rank 0 holds a lock file in the run's checkpoint folder for the whole stage, so a second run into the
    same folder refuses to start instead of interleaving checkpoints with this one.
    """
    rank, world, _, device = dist_setup(cfg.device)
    main_proc = rank == 0
    ckpt_dir = Path(cfg.ckpt_dir) / cfg.name()
    lock = ck.RunLock(ckpt_dir)
    err = None
    if main_proc:
        try:
            lock.acquire()
        except (ck.LockError, OSError) as e:
            err = str(e)
    # every rank stops together, or the others would wait forever for rank 0 in the first collective
    if any_rank(err is not None, world, device):
        if err:
            fail(err)
        raise SystemExit(2)
    try:
        if main_proc:
            for p in ck.clean_stale_temps(ckpt_dir):
                print(f"removed {p}: temp file of an interrupted checkpoint write", flush=True)
        return _train_stage(cfg, rank, world, device, ckpt_dir)
    finally:
        lock.release()


def _train_stage(cfg: Config, rank: int, world: int, device: torch.device,
                 ckpt_dir: Path) -> tuple[Path, torch.nn.Module]:
    main_proc = rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    name = cfg.name()
    say = (lambda *a: print(*a, flush=True)) if main_proc and not cfg.quiet else (lambda *a: None)

    def die(msg: str) -> NoReturn:
        if main_proc:
            fail(msg)
        raise SystemExit(2)

    model = Pips()
    model.grad_checkpoint = cfg.grad_ckpt
    for p in model.norm.parameters():  # in the checkpoint but unused by the forward pass
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-6, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.max_iters + 100,
                                                    pct_start=0.1, cycle_momentum=False, anneal_strategy="linear")
    step = 0
    state: dict = {}  # the loaded checkpoint's extras when its step is resumed
    ignore = tuple(p for p in (cfg.ignore_load or "").split(",") if p)
    if cfg.resume and ck.list_checkpoints(ckpt_dir):
        bad: list[tuple[Path, ck.CheckpointError]] = []
        found = ck.read_newest(ckpt_dir, on_bad=lambda path, e: bad.append((path, e)), rename=main_proc)
        if found is None:
            die(f"{ckpt_dir}: no readable checkpoint to resume from ({len(bad)} unreadable, kept as *.bad)")
        path, state = found
        if main_proc:
            for b, e in bad:
                reason = str(e).removeprefix(f"{b}: ")
                print(f"{b}: unreadable ({reason}); resuming from {path} (kept it as {b.name}.bad)",
                      file=sys.stderr, flush=True)
        try:
            ck.apply_checkpoint(state, path, model, optimizer, scheduler, ignore_prefixes=ignore)
        except ck.CheckpointError as e:
            die(str(e))
        step = ck.step_of(path)
        say(f"loaded {path} (step {step}); resuming at step {step}")
    elif cfg.init_dir:
        load_opt = cfg.load_optimizer
        try:
            path = ck.find_checkpoint(cfg.init_dir)
            loaded = ck.read_checkpoint(path)
            ck.apply_checkpoint(loaded, path, model, optimizer if load_opt else None, scheduler if load_opt else None,
                                ignore_prefixes=ignore)
        except ck.CheckpointError as e:
            die(str(e))
        if cfg.load_step:
            step, state = ck.step_of(path), loaded
        say(f"loaded {path} (step {ck.step_of(path)}){'; resuming at step ' + str(step) if cfg.load_step else ''}")
        del loaded
    state = {k: v for k, v in state.items() if not k.endswith("_state_dict")}  # weights are in place: free them
    if "rng" in state:
        set_rng_state(state["rng"])
    say(ck.parameter_table(model))
    model.to(device)
    net = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    model.train()

    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    try:
        base = build_dataset(cfg, cfg.dataset_version)
        val_iter = None
        if cfg.val_dataset_version:
            vcfg = Config(**{**asdict(cfg), "use_augs": False})
            val_iter = iter(make_loader(build_dataset(vcfg, cfg.val_dataset_version), vcfg, step, rank, world, 17))
    except (ValueError, OSError) as e:
        die(str(e))
    loader = iter(make_loader(base, cfg, step * cfg.grad_acc * cfg.B, rank, world))
    writer = None
    if main_proc:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(Path(cfg.log_dir) / name), max_queue=10, flush_secs=60)
    cache: list[dict] = []
    # the running means continue across a resume: a resumed run prints what an uninterrupted one would
    losses = deque((float(v) for v in state.get("loss_t", [])), maxlen=cfg.log_freq)
    d_ts = deque((float(v) for v in state.get("d_t", [])), maxlen=cfg.log_freq)
    d_vs = deque((float(v) for v in state.get("d_v", [])), maxlen=10)
    nan_total, nan_run = int(state.get("nan_steps", 0)), 0
    # dataset indices of clips skipped as corrupt; a DataLoader worker's own counters never reach this process,
    # so every sample carries the clips skipped while producing it (`corrupt_ids`)
    corrupt = {"train": {int(i) for i in state.get("corrupt_clips", [])},
               "val": {int(i) for i in state.get("corrupt_val_clips", [])}}

    def note_corrupt(kind: str, batch: dict) -> None:
        ids = batch.get("corrupt_ids")
        if ids is not None and ids.numel():
            corrupt[kind].update(int(i) for i in ids.flatten().tolist() if i >= 0)

    say(f"{name}: {cfg.max_iters} steps, B={cfg.B} S={cfg.S} N={cfg.N} crop {cfg.crop_size}, {world} process(es) "
        f"on {device}, amp {cfg.amp}, data {cfg.dataset} ({len(base)} items)")

    def save(at: int) -> None:
        if not main_proc:
            return
        extra = {"rng": rng_state(), "nan_steps": nan_total, "config": json.dumps(asdict(cfg)),
                 "loss_t": [float(v) for v in losses], "d_t": [float(v) for v in d_ts],
                 "d_v": [float(v) for v in d_vs], "corrupt_clips": sorted(corrupt["train"]),
                 "corrupt_val_clips": sorted(corrupt["val"])}
        try:
            ck.save(ckpt_dir, at, net, optimizer, scheduler, keep_latest=cfg.keep_latest, extra=extra)
        except OSError as e:
            # ck.save removed its temp file and left every earlier checkpoint in place
            why = "no space left on device" if is_space_error(e) else (e.strerror or str(e))
            fail(f"cannot save {ckpt_dir / ck.ckpt_name(at)}: {why}")

    while step < cfg.max_iters:
        step += 1
        t0 = time.time()
        rtime, total_loss, finite, figures = 0.0, 0.0, True, None
        for micro in range(cfg.grad_acc):
            tr = time.time()
            if cfg.cache_len and len(cache) >= cfg.cache_len:
                batch = cache[int(torch.randint(len(cache), (1,), generator=step_generator(cfg.seed, step, micro,
                                                                                          rank)))]
            else:
                batch = next(loader)
                note_corrupt("train", batch)
                if cfg.cache_len:
                    cache.append(batch)
            rtime += time.time() - tr
            gen = step_generator(cfg.seed, step, micro, rank)
            loss, final, seen = forward_loss(model, batch, device, cfg.iters, gen, cfg.amp)
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                scaler.scale(loss / cfg.grad_acc).backward()
                total_loss += loss.item() / cfg.grad_acc
            if micro == 0 and main_proc:
                shown = (seen["rgbs"][0], seen["trajs"][0], final[0].detach())
                figures = batch_figures(final.detach().float(), seen["trajs"], seen["visibs"], seen["valids"],
                                        tuple(seen["rgbs"].shape[-2:]))
        if any_rank(not finite, world, device):
            optimizer.zero_grad(set_to_none=True)
            nan_total += 1
            nan_run += 1
            say(f"{name}; step {step:06d}/{cfg.max_iters}; non-finite loss, step skipped ({nan_total} so far)")
            if nan_run >= cfg.max_nan_steps:
                save(step)
                msg = (f"{name}: {nan_run} non-finite losses in a row at step {step}; stopped and saved "
                       f"{ckpt_dir / ck.ckpt_name(step)} (try a lower --lr or --amp=none)")
                if world > 1:
                    dist.destroy_process_group()
                raise SystemExit(msg)
            continue
        nan_run = 0
        optimizer_update(model, optimizer, scheduler, scaler)
        itime = time.time() - t0

        losses.append(total_loss)
        if figures is not None:
            d_ts.append(figures["d_avg"])
        if val_iter is not None and (step % cfg.val_freq == 0 or step == 1):
            v = validate(model, val_iter, cfg, device, lambda b: note_corrupt("val", b))
            d_vs.append(v["d_avg"])
            if writer:
                for k, val in v.items():
                    writer.add_scalar(f"val/{k}", val, step)
        if cfg.tapvid_root and cfg.eval_dataset == "davis" and step % cfg.val_freq == 0 and main_proc:
            v = validate_tapvid(model, cfg, device)
            d_vs.append(v["d_avg"])
            if writer:
                for k, val in v.items():
                    writer.add_scalar(f"davis/{k}", val, step)
        d_v = float(np.mean(d_vs)) if d_vs else float("nan")
        say(f"{name}; step {step:06d}/{cfg.max_iters}; rtime {rtime:.2f}; itime {itime:.2f}; loss {total_loss:.3f}; "
            f"loss_t {np.mean(losses):.3f}; d_t {np.mean(d_ts) if d_ts else float('nan'):.1f}; d_v {d_v:.1f}")
        if writer and (step % cfg.log_freq == 0 or step == 1):
            writer.add_scalar("train/loss", total_loss, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("data/corrupt_clips_skipped", len(corrupt["train"]) + len(corrupt["val"]), step)
            for k, val in (figures or {}).items():
                writer.add_scalar(f"train/{k}", val, step)
            if step % (cfg.log_freq * 10) == 0 or step == 1:
                from utils.vis import summary_image

                rgb0, trajs0, est0 = shown
                frames = rgb0.detach().permute(0, 2, 3, 1).cpu().numpy().clip(0, 255).astype(np.uint8)
                img = summary_image(frames, trajs0.cpu().numpy(), est0.float().cpu().numpy())
                writer.add_image("train/tracks", img, step, dataformats="HWC")
        if step % cfg.save_freq == 0 or step == cfg.max_iters:
            save(step)
    if world > 1:  # each rank met its own corrupt clips
        gathered: list = [None] * world
        dist.all_gather_object(gathered, corrupt)
        corrupt = {k: set().union(*(g[k] for g in gathered)) for k in corrupt}
    n_corrupt = len(corrupt["train"]) + len(corrupt["val"])
    if writer:
        writer.add_scalar("data/corrupt_clips_skipped", n_corrupt, step)
        writer.close()
    say(f"{name}: done, {step} steps, {nan_total} skipped for non-finite loss, {n_corrupt} corrupt clips skipped; "
        f"checkpoints in {ckpt_dir}")
    if world > 1:
        dist.barrier()
    return ckpt_dir, net


def _latest_stage1(ckpt_dir: str) -> str | None:
    runs = [p for p in Path(ckpt_dir).glob("stage1_*") if ck.list_checkpoints(p)]
    return str(max(runs, key=lambda p: p.stat().st_mtime)) if runs else None


def make_config(stage: int, flags: dict) -> Config:
    """Stage defaults, then every flag the user set."""
    known = {f.name for f in fields(Config)}
    unknown = set(flags) - known
    if unknown:
        raise ValueError(f"unknown flags: {sorted(unknown)}")
    values = {**STAGE_DEFAULTS[stage], **{k: v for k, v in flags.items() if v is not None}, "stage": stage}
    values["crop_size"] = parse_hw(values["crop_size"], "crop_size")
    h, w = values["crop_size"]
    if h < 128 or w < 128:
        raise ValueError(f"crop_size must be at least 128x128, got {h}x{w}")
    amp_dtype(values.get("amp", "none"))  # one clear line for an unknown --amp
    return Config(**values)


def main(stage: int = 1, stages: str | None = None, **flags) -> None:
    """Train one stage (--stage) or several in sequence (--stages=1,2; stage 2 starts from stage 1).

    A flag applies to every stage; `--stage2_<flag>=...` applies to stage 2 only (e.g. --stage2_S=64).
    """
    if stages is None:
        order = [int(stage)]
    elif isinstance(stages, (tuple, list)):
        order = [int(s) for s in stages]
    else:
        order = [int(s) for s in str(stages).split(",") if s]
    prev = None
    for st in order:
        prefix = f"stage{st}_"
        stage_flags = {k: v for k, v in flags.items() if not k.startswith("stage")}
        stage_flags.update({k[len(prefix):]: v for k, v in flags.items() if k.startswith(prefix)})
        if st == 2 and not stage_flags.get("init_dir"):
            stage_flags["init_dir"] = prev or _latest_stage1(stage_flags.get("ckpt_dir", Config.ckpt_dir))
            if not stage_flags["init_dir"]:
                fail("stage 2 starts from a stage-1 checkpoint: pass --init_dir or run --stages=1,2")
        try:
            cfg = make_config(st, stage_flags)
        except ValueError as e:
            fail(str(e))
        prev = str(run_stage(cfg)[0])


if __name__ == "__main__":
    try:
        fire.Fire(main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
