"""Deterministic golden weights (docs/MODEL.md), used for the golden test vectors, tests and benchmarks."""

from __future__ import annotations

import math

import torch


def golden_state_dict(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """For the i-th (name, shape): seeded float64 normals scaled by tensor kind, dense x0.05, then float32."""
    out = {}
    for i, (name, shape) in enumerate(shapes):
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


def load_golden_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Fill a Pips with the golden weights (its state-dict order is the checkpoint's, which tests check)."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(golden_state_dict(shapes), strict=True)
    return model
