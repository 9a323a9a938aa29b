"""Shared test helpers: the SPEC-7 deterministic weights and paths to shipped data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def state_dict_spec() -> list[dict]:
    """Entries of state_dict.json (name, shape, dtype) in file order."""
    return json.loads((DATA / "state_dict.json").read_text())


def golden_state_dict() -> dict[str, torch.Tensor]:
    """Weights of SPEC section 7: seeded float64 normals, scaled per tensor kind, then float32."""
    out = {}
    for i, entry in enumerate(state_dict_spec()):
        name, shape = entry["name"], entry["shape"]
        g = torch.Generator().manual_seed(1000 + i)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.01 * t
        if name.startswith("delta_block.dense."):
            t = t * 0.05
        out[name] = t.float()
    return out


def golden_model(**kwargs):
    """A Pips with the golden weights, in eval mode."""
    from nets.pips2 import Pips

    model = Pips(**kwargs)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()
