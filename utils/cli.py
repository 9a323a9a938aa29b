"""Small helpers shared by the command-line scripts."""

from __future__ import annotations

import sys
from typing import NoReturn

import torch

from pips2.utils.checkpoint import CheckpointError, load_pips, resolve_device


def die(msg) -> NoReturn:
    """Bad flags or input: one line on stderr, exit code 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_hw(value, name: str = "size") -> tuple[int, int]:
    """An (H, W) flag as fire hands it over: "512,896", (512, 896) or [512, 896]."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        h, w = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be H,W (two integers), got {value!r}") from None
    return h, w


def aliased(name: str, value, alias: str, alias_value):
    """A flag given by its name or by the authors' alias for it; ValueError when both are given and differ."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"--{name}={value} and its alias --{alias}={alias_value} disagree; give one of them")
    return alias_value if value is None else value


def load_pips_or_exit(init_dir: str, device: str | torch.device = "auto", **kwargs):
    """load_pips, or exit with its one-line error (which names get_reference_model.sh when nothing is there)."""
    try:
        return load_pips(init_dir, resolve_device(device) if isinstance(device, str) else device, **kwargs)
    except CheckpointError as e:
        die(e)
