"""Checkpoints in the authors' format: a folder of `model-%09d.pth` dicts (SPEC section 1)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from prettytable import PrettyTable

CKPT_RE = re.compile(r"^model-(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def ckpt_name(step: int) -> str:
    """File name of the checkpoint saved at `step`."""
    return f"model-{step:09d}.pth"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every model-*.pth in folder, lowest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def find_checkpoint(init: str | os.PathLike, step: int | None = None) -> Path:
    """Resolve a file path, or a folder's checkpoint at `step` (highest step when None)."""
    init = Path(init)
    if init.is_file():
        return init
    if not init.exists():
        raise CheckpointError(f"{init}: no such checkpoint file or folder")
    found = list_checkpoints(init)
    if not found:
        raise CheckpointError(f"{init}: folder holds no model-*.pth checkpoint")
    if step is None:
        return found[-1][1]
    for s, p in found:
        if s == step:
            return p
    raise CheckpointError(f"{init}: no checkpoint for step {step} (have {[s for s, _ in found]})")


def step_of(path: str | os.PathLike) -> int:
    """Training step encoded in a checkpoint's file name, 0 when the name has none."""
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else 0


def _load_problem(e: Exception) -> str:
    """One line for a failed torch.load, without torch's advice to retry with weights_only=False."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return f"not a readable checkpoint ({type(e).__name__})"
    if lines[0].startswith("Weights only load failed"):
        # the preamble suggests weights_only=False, which would run whatever the file holds; keep the cause
        cause = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
        if cause and "GLOBAL" in cause[0]:
            return f"refused: it holds more than tensors and plain data ({cause[0]})"
        return f"not a readable checkpoint ({cause[0] if cause else 'the weights-only unpickler failed'})"
    return f"not a readable checkpoint ({lines[0]})"


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load a checkpoint safely; one clear error line for a corrupt or foreign file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; the user needs one line
        raise CheckpointError(f"{path}: {_load_problem(e)}") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a PIPs++ checkpoint (no 'model_state_dict')")
    return ckpt


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the 'module.' prefix that DataParallel/DDP adds to every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], ignore_prefixes: tuple[str, ...] = (),
                     source: str = "checkpoint") -> None:
    """Load strictly; keys under `ignore_prefixes` may be missing or extra. Mismatches raise and list keys."""
    state = strip_module_prefix(state)
    ignored = lambda k: any(k.startswith(p) for p in ignore_prefixes)  # noqa: E731
    state = {k: v for k, v in state.items() if not ignored(k)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not ignored(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append(f"shape mismatches {wrong}")
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(parts))
    own.update(state)
    model.load_state_dict(own, strict=True)


def load(init: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, step: int | None = None,
         ignore_prefixes: tuple[str, ...] = (), map_location: str | torch.device = "cpu") -> int:
    """Load model (and optionally optimizer/scheduler) from a file or folder; returns the step loaded."""
    path = find_checkpoint(init, step)
    ckpt = read_checkpoint(path, map_location)
    load_model_state(model, ckpt["model_state_dict"], ignore_prefixes, source=str(path))
    if optimizer is not None:
        if "optimizer_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: has no optimizer_state_dict to resume from")
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    if scheduler is not None and "scheduler_state_dict" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler_state_dict"])
    return step_of(path)


def save(folder: str | os.PathLike, step: int, model: nn.Module, optimizer=None, scheduler=None,
         keep_latest: int | None = None, extra: dict | None = None) -> Path:
    """Write model-%09d.pth atomically (temp file, then rename) and keep only the latest K checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = model.module if hasattr(model, "module") else model
    ckpt = {"model_state_dict": net.state_dict()}
    if optimizer is not None:
        ckpt["optimizer_state_dict"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler_state_dict"] = scheduler.state_dict()
    if extra:
        ckpt.update(extra)
    path = folder / ckpt_name(step)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if keep_latest:
        for _, old in list_checkpoints(folder)[:-keep_latest]:
            old.unlink(missing_ok=True)
    return path


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(model: nn.Module) -> str:
    """Per-module parameter table ending in 'total params: X.XX M', as the authors' trainer prints."""
    table = PrettyTable(["Modules", "Parameters"])
    table.align["Modules"] = "l"
    for name, p in model.named_parameters():
        if p.requires_grad:
            table.add_row([name, p.numel()])
    return f"{table}\ntotal params: {count_parameters(model) / 1e6:.2f} M"


def load_pips(init_dir: str | os.PathLike, device: str | torch.device = "cpu", step: int | None = None, **kwargs):
    """A Pips in eval mode with weights from a checkpoint folder or file; a missing one names the fix."""
    from nets.pips2 import Pips

    p = Path(init_dir)
    if not p.exists() or (p.is_dir() and not list_checkpoints(p)):
        raise CheckpointError(f"{init_dir}: no checkpoint here; fetch the authors' model with "
                              f"./get_reference_model.sh (it creates ./reference_model) or pass --init_dir")
    model = Pips(**kwargs)
    load(init_dir, model, step=step, map_location="cpu")
    return model.to(device).eval()


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
