"""Train PIPs++ (docs/MODEL.md): stage 1 (S=36, 256x384) and stage 2 (S=64, 512x896), on CPU, GPU or torchrun;
or LBM (docs/LBM.md#training) with --model=lbm, in one stage.

    python train.py --dataset_location=./pod_export                       # stage 1 defaults
    python train.py --stage=2 --dataset_location=./pod_export --dataset_version=<S64 512x896 export>
    python train.py --stages=1,2 ...                                       # both, stage 2 from stage 1
    torchrun --nproc_per_node 8 --nnodes 2 --node_rank 0 --master_addr host --master_port 29500 train.py ...
    torchrun --nproc_per_node 4 train.py --model=lbm --dataset=kubric --movi_f_root=data/kubric_lbm --amp=fp16

The flags are the fields of pips2.trainer.Config (--crop_size sets its crop_hw); the run itself is
pips2.trainer.run_stage.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import signal
import sys
import types
import typing
from dataclasses import fields, replace
from pathlib import Path

import torch.distributed as dist

from pips2.datasets.clips import STAGE_CLIPS  # the clips each stage trains on, shared with the exporter
from pips2.nets.lbm import MAX_EMBED_DIM, MAX_MEMORY_SIZE
from pips2.tracking import MAX_ITERS
from pips2.train_step import (
    forward_loss,
    init_estimates,
    lbm_forward_loss,
    maybe_transpose,
    optimizer_update,
    sample_queries,
)
from pips2.trainer import Config, TrainingStopped, fail, run_stage
from pips2.utils import checkpoint as ck
from pips2.utils.amp import amp_dtype
from pips2.utils.cli import aliased, flag_kind, parse_hw, run_fire
from pips2.utils.procs import STOP_SIGNALS, usable_cpus

# re-exported: tests and benchmarks call the step's semantics as train.<name>
__all__ = ["Config", "forward_loss", "init_estimates", "lbm_forward_loss", "main", "make_config", "maybe_transpose",
           "optimizer_update", "run_stage", "sample_queries"]

STAGE_DEFAULTS = {
    1: dict(B=4, **STAGE_CLIPS[1], iters=6, lr=5e-4, max_steps=200_000),
    2: dict(B=1, **STAGE_CLIPS[2], iters=6, lr=5e-4, max_steps=10_000),
}
# LBM as its authors train it (their lbm.yaml and assets/train.md): 150 epochs of the 11k Kubric clips at batch 4
# on each of 4 GPUs (687 steps an epoch); AdamW 5e-4, weight decay 1e-5, gradient norm clipped at 1. Their
# fp16 AMP is --amp=fp16 (not the default here: on a CPU fp16 autocast is many times slower than fp32).
LBM_DEFAULTS = dict(B=4, S=24, N=256, crop_hw=(384, 512), iters=0, lr=5e-4, max_steps=150 * 687, wd=1e-5,
                    grad_clip=1.0)
MODELS = ("pips2", "lbm")
STAGES = (1, 2)
# the smallest value each numeric flag may take; anything smaller fails inside the run (a ZeroDivisionError
# after the first step for --save_freq=0, a reshape error for --N=0) or trains nothing (--max_steps=0)
MINIMUM = {"B": 1, "S": 2, "N": 1, "iters": 1, "max_steps": 1, "save_freq": 1, "log_freq": 1, "val_freq": 1,
           "grad_acc": 1, "max_nan_steps": 1, "eval_videos": 1, "memory_size": 1, "embed_dim": 1, "keep_latest": 0,
           "cache_len": 0, "workers": 0, "seed": 0}
MAX_SEED = 2**32 - 1  # numpy's global seed takes 32 bits
# one batch's frames as float32 (B x S x 3 x H x W x 4 bytes) are assembled whole in host memory by the data
# loader before any model call: at most this, and at most half the machine's memory (docs/BAD_INPUTS.md)
MAX_BATCH_BYTES = 16 * 2**30
MAX_LR = 1.0
MIN_LR = 1e-37  # float32's smallest normal numbers: a rate below them is itself lost to rounding
MAX_GRAD_ACC = 256  # micro-batches a step accumulates: a step of 10**9 of them never ended
MAX_EXP_NAME = 100  # the run folder's name is the settings (up to ~90 characters) and --exp_name
LBM_HEADS = 4  # the attention heads of the LBM this trains (nets/lbm.py's default): embed_dim splits among them
# the authors' flag names -> Config's fields: --max_iters is an alias of our --max_steps; --crop_size is the one
# flag of crop_hw, a field named for what it holds (docs/ARCHITECTURE.md, "Names")
ALIASES = {"max_iters": "max_steps", "crop_size": "crop_hw"}
FLAG_OF = {"crop_hw": "crop_size"}  # fields set only through the authors' flag


def resolve_aliases(flags: dict) -> dict:
    """The flags with each alias under its own name; an alias and its name set to different values is an error."""
    out = dict(flags)
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        out[name] = aliased(name, out.get(name), alias, out.pop(alias))
    return out


def _typed(name: str, value, hint) -> typing.Any:
    """A flag's value as its Config field's int, float or bool (None where the field allows it); ValueError
    naming the flag otherwise. fire hands over a string for anything that is not a Python literal
    (--lr=abc, --lr=nan)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a in (int, float, bool)]
    if not kinds or (value is None and type(None) in args):
        return value
    kind = kinds[0]
    if kind is bool and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    what = {int: "an integer", float: "a finite number", bool: "True or False"}[kind]
    raise ValueError(f"--{name} must be {what}, got {value!r}")


def check_folder_flag(flag: str, path: str | None) -> None:
    """ValueError when --ckpt_dir or --log_dir cannot be a folder (a file, /dev/null, a path through a file): it
    was a bare "Not a directory" line naming no flag, or TensorBoard's traceback after the model was built."""
    if not path:
        return
    p = Path(path).expanduser().absolute()
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                why = "is not a folder" if q == p else f"cannot be made: {q} is not a folder"
                raise ValueError(f"--{flag}={path} {why}")
            return


def check_values(values: dict) -> dict:
    """Every numeric and boolean flag of a run checked in one place, before anything is built: types, the
    MINIMUM of each count, a positive learning rate and clip, a non-negative weight decay; ValueError naming
    the flag."""
    hints = typing.get_type_hints(Config)
    out = {k: _typed(k, v, hints[k]) for k, v in values.items() if k in hints}
    for name, low in MINIMUM.items():
        if name == "iters" and out.get("model") == "lbm":
            continue  # LBM has no refinement iterations
        if name in out and out[name] < low:
            raise ValueError(f"--{name} must be at least {low}, got {out[name]}")
    if out.get("iters", 0) > MAX_ITERS:  # each step is one more pass of the update network, forward and back
        raise ValueError(f"--iters must be at most {MAX_ITERS}, got {out['iters']}")
    most = 4 * usable_cpus()  # each loader worker is a process holding its own batches (~450 MB at stage 1)
    if out.get("workers", 0) > most:  # --workers=100000 forked ~780 processes and 5.2 GB in 24 s
        raise ValueError(f"--workers must be at most {most} (4 per CPU core this process may use), got "
                         f"{out['workers']}")
    if out.get("grad_acc", 1) > MAX_GRAD_ACC:
        raise ValueError(f"--grad_acc must be at most {MAX_GRAD_ACC}, got {out['grad_acc']}")
    if out.get("seed", 0) > MAX_SEED:
        raise ValueError(f"--seed must be at most {MAX_SEED}, got {out['seed']}")
    for name in ("lr", "grad_clip"):
        if name in out and out[name] <= 0:
            raise ValueError(f"--{name} must be positive, got {out[name]:g}")
    if out.get("model") == "lbm" and out.get("embed_dim", LBM_HEADS) % LBM_HEADS:  # a reshape traceback later
        raise ValueError(f"--embed_dim must be a multiple of {LBM_HEADS} (LBM's attention heads), "
                         f"got {out['embed_dim']}")
    name = values.get("exp_name")
    if name and not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", str(name)) or name in (".", ".."):
        # a part of the run folder's name: --exp_name=../.. put the run outside --ckpt_dir
        raise ValueError(f"--exp_name must be a plain name (letters, digits and _ . - = , +), got {name!r}")
    if name and len(str(name)) > MAX_EXP_NAME:  # the run folder's name must fit the file system's 255 bytes
        raise ValueError(f"--exp_name must be at most {MAX_EXP_NAME} characters, got {len(str(name))}")
    for flag, most in (("memory_size", MAX_MEMORY_SIZE), ("embed_dim", MAX_EMBED_DIM)):
        if out.get(flag, 0) > most:  # LBM's buffers grow with them: --memory_size=100000 took the machine's memory
            raise ValueError(f"--{flag} must be at most {most} (LBM's bound, as its checkpoints are checked), got "
                             f"{out[flag]}")
    if values.get("backbone_init") and out.get("model", "pips2") != "lbm":
        raise ValueError("--backbone_init is for --model=lbm (its ResNet trunk); PIPs++ has no such trunk")
    if out.get("lr", 0.0) > MAX_LR:  # 1e39 overflowed float32 inside Adam after the first step: a traceback
        raise ValueError(f"--lr must be at most {MAX_LR:g} (the authors train with 5e-4), got {out['lr']:g}")
    if out.get("wd", 0.0) < 0:
        raise ValueError(f"--wd must be at least 0, got {out['wd']:g}")
    if out.get("lr", MIN_LR) < MIN_LR:  # 1e-320 trained nothing, exit 0
        raise ValueError(f"--lr must be at least {MIN_LR:g}, got {out['lr']:g}")
    if out.get("lr", 0.0) * out.get("wd", 0.0) >= 1:
        # AdamW scales the weights by 1 - lr * wd each step: at 1 or more they vanish or flip sign, and the run
        # ended on non-finite weights with the cause misnamed
        raise ValueError(f"--wd={out['wd']:g} with --lr={out['lr']:g}: AdamW scales the weights by 1 - lr x wd each "
                         f"step, which must stay above 0; give a smaller --wd")
    return out


def physical_memory() -> int:
    """This machine's memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_batch_bytes(B: int, S: int, h: int, w: int, stage: int = 1, cache_len: int = 0) -> None:
    """ValueError naming the flags when one batch's frames, or the --cache_len batches kept, would not fit the
    bound: --B=100000 filled 22 GB of memory building its first batch, out of reach of SIGTERM, and a cache grows
    by a batch a step until it holds cache_len of them."""
    need = B * S * 3 * h * w * 4
    bound = min(MAX_BATCH_BYTES, physical_memory() // 2 or MAX_BATCH_BYTES)
    limit = f"{bound / 2**30:.1f} GiB (at most {MAX_BATCH_BYTES // 2**30} GiB and half this machine's memory)"
    if need > bound:
        raise ValueError(f"stage {stage}: one batch of --B={B} clips of --S={S} frames at --crop_size={h},{w} "
                         f"({B}x{S}x3x{h}x{w} float32, {need / 2**30:.1f} GiB) exceeds {limit}; use a smaller --B, "
                         f"--S or --crop_size")
    if cache_len * need > bound:
        raise ValueError(f"stage {stage}: --cache_len={cache_len} batches of {need / 2**20:.1f} MiB "
                         f"({cache_len * need / 2**30:.1f} GiB) exceed {limit}; use a smaller --cache_len")


def make_config(stage: int, flags: dict) -> Config:
    """Stage (or LBM) defaults, then every flag the user set."""
    flags = resolve_aliases(flags)
    known = {f.name for f in fields(Config)}
    unknown = set(flags) - known
    if unknown:
        raise ValueError(f"unknown flags: {sorted(unknown)}")
    if stage not in STAGES:
        raise ValueError(f"--stage must be 1 or 2, got {stage!r}")
    model = flags.get("model") or "pips2"
    if model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if model == "lbm" and stage != 1:
        raise ValueError(f"LBM trains in one stage; --stage={stage} is for PIPs++")
    defaults = LBM_DEFAULTS if model == "lbm" else STAGE_DEFAULTS[stage]
    values = {**defaults, **{k: v for k, v in flags.items() if v is not None}, "stage": stage}
    values = {**values, **check_values(values)}
    values["crop_hw"] = parse_hw(values["crop_hw"], "crop_size")
    h, w = values["crop_hw"]
    if model == "lbm":
        # the crop is LBM's input size, as in the authors' data loader; the model needs whole stride-32 cells
        if h < 32 or w < 32 or h % 32 or w % 32:
            raise ValueError(f"--model=lbm: crop_size is LBM's input_size and must be a multiple of 32 in both "
                             f"dimensions, got {h}x{w}")
    elif h < 128 or w < 128:
        raise ValueError(f"crop_size must be at least 128x128, got {h}x{w}")
    check_batch_bytes(values["B"], values["S"], h, w, stage, values.get("cache_len") or 0)
    for flag in ("ckpt_dir", "log_dir"):
        check_folder_flag(flag, values.get(flag))
    if values.get("eval_dataset") not in (None, "davis"):
        raise ValueError(f"--eval_dataset must be davis (TAP-Vid-DAVIS while training), got {values['eval_dataset']!r}")
    if values.get("eval_dataset") and not values.get("tapvid_root"):
        raise ValueError("--eval_dataset=davis needs --tapvid_root=<tapvid_davis.pkl>")
    amp_dtype(values.get("amp", "none"))  # one clear line for an unknown --amp
    return Config(**values)


def _latest_stage1(ckpt_dir: str) -> str | None:
    """The most recently modified stage-1 run folder in ckpt_dir that holds a checkpoint, of those this user may
    trust (another user's, made in a --ckpt_dir everybody may write to, are passed over)."""
    runs = [p for p in Path(ckpt_dir).glob("stage1_*") if ck.list_checkpoints(p) and not ck.untrusted_run_folder(p)]
    return str(max(runs, key=lambda p: p.stat().st_mtime)) if runs else None


def usage() -> str:
    """--help: main's docstring and every flag with its stage-1 default (main takes them as **flags)."""
    defaults = {**{f.name: f.default for f in fields(Config)}, **STAGE_DEFAULTS[1]}
    lines = sorted(f"    --{FLAG_OF.get(name, name)}={defaults[name]!r}" for name in defaults if name != "stage")
    prog = Path(sys.argv[0]).name or "train.py"  # pips2-train when run as the installed command
    return "\n".join([f"usage: {prog} [--stage=1|2] [--stages=1,2] [--FLAG=VALUE ...]", "",
                      inspect.cleandoc(main.__doc__ or ""), "",
                      "flags (stage-1 defaults; --model=lbm has its own):", *lines,
                      f"aliases: {', '.join(f'--{a} = --{n}' for a, n in ALIASES.items() if n not in FLAG_OF)}"])


def stage_order(stage, stages) -> list[int]:
    """The stages to run, from --stage or --stages=1,2; ValueError unless each is 1 or 2."""
    items = [stage] if stages is None else list(stages) if isinstance(stages, (tuple, list)) \
        else str(stages).split(",")
    order = []
    for s in items:
        try:
            order.append(int(str(s).strip()))
        except ValueError:
            order.append(None)
        if order[-1] not in STAGES or isinstance(s, (bool, float)):
            flag = "--stage" if stages is None else "--stages"
            raise ValueError(f"{flag} must be 1 or 2 (or --stages=1,2), got {stage if stages is None else stages!r}")
    return order


def main(stage: int = 1, stages: str | None = None, **flags) -> None:
    """Train one stage (--stage) or several in sequence (--stages=1,2; stage 2 starts from stage 1).

    A flag applies to every stage; `--stage2_<flag>=...` applies to stage 2 only (e.g. --stage2_S=64).
    `--max_steps` (alias `--max_iters`, the authors' name) is the number of optimiser steps of a stage.
    """
    if flags.pop("help", None) or flags.pop("h", None):
        print(usage())
        return
    inside = sorted(k for k in flags if re.sub(r"^stage[12]_", "", k) in FLAG_OF)
    if inside:
        fail(f"unknown flags: {inside} (the flags are --{', --'.join(FLAG_OF.values())})")
    try:
        order = stage_order(stage, stages)
    except ValueError as e:
        fail(str(e))
    unused = sorted(k for k in flags if (m := re.match(r"stage([12])_", k)) and int(m.group(1)) not in order)
    if unused:  # never checked, never used: --stage2_S=abc was accepted without a word
        fail(f"{', '.join('--' + k for k in unused)}: for a stage this run does not train "
             f"(--stage{'s' if stages else ''}={stages or stage}); drop it or add that stage with --stages=1,2")
    if flags.get("model") == "lbm" and order != [1]:
        fail(f"--model=lbm trains in one stage; drop --stage/--stages (got {','.join(map(str, order))})")
    prev = None
    for st in order:
        prefix = f"stage{st}_"
        try:
            # aliases resolved per group, so a stage's own --stage2_max_iters overrides a common --max_steps
            stage_flags = resolve_aliases({k: v for k, v in flags.items() if not k.startswith("stage")})
            stage_flags.update(resolve_aliases({k[len(prefix):]: v for k, v in flags.items() if k.startswith(prefix)}))
        except ValueError as e:
            fail(str(e))
        chosen = st == 2 and not stage_flags.get("init_dir")  # this program picks stage 2's start
        if chosen:
            stage_flags["init_dir"] = prev or _latest_stage1(stage_flags.get("ckpt_dir", Config.ckpt_dir))
            if not stage_flags["init_dir"]:
                fail("stage 2 starts from a stage-1 checkpoint: pass --init_dir or run --stages=1,2")
        try:
            cfg = make_config(st, stage_flags)
        except ValueError as e:
            fail(str(e))
        if chosen and ck.list_checkpoints(Path(cfg.ckpt_dir) / cfg.name()):
            # the stage-2 run is there already: it resumes from its own checkpoints, whatever stage-1 folder is
            # newest now (the start picked for it was refused as another --init_dir than the run's)
            cfg = replace(cfg, init_dir=None)
        prev = str(run_stage(cfg)[0])


def text_flags() -> dict:
    """The annotations of Config's text fields, under their names and their per-stage `stage<N>_` names: fire
    reads `--dataset_location=2024` as a number, which run_fire turns back into the text typed (the numeric
    fields are checked with their bounds by check_values)."""
    hints = {k: h for k, h in typing.get_type_hints(Config).items() if (flag_kind(h) or (None,))[0] is str}
    return {**hints, **{f"stage{st}_{k}": h for st in STAGES for k, h in hints.items()}}


def empty_text_flags() -> set[str]:
    """The text flags whose default is empty (--exp_name): given empty, they mean their default."""
    empty = {f.name for f in fields(Config) if f.default == ""}
    return empty | {f"stage{st}_{k}" for st in STAGES for k in empty}


def cli() -> None:
    """The `pips2-train` command (and `python train.py`): fire flags of main."""
    try:
        run_fire(main, kwarg_hints=text_flags(), empty_ok=empty_text_flags())
    except TrainingStopped:
        # the stop is decided and said, and the program ends: a second Ctrl-C (the common reflex) must not land in
        # the interpreter's exit as a traceback, or change the exit code by its timing
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
