"""The fast forms of PIPs++'s steps, as plain functions over a module's weights and tensors.

Each computes what its reference in nets/pips2.py computes (tests/test_model.py and test_golden.py check
this in float64); an `ExecPlan` (nets/plan.py) says which form runs. Why each is faster: docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

if TYPE_CHECKING:  # only for hints: pips2 imports this module
    from pips2.nets.pips2 import CorrPyramid, DeltaBlock

# ----------------------------------------------------------------------------------------------------------
# Encoder


def instance_norm_keep_layout(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """F.instance_norm (no affine) that keeps a one-image batch's memory format.

    For one image the batch statistics over (N,H,W) are its instance statistics, and batch_norm keeps a
    channels-last tensor channels-last (instance_norm converts it back, which made channels-last slower than
    contiguous on the CPU).
    """
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


CHEAP_CONV_MACS = 256  # multiply-adds per output value under which a convolution is recomputed, not kept


def _save_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):  # the GEMM form of a convolution
        return CheckpointPolicy.MUST_SAVE
    if op is torch.ops.aten.convolution.default:
        # weight (out, in/groups, kh, kw): one output filter's size is the multiply-adds per output value. The
        # encoder's 7x7 conv of the 3-channel image and the 1x1 shortcuts cost little to redo, and the
        # former's output is as large as a whole layer1 conv's
        if args[1][0].numel() < CHEAP_CONV_MACS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_conv_outputs(fn, *args):
    """fn(*args) under autograd keeping only its convolutions' outputs for backward; the norms, activations,
    sums and resamplings between them are recomputed from those in backward (cheap, memory-bound work)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(_save_convolutions))


# ----------------------------------------------------------------------------------------------------------
# Correlation: sample features around each point first, then take dot products (both steps are linear, so
# this equals sampling the full volume), never building the B*S*N*H8*W8 volume.


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
    # points far outside only see zeros; clamping keeps the integer arithmetic finite without changing that
    x = coords[..., 0].clamp(-radius - 2, w + radius + 1)
    y = coords[..., 1].clamp(-radius - 2, h + radius + 1)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    offs = torch.arange(-radius, radius + 2, device=coords.device)
    ix = x0.long().unsqueeze(-1) + offs  # F, N, P
    iy = y0.long().unsqueeze(-1) + offs
    inside = ((ix >= 0) & (ix < w)).unsqueeze(-1) & ((iy >= 0) & (iy < h)).unsqueeze(-2)  # F,N,Px,Py
    idx = iy.clamp(0, h - 1).unsqueeze(-2) * w + ix.clamp(0, w - 1).unsqueeze(-1)  # F,N,Px,Py
    idx = idx + (torch.arange(Fr, device=coords.device) * (h * w)).view(Fr, 1, 1, 1)
    idx = idx.reshape(-1)
    src = fmap_flat.reshape(Fr * h * w, C)
    if workspace is None:
        patch = src.index_select(0, idx)
    else:
        patch = torch.index_select(src, 0, idx, out=workspace[:idx.numel() * C].view(idx.numel(), C))
    patch = patch.view(Fr * N, P * P, C)
    corr = torch.bmm(targets.reshape(Fr * N, T, C), patch.transpose(1, 2)).view(Fr, N, T, P, P)
    corr = corr * inside.unsqueeze(2).to(corr.dtype) / scale
    fx = fx.view(Fr, N, 1, 1, 1)
    fy = fy.view(Fr, N, 1, 1, 1)
    # P[i, j] is at (x0 + i - r, y0 + j - r); out[i, j] blends P[i:i+2, j:j+2]
    cx = corr[:, :, :, :-1] * (1 - fx) + corr[:, :, :, 1:] * fx
    out = cx[..., :-1] * (1 - fy) + cx[..., 1:] * fy
    return out.reshape(Fr, N, T, (P - 1) * (P - 1))


def local_corr(pyramid: CorrPyramid, targets: torch.Tensor, coords: torch.Tensor, chunk_elems: int,
               gather: str) -> torch.Tensor:
    """CorrPyramid.volume's values from local patches: (B,S,N,T,C), (B,S,N,2) -> (B,S,N,T*L*(2r+1)^2).

    chunk_elems bounds the gathered floats held at once (0 = no bound). gather: "workspace" gathers into
    one buffer kept on the pyramid for all its calls (no autograd); "checkpoint" recomputes each gather in
    backward instead of storing every patch; "plain" gathers into fresh tensors.
    """
    B, S, N, T, C = targets.shape
    BS, r = B * S, pyramid.radius
    tg = targets.reshape(BS, N, T, C)
    xy = coords.reshape(BS, N, 2)
    P = 2 * r + 2
    step = max(1, chunk_elems // max(1, N * P * P * C)) if chunk_elems else BS
    if gather == "workspace":
        need = min(step, BS) * N * P * P * C
        if pyramid.workspace is None or pyramid.workspace.numel() < need:
            # a fresh allocation per gather costs more in page faults than the gather itself
            pyramid.workspace = tg.new_empty(need)
    per_level = []
    for i, lv in enumerate(pyramid.levels):
        h, w = lv.shape[1:3]
        flat = lv.reshape(BS, h * w, C)
        xy_l = xy / (2**i)
        parts = []
        for s in range(0, BS, step):
            args = (flat[s:s + step], tg[s:s + step], xy_l[s:s + step], h, w, r, pyramid.scale)
            if gather == "checkpoint":
                parts.append(checkpoint(patch_corr, *args, use_reentrant=False))
            else:
                parts.append(patch_corr(*args, workspace=pyramid.workspace if gather == "workspace" else None))
        per_level.append(torch.cat(parts, 0))  # BS, N, T, 49
    return torch.stack(per_level, 3).reshape(B, S, N, -1)  # levels inner to templates


# ----------------------------------------------------------------------------------------------------------
# Delta block, time-major (M,S,C) with Winograd F(4,3) (Lavin & Gray 2016) for the widest convolutions:
# four outputs of a 3-tap filter from six inputs with six products instead of twelve. On the CPU these
# convolutions are GEMM-bound, so halving their products is worth the cheap transforms; float32 results
# match conv1d to ~1e-6. No backward: the transforms write into preallocated buffers.

_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
WINOGRAD_MIN_PRODUCT = 512 * 512  # narrower layers (cout*cin): the transforms would cost what they save


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """Conv1d weight (cout,cin,3) -> the six transformed filters (6,cin,cout)."""
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    return torch.einsum("jk,ock->jco", g, weight).contiguous()


def conv1d_k3_winograd(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor,
                       max_elems: int = 1 << 23) -> torch.Tensor:
    """conv1d(kernel 3, padding 1) of time-major x (M,S,cin) with `winograd_weights` wt -> (M,S,cout).

    Sequences go through in groups whose transformed tiles stay under `max_elems` floats, which bounds the
    extra memory at long clips and many points (the GEMMs keep >= ~1000 rows).
    """
    M, S, C = x.shape
    T = -(-S // 4)
    group = max(1, max_elems // (6 * T * max(C, wt.shape[2])))
    if group < M:
        out = x.new_empty(M, S, wt.shape[2])
        for m in range(0, M, group):
            out[m:m + group] = conv1d_k3_winograd(x[m:m + group], wt, bias, max_elems)
        return out
    return _winograd_tiles(x, wt, bias)


def _winograd_tiles(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    M, S, C = x.shape
    T = -(-S // 4)  # tiles of four outputs
    xp = F.pad(x, (0, 0, 1, 1 + 4 * T - S))
    d0, d1, d2, d3, d4, d5 = (xp[:, i:i + 4 * T:4] for i in range(6))  # six inputs of every tile
    U = x.new_empty(6, M, T, C)  # input transform B^T d, sharing subexpressions
    torch.add(d4, d0, alpha=4, out=U[0]).add_(d2, alpha=-5)
    a, b = torch.add(d4, d2, alpha=-4), torch.add(d3, d1, alpha=-4)
    torch.add(a, b, out=U[1])
    torch.sub(a, b, out=U[2])
    c, e = torch.sub(d4, d2), torch.sub(d3, d1)
    torch.add(c, e, alpha=2, out=U[3])
    torch.add(c, e, alpha=-2, out=U[4])
    torch.add(d5, d1, alpha=4, out=U[5]).add_(d3, alpha=-5)
    m0, m1, m2, m3, m4, m5 = torch.bmm(U.view(6, M * T, C), wt).view(6, M, T, -1).unbind(0)
    p, q, r, s = m1 + m2, m1 - m2, m3 + m4, m3.sub_(m4)  # output transform A^T m
    Y = x.new_empty(M, T, 4, wt.shape[2])
    torch.add(m0, p, out=Y[:, :, 0]).add_(r)
    torch.add(q, s, alpha=2, out=Y[:, :, 1])
    torch.add(p, r, alpha=4, out=Y[:, :, 2])
    torch.add(q, s, alpha=8, out=Y[:, :, 3]).add_(m5)
    Y = Y.view(M, 4 * T, -1)
    return (Y[:, :S] if 4 * T != S else Y).add_(bias)


def winograd_filters(block: DeltaBlock) -> list[torch.Tensor | None]:
    """Transformed filters of each of the block's convolutions in module order; None for narrow layers."""
    convs = [m.conv for m in block.convs()]
    with torch.no_grad():
        return [winograd_weights(c.weight) if c.weight.shape[0] * c.weight.shape[1] >= WINOGRAD_MIN_PRODUCT
                else None for c in convs]


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


def _k3_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    M, S, _ = x.shape
    return _unpad_rows(_k3_rows(_pad_rows(x), _taps(weight), bias, False), M, S)


class _Conv1dK3Gemm(torch.autograd.Function):
    """conv1d_k3_gemm; backward: the input gradient is the same three-GEMM form with the taps mirrored, the weight
    gradient three GEMMs against shifted row slices of the padded input (rebuilt, not stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
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


def conv1d_k3_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
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
            return conv1d_k3_gemm(x.to(dt), weight.to(dt), bias.to(dt))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _Conv1dK3Gemm.apply(x, weight, bias)
    return _k3_forward(x, weight, bias)


def _conv_time_major(conv: torch.nn.Conv1d, x: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
    """The Winograd form's convolution: Winograd filters `wt`, or conv1d for a narrow layer (wt None)."""
    if wt is None:
        return F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=1).transpose(1, 2)
    return conv1d_k3_winograd(x, wt, conv.bias)


def _conv_gemm(conv: torch.nn.Conv1d, x: torch.Tensor, _: None) -> torch.Tensor:
    """The GEMM form's convolution (every layer)."""
    return conv1d_k3_gemm(x, conv.weight, conv.bias)


def _instance_norm_time_major(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm1d for time-major (M,S,C): statistics over S per (m, c); in place where no gradient is kept.

    Half-precision inputs are normalised in float32, as autocast runs instance_norm (squares overflow float16).
    """
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    xc = x - x.mean(1, keepdim=True)
    scale = xc.square().mean(1, keepdim=True).add_(eps).rsqrt_()
    out = xc * scale if torch.is_grad_enabled() and x.requires_grad else xc.mul_(scale)
    return out.to(dtype)


def delta_block_time_major(block: DeltaBlock, fcorr: torch.Tensor, flow: torch.Tensor,
                           filters: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """DeltaBlock.forward computed time-major: (M,S,588), (M,S,2) -> (M,S,2).

    filters: `winograd_filters(block)` (inference only; None entries run as conv1d), or None: every convolution
    is one GEMM (`conv1d_k3_gemm`), which has a backward.
    """
    if block.first_block_conv.kernel_size != 3:
        raise ValueError("the time-major delta block needs kernel size 3")
    conv = _conv_time_major if filters is not None else _conv_gemm
    wts = iter(filters if filters is not None else [None] * len(block.convs()))
    x = F.relu(conv(block.first_block_conv.conv, block.inputs(fcorr, flow), next(wts)))
    for blk in block.basicblock_list:
        y = x if blk.first else F.relu_(_instance_norm_time_major(x))
        y = F.relu_(_instance_norm_time_major(conv(blk.conv1.conv, y, next(wts))))
        y = conv(blk.conv2.conv, y, next(wts))
        if blk.cout != blk.cin:
            extra = blk.cout - blk.cin
            x = F.pad(x, (extra // 2, extra - extra // 2))
        x = y + x
    return block.dense(F.relu(x))
