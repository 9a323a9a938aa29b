"""The command-line programs: one module per command (`pips2-train` = pips2.cli.train, ...), each a `main`
with fire flags and a `cli()` entry point; the top-level scripts of a checkout call the same functions."""

from __future__ import annotations

import torch

from pips2.hub import load_pips
from pips2.utils.checkpoint import CheckpointError, resolve_device
from pips2.utils.cli import die


def load_pips_or_exit(init_dir: str, device: str | torch.device = "auto", **kwargs):
    """load_pips, or exit with its one-line error (which names get_reference_model.sh when nothing is there)."""
    try:
        return load_pips(init_dir, resolve_device(device) if isinstance(device, str) else device, **kwargs)
    except CheckpointError as e:
        die(e)
