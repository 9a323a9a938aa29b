"""The paths a GPU would take, proven on a CPU-only machine.

1. Every execution path CUDA takes (`ExecPlan.auto("cuda")`: conv1d delta block, channels-last encoder in
   chunks of 16 frames; local correlation under autocast; fp16 autocast with a GradScaler) runs on the CPU and
   is checked against the reference path (the whole CUDA plan in float64: test_golden.py).
2. The model's forward, a training step (train.forward_loss + backward + train.optimizer_update) and track()
   run on the `meta` device: a device that is not the CPU and that refuses any op mixing it with CPU tensors,
   so a tensor created on the wrong device, or a CUDA-only call on a shared path, fails here.
"""

import numpy as np
import pytest
import torch
from helpers import golden_model
from torch.utils._python_dispatch import TorchDispatchMode

from pips2 import tracking
from pips2.cli import train
from pips2.datasets.training import Sample
from pips2.nets import fast
from pips2.nets.pips2 import CorrPyramid
from pips2.nets.plan import ExecPlan


def _clip(S=4, N=6, H=128, W=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgbs = torch.rand(1, S, 3, H, W, generator=g) * 255
    xy = torch.rand(1, 1, N, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    trajs = xy + torch.cumsum(torch.randn(1, S, N, 2, generator=g), 1)
    return rgbs, trajs


def _batch(S=4, N=6, H=128, W=160):
    rgbs, trajs = _clip(S, N, H, W)
    return Sample(rgbs, trajs, torch.ones(1, S, N), torch.ones(1, S, N), torch.zeros(1, 0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# 1. CUDA's execution paths on the CPU


def test_channels_last_encoder_equals_contiguous():
    rgbs, _ = _clip()
    with torch.no_grad():
        a = golden_model(plan=ExecPlan.auto("cuda")).double().encode(rgbs.double())
        b = golden_model(plan=ExecPlan.reference()).double().encode(rgbs.double())
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_local_correlation_under_autocast_stays_float32(dtype):
    torch.manual_seed(0)
    fmaps = torch.randn(1, 3, 16, 20, 32)
    targets, coords = torch.randn(1, 3, 7, 3, 32), torch.rand(1, 3, 7, 2) * 18
    plan = ExecPlan.auto("cuda", dtype)
    def correlate(*args):
        return fast.Forms(plan).correlation(CorrPyramid(fmaps, 4, 3))(*args)
    ref = correlate(targets, coords)
    with torch.autocast("cpu", dtype=dtype):
        got = correlate(targets.to(dtype), coords)
    assert got.dtype == torch.float32
    # only the targets' rounding to the autocast dtype differs
    want = correlate(targets.to(dtype).float(), coords)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - ref).abs().max() > 0 or dtype == torch.float32


def test_delta_block_form_per_device_dtype_and_training():
    for plan in (ExecPlan.auto("cpu", torch.float16), ExecPlan.auto("cuda"), ExecPlan.auto("cuda", torch.bfloat16),
                 ExecPlan.auto("cuda", training=True), ExecPlan.auto("meta")):
        assert plan.delta == "conv1d", plan
    assert ExecPlan.auto("cpu").delta == "winograd"  # CPU float32, inference and training
    assert ExecPlan.auto("cpu", training=True).delta == "winograd"
    assert ExecPlan.auto("cpu", torch.bfloat16, training=True).delta == "winograd2"  # CPU under bf16
    assert ExecPlan.auto("cpu", torch.bfloat16).delta == "winograd2"
    # the model follows its plan whatever the autocast state: no Winograd filters are built under conv1d
    model = golden_model(plan=ExecPlan.auto("cpu", torch.float16))
    rgbs, trajs = _clip(S=3, N=2)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(trajs, rgbs, iters=1)
    assert model.forms.winograd is None


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_step_with_grad_scaler(amp):
    """The training step under autocast (fp16 with a GradScaler, as on CUDA) against the float32 step.

    Small shapes: the CPU has no fast fp16 kernels (S=3 is the shortest clip whose fp16 gradients stay
    finite: over two frames the delta block's instance norm divides by a near-zero spread). The CPU's fp16
    convolution backward is a slow reference loop (~100 s for these three frames), so under fp16 the encoder
    is frozen: it still runs in fp16, and bf16 trains it under autocast. With fp16, a later step whose
    gradients overflow must be skipped by the scaler, as it would be on a GPU.
    """
    batch = _batch(S=3, N=4, W=128)
    results = {}
    for mode in ("none", amp):
        dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        model = golden_model(plan=ExecPlan.auto("cpu", dtype, training=True)).train()
        if amp == "fp16":
            model.fnet.requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=mode == "fp16", init_scale=8.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss, final, _ = train.forward_loss(model, batch, torch.device("cpu"), 1, torch.Generator().manual_seed(3),
                                            mode)
        scaler.scale(loss).backward()
        train.optimizer_update(model, opt, sched, scaler)
        moved = sum(int(not torch.equal(before[n], p)) for n, p in model.named_parameters())
        results[mode] = (loss.item(), final.float(), moved)
        if mode == "fp16":
            assert scaler.get_scale() == 8.0  # a finite step keeps the scale
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            grad = model.delta_block.dense.weight.grad
            assert grad is not None  # set just above
            grad[0, 0] = float("inf")
            kept = {n: p.detach().clone() for n, p in model.named_parameters()}
            train.optimizer_update(model, opt, sched, scaler)
            assert all(torch.equal(kept[n], p) for n, p in model.named_parameters())
            assert scaler.get_scale() < 8.0
    (l32, f32, m32), (lamp, famp, mamp) = results["none"], results[amp]
    assert m32 == mamp == (36 if amp == "fp16" else 80)  # every trainable parameter took the step
    assert lamp == pytest.approx(l32, rel=0.05)
    assert (famp - f32).abs().mean() < 0.5


# ---------------------------------------------------------------------------------------------------------
# 2. Another device: meta


class MetaHost(TorchDispatchMode):
    """Counts the model's ops on the meta device and answers device-to-host copies with zeros.

    Copying a meta tensor to the CPU is the one thing meta cannot do (it holds no data); a real accelerator
    would return numbers there. Everything else runs as it would on a GPU, including the device checks.
    """

    def __init__(self):
        super().__init__()
        self.meta_convs = 0  # convolutions that ran on meta
        self.host_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "conv" in func._schema.name and args[0].device.type == "meta":
            self.meta_convs += 1
        if func._schema.name in ("aten::_to_copy", "aten::to") and args[0].device.type == "meta":
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, torch.device)), None))
            if target is not None and torch.device(target).type == "cpu":
                self.host_copies += 1
                dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
                return torch.zeros(args[0].shape, dtype=dtype or args[0].dtype)
        return func(*args, **kwargs)


def test_forward_runs_on_another_device():
    model = golden_model(plan=ExecPlan.auto("meta")).to("meta")
    rgbs, trajs = _clip()
    with torch.no_grad():
        preds, anim, feats, loss = model(trajs.to("meta"), rgbs.to("meta"), iters=2, trajs_g=trajs.to("meta"))
    assert preds[-1].device.type == "meta" and loss.device.type == "meta"
    assert all(f.device.type == "meta" for f in feats) and preds[-1].shape == trajs.shape


def test_wrong_device_is_caught_on_meta():
    # the premise of this file: meta refuses CPU tensors in its ops, as CUDA does
    with pytest.raises(RuntimeError):
        _ = torch.ones(3, device="meta") + torch.ones(3)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_training_step_runs_on_another_device(grad_ckpt):
    device = torch.device("meta")
    model = golden_model(plan=ExecPlan.auto(device, training=True, checkpointing=grad_ckpt)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-6, eps=1e-8)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=100, pct_start=0.1,
                                                cycle_momentum=False, anneal_strategy="linear")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    loss, final, seen = train.forward_loss(model, _batch(), device, 2, torch.Generator().manual_seed(0), "none")
    assert loss.device == device and final.device == device and seen.rgbs.device == device
    scaler.scale(loss).backward()
    grad = model.fnet.conv1.weight.grad
    assert grad is not None and grad.device == device
    train.optimizer_update(model, opt, sched, scaler)
    assert all(p.device == device for p in model.parameters())
    assert all(v.device == device for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
               and v.dim() > 0)


def test_track_runs_on_another_device():
    model = golden_model(plan=ExecPlan.auto("meta")).to("meta")
    video = (np.random.default_rng(0).random((11, 128, 160, 3)) * 255).astype(np.uint8)
    queries = np.array([[0, 20.0, 30.0], [4, 100.0, 60.0], [10, 50.0, 50.0]], np.float32)
    with MetaHost() as spy:
        res = tracking.track(model, video, queries, S=4, iters=2, backward=True, point_batch=2)
    assert res["tracks"].shape == (11, 3, 2)
    assert spy.meta_convs > 0 and spy.host_copies > 0  # the model ran on meta; results came back to the host
