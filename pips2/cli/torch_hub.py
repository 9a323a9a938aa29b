"""torch.hub's entry points, which hubconf.py at the repository's root exposes:

    model = torch.hub.load("<owner>/pips2", "pips2")                         # the authors' PIPs++, fetched once
    model = torch.hub.load("/path/to/checkout", "lbm", source="local")      # the authors' LBM, fetched once
    model = torch.hub.load(repo, "pips2", checkpoint="./reference_model")   # any checkpoint file or folder

Both go through pips2.hub.load_model, the one loader (its rules, caches and errors: docs/MODELS.md).
"""

from __future__ import annotations

import os

import torch

from pips2.hub import load_model
from pips2.nets.lbm import LBM
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.amp import amp_dtype
from pips2.utils.checkpoint import resolve_device


def pips2(pretrained: bool = True, device: str | torch.device = "cpu", checkpoint: str | os.PathLike | None = None,
          amp: str | None = None, **config) -> Pips:
    """PIPs++ in eval mode: the authors' reference weights (the hub name pips2, cached in $PIPS2_CACHE), or those
    of `checkpoint` (a file, folder or hub name); pretrained=False gives random weights. amp: the autocast you
    will run it under ('bf16', 'fp16'), for its execution plan."""
    if not pretrained:
        dev = resolve_device(device) if isinstance(device, str) else device
        plan = ExecPlan.auto(dev, amp_dtype(amp) or torch.float32)
        return Pips(**{"plan": plan, **config}).to(dev).eval()
    return load_model(checkpoint or "pips2", device, kind="pips2", amp=amp, **config)


def lbm(pretrained: bool = True, device: str | torch.device = "cpu", checkpoint: str | os.PathLike | None = None,
        memory_size: int | None = None, **config) -> LBM:
    """LBM in eval mode (float32): the authors' released weights (the hub name lbm, in the Hugging Face cache), or
    those of `checkpoint` (a file, folder or hub name); pretrained=False gives random weights. memory_size
    resamples its memory to that many frames."""
    if not pretrained:
        dev = resolve_device(device) if isinstance(device, str) else device
        model = LBM(**config)
        if memory_size is not None:
            model.set_memory_size(int(memory_size))
        return model.to(dev).eval()
    return load_model(checkpoint or "lbm", device, kind="lbm", memory_size=memory_size, **config)
