"""How the model runs, decided once: which form of each step, chunk sizes, memory layout, checkpointing.

Every plan computes the same function (docs/MODEL.md, "Execution plans"); they differ in speed, memory and
float32 rounding order. A plan is a frozen value: pick one with `ExecPlan.auto(...)`, `ExecPlan.reference()`
or `ExecPlan.export()` (or build one field by field) and hand it to `Pips(plan=...)` or `model.set_plan(...)`.
Nothing in the model looks at autocast or grad mode to choose a form; what depends on them is an input of
`auto`, so the caller that knows whether it trains, and in which dtype, says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHOICES = {"corr": ("local", "volume"), "gather": ("workspace", "checkpoint", "plain"),
            "delta": ("conv1d", "gemm", "winograd", "winograd2"), "norm": ("layout", "reference")}


@dataclass(frozen=True)
class ExecPlan:
    """One execution plan of `Pips`; see the module docstring and docs/MODEL.md for each field."""

    corr: str = "local"  # "local": gather a patch around each point; "volume": the reference's full volume
    corr_chunk: int = 1 << 22  # floats of gathered patches held at once by "local"; 0 = no bound
    gather: str = "workspace"  # local patches: one reused buffer / recomputed in backward / fresh tensors
    # delta block: "conv1d" (reference); time-major "gemm", or for its wide layers "winograd" (F(4,3)) or
    # "winograd2" (F(2,3), for bf16)
    delta: str = "conv1d"
    encoder_chunk: int = 1  # frames per encoder call; 0 = the whole clip at once
    channels_last: bool = False  # encoder memory format
    # encoder instance norm: "layout" keeps a one-frame chunk's memory layout (computed by batch_norm, equal for one
    # image); "reference": F.instance_norm, as the reference
    norm: str = "layout"
    checkpointing: bool = False  # recompute encoder chunks and delta-block calls in backward
    recompute_cheap: bool = False  # keep only convolution outputs; recompute norms/activations in backward

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ExecPlan.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.encoder_chunk < 0 or self.corr_chunk < 0:
            raise ValueError("ExecPlan chunk sizes must be >= 0 (0 = no chunks)")
        if (self.checkpointing or self.recompute_cheap) and self.inference_only:
            raise ValueError("ExecPlan: checkpointing and recompute_cheap are for training, but gather='workspace' "
                             "cannot run under autograd")

    @property
    def inference_only(self) -> bool:
        """True when a form without autograd support is used (the gather workspace)."""
        return self.gather == "workspace"

    @classmethod
    def reference(cls) -> ExecPlan:
        """The authors' computation as written: full correlation volumes, conv1d, the whole clip at once."""
        return cls(corr="volume", gather="plain", delta="conv1d", encoder_chunk=0, channels_last=False,
                   norm="reference")

    @classmethod
    def export(cls) -> ExecPlan:
        """For ONNX export: only traceable forms, and no chunk size computed from N (it would pin N in the graph)."""
        return cls(corr="local", corr_chunk=0, gather="plain", delta="conv1d", encoder_chunk=0,
                   channels_last=False, norm="reference")

    @classmethod
    def auto(cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, training: bool = False,
             checkpointing: bool = False, recompute_cheap: bool | None = None, points: int | None = None,
             crop_hw: tuple[int, int] | None = None) -> ExecPlan:
        """The fastest plan measured (docs/BENCHMARKS.md) for a device and the dtype the convolutions run in.

        dtype: the weights' dtype, or the autocast dtype when the caller runs the model under autocast.
        training: gradients will flow (the correlation gathers are recomputed in backward);
        inference plans refuse a forward that records gradients.
        checkpointing: recompute encoder chunks and delta-block calls in backward (train.py --grad_ckpt).
        recompute_cheap: keep only convolution outputs for backward (train.py --recompute_cheap): about half the
        activation memory. None (the default): on for CPU float32 training above the small crops, where it runs
        as fast as keeping everything (bench_train.py); off elsewhere (not measured on CUDA).
        points, crop_hw: the training batch's points (B*N) and crop, when known. Small CPU training batches (B=2 N=32
        at 128x128 or 128x192) run faster with the reference's full correlation volume, conv1d delta block and
        the encoder over all frames at once (docs/BENCHMARKS.md, "Small training batches").
        """
        device = torch.device(device)
        cuda = device.type == "cuda"
        half = dtype in (torch.bfloat16, torch.float16)
        small_frames = crop_hw is not None and crop_hw[0] * crop_hw[1] <= 128 * 192
        if recompute_cheap is None:
            recompute_cheap = device.type == "cpu" and not small_frames
        # float32 only: the encoder's replay in backward runs without autocast, so it would not remake the
        # forward's half-precision values (and selective checkpointing, for the GEMM delta block, refuses
        # autocast's cached weight casts)
        recompute = recompute_cheap and training and not checkpointing and not half
        # Winograd pays off where the delta block is GEMM-bound: the CPU in float32, in inference and in training
        # (its backward halves the products too). Under bf16 F(4,3)'s transformed tiles, rounded to 8 bits of
        # mantissa, give ~3x the error of a bf16 GEMM: bf16 runs F(2,3) instead (~1.3x a bf16 GEMM's error, a
        # third fewer products), in inference also for its fused norms: the reference's InstanceNorm1d is a batch
        # norm over points x channels of a few values each, slow in bf16 (docs/BENCHMARKS.md)
        small_points = points is not None and points < 128
        winograd = device.type == "cpu" and dtype == torch.float32 and not (training and small_points)
        winograd2 = device.type == "cpu" and dtype == torch.bfloat16 and not (training and small_points)
        # small CPU training crops: the full volume is tiny (16x16 or 16x24 maps) and its matmul backward beats
        # recomputing the local gathers (3.1-3.2 against 3.5-3.6 s per step at the demo's shape)
        volume = training and small_frames and device.type == "cpu"
        return cls(
            corr="volume" if volume else "local",
            gather="plain" if volume else "checkpoint" if training else "workspace",
            # CPU training: the GEMM form's backward (row-slice GEMMs) beats oneDNN's conv1d backward on
            # short sequences (bench_train.py); CUDA keeps cuDNN's conv1d
            delta="winograd" if winograd else "winograd2" if winograd2
            else "gemm" if training and device.type == "cpu" and not small_points
            else "conv1d",
            # one frame at a time on the CPU (cache locality) and under checkpointing (a recompute then holds
            # one frame's activations: 1.4 instead of 9.2 GiB at 512x896); larger kernels run faster on CUDA
            encoder_chunk=16 if cuda and not checkpointing else 0 if small_frames and not checkpointing else 1,
            # channels-last is faster on CUDA, under autocast and in float32 training with recompute_cheap (its
            # encoder replay: oneDNN's channels-last 3x3 convolutions there are up to 1.5x faster, which pays for
            # the replay, bench_train.py); otherwise CPU float32 oneDNN kernels round closer to the reference in
            # the contiguous layout, and autograd's own norms and ReLUs run slower in channels-last
            channels_last=cuda or half or recompute,
            norm="layout",
            checkpointing=checkpointing,
            recompute_cheap=recompute,
        )
