"""The fast forms of PIPs++'s steps, as plain functions over a module's weights and tensors, and `Forms`, which
picks them as an `ExecPlan` (nets/plan.py) says and keeps what they reuse between calls.

Each computes what its reference in nets/pips2.py computes (tests/test_model.py and test_golden.py check
this in float64). Why each is faster: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pips2.nets.plan import ExecPlan
from pips2.utils.amp import autocast_off

if TYPE_CHECKING:  # only for hints: pips2 imports this module
    from pips2.nets.pips2 import BasicBlock1d, BasicEncoder, CorrPyramid, DeltaBlock, ResidualBlock

# ----------------------------------------------------------------------------------------------------------
# Encoder


ENCODER_NORM_EPS = 1e-5  # the encoder's instance norm (the reference's)


def instance_norm_keep_layout(x: torch.Tensor, eps: float = ENCODER_NORM_EPS) -> torch.Tensor:
    """F.instance_norm (no affine) that keeps the input's memory format, in the fastest of torch's equal kernels.

    A group norm with a group per channel is an instance norm, and its CPU kernel is 2-4x faster than
    instance_norm's or batch_norm's on the encoder's maps in the contiguous layout, forward and backward, and in
    channels-last without autograd (docs/BENCHMARKS.md). Channels-last under autograd keeps batch_norm over a
    one-image batch (its statistics are the image's): its backward is twice group_norm's there. instance_norm
    itself would convert a channels-last tensor back.
    """
    if x.device.type == "cpu" and (x.is_contiguous() or not x.requires_grad):  # measured on the CPU only
        if x.dtype in (torch.float16, torch.bfloat16):
            # autocast would run group_norm in float32, and the residual adds and ReLUs after it with it: twice
            # the memory traffic of keeping the half-precision maps batch_norm kept (its statistics are float32
            # either way)
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, x.shape[1], eps=eps)
        return F.group_norm(x, x.shape[1], eps=eps)
    if x.shape[0] == 1:
        return F.batch_norm(x, None, None, training=True, eps=eps)
    return F.instance_norm(x, eps=eps)


def stack_frames(maps: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Channels-last maps of consecutive frame chunks -> one contiguous (frames,H8,W8,C) tensor of `shape`.

    Without autograd the chunks are copied into one buffer: torch.cat of the permuted views would keep their
    channels-first strides and force another copy at the caller's reshape.
    """
    if len(maps) == 1:
        return maps[0].contiguous()
    if any(m.requires_grad for m in maps):  # outputs of a forward that records gradients
        return torch.cat(maps, 0)
    out = maps[0].new_empty(shape)
    start = 0
    for m in maps:
        out[start:start + m.shape[0]] = m
        start += m.shape[0]
    return out


def _call(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def run_encoder(fnet: BasicEncoder, x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                conv: Callable[[torch.nn.Conv2d, torch.Tensor], torch.Tensor] = _call) -> torch.Tensor:
    """fnet(x) (BasicEncoder.forward in nets/pips2.py) step for step, with its norm and the way each convolution
    runs as arguments: the layout-keeping norm and the replay below (which records and replays convolutions)
    run the encoder through this. With `F.instance_norm(eps=1e-5)` it is fnet(x) exactly (tests/test_model.py)."""
    H, W = x.shape[-2:]
    size = (H // fnet.stride, W // fnet.stride)
    x = F.relu_(norm(conv(fnet.conv1, x)))
    feats = []
    for layer in (fnet.layer1, fnet.layer2, fnet.layer3, fnet.layer4):
        for block in cast("Iterable[ResidualBlock]", layer):  # ResidualBlock.forward (the layers hold only those)
            y = F.relu_(norm(conv(block.conv1, x)))
            y = F.relu_(norm(conv(block.conv2, y)))
            if block.downsample is not None:
                x = norm(conv(cast(torch.nn.Conv2d, block.downsample[0]), x))  # Sequential(Conv2d)
            x = F.relu_(x + y)
        feats.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
    x = F.relu_(norm(conv(fnet.conv2, torch.cat(feats, 1))))
    return conv(fnet.conv3, x)


CHEAP_CONV_MACS = 256  # multiply-adds per output value under which a convolution is recomputed, not kept


def _costly(weight: torch.Tensor) -> bool:
    """Whether a convolution's output is kept for backward rather than computed again: weight (out, in/groups,
    kh, kw), one output filter's size is the multiply-adds per output value. The encoder's 7x7 conv of the
    3-channel image and the 1x1 shortcuts cost little to redo, and the former's output is as large as a whole
    layer1 conv's."""
    return weight[0].numel() >= CHEAP_CONV_MACS


def _save_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        return CheckpointPolicy.MUST_SAVE  # the GEMM and Winograd forms of a convolution (the latter's products)
    if op is torch.ops.aten.convolution.default:
        return CheckpointPolicy.MUST_SAVE if _costly(args[1]) else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _ConvGivenOutput(torch.autograd.Function):
    """A convolution whose output is already known (kept from the forward pass): returns it as is, and
    back-propagates through the convolution as autograd's own backward would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: tuple[torch.Tensor],
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        # `out` comes wrapped: as a tensor input, the alias returned would carry gradients back into the
        # graph that made it (the encoder's own output among them)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, bias is not None)
        return out[0].detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, [1, 1], False, [0, 0], 1,
            [need[0], need[1], has_bias and need[2]])
        return gx, gw, gb, None, None, None


def _as_one_batch(x: torch.Tensor) -> torch.Tensor:
    """(n,C,H,W) -> (1,n*C,H,W): instance statistics are then batch statistics (what F.instance_norm does)."""
    return x if x.shape[0] == 1 else x.reshape(1, -1, *x.shape[2:])


def _norm_with_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance norm of (n,C,H,W) without affine parameters -> (output, mean, 1/std), the statistics per
    channel of each image; the output is the one F.instance_norm and F.batch_norm (n=1) make."""
    y, mean, invstd = torch.native_batch_norm(_as_one_batch(x), None, None, None, None, True, 0.0,
                                              ENCODER_NORM_EPS)
    return y.view(x.shape) if x.shape[0] > 1 else y, mean, invstd


class _NormGivenStats(torch.autograd.Function):
    """Instance norm of x from statistics saved in the forward pass (one pass, none to gather statistics again),
    with the gradient of the true norm (statistics depending on x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, invstd = stats
        ctx.save_for_backward(x)
        ctx.stats = stats
        shape = (x.shape[0], -1, 1, 1)  # per image and channel
        return torch.addcmul((-mean * invstd).view(shape), x, invstd.view(shape))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        mean, invstd = ctx.stats
        gx = torch.ops.aten.native_batch_norm_backward(_as_one_batch(g), _as_one_batch(x), None, None, None, mean,
                                                       invstd, True, ENCODER_NORM_EPS, [True, False, False])[0]
        return gx.view(x.shape) if x.shape[0] > 1 else gx, None


class _EncodeKeepingConvs(torch.autograd.Function):
    """The encoder on a chunk of frames, keeping for backward only its input, the outputs of its costly
    convolutions and the norms' statistics: backward replays the forward from these (norms from their saved
    statistics, ReLUs, sums, resamplings and the cheap 7x7 and 1x1 convolutions recomputed, the kept outputs
    reused) and back-propagates through the replay, whose own activations live for one chunk's backward only."""

    @staticmethod
    def forward(ctx, fnet, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        kept, stats = [], []

        def record(conv: torch.nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:
            out = conv(inp)
            if _costly(conv.weight):
                kept.append(out)
            return out

        def record_norm(z: torch.Tensor) -> torch.Tensor:
            y, *st = _norm_with_stats(z)
            stats.extend(st)
            return y

        y = run_encoder(fnet, x, record_norm, record)
        ctx.fnet, ctx.n_kept = fnet, len(kept)
        ctx.save_for_backward(x, *kept, *stats)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, *saved = ctx.saved_tensors
        outs, stats = iter(saved[:ctx.n_kept]), iter(saved[ctx.n_kept:])

        def replay(conv: torch.nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:
            if _costly(conv.weight):
                return _ConvGivenOutput.apply(inp, conv.weight, conv.bias, (next(outs),), conv.stride, conv.padding)
            return conv(inp)

        def replay_norm(z: torch.Tensor) -> torch.Tensor:
            return _NormGivenStats.apply(z, (next(stats), next(stats)))

        params = list(ctx.fnet.parameters())
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:], strict=True) if need]
        with torch.enable_grad():
            xd = x.detach().requires_grad_(ctx.needs_input_grad[1])
            y = run_encoder(ctx.fnet, xd, replay_norm, replay)
            grads = iter(torch.autograd.grad(y, ([xd] if xd.requires_grad else []) + wanted, g, allow_unused=True))
        gx = next(grads) if xd.requires_grad else None
        return None, gx, *(next(grads) if need else None for need in ctx.needs_input_grad[2:])


def encode_keeping_convs(fnet: BasicEncoder, x: torch.Tensor) -> torch.Tensor:
    """fnet(x) (instance norms) under autograd keeping only x, its costly convolutions' outputs and the norms'
    statistics for backward: about half the encoder's activation memory, for a replay of its cheap operations
    in backward."""
    params = list(fnet.parameters())
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return run_encoder(fnet, x, instance_norm_keep_layout)
    return _EncodeKeepingConvs.apply(fnet, x, *params)


def keep_conv_outputs(fn, *args):
    """fn(*args) under autograd keeping only its convolutions' outputs for backward; the norms, activations,
    sums and resamplings between them are recomputed from those in backward (cheap, memory-bound work)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(_save_convolutions))


# ----------------------------------------------------------------------------------------------------------
# Correlation: sample features around each point first, then take dot products (both steps are linear, so
# this equals sampling the full volume), never building the B*S*N*H8*W8 volume.


def _patch_index(coords: torch.Tensor, h: int, w: int, radius: int):
    """Where patch_corr gathers: flat row indices (F*N*P*P) into (F*h*w) rows, the in-map mask (F,N,P,P) and the
    fractional offsets fx, fy (F,N) of coords (F,N,2); P = 2r+2."""
    Fr = coords.shape[0]
    # points far outside only see zeros; clamping keeps the integer arithmetic finite without changing that
    x = coords[..., 0].clamp(-radius - 2, w + radius + 1)
    y = coords[..., 1].clamp(-radius - 2, h + radius + 1)
    x0, y0 = x.floor(), y.floor()
    offs = torch.arange(-radius, radius + 2, device=coords.device)
    ix = x0.long().unsqueeze(-1) + offs  # F, N, P
    iy = y0.long().unsqueeze(-1) + offs
    inside = ((ix >= 0) & (ix < w)).unsqueeze(-1) & ((iy >= 0) & (iy < h)).unsqueeze(-2)  # F,N,Px,Py
    idx = iy.clamp(0, h - 1).unsqueeze(-2) * w + ix.clamp(0, w - 1).unsqueeze(-1)  # F,N,Px,Py
    idx = idx + (torch.arange(Fr, device=coords.device) * (h * w)).view(Fr, 1, 1, 1)
    return idx.reshape(-1), inside, x - x0, y - y0


def _patch_blend(patch: torch.Tensor, targets: torch.Tensor, inside: torch.Tensor, fx: torch.Tensor,
                 fy: torch.Tensor, scale: float) -> torch.Tensor:
    """Gathered patches (F*N, P*P, C) and targets (F,N,T,C) -> correlations (F,N,T,(P-1)^2), zeros outside."""
    Fr, N, T, C = targets.shape
    P = inside.shape[-1]
    corr = torch.bmm(targets.reshape(Fr * N, T, C), patch.transpose(1, 2)).view(Fr, N, T, P, P)
    corr = corr * inside.unsqueeze(2).to(corr.dtype) / scale
    fx = fx.view(Fr, N, 1, 1, 1)
    fy = fy.view(Fr, N, 1, 1, 1)
    # P[i, j] is at (x0 + i - r, y0 + j - r); out[i, j] blends P[i:i+2, j:j+2]
    cx = corr[:, :, :, :-1] * (1 - fx) + corr[:, :, :, 1:] * fx
    out = cx[..., :-1] * (1 - fy) + cx[..., 1:] * fy
    return out.reshape(Fr, N, T, (P - 1) * (P - 1))


def _patch_blend_grad(grad: torch.Tensor, inside: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The adjoint of _patch_blend's blend and mask: gradient (F,N,T,(P-1)^2) of the correlations -> gradient
    (F*N, T, P*P) of the raw patch products (the blend is linear in them, so they need not be recomputed)."""
    Fr, N, T, _ = grad.shape
    P = inside.shape[-1]
    g = grad.view(Fr, N, T, P - 1, P - 1)
    fx = fx.view(Fr, N, 1, 1, 1).to(g.dtype)
    fy = fy.view(Fr, N, 1, 1, 1).to(g.dtype)
    gcx = F.pad(g * (1 - fy), (0, 1)) + F.pad(g * fy, (1, 0))  # (.., P-1, P)
    gc = F.pad(gcx * (1 - fx), (0, 0, 0, 1)) + F.pad(gcx * fx, (0, 0, 1, 0))  # (.., P, P)
    gc = gc * inside.unsqueeze(2).to(gc.dtype) / scale
    return gc.view(Fr * N, T, P * P)


def _gather(src: torch.Tensor, idx: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    if workspace is None:
        return src.index_select(0, idx)
    C = src.shape[1]
    return torch.index_select(src, 0, idx, out=workspace[:idx.numel() * C].view(idx.numel(), C))


def patch_corr(fmap_flat: torch.Tensor, targets: torch.Tensor, coords: torch.Tensor, h: int, w: int,
               radius: int, scale: float, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation of targets with a (2r+1)^2 bilinear neighbourhood, zeros outside the map.

    fmap_flat (F, h*w, C) one map per frame; targets (F, N, T, C); coords (F, N, 2) at this level.
    Returns (F, N, T, (2r+1)^2) with value k = (2r+1)*i + j read at (x + i - r, y + j - r), divided by scale.
    `workspace` (no autograd): a buffer of at least F*N*(2r+2)^2*C floats to gather into.
    The 2r+1 taps along each axis share one fractional offset, so one integer (2r+2)^2 patch is gathered,
    correlated once with every template and then blended, instead of 4 gathers per tap.
    """
    Fr, N, T, C = targets.shape
    P = 2 * radius + 2
    idx, inside, fx, fy = _patch_index(coords, h, w, radius)
    patch = _gather(fmap_flat.reshape(Fr * h * w, C), idx, workspace).view(Fr * N, P * P, C)
    return _patch_blend(patch, targets, inside, fx, fy, scale)


class _LocalCorrRecompute(torch.autograd.Function):
    """One pyramid level of local_corr over frame chunks, storing no patch: backward gathers each chunk's
    patches again (for the targets' gradient) and accumulates the map's gradient of every chunk into one buffer
    (a checkpoint per chunk allocated a whole-map gradient for each chunk's slice, and freshly mapped memory is
    slow to touch). The correlations are linear in the patch products, so these are not recomputed."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, tg: torch.Tensor, xy: torch.Tensor, h: int, w: int, r: int, scale: float,
                step: int) -> torch.Tensor:
        ctx.save_for_backward(flat, tg, xy)
        ctx.args = (h, w, r, scale, step)
        BS, N, T, C = tg.shape
        ws = tg.new_empty(min(step, BS) * N * (2 * r + 2) ** 2 * C)
        return torch.cat([patch_corr(flat[s:s + step], tg[s:s + step], xy[s:s + step], h, w, r, scale, ws)
                          for s in range(0, BS, step)], 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat, tg, xy = ctx.saved_tensors
        h, w, r, scale, step = ctx.args
        BS, N, T, C = tg.shape
        P = 2 * r + 2
        want_map, want_tg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_map = flat.new_zeros(BS * h * w, C) if want_map else None
        g_tg = tg.new_empty(tg.shape) if want_tg else None
        ws = tg.new_empty(min(step, BS) * N * P * P * C)
        g_patches = tg.new_empty(min(step, BS) * N, P * P, C) if want_map else None  # reused: no page faults
        for s in range(0, BS, step):
            fr = min(step, BS - s)
            idx, inside, fx, fy = _patch_index(xy[s:s + step], h, w, r)
            g_corr = _patch_blend_grad(grad[s:s + step], inside, fx, fy, scale)  # fr*N, T, P*P
            if g_map is not None and g_patches is not None:  # want_map
                # corr = targets patch^T: patch gradient g_corr^T targets, made contiguous by its bmm
                g_patch = torch.bmm(g_corr.transpose(1, 2).to(tg.dtype), tg[s:s + step].reshape(fr * N, T, C),
                                    out=g_patches[:fr * N])
                g_map.index_add_(0, idx + s * h * w, g_patch.view(-1, C))
            if g_tg is not None:  # want_tg
                patch = _gather(flat[s:s + step].reshape(fr * h * w, C), idx, ws).view(fr * N, P * P, C)
                torch.bmm(g_corr, patch, out=g_tg[s:s + step].view(fr * N, T, C))
        return (g_map.view(flat.shape) if g_map is not None else None), g_tg, None, None, None, None, None, None


class LocalCorrelation:
    """`pyramid(targets, coords)` (CorrPyramid.__call__) computed from local patches, for one forward pass.

    chunk_elems bounds the gathered floats held at once (0 = no bound). gather: "workspace" gathers into one
    buffer kept here for all calls (no autograd; a fresh allocation per gather costs more in page faults than
    the gather itself); "checkpoint" stores no patch for backward and gathers each chunk again there; "plain"
    gathers into fresh tensors.
    """

    def __init__(self, pyramid: CorrPyramid, chunk_elems: int, gather: str):
        self.pyramid, self.chunk_elems, self.gather = pyramid, chunk_elems, gather
        self.workspace: torch.Tensor | None = None

    def __call__(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """targets (B,S,N,T,C), coords (B,S,N,2) -> (B,S,N,T*L*(2r+1)^2) float32, as CorrPyramid.__call__: in the
        maps' dtype without autocast, rounded to float32 as the reference's correlations are."""
        B, S, N, T, C = targets.shape
        with autocast_off(coords.device.type):
            dtype = self.pyramid.levels[0].dtype
            out = self.lookup(targets.to(dtype), coords.to(dtype))
        return out.reshape(B, S, N, -1).float()

    def lookup(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """CorrPyramid.volume's values in the targets' dtype: (B,S,N,T,C), (B,S,N,2) -> (B,S,N,T*L*(2r+1)^2)."""
        pyramid, gather = self.pyramid, self.gather
        B, S, N, T, C = targets.shape
        BS, r = B * S, pyramid.radius
        tg = targets.reshape(BS, N, T, C)
        xy = coords.reshape(BS, N, 2)
        P = 2 * r + 2
        step = max(1, self.chunk_elems // max(1, N * P * P * C)) if self.chunk_elems else BS
        if gather == "workspace":
            need = min(step, BS) * N * P * P * C
            if self.workspace is None or self.workspace.numel() < need:
                self.workspace = tg.new_empty(need)
        recompute = gather == "checkpoint" and torch.is_grad_enabled() and (
            pyramid.levels[0].requires_grad or tg.requires_grad)
        per_level = []
        for i, lv in enumerate(pyramid.levels):
            h, w = lv.shape[1:3]
            flat = lv.reshape(BS, h * w, C)
            xy_l = xy / (2**i)
            if recompute and not xy_l.requires_grad:
                per_level.append(_LocalCorrRecompute.apply(flat, tg, xy_l, h, w, r, pyramid.scale, step))
                continue
            parts = []
            for s in range(0, BS, step):
                args = (flat[s:s + step], tg[s:s + step], xy_l[s:s + step], h, w, r, pyramid.scale)
                if gather == "checkpoint":
                    parts.append(checkpoint(patch_corr, *args, use_reentrant=False))
                else:
                    parts.append(patch_corr(*args, workspace=self.workspace if gather == "workspace" else None))
            per_level.append(torch.cat(parts, 0))  # BS, N, T, 49
        return torch.stack(per_level, 3).reshape(B, S, N, -1)  # levels inner to templates


def local_corr(pyramid: CorrPyramid, targets: torch.Tensor, coords: torch.Tensor, chunk_elems: int,
               gather: str) -> torch.Tensor:
    """CorrPyramid.volume's values from local patches: (B,S,N,T,C), (B,S,N,2) -> (B,S,N,T*L*(2r+1)^2), in one
    call (`LocalCorrelation` for its arguments)."""
    return LocalCorrelation(pyramid, chunk_elems, gather).lookup(targets, coords)


# ----------------------------------------------------------------------------------------------------------
# Delta block, time-major (M,S,C) with Winograd F(4,3) (Lavin & Gray 2016) for the widest convolutions:
# four outputs of a 3-tap filter from six inputs with six products instead of twelve. On the CPU these
# convolutions are GEMM-bound, so halving their products is worth the cheap transforms; float32 results
# match conv1d to ~1e-6. Its backward (`_Conv1dK3Winograd`) runs the transposed transforms: half the products
# of the direct form for the input and the weight gradients too. Under bf16 the F(4,3) transforms' large and
# fractional coefficients cost too much precision; F(2,3) (two outputs from four inputs, four products instead
# of six; coefficients 0, +-1 and 1/2) keeps the error of a bf16 GEMM and still saves a third of the products.
# The filters' first dimension (6 or 4 transformed filters) says which of the two a layer runs.

_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD2_G = ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1))
WINOGRAD_MIN_PRODUCT = 512 * 512  # narrower layers (cout*cin): the transforms would cost what they save


def winograd_weights(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """Conv1d weight (cout,cin,3) -> the transformed filters: (6,cin,cout) for F(4,3), (4,cin,cout) for tile=2."""
    if tile not in _SCHEMES:
        raise ValueError(f"Winograd tiles of 2 or 4 outputs, got {tile}")
    g = torch.tensor(_SCHEMES[tile].G, dtype=weight.dtype, device=weight.device)
    return torch.einsum("jk,ock->jco", g, weight).contiguous()


def _tiling(wt: torch.Tensor, S: int, C: int, max_elems: int) -> tuple[_Scheme, int, int]:
    """The scheme that transformed filters wt belong to (six filters: F(4,3), four: F(2,3)), the tiles per
    sequence of S frames, and how many sequences go through at once to keep the tiles under max_elems floats."""
    scheme = _SCHEMES[wt.shape[0] - 2]
    T = -(-S // scheme.tile)
    return scheme, T, max(1, max_elems // (wt.shape[0] * T * max(C, wt.shape[2])))


def conv1d_k3_winograd(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor,
                       max_elems: int = 1 << 23) -> torch.Tensor:
    """conv1d(kernel 3, padding 1) of time-major x (M,S,cin) with `winograd_weights` wt -> (M,S,cout).

    Sequences go through in groups whose transformed tiles stay under `max_elems` floats, which bounds the
    extra memory at long clips and many points (the GEMMs keep >= ~1000 rows).
    """
    M, S, C = x.shape
    scheme, T, group = _tiling(wt, S, C, max_elems)
    if group < M:
        out = x.new_empty(M, S, wt.shape[2])
        for m in range(0, M, group):
            out[m:m + group] = conv1d_k3_winograd(x[m:m + group], wt, bias, max_elems)
        return out
    m = torch.bmm(scheme.t_in(x, T).view(wt.shape[0], M * T, C), wt)
    return scheme.t_out(m.view(wt.shape[0], M, T, -1), S, bias)


def _padded_in_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Time-major x (M,S,C) between zero rows: one before, length - S - 1 after (F.pad would zero it all first)."""
    M, S, C = x.shape
    xp = x.new_empty(M, length, C)
    xp[:, 0].zero_()
    xp[:, S + 1:].zero_()
    xp[:, 1:S + 1] = x
    return xp


def _winograd_in(x: torch.Tensor, T: int) -> torch.Tensor:
    """Input transform B^T d of every tile of time-major x (M,S,C) -> (6,M,T,C); tile j reads x[4j-1 .. 4j+4]."""
    M, S, C = x.shape
    xp = _padded_in_time(x, 4 * T + 2)
    d0, d1, d2, d3, d4, d5 = (xp[:, i:i + 4 * T:4] for i in range(6))  # six inputs of every tile
    U = x.new_empty(6, M, T, C)  # sharing subexpressions
    torch.add(d4, d0, alpha=4, out=U[0]).add_(d2, alpha=-5)
    a, b = torch.add(d4, d2, alpha=-4), torch.add(d3, d1, alpha=-4)
    torch.add(a, b, out=U[1])
    torch.sub(a, b, out=U[2])
    c, e = torch.sub(d4, d2), torch.sub(d3, d1)
    torch.add(c, e, alpha=2, out=U[3])
    torch.add(c, e, alpha=-2, out=U[4])
    torch.add(d5, d1, alpha=4, out=U[5]).add_(d3, alpha=-5)
    return U


def _winograd_out(m: torch.Tensor, S: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Output transform A^T m of the tiles' products (6,M,T,C) -> time-major (M,S,C)."""
    m0, m1, m2, m3, m4, m5 = m.unbind(0)  # not changed in place: selective checkpointing may keep m
    p, q, r, s = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    _, M, T, C = m.shape
    Y = m.new_empty(M, T, 4, C)
    torch.add(m0, p, out=Y[:, :, 0]).add_(r)
    torch.add(q, s, alpha=2, out=Y[:, :, 1])
    torch.add(p, r, alpha=4, out=Y[:, :, 2])
    torch.add(q, s, alpha=8, out=Y[:, :, 3]).add_(m5)
    Y = Y.view(M, 4 * T, C)[:, :S]
    return Y if bias is None else Y.add_(bias)


def _winograd_out_grad(g: torch.Tensor, T: int) -> torch.Tensor:
    """The output transform's adjoint A g: gradient (M,S,C) of the outputs -> of the tiles' products (6,M,T,C)."""
    M, S, C = g.shape
    gt = F.pad(g, (0, 0, 0, 4 * T - S)).view(M, T, 4, C)
    g0, g1, g2, g3 = gt.unbind(2)
    a, b = g0 + g2, g1 + g3  # even and odd rows, then the same with weights 1, 4 and 2, 8
    c, e = torch.add(g0, g2, alpha=4), torch.add(g1, g3, alpha=4)
    gm = g.new_empty(6, M, T, C)
    gm[0] = g0
    torch.add(a, b, out=gm[1])
    torch.sub(a, b, out=gm[2])
    torch.add(c, e, alpha=2, out=gm[3])
    torch.add(c, e, alpha=-2, out=gm[4])
    gm[5] = g3
    return gm


def _winograd_in_grad(gU: torch.Tensor, S: int) -> torch.Tensor:
    """The input transform's adjoint B gU, tiles overlap-added: (6,M,T,C) -> gradient of x (M,S,C)."""
    u0, u1, u2, u3, u4, u5 = gU.unbind(0)
    _, M, T, C = gU.shape
    p, q, r, s = u1 + u2, u1 - u2, u3 + u4, u3 - u4
    gxp = gU.new_empty(M, 4 * T + 2, C)
    core = gxp[:, :4 * T].view(M, T, 4, C)
    torch.mul(u0, 4, out=core[:, :, 0])
    torch.add(s, q, alpha=2, out=core[:, :, 1]).mul_(-2).add_(u5, alpha=4)
    torch.add(r, p, alpha=4, out=core[:, :, 2]).neg_().add_(u0, alpha=-5)
    torch.add(q, s, alpha=2, out=core[:, :, 3]).add_(u5, alpha=-5)
    g4 = p.add_(r).add_(u0)  # a tile's inputs 4 and 5 are the next tile's 0 and 1
    core[:, 1:, 0] += g4[:, :-1]
    core[:, 1:, 1] += u5[:, :-1]
    gxp[:, 4 * T] = g4[:, -1]
    gxp[:, 4 * T + 1] = u5[:, -1]
    return gxp[:, 1:S + 1]


def _winograd2_in(x: torch.Tensor, T: int) -> torch.Tensor:
    """F(2,3)'s input transform of every tile of time-major x (M,S,C) -> (4,M,T,C); tile j reads x[2j-1 .. 2j+2]."""
    M, S, C = x.shape
    xp = _padded_in_time(x, 2 * T + 2)
    d0, d1, d2, d3 = (xp[:, i:i + 2 * T:2] for i in range(4))
    U = x.new_empty(4, M, T, C)
    torch.sub(d0, d2, out=U[0])
    torch.add(d1, d2, out=U[1])
    torch.sub(d2, d1, out=U[2])
    torch.sub(d1, d3, out=U[3])
    return U


def _winograd2_out(m: torch.Tensor, S: int, bias: torch.Tensor | None) -> torch.Tensor:
    """F(2,3)'s output transform of the tiles' products (4,M,T,C) -> time-major (M,S,C)."""
    m0, m1, m2, m3 = m.unbind(0)
    _, M, T, C = m.shape
    Y = m.new_empty(M, T, 2, C)
    torch.add(m0, m1, out=Y[:, :, 0]).add_(m2)
    torch.sub(m1, m2, out=Y[:, :, 1]).sub_(m3)
    Y = Y.view(M, 2 * T, C)[:, :S]
    return Y if bias is None else Y.add_(bias)


def _winograd2_out_grad(g: torch.Tensor, T: int) -> torch.Tensor:
    """The adjoint of F(2,3)'s output transform: gradient (M,S,C) of the outputs -> of the products (4,M,T,C)."""
    M, S, C = g.shape
    g0, g1 = F.pad(g, (0, 0, 0, 2 * T - S)).view(M, T, 2, C).unbind(2)
    gm = g.new_empty(4, M, T, C)
    gm[0] = g0
    torch.add(g0, g1, out=gm[1])
    torch.sub(g0, g1, out=gm[2])
    torch.neg(g1, out=gm[3])
    return gm


def _winograd2_in_grad(gU: torch.Tensor, S: int) -> torch.Tensor:
    """The adjoint of F(2,3)'s input transform, tiles overlap-added: (4,M,T,C) -> gradient of x (M,S,C)."""
    u0, u1, u2, u3 = gU.unbind(0)
    _, M, T, C = gU.shape
    gxp = gU.new_empty(M, 2 * T + 2, C)
    core = gxp[:, :2 * T].view(M, T, 2, C)
    core[:, :, 0] = u0
    torch.sub(u1, u2, out=core[:, :, 1]).add_(u3)
    g2 = torch.add(u1, u2).sub_(u0)  # a tile's inputs 2 and 3 are the next tile's 0 and 1
    core[:, 1:, 0] += g2[:, :-1]
    core[:, 1:, 1] -= u3[:, :-1]
    gxp[:, 2 * T] = g2[:, -1]
    torch.neg(u3[:, -1], out=gxp[:, 2 * T + 1])
    return gxp[:, 1:S + 1]


class _Scheme(NamedTuple):
    """One Winograd F(tile,3): its transforms, their adjoints, and G (filters -> transformed filters)."""

    tile: int
    t_in: Callable[[torch.Tensor, int], torch.Tensor]
    t_out: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]
    t_out_grad: Callable[[torch.Tensor, int], torch.Tensor]
    t_in_grad: Callable[[torch.Tensor, int], torch.Tensor]
    G: tuple[tuple[float, ...], ...]


_SCHEMES = {  # outputs per tile -> scheme
    4: _Scheme(4, _winograd_in, _winograd_out, _winograd_out_grad, _winograd_in_grad, _WINOGRAD_G),
    2: _Scheme(2, _winograd2_in, _winograd2_out, _winograd2_out_grad, _winograd2_in_grad, _WINOGRAD2_G),
}
WINOGRAD_TILES = {"winograd": 4, "winograd2": 2}  # ExecPlan.delta -> outputs per tile of its wide layers


class _Conv1dK3Winograd(torch.autograd.Function):
    """conv1d_k3_winograd with a backward in the same form: the gradients of the tiles' products are A g, the
    input gradient B (A g wt^T) overlap-added over tiles, the filters' gradient U^T (A g) mapped back to the
    three taps by G^T. Every product is one (n, rows/tile, .) batched GEMM (n = tile + 2 transformed filters):
    half the multiplications of the direct form each way under F(4,3), two thirds under F(2,3). Sequences go
    through in groups, as in the forward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wt: torch.Tensor,
                max_elems: int, eps: float | None) -> torch.Tensor:
        ctx.max_elems, ctx.weight_dtype, ctx.normed = max_elems, weight.dtype, eps is not None
        if eps is None:
            x = z
            ctx.save_for_backward(z, wt)
        else:
            y, mean, scale = _norm_relu_forward(z, eps)
            x = y.to(z.dtype)
            del y  # the float32 copy of a half-precision input, not needed through the products
            ctx.save_for_backward(z, wt, mean, scale)
        return conv1d_k3_winograd(x, wt, bias, max_elems)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, wt, *stats = ctx.saved_tensors
        x = z
        if ctx.normed:  # the normalised input again: the norm's backward needs it, the filters' gradient its ReLU
            xh = _normalised(z, *stats)
            x = xh.relu().to(z.dtype) if ctx.needs_input_grad[1] else None
        M, S, C = z.shape
        n = wt.shape[0]
        scheme, T, group = _tiling(wt, S, C, ctx.max_elems)
        gx = z.new_empty(M, S, C) if ctx.needs_input_grad[0] else None
        gwt = U = None
        for m in range(0, M, group):
            g = grad[m:m + group]
            k = g.shape[0]
            gm = scheme.t_out_grad(g, T).view(n, k * T, -1)
            if gx is not None:  # needs_input_grad[0]
                gx[m:m + group] = scheme.t_in_grad(torch.bmm(gm, wt.transpose(1, 2)).view(n, k, T, C), S)
            if x is not None and ctx.needs_input_grad[1]:  # (x is None only when it is not needed)
                U = scheme.t_in(x[m:m + group], T).view(n, k * T, C)
                gwt = torch.baddbmm(gwt, U.transpose(1, 2), gm) if gwt is not None else torch.bmm(
                    U.transpose(1, 2), gm)
        gw = None
        if gwt is not None:  # (n, cin, cout) -> (cout, cin, 3): G^T, in float32 at least
            dt = torch.promote_types(gwt.dtype, torch.float32)
            g_mat = torch.tensor(scheme.G, dtype=dt, device=gwt.device)
            cin, cout = gwt.shape[1:]
            # (cin*cout, n) x (n, 3) then one transposing copy: a third of the time of the einsum's own layout
            gw = torch.mm(gwt.to(dt).view(n, -1).t(), g_mat).view(cin, cout, 3).transpose(0, 1)
            gw = gw.contiguous().to(ctx.weight_dtype)
        gb = grad.sum((0, 1)) if ctx.needs_input_grad[2] else None
        if ctx.normed and gx is not None:
            del x, U  # before the norm's backward allocates its own (M,S,C) temporaries
            gx = _norm_relu_backward(gx, xh, stats[1]).to(z.dtype)
        return gx, gw, gb, None, None, None


def conv1d_k3_winograd_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wt: torch.Tensor,
                             max_elems: int = 1 << 23, norm_eps: float | None = None) -> torch.Tensor:
    """conv1d_k3_winograd with gradients for x, weight and bias; wt = winograd_weights(weight), treated as a
    constant (the weight's gradient is computed directly). With norm_eps the input is relu(InstanceNorm1d(x))
    made inside: only x is kept for backward, not the normalised copy as well (one tensor per layer fewer)."""
    return _Conv1dK3Winograd.apply(x, weight, bias, wt, max_elems, norm_eps)


def _delta_convs(block: DeltaBlock) -> list[torch.nn.Conv1d]:
    """The delta block's convolutions in the order data goes through them (the order they are registered in:
    first_block_conv, then conv1 and conv2 of each block)."""
    return [m for m in block.modules() if isinstance(m, torch.nn.Conv1d)]


def _is_wide(conv: torch.nn.Conv1d) -> bool:
    return conv.weight.shape[0] * conv.weight.shape[1] >= WINOGRAD_MIN_PRODUCT


def winograd_filters(block: DeltaBlock, tile: int = 4) -> list[torch.Tensor | None]:
    """Transformed filters (`winograd_weights`) of each of the block's convolutions in module order; None for
    narrow layers."""
    convs = _delta_convs(block)
    with torch.no_grad():
        return [winograd_weights(c.weight, tile) if _is_wide(c) else None for c in convs]


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """Conv1d weight (cout, cin, 3) -> (3, cout, cin): one contiguous matrix per tap."""
    return weight.permute(2, 0, 1).contiguous()


def _k3_rows(xp: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """Three-tap convolution over the rows of a sequence-padded matrix xp (L, c): row j of the result (1 <= j <
    L-1) is xp[j-1] A0 + xp[j] A1 + xp[j+1] A2, with A_k = taps[k].t() (or taps[2-k] when `transposed`, which
    gives the input gradient). Rows 0 and L-1 are left unset. Contiguous row slices: no shifted copies."""
    a0, a1, a2 = (taps[2], taps[1], taps[0]) if transposed else (taps[0].t(), taps[1].t(), taps[2].t())
    out = xp.new_empty(xp.shape[0], a1.shape[1])
    o = out[1:-1]
    if bias is None:
        torch.mm(xp[1:-1], a1, out=o)
    else:
        torch.addmm(bias, xp[1:-1], a1, out=o)
    o.addmm_(xp[:-2], a0)
    o.addmm_(xp[2:], a2)
    return out


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Time-major (M,S,C) -> (M*(S+2), C): every sequence between two zero rows, so a time shift is a row shift."""
    return F.pad(x, (0, 0, 1, 1)).view(-1, x.shape[2])


def _unpad_rows(out: torch.Tensor, M: int, S: int) -> torch.Tensor:
    return out.view(M, S + 2, -1)[:, 1:-1]


def _k3_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    M, S, _ = x.shape
    return _unpad_rows(_k3_rows(_pad_rows(x), _taps(weight), bias, False), M, S)


class _Conv1dK3Gemm(torch.autograd.Function):
    """conv1d_k3_gemm; backward: the input gradient is the same three-GEMM form with the taps mirrored, the weight
    gradient three GEMMs against shifted row slices of the padded input (rebuilt, not stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _k3_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        M, S, _ = x.shape
        gp = _pad_rows(grad)  # zero rows between sequences: nothing leaks across them
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # the input at t fed output t+1 through tap 0, output t through tap 1, output t-1 through tap 2
            gx = _unpad_rows(_k3_rows(gp, _taps(weight), None, True), M, S)
        if ctx.needs_input_grad[1]:
            xp, g = _pad_rows(x), gp[1:-1]
            L = xp.shape[0]
            gw = torch.stack([g.t() @ xp[k:L - 2 + k] for k in range(3)], 2)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 1))
        return gx, gw, gb


def conv1d_k3_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv1d(kernel 3, padding 1) of time-major x (M,S,cin) as three GEMMs over row slices -> (M,S,cout).

    The sequences are laid end to end with a zero row between neighbours, so each tap is one GEMM on a
    contiguous row slice (the two padding rows per sequence cost 2/(S+2) extra rows, no shifted copies). With
    autograd its backward is six GEMMs of the same form, which the CPU runs closer to its peak than conv1d's
    backward on (M, C, S) maps with short S, and it stores only the input, as conv1d does.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # GEMMs into preallocated outputs, and a custom Function, see no autocast (the latter not in backward):
        # cast here, as autocast would for addmm, so that both passes run in one dtype (the casts carry the
        # gradients back to the float32 weights)
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return conv1d_k3_gemm(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    bias_grad = bias is not None and bias.requires_grad
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias_grad):
        return _Conv1dK3Gemm.apply(x, weight, bias)
    return _k3_forward(x, weight, bias)


def _conv_time_major(conv: torch.nn.Conv1d, x: torch.Tensor, wt: torch.Tensor | None,
                     normed: bool = False) -> torch.Tensor:
    """The Winograd plan's convolution of x, or of relu(InstanceNorm1d(x)) if `normed`: with Winograd filters
    `wt` (a wide layer) F(4,3) or F(2,3), as wt's scheme says, with gradients when autograd records; a narrow
    layer (wt None) runs as conv1d, or as GEMMs when autograd records."""
    dev = x.device.type
    grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if normed and not (grad and wt is not None):  # else the norm is made inside the Winograd Function
        x = _instance_norm_relu_time_major(x)
    if wt is None:
        if grad:
            return conv1d_k3_gemm(x, conv.weight, conv.bias)
        return F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=1).transpose(1, 2)
    eps = NORM_EPS if normed and grad else None
    assert conv.bias is not None  # Winograd's output transform adds it; the delta block's convolutions have one
    if torch.is_autocast_enabled(dev):  # the Function sees no autocast: cast as for conv1d_k3_gemm
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _conv_winograd_cast(x.to(dt), conv.weight.to(dt), conv.bias.to(dt), wt.to(dt), grad, eps)
    return _conv_winograd_cast(x, conv.weight, conv.bias, wt, grad, eps)


def _conv_winograd_cast(x, weight, bias, wt, grad: bool, eps: float | None) -> torch.Tensor:
    if grad:
        return conv1d_k3_winograd_train(x, weight, bias, wt, norm_eps=eps)
    return conv1d_k3_winograd(x, wt, bias)


def _conv_gemm(conv: torch.nn.Conv1d, x: torch.Tensor, _: torch.Tensor | None, normed: bool = False) -> torch.Tensor:
    """The GEMM form's convolution (every layer) of x, or of relu(InstanceNorm1d(x)) if `normed` (the third
    argument, _conv_time_major's filters, is None here: this form has none)."""
    return conv1d_k3_gemm(_instance_norm_relu_time_major(x) if normed else x, conv.weight, conv.bias)


NORM_EPS = 1e-5  # the delta block's InstanceNorm1d (the reference's default)


def _norm_relu_forward(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(InstanceNorm1d(x)) of time-major (M,S,C) in float32 at least, with its statistics (M,1,C).

    Half-precision inputs are normalised in float32, as autocast runs instance_norm (squares overflow float16).
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(1, keepdim=True)  # (torch.var_mean over this middle axis is several times slower)
    xh = xf - mean
    scale = xh.square().mean(1, keepdim=True).add_(eps).rsqrt_()
    return xh.mul_(scale).relu_(), mean, scale


def _normalised(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x normalised again from saved statistics, in the precision and arithmetic of the forward pass."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf - mean).mul_(scale)


def _norm_relu_backward(g: torch.Tensor, xh: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient through relu(xh), xh = (x - mean(x)) * scale over the time axis."""
    gh = torch.ops.aten.threshold_backward(g.to(xh.dtype), xh, 0)  # g where xh > 0
    # d/dx of (x - mean) * scale: scale * (gh - mean(gh) - xh * mean(gh * xh)), in place on gh: every fresh
    # (M,S,C) buffer costs more in page faults than a pass over it
    proj = torch.linalg.vecdot(gh, xh, dim=1).unsqueeze(1).mul_(-1 / xh.shape[1])
    shift = gh.mean(1, keepdim=True)
    return gh.sub_(shift).mul_(scale).addcmul_(xh, proj.mul_(scale))


class _InstanceNormReLUTimeMajor(torch.autograd.Function):
    """relu(InstanceNorm1d(x)) for time-major (M,S,C) with a backward of a few passes: autograd's composite
    backward makes ~10 passes over an (M,S,C) float32 tensor per layer, the delta block's largest elementwise
    cost in training. Saves only x and the per-(m, c) statistics; the normalised x is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, scale = _norm_relu_forward(x, eps)
        ctx.save_for_backward(x, mean, scale)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, mean, scale = ctx.saved_tensors
        return _norm_relu_backward(g, _normalised(x, mean, scale), scale).to(x.dtype), None


def _instance_norm_relu_time_major(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """relu(InstanceNorm1d(x)) for time-major (M,S,C), without a graph when no gradient is kept."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _InstanceNormReLUTimeMajor.apply(x, eps)
    return _norm_relu_forward(x, eps)[0].to(x.dtype)


def delta_block_time_major(block: DeltaBlock, fcorr: torch.Tensor, flow: torch.Tensor,
                           filters: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """DeltaBlock.forward computed time-major: (M,S,588), (M,S,2) -> (M,S,2).

    filters: `winograd_filters(block, tile)`: its layers run as Winograd F(tile,3), None entries (narrow layers)
    as conv1d (as GEMMs when autograd records); or None: every convolution is one GEMM (`conv1d_k3_gemm`).
    """
    if block.first_block_conv.kernel_size != 3:
        raise ValueError("the time-major delta block needs kernel size 3")
    conv = _conv_time_major if filters is not None else _conv_gemm
    wts = iter(filters) if filters is not None else itertools.repeat(None)
    x = F.relu(conv(block.first_block_conv.conv, block.inputs(fcorr, flow), next(wts)))
    for blk in cast("Iterable[BasicBlock1d]", block.basicblock_list):  # it holds only those
        y = conv(blk.conv1.conv, x, next(wts), not blk.first)
        y = conv(blk.conv2.conv, y, next(wts), True)
        if blk.cout != blk.cin:
            extra = blk.cout - blk.cin
            x = F.pad(x, (extra // 2, extra - extra // 2))
        x = y + x
    return block.dense(F.relu(x))


# ----------------------------------------------------------------------------------------------------------
# The plan's forms


def _weights_state(weights: list[torch.Tensor]) -> list[tuple]:
    """What tells that tensors still hold the values they held: their storage, place, dtype and version counter
    (bumped by in-place changes, load_state_dict's copy among them; inference tensors keep none)."""
    return [(w.untyped_storage(), w.storage_offset(), w.shape, w.dtype, None if w.is_inference() else w._version)
            for w in weights]


class Forms:
    """The forms of the model's steps that an ExecPlan picks, and what they keep between calls.

    `Pips` builds one from its plan and asks it for the encoder's form (`frame_chunks`, `encoder`), the
    correlation's (`correlation`) and the delta block's (`delta_block`); the reference form of each is the
    module's own code in nets/pips2.py. Winograd filters of an inference plan are kept here across forward
    passes and remade when the weights they come from change (a load, a cast or move, an in-place edit).
    """

    def __init__(self, plan: ExecPlan):
        if not isinstance(plan, ExecPlan):
            raise TypeError(f"plan must be an ExecPlan, got {type(plan).__name__}")
        self.plan = plan
        self.winograd: list[torch.Tensor | None] | None = None  # an inference plan's filters, see _filters
        self._winograd_of: list[tuple] = []  # the weights they were made from: weak storage references etc.

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy of the model) or pickle carries the plan only: the filters belong to the
        # original's weights, and weak references do not pickle
        return {"plan": self.plan}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["plan"])

    def check_grad_mode(self, weight: torch.Tensor) -> None:
        """Refuse a forward that would record gradients (of `weight`) through forms without a backward."""
        if self.plan.inference_only and torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError("Pips: the model's ExecPlan is for inference; run it under torch.no_grad() or "
                               "set a training plan: model.set_plan(ExecPlan.auto(device, training=True))")

    def frame_chunks(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Frames (n,...) -> consecutive chunks of the plan's `encoder_chunk` frames (all at once for 0)."""
        n = frames.shape[0]
        chunk = self.plan.encoder_chunk or n
        return [frames[s:s + chunk] for s in range(0, n, chunk)]

    def encoder(self, fnet: BasicEncoder, x: torch.Tensor) -> torch.Tensor:
        """fnet(x) in the plan's form: memory layout, norm, checkpointing or the replay of cheap operations."""
        plan = self.plan
        if plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if plan.norm == "layout":
            run = functools.partial(run_encoder, fnet, norm=instance_norm_keep_layout)
        else:
            run = fnet
        if plan.checkpointing:
            return checkpoint(run, x, use_reentrant=False)
        if plan.recompute_cheap:
            return encode_keeping_convs(fnet, x)
        return run(x)

    def correlation(self, pyramid: CorrPyramid) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`pyramid(targets, coords)` in the plan's form, for one forward pass (its gather workspace lives as
        long as the returned function)."""
        if self.plan.corr == "volume":
            return pyramid
        return LocalCorrelation(pyramid, self.plan.corr_chunk, self.plan.gather)

    def delta_block(self, block: DeltaBlock) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`block(fcorr, flow)` in the plan's form, for one forward pass (its iterations share the filters)."""
        plan = self.plan
        filters = self._filters(block)
        if filters is not None:
            fn = functools.partial(delta_block_time_major, block, filters=filters)
        elif plan.delta == "gemm":
            fn = functools.partial(delta_block_time_major, block)
        else:
            fn = block.forward
        if plan.checkpointing:
            return functools.partial(checkpoint, fn, use_reentrant=False)
        if plan.recompute_cheap and filters is None:
            return functools.partial(keep_conv_outputs, fn)
        # the Winograd form keeps one tensor per layer by itself (each wide layer makes its input's norm inside
        # and keeps only the norm's input): as little as selective checkpointing keeps of it (its products),
        # without the recomputation
        return fn

    def _filters(self, block: DeltaBlock) -> list[torch.Tensor | None] | None:
        """The block's Winograd filters for one forward pass, or None when the plan's delta block has none."""
        tile = WINOGRAD_TILES.get(self.plan.delta)
        if tile is None:
            return None
        if not self.plan.inference_only:
            # a training plan's weights change in place at every optimiser step (fused optimisers do not even
            # bump the tensors' versions), so its filters are made afresh for each forward pass
            return winograd_filters(block, tile)
        state = _weights_state([c.weight for c in _delta_convs(block) if _is_wide(c)])
        filters = self.winograd
        if filters is None or not self._made_from(state):
            self.winograd = filters = None  # the stale filters go before the new ones are made
            filters = winograd_filters(block, tile)
            # weak references: a storage freed (a cast or move) cannot pass for a new one at its address
            self._winograd_of = [(weakref.ref(st), *rest) for st, *rest in state]
            self.winograd = filters
        return filters

    def _made_from(self, state: list[tuple]) -> bool:
        """Whether the kept filters were made from weights in exactly this `_weights_state`."""
        return len(state) == len(self._winograd_of) and all(
            ref() is st and tuple(rest) == tuple(kept)
            for (st, *rest), (ref, *kept) in zip(state, self._winograd_of, strict=True))
