"""Mixed precision in one place: the --amp flag's names, and autocast contexts that work on any device type."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of an --amp value ('none'/None, 'bf16', 'fp16'); one clear error for anything else."""
    key = "none" if amp is None else str(amp)
    if key not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[key]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for a device type; False for types autocast does not know (e.g. 'meta')."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast(device_type: str, amp: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for amp ('bf16', 'fp16' or a dtype), or no context at all when amp is off.

    torch.autocast(..., enabled=False) is not a no-op everywhere: it raises for device types autocast does
    not know (the 'meta' device the device tests run on), so "off" must mean "no context".
    """
    dtype = amp if isinstance(amp, torch.dtype) else amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Leave autocast for a block that must run in the model's own dtype (a no-op where autocast is off)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
