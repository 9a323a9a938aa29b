"""The training run in parts: processes, train state (save/resume), data, step, logger, validator, the loop.

`run_stage(cfg)` trains one stage of PIPs++ (--model=pips2) or LBM (--model=lbm, one stage). What a step computes
is in pips2/train_step.py; the flags and the stage defaults are train.py's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import queue
import random
import re
import secrets
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader

from pips2 import evaluation
from pips2.datasets.exportdataset import CorruptClipWarning, ExportDataset
from pips2.datasets.kubric import KubricDataset
from pips2.datasets.tapvid import load_tapvid
from pips2.datasets.training import DataGoneError, OrdinalDataset, OrdinalSampler, Sample
from pips2.hub import load_into
from pips2.nets.lbm import LBM
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.train_step import (
    batch_figures,
    forward_loss,
    lbm_figures,
    lbm_forward_loss,
    optimizer_update,
    step_generator,
    warmup_cosine,
)
from pips2.utils import checkpoint as ck
from pips2.utils import metrics, plots
from pips2.utils.amp import amp_dtype, autocast
from pips2.utils.cli import die
from pips2.utils.paths import make_dirs, output_folder_problem, pinned_folder, printable
from pips2.utils.procs import (
    STOP_SIGNALS,
    caught_stop_signals,
    detach_from_closed_terminal,
    die_with_parent,
    ending_at_once_on_stop,
    error_line,
    is_space_error,
    os_error_in,
    out_of_memory,
    raise_stop,
)
from pips2.utils.vis import summary_image


@dataclass
class Config:
    """Every flag of a training run; train.py fills the first eight from its stage (or LBM) defaults."""

    stage: int
    B: int
    S: int
    N: int
    crop_hw: tuple[int, int]  # the training crop (H, W): the flag --crop_size
    iters: int  # PIPs++'s refinement iterations per forward pass (validation uses twice as many); unused by LBM
    lr: float
    max_steps: int  # optimiser steps of the stage (the authors' flag: --max_iters)
    use_augs: bool = True
    shuffle: bool = True
    dataset: str = "pod_export"
    dataset_location: str = "./pod_export"
    dataset_version: str | None = None
    val_dataset_version: str | None = None
    movi_f_root: str | None = None
    tapvid_root: str | None = None
    eval_dataset: str | None = None  # "davis": validate on the first --eval_videos videos of --tapvid_root
    eval_videos: int = 5
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
    # float32: keep only convolution outputs for backward (~half the memory); None: on where it is as fast (CPU)
    recompute_cheap: bool | None = None
    max_nan_steps: int = 20
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    exp_name: str = ""
    quiet: bool = False
    model: str = "pips2"  # pips2 or lbm
    wd: float = 1e-6  # AdamW weight decay (the authors' flag name for LBM; LBM's default is 1e-5)
    grad_clip: float = 5.0  # gradient-norm clip (LBM's default is 1.0)
    # LBM only: its input_hw is crop_hw, its N and T are N and S
    memory_size: int = 12
    embed_dim: int = 256
    backbone_init: str | None = None  # torchvision resnet18 state_dict (ImageNet weights)

    @property
    def lbm(self) -> bool:
        """Whether the run trains LBM."""
        return self.model == "lbm"

    @property
    def layout(self) -> ck.Layout:
        """The key layout of this run's checkpoints."""
        return ck.LBM_LAYOUT if self.lbm else ck.PIPS_LAYOUT

    def name(self) -> str:
        """The run's folder name under ckpt_dir and log_dir."""
        h, w = self.crop_hw
        if self.lbm:
            base = f"lbm_{self.B}x{self.S}x{self.N}_{h}x{w}_m{self.memory_size}_c{self.embed_dim}_lr{self.lr:g}"
        else:
            base = f"stage{self.stage}_{self.B}x{self.S}x{self.N}_{h}x{w}_i{self.iters}_lr{self.lr:g}"
        return base + (f"_{self.exp_name}" if self.exp_name else "")


RUN_ID = re.compile(r"[0-9a-f]{16}")  # a run's id in its checkpoints (secrets.token_hex(8))
DDP_TIMEOUT = datetime.timedelta(hours=3)  # longest a rank waits for the others in one collective
fail = die  # one error line, exit 2: bad input or a run that cannot go on safely


# ---------------------------------------------------------------------------------------------------------
# Processes.


def launch_environment() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them (0, 1, 0 without it), each checked: one line and exit 2
    for a value that is no whole number, a rank outside the world, or a world of several processes without the
    rendezvous address. A RANK left in the shell by an earlier launch made a lone process a silent non-main rank:
    it trained to the end, saved nothing and exited 0."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "").strip()
        if not text:
            values[name] = default
            continue
        if not re.fullmatch(r"[0-9]{1,6}", text):
            fail(f"the environment's {name}={text[:40]!r} is not a whole number (torchrun sets it: unset it to train "
                 f"in one process)")
        values[name] = int(text)
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or rank >= world or local >= world:
        fail(f"the environment's RANK={rank}, LOCAL_RANK={local} and WORLD_SIZE={world} do not fit (a rank from 0 to "
             f"WORLD_SIZE - 1; WORLD_SIZE is 1 when unset): left from another launch? unset them to train in one "
             f"process, or start several with torchrun (README.md, train.py)")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(v)]
    if missing:
        fail(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start "
             f"several processes with torchrun, which sets them (or unset WORLD_SIZE to train in one process)")
    return rank, world, local


@dataclass
class Ranks:
    """This process's place in the run (rank, world size, device) and what the ranks do together."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def setup(cls, device: str) -> Ranks:
        """Read torchrun's environment (one process without it) and initialise the process group."""
        rank, world, local = launch_environment()
        dev = ck.resolve_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            # a lone process of a launch whose others never come waited here without a word (every rank says it:
            # any of them may be the lone one)
            print(f"{f'rank {rank}: ' if rank else ''}waiting for the {world} processes of this run to meet at "
                  f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} (WORLD_SIZE={world}); a stop "
                  f"signal ends the wait", file=sys.stderr, flush=True)
            # the other ranks wait in their next collective while rank 0 validates on TAP-Vid, which on a CPU
            # can outlast the default 30 minutes; the meeting itself waits in C++, deaf to this program's stop
            # handlers, and nothing is made yet that a stop would need to save
            with ending_at_once_on_stop():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DDP_TIMEOUT)
        return cls(rank, world, dev)

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs, saves and holds the lock."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max(self, value: int) -> int:
        """The largest of `value` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def die(self, msg: str, code: int = 2) -> NoReturn:
        """Exit 2 (bad input; 1 for this machine's error) on every rank; rank 0 says why in one line."""
        if self.main:
            fail(msg, code)
        raise SystemExit(code)

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def union(self, sets: dict[str, set]) -> dict[str, set]:
        """Each set united over the ranks."""
        if self.world == 1:
            return sets
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, sets)
        return {k: set().union(*(g[k] for g in gathered)) for k in sets}

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            barrier()


_LAST_BARRIER: list = []


def barrier() -> None:
    """dist.barrier() that is safe as the last collective before the process exits."""
    work = dist.barrier(async_op=True)
    assert work is not None  # what async_op=True returns
    work.wait()
    # A gloo barrier keeps the collectives it waited for, and their tensors, until it is freed. Freed by gloo's
    # worker thread, the tensors' release needs the GIL; if the interpreter is finalising by then, that thread is
    # killed inside a C++ destructor and the rank aborts (SIGABRT) after all its work is done (seen in 1 run of
    # ~15). Holding the last barrier here leaves its release to the main thread.
    _LAST_BARRIER[:] = [work]


@contextmanager
def run_lock(ckpt_dir: Path, ranks: Ranks) -> Iterator[None]:
    """Rank 0 holds the checkpoint folder's lock for the block, so a second run into the same folder refuses to
    start instead of interleaving checkpoints with this one; temps of killed writers are removed first."""
    lock = ck.RunLock(ckpt_dir)
    err = None
    if ranks.main:
        try:
            lock.acquire()
        except ck.LockError as e:
            err = str(e)
        except OSError as e:
            err = f"cannot make or lock the run folder {ckpt_dir} ({e.strerror or type(e).__name__})"
    # every rank stops together, or the others would wait forever for rank 0 in the first collective
    if ranks.any(err is not None):
        ranks.die(err or "")
    try:
        if ranks.main:
            for p in ck.clean_stale_temps(ckpt_dir, lock_held=True):
                print(f"removed {p}: temp file of an interrupted checkpoint write", flush=True)
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------
# Signals: a scheduler's SIGTERM before preemption, a user's Ctrl-C.

# torchrun passes the signal it gets on to every rank, which a terminal's Ctrl-C has reached already: two copies
# this close together are one request
SAME_REQUEST_S = 1.0


class TrainingStopped(SystemExit):
    """The run stopped on a signal at a step boundary, its state saved: exit 0 (the same command resumes)."""

    def __init__(self):
        super().__init__(0)


class StoppedAtOnce(BaseException):
    """A second Ctrl-C during a step: stop now, without saving (the run resumes from its last checkpoint)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StoppedWaitingForData(BaseException):
    """A stop request while a one-process run waits for a batch of a step or of its validation: the run stops at
    once at the step boundary before that wait, as the step's optimiser update has not run or has been saved (a
    loader worker that no longer answers, or a data disk that hangs, would keep it waiting for ever, deaf to the
    scheduler's SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StoppedLosingNothing(BaseException):
    """A stop request during the first step since the last save (or the start) of a one-process run: that step is
    abandoned at once, as nothing it has not finished is lost (the run resumes from that save)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGTERM, SIGINT and SIGHUP as a request to stop at the next step boundary (the loop saves there and exits 0).

    The handler only notes the signal: what a step does is never cut short, so the checkpoint written is
    the one a regular save at that step writes. A further SIGTERM changes nothing (a scheduler that will not
    wait kills with SIGKILL); a further Ctrl-C at least SAME_REQUEST_S later stops at once without saving,
    except while a checkpoint is being written, which always completes. While `lossless` (the step in progress
    is the first since the last save, in a one-process run) the first request stops at once: waiting for the
    boundary would only add a step to save, and a first step that never ends (a batch too large for the
    machine) would never reach it.
    """

    def __init__(self):
        self.signum = 0
        self.first_at = 0.0
        self.writing = False
        self.lossless = False
        self.waiting = False  # for a batch, in a one-process run, before the step's update or after its save
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}  # what signal.signal returned

    def install(self) -> None:
        """Catch STOP_SIGNALS (main thread only: elsewhere Python cannot, and they keep their handlers). A signal
        ignored by whoever started the run stays ignored (a shell's background job ignores SIGINT)."""
        if threading.current_thread() is threading.main_thread():
            for sig in caught_stop_signals():
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers install() replaced."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        detach_from_closed_terminal(signum)  # a closed terminal: the step line and the stop line must not fail
        now = time.monotonic()
        if not self.signum:
            self.signum, self.first_at = signum, now
            if self.lossless and not self.writing:
                raise_stop(signum, StoppedLosingNothing(signum))
            if self.waiting and not self.writing:
                raise_stop(signum, StoppedWaitingForData(signum))
        elif signum == signal.SIGINT and not self.writing and now - self.first_at >= SAME_REQUEST_S:
            raise_stop(signum, StoppedAtOnce(signum))

    @contextmanager
    def waiting_for_data(self, ranks: Ranks, already: bool = False) -> Iterator[None]:
        """While a one-process run waits for a batch, a stop request stops it there at once; with `already`, so
        does one that came before the wait (in a step's earlier micro-batches: the request would be heard again
        only at the boundary, which a loader that no longer answers keeps from coming)."""
        self.waiting = ranks.world == 1  # several ranks stop together, at a boundary (a collective)
        if self.waiting and already and self.signum and not self.writing:
            self.waiting = False
            raise StoppedWaitingForData(self.signum)
        try:
            yield
        finally:
            self.waiting = False

    def agreed(self, ranks: Ranks) -> int:
        """The signal every rank stops for (0: go on); a collective, so every rank asks at the same step."""
        return ranks.max(self.signum)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """A block no signal interrupts (a checkpoint being written)."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False


def loader_worker_init(worker_id: int, parent: int | None = None) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the training process, which stops at a step boundary and
    then shuts them down: a worker killed by a terminal's Ctrl-C or a scheduler's SIGTERM to the process group
    would fail the step in progress instead. They end with the training process (`parent`) however it ends: one
    stopped while it still starts them, or killed, cannot shut them down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if parent is not None:
        die_with_parent(parent)


# ---------------------------------------------------------------------------------------------------------
# Train state: everything a checkpoint holds, and saving and resuming it.


def build_model(cfg: Config, device: torch.device) -> Pips | LBM:
    """A fresh Pips or LBM on `device`, set up for training (CheckpointError for a bad --backbone_init)."""
    if cfg.lbm:
        return LBM(input_size=cfg.crop_hw, N=cfg.N, T=cfg.S, memory_size=cfg.memory_size, embed_dim=cfg.embed_dim,
                   backbone_init=cfg.backbone_init).to(device)
    dtype = amp_dtype(cfg.amp) or torch.float32  # the dtype the convolutions run in picks the layout
    model = Pips(ExecPlan.auto(device, dtype, training=True, checkpointing=cfg.grad_ckpt,
                               recompute_cheap=cfg.recompute_cheap, points=cfg.B * cfg.N, crop_hw=cfg.crop_hw))
    return model.to(device)


def rng_state() -> dict:
    """Global RNG states in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


MAX_SCHEDULE = 10**9  # steps: a schedule's end beyond any run (the authors' stage 1 is 200,000)


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within rounding, in nested lists and dicts (a schedule's state as saved and as rebuilt)."""
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, dict) and isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    return type(a) is type(b) and a == b


def _finite(v: Any) -> float:
    """A saved running figure: a float, or ValueError."""
    f = float(v)
    if not np.isfinite(f):
        raise ValueError(f"{v!r} is not finite")
    return f


def _count(v: Any) -> int:
    """A saved count or clip index: a non-negative int, or ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{v!r} is not a count")
    return int(v)


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    random.setstate((state["python_version"], tuple(state["python"]), None))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


# settings a run's folder name does not hold but its results depend on: resuming with other values mixes two
# set-ups in one run, so it is said (the name holds stage, B, S, N, crop, iters, lr and --exp_name)
RESUME_SETTINGS = ("max_steps", "amp", "dataset", "dataset_location", "dataset_version", "use_augs", "shuffle",
                   "grad_acc", "cache_len", "seed", "wd", "grad_clip", "memory_size", "embed_dim")


def saved_settings(saved_config: Any) -> dict:
    """The settings a checkpoint says its run was saved with (its 'config', JSON text), {} when it holds none that
    parse to an object: the file is untrusted, and a list there broke the lookups."""
    try:
        saved = json.loads(saved_config) if isinstance(saved_config, str) else {}
    except (ValueError, RecursionError):
        return {}
    return saved if isinstance(saved, dict) else {}


def resume_warnings(cfg: Config, saved_config: str | None, step: int, world: int = 1,
                    saved_world: int | None = None) -> list[str]:
    """What a resume of a run saved with `saved_config` (its checkpoint's JSON) at `step` should tell the user:
    settings that changed since, a change in the number of processes, and a run already at or past --max_steps
    (nothing would be trained)."""
    out = []
    saved = saved_settings(saved_config)
    now = json.loads(json.dumps(asdict(cfg)))
    changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
    if changed:
        out.append(f"resuming a run saved with {', '.join(changed)}; for a separate run give --exp_name")
    if saved_world is not None and saved_world != world:  # --B is per process
        out.append(f"the run was trained by {saved_world} process(es), now {world}: its batch of {cfg.B} per process "
                   f"makes {cfg.B * world} clips per step instead of {cfg.B * saved_world}")
    if step >= cfg.max_steps:
        out.append(f"the run is at step {step}, at or past --max_steps={cfg.max_steps}: nothing to train (for a new "
                   f"run give --exp_name; --init_dir=<its folder> starts from its weights)")
    return out


def saved_init_dir(saved_config: str | None) -> tuple[bool, Any]:
    """Whether a checkpoint's settings (its JSON) say which --init_dir its run started from, and that value."""
    saved = saved_settings(saved_config)
    return "init_dir" in saved, saved.get("init_dir")


def init_dir_problem(given: str | None, before: Any, run_dir: Path, step: int) -> str | None:
    """Why resuming the run in `run_dir`, which started from --init_dir=`before`, would ignore the --init_dir
    `given` (None when it would not): its continuation is not the run from `given` the user asked for. The same
    --init_dir (a requeued job's command) or one inside the run folder resumes."""
    if not given or given == before:
        return None

    def place(p: object) -> Path | None:
        try:
            return Path(str(p)).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None

    here, run = place(given), place(run_dir)
    if here is not None and (before is not None and here == place(before) or here == run or run in here.parents):
        return None
    return (f"{run_dir} holds a run at step {step} that started from --init_dir={before}; --init_dir={given} "
            f"would be ignored by resuming it: give --exp_name=<a new name> for a new run from {given}, or leave "
            f"--init_dir out to resume")


def make_optimizer(params: Any, cfg: Config) -> torch.optim.AdamW:
    """The optimiser of a run: AdamW at --lr and --wd."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd, eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int | None = None
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of a run: LBM's warm-up then cosine; PIPs++'s one cycle (linear, 10 % up) ending
    100 steps after --max_steps, or at `total_steps` (a resumed run keeps the end it started with)."""
    if cfg.lbm:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.max_steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps or cfg.max_steps + 100, pct_start=0.1, cycle_momentum=False,
        anneal_strategy="linear")


# the parts of a schedule's state fixed when its run starts (its step and rates move on)
SCHEDULE_FIXED = ("total_steps", "_schedule_phases", "_anneal_func_type", "cycle_momentum", "use_beta1", "base_lrs")
SCHEDULE_RATES = ("initial_lr", "max_lr", "min_lr")  # what a one-cycle schedule keeps in the optimiser's groups


class TrainState:
    """Model, optimiser, schedule, scaler, step and running figures: built fresh, resumed or initialised from
    --init_dir, and saved (rank 0) with the extras that make a resumed run print what an uninterrupted one would."""

    def __init__(self, cfg: Config, ranks: Ranks, ckpt_dir: Path, say: Callable[..., None],
                 stop: StopRequest | None = None):
        self.cfg, self.ranks, self.ckpt_dir = cfg, ranks, ckpt_dir
        self.stop = stop or StopRequest()
        self.updating = False  # the optimiser is changing the weights: a step cut short here cannot be saved
        self.updated = -1  # the last step whose weight update completed
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        try:
            self.net = build_model(cfg, ranks.device)
        except ck.CheckpointError as e:
            ranks.die(str(e))
        self.optimizer = make_optimizer(self.net.parameters(), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(ranks.device.type, enabled=cfg.amp == "fp16")
        self.origin = cfg.init_dir  # the --init_dir the run started from, saved with its settings
        self.run_id = secrets.token_hex(8)  # saved in every checkpoint: a resume can tell another run's apart
        self.step, extras, self.loaded_from = self._load(say)
        self._apply_extras(extras)
        self.model = self.net
        if ranks.world > 1:
            # LBM's last layer's reference-point head gets no loss (as the authors'), hence unused parameters
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
                find_unused_parameters=cfg.lbm)
        self.model.train()

    def _apply_extras(self, extras: dict) -> None:
        """Restore the RNG states, running means and counters a checkpoint carries; one that is not what this
        program saves ends the run in one line naming the file and the key (exit 2), not a traceback."""
        cfg, key = self.cfg, "rng"
        try:
            if "rng" in extras:
                set_rng_state(extras["rng"])
            # the running means continue across a resume: a resumed run prints what an uninterrupted one would
            key = "loss_t"
            self.losses = deque((_finite(v) for v in extras.get("loss_t", [])), maxlen=cfg.log_freq)
            key = "d_t"
            self.d_ts = deque((float(v) for v in extras.get("d_t", [])), maxlen=cfg.log_freq)
            key = "d_v"
            self.d_vs = deque((float(v) for v in extras.get("d_v", [])), maxlen=10)
            key = "nan_steps"
            self.nan_total, self.nan_run = _count(extras.get("nan_steps", 0)), 0
            # dataset indices of clips skipped as corrupt; a DataLoader worker's own counters never reach this
            # process, so every sample carries the clips skipped while producing it (`corrupt_ids`)
            key = "corrupt_clips"
            self.corrupt = {"train": {_count(i) for i in extras.get("corrupt_clips", [])}, "val": set()}
            key = "corrupt_val_clips"
            self.corrupt["val"] = {_count(i) for i in extras.get("corrupt_val_clips", [])}
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError) as e:
            self.ranks.die(f"{self.loaded_from}: its '{key}' is not what this program saves ({e}); move the file "
                           f"aside to resume from the checkpoint before it")

    def _load(self, say: Callable[..., None]) -> tuple[int, dict, Path | None]:
        """Resume from the run's folder, else start from --init_dir, else fresh: (step, the checkpoint's extras,
        its file)."""
        cfg, main = self.cfg, self.ranks.main
        step, loaded, path = 0, {}, None  # loaded: the checkpoint whose step is resumed
        ignore = tuple(p for p in (cfg.ignore_load or "").split(",") if p)
        if not cfg.resume and (held := ck.list_checkpoints(self.ckpt_dir)):
            # a new run there overwrote the old one's checkpoints of the same steps and left its later ones newest:
            # the next plain rerun resumed the old run and dropped the new one's steps
            self.ranks.die(f"{self.ckpt_dir} holds an earlier run's checkpoints (the newest {held[-1][1].name}); "
                           f"--resume=False would mix a new run into them: give --exp_name=<a new name> for a "
                           f"separate run, or move that folder aside")
        if cfg.resume and ck.list_checkpoints(self.ckpt_dir):
            if foreign := ck.foreign_checkpoints(self.ckpt_dir):
                p, uid = foreign[-1]
                self.ranks.die(f"{p}: a checkpoint of uid {uid}, not this user's: a run never resumes from a file "
                               f"another user put in its folder; move it aside (or give another --ckpt_dir)")
            if changeable := ck.changeable_checkpoints(self.ckpt_dir):
                p, mode = changeable[-1]
                self.ranks.die(f"{p}: others may write to it (mode {mode:03o}): whoever may could have rewritten it "
                               f"in place, and a run never resumes from such a file; if nobody did, `chmod go-w "
                               f"{self.ckpt_dir}/model-*.pth` and rerun (this program writes none such now)")
            bad: list[tuple[Path, ck.CheckpointError]] = []
            try:
                found = ck.read_newest(self.ckpt_dir, on_bad=lambda path, e: bad.append((path, e)), rename=main,
                                       layout=cfg.layout)
            except ck.CheckpointError as e:  # a checkpoint this machine cannot read now: set nothing aside
                self.ranks.die(f"{e}; nothing was set aside, rerun once it can be read", code=1)
            if found is None:
                self.ranks.die(f"{self.ckpt_dir}: no readable checkpoint to resume from ({len(bad)} unreadable, "
                               f"kept as *.bad)")
            path, loaded = found
            self._check_belongs(path, loaded)
            said_origin, origin = saved_init_dir(loaded.get("config"))
            if said_origin:
                problem = init_dir_problem(cfg.init_dir, origin, self.ckpt_dir, ck.step_of(path))
                if problem is not None:
                    self.ranks.die(problem)
                self.origin = origin  # a resume without --init_dir still records where the run started
            if main:
                for b, e in bad:
                    reason = str(e).removeprefix(f"{b}: ")
                    print(f"{b}: unreadable ({reason}); resuming from {path} (kept it as {b.name}.bad)",
                          file=sys.stderr, flush=True)
            try:
                ck.apply_checkpoint(loaded, path, self.net, self.optimizer, self.scheduler, ignore_prefixes=ignore,
                                    layout=cfg.layout)
            except ck.CheckpointError as e:
                self.ranks.die(str(e))
            step = ck.step_of(path)
            try:
                if cfg.lbm and loaded.get("scaler"):  # empty when saved without fp16: the fresh scale then
                    self.scaler.load_state_dict(loaded["scaler"])
            except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
                self.ranks.die(f"{path}: its 'scaler' is not what this program saves ({e}); move the file aside to "
                               f"resume from the checkpoint before it")
            done = self.scheduler.last_epoch  # one scheduler step per training step (fewer after skipped ones)
            if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= step:
                self.ranks.die(f"{path}: its learning-rate schedule is at step {done!r}, not one of steps 0 to {step} "
                               f"that its name allows; move the file aside to resume from the checkpoint before it")
            self._check_schedule(path, step)
            self._check_groups(path, loaded.get("config"))
            say(f"loaded {path} (step {step}); resuming at step {step}")
            end = getattr(self.scheduler, "total_steps", None)  # PIPs++'s one-cycle schedule, as restored
            # its last step is end - 1: a step to `end` extrapolates the one cycle to a negative rate, which the
            # next resume then refused as a bad file
            if end is not None and cfg.max_steps >= end:
                self.ranks.die(f"{path}: --max_steps={cfg.max_steps} runs past the end of the run's learning-rate "
                               f"schedule (step {end}, set when it started); resume with --max_steps={end - 1} or "
                               f"less, or train on from its weights in a new run: --exp_name=<name> "
                               f"--init_dir=<its folder>")
            said = resume_warnings(cfg, loaded.get("config"), step, self.ranks.world, loaded.get("world"))
            if main:
                for line in said:
                    print(f"warning: {path}: {line}", file=sys.stderr, flush=True)
        elif cfg.init_dir:
            opt = (self.optimizer, self.scheduler) if cfg.load_optimizer else (None, None)
            try:  # the one loader's rules: a hub name, a file, or a folder; the model kind checked, not guessed
                path, init = load_into(self.net, cfg.init_dir, "lbm" if cfg.lbm else "pips2", *opt,
                                       ignore_prefixes=ignore)
            except ck.CheckpointError as e:
                self.ranks.die(str(e))
            if cfg.load_step:
                step, loaded = ck.step_of(path), init
            if cfg.load_optimizer:  # the same checks as a resume's: this path crashed on a schedule's end
                self._check_loaded_schedule(path, init, step)
            say(f"loaded {path} (step {ck.step_of(path)}){'; resuming at step ' + str(step) if cfg.load_step else ''}")
        # the weights are in place: keep only the extras
        layout = self.cfg.layout
        parts = {layout.model, layout.optimizer, layout.scheduler, "scaler"}
        return step, {k: v for k, v in loaded.items() if not k.endswith("_state_dict") and k not in parts}, path

    def _check_belongs(self, path: Path, loaded: dict) -> None:
        """The checkpoint to resume is this run's own at the step its name says: the step it records is its name's,
        and the run it records is that of the checkpoint before it. In a folder others may write to (umask 002),
        a group member could move in the user's own checkpoint of another run under a later step's name: it was
        resumed, and the steps in between were skipped without a word. One line naming the file otherwise."""
        step, said = ck.step_of(path), loaded.get("step")
        if "step" in loaded and (isinstance(said, bool) or not isinstance(said, int) or said != step):
            self.ranks.die(f"{path}: it records step {str(said)[:40]}, its name step {step}: renamed, or moved in from "
                           f"another run's folder; move it aside to resume from the checkpoint before it")
        # the settings its folder's name is made of, which checkpoints of every version record: one moved in from
        # another run's folder names that run (the run id below is newer, and compares with a neighbour only)
        now = json.loads(json.dumps(asdict(self.cfg)))
        named = ("model", "B", "S", "N", "crop_hw", "lr", "exp_name") + (
            ("memory_size", "embed_dim") if self.cfg.lbm else ("stage", "iters"))
        def differ(ckpt: dict) -> list[str]:
            saved = saved_settings(ckpt.get("config"))
            return [f"{k}={str(saved[k])[:40]!r}" for k in named if k in saved and saved[k] != now[k]]

        if found := differ(loaded):
            oldest = ck.list_checkpoints(self.ckpt_dir)[0][1]
            try:
                renamed = oldest == path or bool(differ(ck.read_checkpoint(oldest, layout=self.cfg.layout)))
            except ck.CheckpointError:
                renamed = False
            if renamed:  # every checkpoint is of that run: moving them aside one by one would empty the folder
                self.ranks.die(f"{self.ckpt_dir}: its checkpoints were saved by a run of other settings "
                               f"({', '.join(found)}): this folder was renamed, or filled from that run's; rename it "
                               f"back, or train on from it in a new run: --exp_name=<a new name> "
                               f"--init_dir={self.ckpt_dir} --load_optimizer=True --load_step=True")
            self.ranks.die(f"{path}: saved by another run ({', '.join(found)}; this run's folder is "
                           f"{self.ckpt_dir.name}): moved in from that run's folder; move it aside to resume from the "
                           f"checkpoint before it")
        run = loaded.get("run")
        if run is not None and not (isinstance(run, str) and RUN_ID.fullmatch(run)):
            self.ranks.die(f"{path}: its run id {str(run)[:40]!r} is not one this program writes; move it aside to "
                           f"resume from the checkpoint before it")
        self.run_id = run or self.run_id  # a checkpoint of an older version has none: the run gets one now
        before = [p for s, p in ck.list_checkpoints(self.ckpt_dir) if s < step]
        if not before:
            return
        try:
            theirs = ck.read_checkpoint(before[-1], layout=self.cfg.layout).get("run")
        except ck.CheckpointError:  # an unreadable older file says nothing of this one
            return
        if isinstance(theirs, str) and run is None:  # older than its predecessor, or moved in
            self.ranks.die(f"{path} records no run id, and {before[-1].name} before it does: saved by a version of "
                           f"this program older than the one before it, or moved in from another run's folder; move it "
                           f"aside to resume from the checkpoint before it")
        if isinstance(theirs, str) and theirs != run:
            self.ranks.die(f"{path} and {before[-1].name} beside it are of two runs (their run ids differ): one was "
                           f"moved in from another run's folder; move the other run's checkpoint aside")

    def _check_schedule(self, path: Path, step: int) -> None:
        """The restored learning-rate schedule is one this program builds: PIPs++'s one-cycle end a whole number from
        `step` to MAX_SCHEDULE, and everything else as this program makes it for that end; one line naming the file
        otherwise (a string there ended the run in a traceback, 10**30 trained on silently)."""
        end = getattr(self.scheduler, "total_steps", None)
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or not step <= end <= MAX_SCHEDULE):
            self.ranks.die(f"{path}: its learning-rate schedule ends at step {str(end)[:40]}, not a whole number from "
                           f"its step, {step}, to {MAX_SCHEDULE}; move the file aside to resume from the checkpoint "
                           f"before it")
        # every other part as this program builds it for that end: phases from a file ending early divided by zero
        # or turned the rate negative or without bound a few steps after the resume
        ref_opt = make_optimizer([torch.zeros(1, requires_grad=True)], self.cfg)
        ref = make_scheduler(ref_opt, self.cfg, end)
        mine, theirs = ref.state_dict(), self.scheduler.state_dict()
        wrong = [k for k in SCHEDULE_FIXED if k in mine and not _same(theirs.get(k), mine[k])]
        wrong += [k for k in SCHEDULE_RATES for g in self.optimizer.param_groups
                  if k in ref_opt.param_groups[0] and not _same(g.get(k), ref_opt.param_groups[0][k])]
        if wrong:
            self.ranks.die(f"{path}: its learning-rate schedule is not the one this program builds for its run "
                           f"({', '.join(dict.fromkeys(wrong))} differ); move the file aside to resume from the "
                           f"checkpoint before it")

    def _check_loaded_schedule(self, path: Path, init: dict, step: int) -> None:
        """--init_dir with --load_optimizer: the schedule and optimiser it brings are checked as a resume's, and the
        steps this run will take must fit before its end (continuing a finished 2-step run trained 100 steps, then
        failed in a traceback, "Tried to step 103 times", with nothing saved)."""
        done = self.scheduler.last_epoch
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= MAX_SCHEDULE:
            self.ranks.die(f"{path}: its learning-rate schedule is at step {str(done)[:40]}; load it without "
                           f"--load_optimizer")
        self._check_schedule(path, done)
        self._check_groups(path, init.get("config"))
        end = getattr(self.scheduler, "total_steps", None)
        if end is None and self.cfg.lbm:
            end = self.cfg.max_steps + 1  # LBM's cosine reaches 0 at --max_steps and stays there: no steps past it
        if end is not None and done + (self.cfg.max_steps - step) >= end:  # one-cycle refuses its end-th step
            self.ranks.die(f"{path}: its learning-rate schedule (--load_optimizer) is at step {done} and ends at "
                           f"step {end}: the {self.cfg.max_steps - step} steps of this run go past its end; give "
                           f"--max_steps={step + end - done - 1} or less, or --load_optimizer=False for a new schedule")

    def _check_groups(self, path: Path, saved_config: Any) -> None:
        """The restored optimiser's settings are the ones this program gives AdamW: eps and betas its own, the
        weight decay the run was saved with (else --wd), the rate at most the schedule's peak; one line naming the
        file otherwise (a group's lr of 1e30 trained to weights of 1e30 and ended "done", exit 0; a weight decay or
        eps from the file silently replaced the flags)."""
        saved_wd = saved_settings(saved_config).get("wd")
        wd = float(saved_wd) if isinstance(saved_wd, (int, float)) else self.cfg.wd
        ref = make_optimizer([torch.zeros(1, requires_grad=True)], self.cfg).param_groups[0]
        peak = max(float(v) for v in self.scheduler.base_lrs) if self.cfg.lbm else \
            max(float(g.get("max_lr", self.cfg.lr)) for g in self.optimizer.param_groups)
        # every setting AdamW keeps in a group, as this run builds it (maximize=True resumed into gradient ascent,
        # exit 0; capturable=True failed inside torch), the weight decay the one the run was saved with
        wants: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in ref.items()
                                 if k not in ("params", "lr", *SCHEDULE_RATES)}
        wants["weight_decay"] = float(wd)
        if not (math.isfinite(wd) and wd >= 0 and peak * wd < 1):
            # the flag's rule (cli/train.check_values), for the decay the file says it was saved with: 1e4 passed
            # when its groups said the same, and AdamW's 1 - lr x wd shrank the weights to a quarter in 3 steps
            self.ranks.die(f"{path}: the run was saved with wd={wd:g}; with the schedule's peak rate {peak:g}, AdamW "
                           f"would scale the weights by 1 - lr x wd = {1 - peak * wd:g} a step, which must stay above "
                           f"0 and at most 1; move the file aside to resume from the checkpoint before it")
        for g, group in enumerate(self.optimizer.param_groups):
            have = {k: list(v) if isinstance(v := group.get(k), tuple) else v for k in wants}
            wrong = [f"{k} {group.get(k)!r} (this program's: {wants[k]!r})" for k in wants
                     if not _same(have[k], wants[k])]
            if not wrong and float(group.get("lr", 0.0)) > peak * (1 + 1e-6):
                wrong = [f"lr {group.get('lr')!r} (above the schedule's peak, {peak:g})"]
            if wrong:
                self.ranks.die(f"{path}: its optimizer's param_groups[{g}] holds {'; '.join(wrong)[:200]}; move the "
                               f"file aside to resume from the checkpoint before it")

    def note_corrupt(self, kind: str, batch: Sample) -> list[int]:
        """Remember the clips skipped as corrupt while producing a 'train' or 'val' batch; returns the new ones."""
        ids = {int(i) for i in batch.corrupt_ids.flatten().tolist() if i >= 0} - self.corrupt[kind]
        self.corrupt[kind] |= ids
        return sorted(ids)

    def record(self, res: StepResult) -> None:
        """Add a finished step to the running means."""
        self.nan_run = 0
        self.losses.append(res.loss)
        if res.figures is not None:
            self.d_ts.append(res.figures["d_avg"])

    def skip(self, say: Callable[..., None]) -> None:
        """Count a step skipped for a non-finite loss; after --max_nan_steps in a row, save and stop the run."""
        self.nan_total += 1
        self.nan_run += 1
        name, step = self.cfg.name(), self.step
        say(f"{name}; step {step:06d}/{self.cfg.max_steps}; non-finite loss, step skipped ({self.nan_total} so far)")
        if self.nan_run >= self.cfg.max_nan_steps:
            self.save()
            msg = (f"{name}: {self.nan_run} non-finite losses in a row at step {step}; stopped and saved "
                   f"{self.ckpt_dir / ck.ckpt_name(step)} (try a lower --lr or --amp=none)")
            if self.ranks.world > 1:
                barrier()  # every rank stops here together (the losses were agreed); see barrier()
                dist.destroy_process_group()
            raise SystemExit(msg)

    def stopped(self, signum: int, saved: bool, waiting: str = "") -> NoReturn:
        """End the run on a stop request, every rank together (rank 0 has saved if `saved`): one line, exit 0.
        `waiting`: what waited for a batch when the request came ("step 5", "step 4's validation")."""
        name, step = self.cfg.name(), self.step
        if self.ranks.main:
            how = signal.Signals(signum).name
            if saved and step >= self.cfg.max_steps:  # the run is complete: nothing of it is left to resume
                line = (f"{name}: stopped by {how} after its last step, {step:06d}/{self.cfg.max_steps}; saved "
                        f"{self.ckpt_dir / ck.ckpt_name(step)}; the run is complete (the same command goes on "
                        f"with any stage after it)")
            elif saved:
                line = (f"{name}: stopped by {how} at step {step:06d}/{self.cfg.max_steps}; saved "
                        f"{self.ckpt_dir / ck.ckpt_name(step)}; the same command resumes from there")
            else:
                line = f"{name}: stopped by {how} before step {step + 1}, nothing trained; the same command starts it"
            if waiting:
                line += f" (it came while {waiting} waited for its data)"
            # the reader of stdout is gone on SIGPIPE: the line goes where it can still be read
            print(line, file=sys.stderr if signum == getattr(signal, "SIGPIPE", None) else sys.stdout, flush=True)
        self.ranks.barrier()  # no rank leaves before rank 0's checkpoint is complete
        raise TrainingStopped()

    def data_failed(self, e: DataFailed, saved: bool, exit_within: float | None = None) -> NoReturn:
        """End the run because a batch could not be read: save the steps trained (if any since the start), then
        one error line and exit 2 on every rank; an unexpected error is raised again after the save. With
        `exit_within`, the process ends that many seconds after the save whatever its shutdown does."""
        if saved:
            self.save()
        if exit_within is not None:
            _exit_within(exit_within)
        where = (f"saved {self.ckpt_dir / ck.ckpt_name(self.step)} (step {self.step}); the same command resumes "
                 f"from there once the data is readable" if saved else "nothing trained since the start, nothing saved")
        self.ranks.barrier()  # no rank leaves before rank 0's checkpoint is complete
        if e.error is None or isinstance(e.error, DataGoneError) or LOADER_WORKER_DIED.search(str(e.error)):
            self.ranks.die(f"{e}; {where}")
        # not a known data problem: said in one line, then its traceback (a bug, or a loader worker killed)
        if self.ranks.main:
            print(f"error: reading the data of step {self.step + 1} failed ({e}); {where}", file=sys.stderr,
                  flush=True)
        raise e.error

    def worker_died(self, e: RuntimeError, start: int) -> NoReturn:
        """A DataLoader worker was killed (the OOM killer's usual pick): torch raises that from its SIGCHLD handler
        wherever the training process is. Save the last step whose update completed, one line, exit 2; a step cut
        short while the optimiser changed the weights leaves a mix of two steps, so nothing is saved then."""
        why = " ".join(str(e).split()).rstrip(".")
        if self.updating:
            _exit_within(DEAD_WORKER_EXIT_S)
            self.ranks.die(f"{why} (out of memory?) while the weights were being updated; nothing saved, the "
                           f"same command resumes from the last checkpoint")
        if self.updated != self.step:  # the step in progress never changed the weights: it did not happen
            self.step -= 1
            self.optimizer.zero_grad(set_to_none=True)
        self.data_failed(DataFailed(None, [f"{why} (out of memory?)"]), saved=self.step > start,
                         exit_within=DEAD_WORKER_EXIT_S)

    def save(self) -> None:
        """Write the checkpoint of the current step (rank 0); a failed write is one error line and exit 2.
        No signal interrupts it. Weights that are not finite are never saved: the run ends in one line instead
        (every rank sees the same weights), keeping the last good checkpoint."""
        lost = ck.lock_lost(self.ckpt_dir) if self.ranks.main else None
        if lost is not None:  # two runs must never write one folder (rank 0 alone: torchrun then stops the rest)
            self.ranks.die(f"{lost}; stopping without saving")
        bad = next((n for n, p in self.net.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            last = ck.list_checkpoints(self.ckpt_dir)
            keep = (f"the last checkpoint, {last[-1][1]}, is kept" if last else "nothing was saved")
            self.ranks.die(f"{self.ckpt_dir}: the weights are not finite at step {self.step} ({bad}, after an update "
                           f"with a finite loss: a non-finite learning rate or optimizer state); not saved, {keep}")
        if not self.ranks.main:
            return
        with self.stop.saving():
            self._save()

    def _save(self) -> None:
        config = json.dumps({**asdict(self.cfg), "init_dir": self.origin})
        extra = {"rng": rng_state(), "step": self.step, "run": self.run_id, "nan_steps": self.nan_total,
                 "config": config, "world": self.ranks.world,
                 "loss_t": [float(v) for v in self.losses], "d_t": [float(v) for v in self.d_ts],
                 "d_v": [float(v) for v in self.d_vs], "corrupt_clips": sorted(self.corrupt["train"]),
                 "corrupt_val_clips": sorted(self.corrupt["val"])}
        if self.cfg.lbm:
            extra.update(scaler=self.scaler.state_dict())  # beside 'model', as the authors keep it
        try:
            ck.save(self.ckpt_dir, self.step, self.net, self.optimizer, self.scheduler,
                    keep_latest=self.cfg.keep_latest, extra=extra, layout=self.cfg.layout)
        except (OSError, RuntimeError) as e:
            # ck.save removed its temp file and left every earlier checkpoint in place. torch's zip writer turns a
            # failed write (a full disk, a quota, `ulimit -f`, EIO) into a RuntimeError with the OSError in its chain
            cause = os_error_in(e)
            if cause is None:
                raise
            why = "no space left on device" if is_space_error(e) else (cause.strerror or str(cause))
            fail(f"cannot save {self.ckpt_dir / ck.ckpt_name(self.step)}: {why}")


# ---------------------------------------------------------------------------------------------------------
# Data.


def build_dataset(cfg: Config, version: str | None) -> ExportDataset | KubricDataset:
    """The clips of --dataset (an export's `version`, or Kubric MOVi-F); ValueError/OSError for bad input."""
    if cfg.dataset == "kubric":
        if not cfg.movi_f_root:
            raise ValueError("--dataset=kubric needs --movi_f_root=<folder of MOVi-F sequences>")
        return KubricDataset(cfg.movi_f_root, cfg.S, cfg.N, cfg.crop_hw, cfg.use_augs)
    if cfg.dataset != "pod_export":
        raise ValueError(f"--dataset must be pod_export or kubric, got {cfg.dataset!r}")
    return ExportDataset(cfg.dataset_location, version, cfg.S, cfg.N, cfg.crop_hw, cfg.use_augs, seed=cfg.seed)


def validates_at(step: int, val_freq: int) -> bool:
    """Whether the step just trained is validated on an exported batch: step 1 and every --val_freq-th."""
    return step % val_freq == 0 or step == 1


def validations_before(step: int, val_freq: int) -> int:
    """How many exported-batch validations the steps 1..step held (a step stopped by a signal skips its own, and
    its batch is then left unused, as in the run that was stopped)."""
    return step // val_freq + (1 if step >= 1 and val_freq > 1 else 0)


def make_loader(base, cfg: Config, start_ordinal: int, ranks: Ranks, seed_offset: int = 0) -> DataLoader:
    """This rank's endless batches of `base`, from sample `start_ordinal` of the run's stream on."""
    data = OrdinalDataset(base, cfg.seed + seed_offset, cfg.shuffle)
    sampler = OrdinalSampler(start_ordinal, ranks.rank, ranks.world)
    return DataLoader(data, batch_size=cfg.B, sampler=sampler, num_workers=cfg.workers,
                      persistent_workers=cfg.workers > 0, prefetch_factor=2 if cfg.workers > 0 else None,
                      worker_init_fn=partial(loader_worker_init, parent=os.getpid()) if cfg.workers > 0 else None)


def shut_down_workers(it: object) -> None:
    """Stop a DataLoader iterator's workers now (torch's own shutdown of them, which the iterator would otherwise
    run only when garbage collected); anything else is left as it is. A worker still there after it (stopped, or
    stuck on a data disk that no longer answers) is killed: it holds nothing to save, it ignores SIGTERM, and the
    interpreter's exit would wait for it for ever."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, "_workers", None) or []:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


class TrainData:
    """The run's batches: training ones from the resumed step's sample on (or from the --cache_len cache) and
    validation ones; each fresh batch reports its corrupt clips to `note`."""

    def __init__(self, cfg: Config, ranks: Ranks, step: int, note: Callable[[str, Sample], list[int]]):
        self.cfg, self.rank, self.note = cfg, ranks.rank, note
        self.sets: dict[str, ExportDataset | KubricDataset] = {}
        try:
            base = build_dataset(cfg, cfg.dataset_version)
            self.sets["train"] = base
            self.val = None
            if cfg.val_dataset_version:
                vcfg = replace(cfg, use_augs=False)
                self.sets["val"] = build_dataset(vcfg, cfg.val_dataset_version)
                # the batch after the ones the steps before `step` validated on: a resumed run validates on what
                # the same run uninterrupted would (it started at batch `step`, far ahead at --val_freq 1000)
                self.val = iter(make_loader(self.sets["val"], vcfg, validations_before(step, cfg.val_freq) * cfg.B,
                                            ranks, 17))
        except (ValueError, OSError) as e:
            ranks.die(str(e))
        self.n_items = len(base)
        if cfg.B > self.n_items:  # the batch would repeat clips (and --B=100000 only filled memory)
            ranks.die(f"--B={cfg.B}: a batch cannot hold more clips than the training data has ({self.n_items} in "
                      f"{cfg.dataset_location}); use --B={self.n_items} or fewer")
        self.train = iter(make_loader(base, cfg, step * cfg.grad_acc * cfg.B, ranks))
        self.cache: list[Sample] = []
        if cfg.cache_len and step:
            # the cache the run had filled before `step`: the stream's first batches, read again (a resumed run
            # filled it from the resumed step's batches on and trained on other batches than the run uninterrupted)
            it = iter(make_loader(base, cfg, 0, ranks))
            try:
                self.cache = [next(it) for _ in range(min(step * cfg.grad_acc, cfg.cache_len))]
            finally:
                shut_down_workers(it)

    def _noted(self, kind: str, batch: Sample) -> None:
        """Tell `note` the batch's skipped clips; say each clip new to this process once, with its problem. The
        loader workers keep quiet (train_stage): each has its own memory of bad clips, so several would warn of
        one. (Under DDP each rank says the clips it meets; the final count is of distinct clips.)"""
        for i in self.note(kind, batch):
            line = printable(f"warning: skipping corrupt clip: {self.sets[kind].problem(i)}")
            print(line, file=sys.stderr, flush=True)

    def next(self, step: int, micro: int) -> Sample:
        """The batch of a step's micro-batch: the next of the stream, or a random cached one once the cache is full."""
        cfg = self.cfg
        if cfg.cache_len and len(self.cache) >= cfg.cache_len:
            pick = torch.randint(len(self.cache), (1,), generator=step_generator(cfg.seed, step, micro, self.rank))
            return self.cache[int(pick)]
        batch = next(self.train)
        self._noted("train", batch)
        if cfg.cache_len:
            self.cache.append(batch)
        return batch

    def close(self) -> None:
        """Stop the loader workers now: they ignore the stop signals and exit when told."""
        for it in (getattr(self, "train", None), self.val):
            shut_down_workers(it)

    def next_val(self) -> Sample:
        """The next validation batch."""
        assert self.val is not None, "no validation data (--val_dataset_version)"  # Validator asks only then
        batch = next(self.val)
        self._noted("val", batch)
        return batch


# ---------------------------------------------------------------------------------------------------------
# The step.


@dataclass
class StepResult:
    """What a step did: finite or skipped, its loss, data and step seconds, figures of rank 0's first batch."""

    finite: bool
    loss: float = 0.0
    rtime: float = 0.0
    itime: float = 0.0
    figures: dict[str, float] | None = None
    shown: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # frames, truth, estimate of one clip


# a loader worker killed while it held a lock of the loader's queues can leave their shutdown waiting for ever
# (seen once in hundreds of runs): a run ending on a killed worker exits this long after its save, whatever then
DEAD_WORKER_EXIT_S = 30.0


def _exit_within(seconds: float) -> None:
    """End the process with exit 2 `seconds` from now unless it has ended by then (a daemon timer)."""
    timer = threading.Timer(seconds, os._exit, args=(2,))
    timer.daemon = True
    timer.start()


# torch's words when a DataLoader worker dies (its SIGCHLD handler, or the iterator finding it gone)
LOADER_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:s|\(s\))? [^)]*\)+ "
                                r"(is killed by signal|exited unexpectedly)")


class DataFailed(Exception):
    """A step's batch could not be read on some rank; `error` is this rank's exception (None: another rank's).
    str(e) is one line."""

    def __init__(self, error: Exception | None, problems: list[str]):
        super().__init__("; ".join(problems))
        self.error = error


def fetch(ranks: Ranks, get: Callable[[], Sample]) -> Sample:
    """get(): a batch; DataFailed on every rank if any rank could not read its batch (agreed before the forward
    pass, in which DDP's ranks wait for each other)."""
    try:
        batch, error = get(), None
    except Exception as e:  # anything: the steps trained so far are saved before the run ends
        batch, error = None, e
    if ranks.any(error is not None):
        mine = None if error is None else str(error) if isinstance(error, DataGoneError) else \
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        problems = [p for p in ranks.gather(mine) if p]
        raise DataFailed(error, problems)
    assert batch is not None  # get() returned it on this rank
    return batch


class _StepStart:
    """What forward passes change outside the gradients, as a step found it: batch-norm statistics (LBM's
    encoder) and, with `rng`, the RNG states (dropout, augmentation in the main process). A step that ends
    before its update puts them back: one skipped for a non-finite loss must not leave that loss's NaNs in the
    statistics (every later checkpoint carried them, and was refused), and a step abandoned after some
    micro-batches is saved as the previous step left it, so it resumes bit-exact."""

    def __init__(self, model: torch.nn.Module, rng: bool):
        self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self.rng = rng_state() if rng else None

    def restore(self, model: torch.nn.Module, rng: bool = True) -> None:
        """Put the buffers (and, with `rng`, the RNG states if kept) back."""
        if self.buffers:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    if k in self.buffers:
                        v.copy_(self.buffers[k])
        if rng and self.rng is not None:
            set_rng_state(self.rng)


def train_step(state: TrainState, data: TrainData, cfg: Config) -> StepResult:
    """One optimiser step over --grad_acc micro-batches; a non-finite loss on any rank skips it on every rank."""
    t0 = time.time()
    # what a micro-batch changes besides the gradients, put back when the step ends before its update (a stop, a
    # batch that cannot be read, a dead loader worker, a non-finite loss): the previous step is then saved as it
    # was. The RNG states only matter when a later micro-batch can be abandoned after an earlier one ran
    one = state.ranks.world == 1
    at_start = _StepStart(state.model, rng=cfg.grad_acc > 1 and one)
    try:
        rtime, total_loss, finite, figures, shown = _micro_batches(state, data, cfg)
    except BaseException:
        if one:
            at_start.restore(state.model)
        raise
    if not finite:
        # its statistics only: the run goes on, and its random draws stay drawn as in the run resumed
        at_start.restore(state.model, rng=False)
        state.optimizer.zero_grad(set_to_none=True)
        return StepResult(False)
    state.updating = True
    optimizer_update(state.model, state.optimizer, state.scheduler, state.scaler, cfg.grad_clip)
    state.updating, state.updated = False, state.step
    return StepResult(True, total_loss, rtime, time.time() - t0, figures, shown)


def _micro_batches(state: TrainState, data: TrainData, cfg: Config) -> tuple[float, float, bool, Any, Any]:
    """Forward and backward of the step's --grad_acc micro-batches: (seconds waiting for data, the loss, whether
    every loss was finite on every rank, rank 0's figures and shown sample of the first)."""
    ranks = state.ranks
    rtime, total_loss, finite, figures, shown = 0.0, 0.0, True, None, None
    for micro in range(cfg.grad_acc):
        tr = time.time()
        with state.stop.waiting_for_data(ranks, already=micro > 0):
            batch = fetch(ranks, lambda: data.next(state.step, micro))  # noqa: B023 (called at once)
        rtime += time.time() - tr
        gen = step_generator(cfg.seed, state.step, micro, ranks.rank)
        if cfg.lbm:
            loss, out, seen = lbm_forward_loss(state.model, batch, ranks.device, gen, cfg.amp)
            final = out["points"]
        else:
            loss, final, seen = forward_loss(state.model, batch, ranks.device, cfg.iters, gen, cfg.amp)
        # agreed before backward: under DDP a rank that skipped backward would leave the others waiting in its
        # gradient all-reduce (one flag per micro-batch, so every rank makes the same calls)
        bad = ranks.any(not bool(torch.isfinite(loss)))
        finite = finite and not bad
        if finite:
            state.scaler.scale(loss / cfg.grad_acc).backward()
            total_loss += loss.item() / cfg.grad_acc
        if micro == 0 and ranks.main:
            shown = (seen.rgbs[0], seen.trajs[0], final[0].detach())
            if cfg.lbm:
                figures = lbm_figures(out, seen)
            else:
                figures = batch_figures(final.detach().float(), seen.trajs, seen.visibs, seen.valids,
                                        (seen.rgbs.shape[-2], seen.rgbs.shape[-1]))
    return rtime, total_loss, finite, figures, shown


# ---------------------------------------------------------------------------------------------------------
# Logging and validation.


def _event_writer(writer: SummaryWriter | None) -> Any:
    """tensorboardX's object that queues the events of `writer` for its writing thread (None if this version of
    tensorboardX keeps it elsewhere: then nothing here can watch it)."""
    return getattr(getattr(writer, "file_writer", None), "event_writer", None)


def _event_thread_alive(writer: SummaryWriter) -> bool:
    """Whether tensorboardX's thread that writes the events of `writer` to disk still runs."""
    worker = getattr(_event_writer(writer), "_worker", None)
    return not isinstance(worker, threading.Thread) or worker.is_alive()


def _log_failure(e: BaseException | None) -> str:
    """Why writing the TensorBoard log failed, as its warning says it."""
    return "no space left on device" if e is not None and is_space_error(e) else f"{type(e).__name__}: {e}"


LOG_WAIT_S = 10.0  # an event waits this long for room in the TensorBoard writer's queue, then logging stops
LOG_CLOSE_S = 30.0  # the TensorBoard log's last flush and close may take this long, then it is left as it is


def _never_wait_on(writer: SummaryWriter) -> None:
    """Make the events' queue of `writer` refuse (queue.Full) after LOG_WAIT_S instead of waiting for ever when it
    is full: a writing thread stuck in a log folder that no longer answers (a hard NFS mount whose server went
    away) filled it, and the next event waited for ever, deaf to SIGTERM."""
    q = getattr(_event_writer(writer), "_event_queue", None)
    if q is not None and callable(getattr(q, "put", None)):
        put = q.put
        q.put = lambda obj, block=True, timeout=None: put(obj, True, LOG_WAIT_S)


class Logger:
    """The step lines on stdout and the TensorBoard scalars and images; rank 0 only (and no lines with --quiet)."""

    def __init__(self, cfg: Config, ranks: Ranks):
        self.cfg, self.ranks, self.name = cfg, ranks, cfg.name()
        self.say = (lambda *a: print(*a, flush=True)) if ranks.main and not cfg.quiet else (lambda *a: None)
        self._writer: SummaryWriter | None = None
        self.event_error: str | None = None  # why TensorBoard's writing thread ended, if it did
        self._excepthook: Callable | None = None

    def start(self, n_items: int) -> None:
        """Open the TensorBoard log and print the run's header line."""
        cfg = self.cfg
        if self.ranks.main:
            self._excepthook = threading.excepthook  # first: the writing thread may fail on the first event
            threading.excepthook = self._thread_failed
            # tensorboardX names its file after the second and the host, and opens it following links: a random
            # part makes the name one nobody can plant a link at in a shared --log_dir, nor two runs of one name
            # started in the same second share
            # and the folder is written through a descriptor (utils/paths.pinned_folder): a link put at its name
            # later is not followed
            logs = Path(cfg.log_dir) / self.name
            try:
                make_dirs(logs)
                pinned = pinned_folder(logs)
                owner = os.stat(pinned).st_uid
            except OSError as e:  # a link or a file put at its name since the check, or the folder cannot be made
                pinned, why = None, (e.strerror or type(e).__name__).lower()
            else:
                if owner != os.geteuid() and owner not in ck.trusted_owners(logs):
                    pinned, why = None, f"made by uid {owner} since the run started"
            if pinned is None:
                print(f"warning: TensorBoard logging in {logs} is off ({why}); training goes on", file=sys.stderr,
                      flush=True)
            else:
                self._writer = SummaryWriter(str(pinned), max_queue=10, flush_secs=60,
                                             filename_suffix=f".{os.getpid()}.{secrets.token_hex(6)}")
                _never_wait_on(self._writer)
        self.say(f"{self.name}: {cfg.max_steps} steps, B={cfg.B} S={cfg.S} N={cfg.N} crop {cfg.crop_hw}, "
                 f"{self.ranks.world} process(es) on {self.ranks.device}, amp {cfg.amp}, data {cfg.dataset} "
                 f"({n_items} items)")

    def _thread_failed(self, args) -> None:
        """threading.excepthook while the log is open: the error that ended TensorBoard's writing thread (a full
        log disk) is kept for one warning line; any other thread's goes to the usual hook."""
        if type(args.thread).__name__ == "_EventLoggerThread":
            self.event_error = _log_failure(args.exc_value)
            return
        (self._excepthook or threading.__excepthook__)(args)

    @property
    def writer(self) -> SummaryWriter | None:
        """The TensorBoard writer while its writing thread lives. Events go to that thread through a queue of 10:
        once it has died (a full log disk) the 11th waited for ever, a hang no stop signal could end. A full log
        disk now costs the logs, said once, not the run."""
        w = self._writer
        if w is not None and not _event_thread_alive(w):
            self._drop(self.event_error or "its writing thread ended")
        return self._writer

    def _not_keeping_up(self) -> None:
        """The events' queue is full: its writing thread is stuck (a folder that no longer answers), or it is
        ending on an error (a full disk) whose hook has not run yet, given a second to say which."""
        worker = getattr(_event_writer(self._writer), "_worker", None)
        if isinstance(worker, threading.Thread):
            worker.join(1.0)
        self._drop(self.event_error or f"its folder has not taken an event for {LOG_WAIT_S:.0f} s")

    def _drop(self, why: str) -> None:
        """Stop logging to TensorBoard, said once; the writer is marked closed, not closed: closing waits on the
        dead thread, and tensorboardX's exit hook would flush it again into a traceback."""
        print(f"warning: TensorBoard logging in {Path(self.cfg.log_dir) / self.name} stopped ({why}); training goes "
              f"on", file=sys.stderr, flush=True)
        event_writer = _event_writer(self._writer)
        if event_writer is not None and hasattr(event_writer, "_closed"):
            event_writer._closed = True
        queue = getattr(event_writer, "_event_queue", None)
        if queue is not None and hasattr(queue, "cancel_join_thread"):
            queue.cancel_join_thread()  # its feeder may be stuck on a full pipe: the process's exit must not wait
        self._writer = None

    def close(self) -> None:
        """Write out and close the TensorBoard log (also when the run stops early)."""
        if w := self.writer:
            failed: list[BaseException] = []

            def close() -> None:
                try:
                    w.close()
                except (OSError, queue.Full) as e:  # its last events did not fit: the logs, not the run
                    failed.append(e)

            closing = threading.Thread(target=close, daemon=True, name="close TensorBoard log")
            closing.start()
            closing.join(LOG_CLOSE_S)  # a log folder that no longer answers must not hold the run's end
            if closing.is_alive():
                self._drop(f"its folder did not answer for {LOG_CLOSE_S:.0f} s")
            elif failed:
                self._drop(_log_failure(failed[0]))
        self._writer = None
        if self._excepthook is not None:
            threading.excepthook, self._excepthook = self._excepthook, None

    def curves(self, tag: str, curves: dict, step: int) -> None:
        """The validation's curves as a figure (utils/plots)."""
        if w := self.writer:
            try:
                plots.add_to_tensorboard(w, tag, curves, step)
            except queue.Full:
                self._not_keeping_up()

    def scalars(self, group: str, figures: dict[str, float], step: int) -> None:
        """Write every figure as `group/name`."""
        for k, val in figures.items():
            if w := self.writer:
                try:
                    w.add_scalar(f"{group}/{k}", val, step)
                except queue.Full:
                    self._not_keeping_up()

    def step(self, state: TrainState, res: StepResult) -> None:
        """The step line, and every --log_freq steps (and at step 1) the scalars; images 10x less often."""
        step, cfg = state.step, self.cfg
        d_v = float(np.mean(state.d_vs)) if state.d_vs else float("nan")
        d_t = np.mean(state.d_ts) if state.d_ts else float("nan")
        self.say(f"{self.name}; step {step:06d}/{cfg.max_steps}; rtime {res.rtime:.2f}; itime {res.itime:.2f}; "
                 f"loss {res.loss:.3f}; loss_t {np.mean(state.losses):.3f}; d_t {d_t:.1f}; d_v {d_v:.1f}")
        if not self.writer or not (step % cfg.log_freq == 0 or step == 1):
            return
        self.scalars("train", {"loss": res.loss, "lr": float(state.scheduler.get_last_lr()[0])}, step)
        self.scalars("data", {"corrupt_clips_skipped": sum(len(s) for s in state.corrupt.values())}, step)
        self.scalars("train", res.figures or {}, step)
        if res.shown is not None and (step % (cfg.log_freq * 10) == 0 or step == 1):  # shown: rank 0's
            rgb0, trajs0, est0 = res.shown
            frames = rgb0.detach().permute(0, 2, 3, 1).cpu().numpy().clip(0, 255).astype(np.uint8)
            img = summary_image(frames, trajs0.cpu().numpy(), est0.float().cpu().numpy())
            if w := self.writer:
                try:
                    w.add_image("train/tracks", img, step, dataformats="HWC")
                except queue.Full:
                    self._not_keeping_up()

    def done(self, state: TrainState, corrupt: dict[str, set]) -> None:
        """The final corrupt-clip count and summary line."""
        n_corrupt = sum(len(s) for s in corrupt.values())
        self.scalars("data", {"corrupt_clips_skipped": n_corrupt}, state.step)
        self.say(f"{self.name}: done, {state.step} steps, {state.nan_total} skipped for non-finite loss, "
                 f"{n_corrupt} corrupt clips skipped; checkpoints in {state.ckpt_dir}")


class Validator:
    """Validation while training: one exported batch every --val_freq steps and at step 1 (every rank), and the
    first --eval_videos TAP-Vid-DAVIS videos every --val_freq steps (rank 0); PIPs++ with twice the training
    iterations."""

    def __init__(self, cfg: Config, ranks: Ranks, data: TrainData):
        self.cfg, self.ranks, self.data = cfg, ranks, data
        self.curves: dict = {}  # {dataset: {series: curves}} of the last PIPs++ validation batch, for TensorBoard

    def run(self, step: int, model: torch.nn.Module, stop: StopRequest | None = None) -> dict[str, dict[str, float]]:
        """{log group: figures} of the validations due at `step`; a TAP-Vid validation cut short by a stop
        request is left out."""
        cfg, out = self.cfg, {}
        net = ck.unwrap(model)
        if self.data.val is not None and validates_at(step, cfg.val_freq):
            out["val"] = self.exported(net, stop)
        if cfg.tapvid_root and cfg.eval_dataset == "davis" and step % cfg.val_freq == 0 and self.ranks.main:
            figures = self.tapvid(net, stop)
            if figures is not None:
                out["davis"] = figures
        return out

    def exported(self, net: torch.nn.Module, stop: StopRequest | None = None) -> dict[str, float]:
        """Figures of one validation batch: PIPs++ tracked from zero-velocity estimates; LBM's training forward
        in eval mode (its losses, as the authors' validation while training, with queries from a fixed seed)."""
        with stop.waiting_for_data(self.ranks) if stop is not None else contextlib.nullcontext():
            batch = fetch(self.ranks, self.data.next_val)
        device = self.ranks.device
        if self.cfg.lbm:
            net.eval()
            with torch.no_grad():
                _, out, seen = lbm_forward_loss(net, batch, device, torch.Generator().manual_seed(self.cfg.seed),
                                                self.cfg.amp)
            net.train()
            return lbm_figures(out, seen)
        rgbs, trajs_g, visibs, valids, _ = batch.to(device)
        init = trajs_g[:, :1].expand_as(trajs_g).contiguous()
        net.eval()
        with torch.no_grad(), autocast(device.type, self.cfg.amp):
            preds = net(init, rgbs, iters=self.cfg.iters * 2)[0]
        net.train()
        hw = (rgbs.shape[-2], rgbs.shape[-1])
        self.curves["val"] = {"model": plots.curves_of(preds[-1].float(), trajs_g, valids, hw),
                              plots.ZERO_VEL: plots.curves_of(init, trajs_g, valids, hw)}
        return batch_figures(preds[-1].float(), trajs_g, visibs, valids, hw)

    def tapvid(self, net: torch.nn.Module, stop: StopRequest | None = None) -> dict[str, float] | None:
        """Figures on the first --eval_videos TAP-Vid videos: PIPs++ in the authors' protocol (points visible in
        frame 0, windows at the crop size); LBM as its authors validate while training (every point queried on
        its first visible frame, TAP-Vid's AJ, delta^x_avg and OA in 256x256, at the training memory size). None
        when a stop request comes first: the step is saved without them."""
        cfg, rows = self.cfg, []
        assert cfg.tapvid_root, "no --tapvid_root"  # run() asks only then
        net.eval()
        with torch.no_grad():
            for i, (_, video, points, occluded) in enumerate(load_tapvid(cfg.tapvid_root)):
                if i >= cfg.eval_videos:
                    break
                if stop is not None and stop.signum:
                    net.train()
                    return None
                if cfg.lbm:
                    res = evaluation.tapvid_query_mode(net, video, points, occluded, "first",
                                                       eval_hw=evaluation.TAPVID_HW)
                else:
                    res = evaluation.evaluate_tapvid_video(net, video, points, occluded, cfg.crop_hw, S=cfg.S,
                                                           iters=cfg.iters * 2)
                if res:
                    rows.append(res)
        net.train()
        if not cfg.lbm:
            return metrics.average({k: r[k] for k in metrics.METRIC_NAMES} for r in rows)
        # d_avg: the key the step line's d_v averages (for LBM, TAP-Vid's delta^x_avg)
        names = {"AJ": "average_jaccard", "d_avg": "delta_avg", "OA": "occlusion_accuracy"}
        return {short: float(np.mean([r[k] for r in rows])) if rows else float("nan") for short, k in names.items()}


# ---------------------------------------------------------------------------------------------------------
# The loop.


def run_stage(cfg: Config) -> tuple[Path, torch.nn.Module]:
    """Train one stage under the run lock; returns its checkpoint folder and the trained model.

    SIGTERM or Ctrl-C stops the run at the next step boundary: it saves that step's checkpoint, says so in one
    line and raises TrainingStopped (exit 0); the same command resumes it exactly. A second Ctrl-C during a step
    stops at once without saving (exit 130).
    """
    stop = StopRequest()
    stop.install()
    try:
        ranks = Ranks.setup(cfg.device)
        ckpt_dir = Path(cfg.ckpt_dir) / cfg.name()
        # the flags' own paths (their defaults ./checkpoints and ./logs_train in a team's checkout too): a link
        # another user planted on the way would send the run's checkpoints and logs into a folder of their choice
        problem = next(filter(None, (output_folder_problem(Path(cfg.ckpt_dir), "--ckpt_dir"),
                                     output_folder_problem(Path(cfg.log_dir), "--log_dir"))), None)
        if ranks.any(problem is not None):
            ranks.die(problem or "")
        with run_lock(ckpt_dir, ranks):
            return train_stage(cfg, ranks, ckpt_dir, stop)
    except StoppedLosingNothing as e:
        last = ck.list_checkpoints(Path(cfg.ckpt_dir) / cfg.name())
        since = (f"the same command resumes from {last[-1][1]}" if last
                 else "nothing trained; the same command starts it")
        print(f"{cfg.name()}: stopped by {signal.Signals(e.signum).name} during the first step since the last save, "
              f"which is redone; {since}", flush=True)
        raise TrainingStopped() from None
    except StoppedAtOnce as e:
        if int(os.environ.get("RANK", "0")) == 0:
            last = ck.list_checkpoints(Path(cfg.ckpt_dir) / cfg.name())
            since = f"the same command resumes from {last[-1][1]}" if last else "no checkpoint was saved yet"
            print(f"{cfg.name()}: stopped at once by a second {signal.Signals(e.signum).name}, without saving; "
                  f"{since}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        last = ck.list_checkpoints(Path(cfg.ckpt_dir) / cfg.name())
        since = f"the same command resumes from {last[-1][1]}" if last else "no checkpoint was saved yet"
        print(f"{cfg.name()}: out of memory on this machine ({error_line(e)}); {since} once more memory is free, and a "
              f"smaller --B, --N or --crop_size needs less (docs/BENCHMARKS.md has measured sizes)", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None
    finally:
        stop.restore()


def train_stage(cfg: Config, ranks: Ranks, ckpt_dir: Path, stop: StopRequest | None = None
                ) -> tuple[Path, torch.nn.Module]:
    """Set up the parts, then step, validate, log and save until --max_steps (or a stop request)."""
    with warnings.catch_warnings():  # corrupt clips are said by TrainData, once each (loader workers inherit this)
        warnings.simplefilter("ignore", CorruptClipWarning)
        return _train_stage(cfg, ranks, ckpt_dir, stop or StopRequest())


def _train_stage(cfg: Config, ranks: Ranks, ckpt_dir: Path, stop: StopRequest) -> tuple[Path, torch.nn.Module]:
    logs = Path(cfg.log_dir) / cfg.name()
    # before the model is built: TensorBoard's writer (rank 0's) would fail on it with a traceback; every rank
    # ends together rather than build its model until torchrun tears it down
    if ranks.any(ranks.main and os.path.lexists(logs) and not logs.is_dir()):
        what = (f"a link to {os.readlink(logs)}, which does not exist" if logs.is_symlink() and not logs.exists()
                else "not a folder")
        ranks.die(f"--log_dir: {logs} is {what} (the run's TensorBoard log goes there); remove it or give another "
                  f"--log_dir")
    # in a --log_dir others may write to, the run folder's name follows from the flags: a link planted there
    # steered the log into a folder of the planter's choice
    problem = ck.run_folder_problem(logs, "--log_dir") if ranks.main and os.path.lexists(logs) else None
    if ranks.any(problem is not None):
        ranks.die(problem or "")
    log = Logger(cfg, ranks)
    state = TrainState(cfg, ranks, ckpt_dir, log.say, stop)
    data = TrainData(cfg, ranks, state.step, state.note_corrupt)
    try:
        _loop(cfg, ranks, state, data, log, stop)
    finally:
        data.close()
        log.close()
    ranks.barrier()
    return ckpt_dir, state.net


def _loop(cfg: Config, ranks: Ranks, state: TrainState, data: TrainData, log: Logger, stop: StopRequest) -> None:
    validator = Validator(cfg, ranks, data)
    log.say(ck.parameter_table(state.net))  # after the data checks: a bad path is not the 86th line of output
    log.start(data.n_items)
    start = state.step
    if signum := stop.agreed(ranks):  # a signal while setting up: nothing trained, nothing to save
        state.stopped(signum, saved=False)
    stop.lossless = ranks.world == 1  # several ranks stop together, at a boundary (a collective)
    try:
        while state.step < cfg.max_steps:
            state.step += 1
            try:
                _step(cfg, ranks, state, data, log, stop, validator, start)
            except RuntimeError as e:
                if not LOADER_WORKER_DIED.search(str(e)):
                    raise
                state.worker_died(e, start)
    finally:
        stop.lossless = False
    log.done(state, ranks.union(state.corrupt))


def _step(cfg: Config, ranks: Ranks, state: TrainState, data: TrainData, log: Logger, stop: StopRequest,
          validator: Validator, start: int) -> None:
    """One training step (state.step), its validation and logging, then the step boundary's save and stop."""
    try:
        res = train_step(state, data, cfg)
    except StoppedWaitingForData as e:
        state.step -= 1  # that step never began
        state.optimizer.zero_grad(set_to_none=True)
        if state.step > start:
            state.save()
        # the line before the workers are shut down: stuck ones take torch's shutdown a few seconds each
        state.stopped(e.signum, saved=state.step > start, waiting=f"step {state.step + 1}")
    except DataFailed as e:
        if isinstance(e.error, RuntimeError) and LOADER_WORKER_DIED.search(str(e.error)):
            state.worker_died(e.error, start)  # found dead while its batch was awaited: said as when torch signals it
        state.step -= 1  # that step never happened
        state.optimizer.zero_grad(set_to_none=True)
        state.data_failed(e, saved=state.step > start)
    stop.lossless = False  # the step is done: a stop now saves it first
    # a stop requested during the step is taken before this step's validation: a scheduler's lead time is for
    # the save, not for figures
    early = stop.agreed(ranks)
    if res.finite:
        state.record(res)
        try:
            validations = {} if early else validator.run(state.step, state.model, stop)
        except DataFailed as e:  # the step itself is done
            state.data_failed(e, saved=True)
        except StoppedWaitingForData as e:  # the step is done and its validation never began
            state.save()
            state.stopped(e.signum, saved=True, waiting=f"step {state.step}'s validation")
        for group, figures in validations.items():
            state.d_vs.append(figures["d_avg"])
            log.scalars(group, figures, state.step)
        if validator.curves:
            log.curves("val/curves", validator.curves, state.step)
            validator.curves = {}
        log.step(state, res)
    else:
        state.skip(log.say)
    # the step boundary: a stop request is taken here, with the checkpoint a regular save here would write
    signum = early or stop.agreed(ranks)
    if signum or state.step % cfg.save_freq == 0 or state.step == cfg.max_steps:
        state.save()
        stop.lossless = ranks.world == 1
        # a signal during the save itself: this boundary's checkpoint is written, so stop here rather than after
        # one more step and save of the scheduler's lead time
        signum = signum or stop.agreed(ranks)
    if signum:
        state.stopped(signum, saved=True)
