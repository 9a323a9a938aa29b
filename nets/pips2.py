"""PIPs++ (PointOdyssey, ICCV 2023): the model, readable top to bottom.

Layout of this file: feature sampling and correlation helpers, the feature encoder `fnet`, the temporal
`DeltaBlock`, then `Pips` with its forward pass and loss. State-dict keys match the authors' checkpoint
exactly (see docs/MODEL.md), so `load_state_dict(strict=True)` works on `model-000200000.pth`.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.amp import autocast_enabled, autocast_off

MIN_SIZE = 128  # four pyramid levels at stride 8 must stay >= 2x2


@cache  # called per gather chunk and level; the value depends on C alone
def corr_scale(C: int) -> float:
    """sqrt(C) as the reference computes it, in float32 (a float64 run of the reference divides by this too)."""
    return float(torch.tensor(float(C), dtype=torch.float32).sqrt())


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers. All coordinates are (x, y) with x=0 the centre of the first column.


def sample_features(fmap: torch.Tensor, xy: torch.Tensor, frame: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear sample of channels-last maps (F,H,W,C) at xy (M,N,2), border replication -> (M,N,C) in fmap's dtype.

    Row m reads map `frame[m]` (default: map m, so M == F). As in the reference, the position and the four
    bilinear weights are float32 whatever the maps' dtype (this is what a float64 run of it computes).
    """
    Fr, H, W, C = fmap.shape
    M, N, _ = xy.shape
    if frame is None:
        frame = torch.arange(Fr, device=xy.device)
    x = xy[..., 0].float().clamp(0, W - 1)
    y = xy[..., 1].float().clamp(0, H - 1)
    # the 2x2 cell's top-left corner; the last row/column uses the cell before it with weight 1
    x0 = x.floor().clamp(max=max(W - 2, 0))
    y0 = y.floor().clamp(max=max(H - 2, 0))
    fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
    gx, gy = 1 - fx, 1 - fy
    flat = fmap.reshape(Fr * H * W, C)
    # a NaN coordinate must give NaN features, not an out-of-range index: index with 0, weight with NaN
    base = frame.view(M, 1) * (H * W) + y0.nan_to_num(0).long() * W + x0.nan_to_num(0).long()
    dx, dy = min(1, W - 1), min(1, H - 1) * W

    def tap(off: int, weight: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, (base + off).reshape(-1)).view(M, N, C) * weight.to(fmap.dtype)

    return tap(0, gx * gy) + tap(dx, fx * gy) + tap(dy, gx * fy) + tap(dy + dx, fx * fy)


def avg_pool2x2_nhwc(x: torch.Tensor) -> torch.Tensor:
    """avg_pool2d(kernel 2, stride 2) for channels-last (F,H,W,C); an odd last row/column is dropped."""
    Fr, H, W, C = x.shape
    h, w = H // 2, W // 2
    return x[:, : 2 * h, : 2 * w].reshape(Fr, h, 2, w, 2, C).mean((2, 4))


def _patch_corr(fmap_flat: torch.Tensor, targets: torch.Tensor, coords: torch.Tensor, h: int, w: int,
                radius: int, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation of targets with a (2r+1)^2 bilinear neighbourhood, zeros outside the map.

    fmap_flat (F, h*w, C) one map per frame; targets (F, N, T, C); coords (F, N, 2) at this level.
    Returns (F, N, T, (2r+1)^2) with value k = (2r+1)*i + j read at (x + i - r, y + j - r).
    `workspace` (inference only): a buffer of at least F*N*(2r+2)^2*C floats to gather into.
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
    corr = corr * inside.unsqueeze(2).to(corr.dtype) / corr_scale(C)
    fx = fx.view(Fr, N, 1, 1, 1)
    fy = fy.view(Fr, N, 1, 1, 1)
    # P[i, j] is at (x0 + i - r, y0 + j - r); out[i, j] blends P[i:i+2, j:j+2]
    cx = corr[:, :, :, :-1] * (1 - fx) + corr[:, :, :, 1:] * fx
    out = cx[..., :-1] * (1 - fy) + cx[..., 1:] * fy
    return out.reshape(Fr, N, T, (P - 1) * (P - 1))


class CorrPyramid:
    """Feature pyramid of S frames that answers correlation look-ups for several templates at once.

    `impl="local"` (default) never builds the B*S*N*H8*W8 volume; `impl="volume"` is the reference
    semantics (full volume per template, then grid_sample), kept for tests and as the benchmark baseline.
    """

    def __init__(self, fmaps: torch.Tensor, num_levels: int = 4, radius: int = 3, impl: str = "local",
                 chunk_elems: int = 1 << 24):
        """fmaps: channels-last maps (B,S,H,W,C); correlations are computed in their dtype."""
        if impl not in ("local", "volume"):
            raise ValueError(f"corr impl must be 'local' or 'volume', got {impl!r}")
        B, S, H, W, C = fmaps.shape
        self.B, self.S, self.C = B, S, C
        self.radius, self.impl, self.chunk_elems = radius, impl, chunk_elems
        self._workspace: torch.Tensor | None = None
        self.levels = [fmaps.reshape(B * S, H, W, C)]  # channels-last (B*S, h, w, C)
        for _ in range(1, num_levels):
            self.levels.append(avg_pool2x2_nhwc(self.levels[-1]))

    def __call__(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """targets (B,S,N,T,C), coords (B,S,N,2) at stride 8 -> (B,S,N,T*L*(2r+1)^2) float32, template-major.

        The result is float32 whatever the maps' dtype: the reference rounds its correlations to float32.
        """
        B, S, N, T, C = targets.shape
        with autocast_off(coords.device.type):
            dtype = self.levels[0].dtype
            targets, coords = targets.to(dtype), coords.to(dtype)
            if self.impl == "volume":
                out = self._volume(targets, coords)
            else:
                out = self._local(targets, coords)
        return out.reshape(B, S, N, -1).float()

    def _local(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        B, S, N, T, C = targets.shape
        BS, r = B * S, self.radius
        tg = targets.reshape(BS, N, T, C)
        xy = coords.reshape(BS, N, 2)
        P = 2 * r + 2
        # bound the gathered patches (frames * N * P^2 * C floats) held at any one time; 0 = no chunks
        step = max(1, self.chunk_elems // max(1, N * P * P * C)) if self.chunk_elems else BS
        grad = torch.is_grad_enabled() and (self.levels[0].requires_grad or tg.requires_grad)
        need = min(step, BS) * N * P * P * C
        if not grad and (self._workspace is None or self._workspace.numel() < need):
            # one buffer for every gather of this clip: a fresh allocation per gather costs more in page
            # faults than the gather itself (docs/BENCHMARKS.md)
            self._workspace = tg.new_empty(need)
        per_level = []
        for i, lv in enumerate(self.levels):
            h, w = lv.shape[1:3]
            flat = lv.reshape(BS, h * w, C)
            xy_l = xy / (2**i)
            parts = []
            for s in range(0, BS, step):
                args = (flat[s:s + step], tg[s:s + step], xy_l[s:s + step], h, w, r)
                if grad:  # recompute the gather in backward instead of storing every patch
                    parts.append(checkpoint(_patch_corr, *args, use_reentrant=False))
                else:
                    parts.append(_patch_corr(*args, workspace=self._workspace))
            per_level.append(torch.cat(parts, 0))  # BS, N, T, 49
        out = torch.stack(per_level, 3)  # BS, N, T, L, 49
        return out.reshape(B, S, N, -1)

    def _volume(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        B, S, N, T, C = targets.shape
        r = self.radius
        # as the reference: every template's whole volume pyramid exists before any sampling
        maps = [lv.reshape(B, S, -1, C).transpose(2, 3) for lv in self.levels]  # B,S,C,hw
        volumes = [[torch.matmul(targets[:, :, :, t], m) / corr_scale(C) for m in maps] for t in range(T)]
        d = torch.arange(-r, r + 1, device=coords.device, dtype=coords.dtype)
        # x offset outer, y offset inner: k = (2r+1)*i + j at (x + d_i, y + d_j)
        dx, dy = torch.meshgrid(d, d, indexing="ij")
        delta = torch.stack([dx, dy], -1).view(1, 2 * r + 1, 2 * r + 1, 2)
        outs = []
        for t in range(T):
            per_level = []
            for i, lv in enumerate(self.levels):
                h, w = lv.shape[1:3]
                grid = coords.reshape(B * S * N, 1, 1, 2) / 2**i + delta
                gx = 2 * grid[..., 0] / (w - 1) - 1
                gy = 2 * grid[..., 1] / (h - 1) - 1
                vol = volumes[t][i].reshape(B * S * N, 1, h, w)
                smp = F.grid_sample(vol, torch.stack([gx, gy], -1), align_corners=True, padding_mode="zeros")
                per_level.append(smp.view(B, S, N, -1))
            outs.append(torch.cat(per_level, -1))
        return torch.stack(outs, 3)


# ----------------------------------------------------------------------------------------------------------
# Feature encoder: ResNet-style, instance norm, 128 channels at stride 8.


class InstanceNorm(nn.Module):
    """InstanceNorm2d without affine parameters that keeps x's memory format.

    For one image, batch-norm statistics over (N,H,W) are the instance statistics, and batch_norm keeps
    channels-last tensors channels-last (instance_norm converts them back, which made channels-last slower
    than contiguous on the CPU); see docs/BENCHMARKS.md.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and not torch.onnx.is_in_onnx_export():
            return F.batch_norm(x, None, None, training=True, eps=self.eps)
        return F.instance_norm(x, eps=self.eps)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm; a strided block gets a 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.norm1 = InstanceNorm()
        self.norm2 = InstanceNorm()
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), InstanceNorm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place ReLUs act on fresh norm outputs, which no backward needs
        y = F.relu_(self.norm1(self.conv1(x)))
        y = F.relu_(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu_(x + y)


class BasicEncoder(nn.Module):
    """Frames (N,3,H,W) in [-1,1] -> features (N,128,H/8,W/8) from four stages fused at stride 8."""

    def __init__(self, output_dim: int = 128, stride: int = 8):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.norm1 = InstanceNorm()
        widths, strides = (64, 96, 128, 128), (1, 2, 2, 2)
        in_planes = 64
        for k, (width, s) in enumerate(zip(widths, strides, strict=True)):
            stage = nn.Sequential(ResidualBlock(in_planes, width, s), ResidualBlock(width, width, 1))
            setattr(self, f"layer{k + 1}", stage)
            in_planes = width
        self.conv2 = nn.Conv2d(sum(widths), output_dim * 2, 3, padding=1)
        self.norm2 = InstanceNorm()
        self.conv3 = nn.Conv2d(output_dim * 2, output_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        size = (H // self.stride, W // self.stride)
        x = F.relu_(self.norm1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
        x = F.relu_(self.norm2(self.conv2(torch.cat(feats, 1))))
        return self.conv3(x)


# ----------------------------------------------------------------------------------------------------------
# Delta block: a 1-D ResNet over time, per point.


# Winograd F(4,3) (Lavin & Gray 2016): four outputs of a 3-tap filter from six inputs with six products
# instead of twelve. On the CPU the delta block's widest convolutions are GEMM-bound, so halving their
# products is worth the cheap transforms (docs/BENCHMARKS.md); float32 results match to ~1e-6.
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


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


def _instance_norm_time_major(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm1d for time-major (M,S,C): statistics over S per (m, c)."""
    xc = x - x.mean(1, keepdim=True)
    return xc.mul_(xc.square().mean(1, keepdim=True).add_(eps).rsqrt_())


class Conv1dSame(nn.Module):
    """Conv1d with TensorFlow-style 'same' padding (left p//2, right p - p//2)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(cin, cout, kernel_size)
        self._winograd: tuple[tuple[int, int], torch.Tensor] | None = None  # (weight identity, filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size - 1
        if p % 2 == 0:  # symmetric: let the convolution pad instead of copying the input into a padded one
            return F.conv1d(x, self.conv.weight, self.conv.bias, padding=p // 2)
        return self.conv(F.pad(x, (p // 2, p - p // 2)))

    def forward_time_major(self, x: torch.Tensor) -> torch.Tensor:
        """forward() of a kernel-3 layer on time-major x (M,S,cin) -> (M,S,cout), Winograd when wide."""
        w = self.conv.weight
        if w.shape[0] * w.shape[1] < 512 * 512:  # narrow layers: the transforms would cost what they save
            return F.conv1d(x.transpose(1, 2), w, self.conv.bias, padding=1).transpose(1, 2)
        key = (w.data_ptr(), w._version)  # new after load_state_dict, .to() or an optimiser step
        if self._winograd is None or self._winograd[0] != key:
            self._winograd = (key, winograd_weights(w))
        return conv1d_k3_winograd(x, self._winograd[1], self.conv.bias)


class BasicBlock1d(nn.Module):
    """Pre-activation residual block; wider outputs zero-pad the shortcut's channels on both sides."""

    def __init__(self, cin: int, cout: int, kernel_size: int, first: bool):
        super().__init__()
        self.cin, self.cout, self.first = cin, cout, first
        self.norm1 = nn.InstanceNorm1d(cin)
        self.conv1 = Conv1dSame(cin, cout, kernel_size)
        self.norm2 = nn.InstanceNorm1d(cout)
        self.conv2 = Conv1dSame(cout, cout, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.first else F.relu_(self.norm1(x))
        y = self.conv2(F.relu_(self.norm2(self.conv1(y))))
        if self.cout != self.cin:
            extra = self.cout - self.cin
            x = F.pad(x, (0, 0, extra // 2, extra - extra // 2))
        return y + x

    def forward_time_major(self, x: torch.Tensor) -> torch.Tensor:
        """forward() on time-major x (M,S,C)."""
        y = x if self.first else F.relu_(_instance_norm_time_major(x))
        y = self.conv2.forward_time_major(F.relu_(_instance_norm_time_major(self.conv1.forward_time_major(y))))
        if self.cout != self.cin:
            extra = self.cout - self.cin
            x = F.pad(x, (extra // 2, extra - extra // 2))
        return y + x


class DeltaBlock(nn.Module):
    """(correlations, flow) per point and frame -> coordinate update in stride-8 units.

    impl: "auto" (default) runs CPU float32 inference time-major with Winograd for the widest convolutions;
    "direct" always uses conv1d (the reference form; training, autocast, CUDA and ONNX export use it too);
    "winograd" takes the Winograd form in any inference, whatever the device and dtype (to test it in float64).
    """

    def __init__(self, corr_dim: int = 588, embed_dim: int = 128, kernel_size: int = 3, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "direct", "winograd"):
            raise ValueError(f"delta impl must be 'auto', 'direct' or 'winograd', got {impl!r}")
        self.impl = impl
        self.embed_dim = embed_dim
        self.first_block_conv = Conv1dSame(corr_dim + embed_dim + 2, 128, kernel_size)
        widths = [128, 128, 128, 256, 256, 512, 512, 1024, 1024]
        self.basicblock_list = nn.ModuleList(
            BasicBlock1d(widths[k], widths[k + 1], kernel_size, first=(k == 0)) for k in range(8))
        self.dense = nn.Linear(1024, 2)

    def forward(self, fcorr: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """fcorr (M,S,588), flow (M,S,2) -> delta (M,S,2)."""
        x = torch.cat([fcorr.to(flow.dtype), sincos_embed_xy(flow, self.embed_dim), flow], 2)
        if self._use_winograd(x):
            return self._forward_time_major(x)
        x = F.relu_(self.first_block_conv(x.transpose(1, 2)))
        for block in self.basicblock_list:
            x = block(x)
        return self.dense(F.relu(x).transpose(1, 2))

    def _use_winograd(self, x: torch.Tensor) -> bool:
        if (self.impl == "direct" or self.first_block_conv.kernel_size != 3 or torch.is_grad_enabled()
                or torch.onnx.is_in_onnx_export()):
            return False
        if self.impl == "winograd":
            return True
        return x.device.type == "cpu" and x.dtype == torch.float32 and not autocast_enabled("cpu")

    def _forward_time_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation as the conv1d form, laid out (M,S,C) for the Winograd GEMMs."""
        x = F.relu_(self.first_block_conv.forward_time_major(x))
        for block in self.basicblock_list:
            x = block.forward_time_major(x)
        return self.dense(F.relu(x))


def sincos_embed_xy(xy: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sin-cos embedding of (...,2) with dim//4 frequencies per axis: [sin x, cos x, sin y, cos y]."""
    q = dim // 4
    dtype = torch.promote_types(xy.dtype, torch.float32)  # float64 stays float64; half types compute in float32
    # the frequencies are float32 in the reference, also in a float64 run of it
    omega = (1.0 / temperature ** (torch.arange(q, device=xy.device, dtype=torch.float32) / (q - 1))).to(dtype)
    x = xy[..., 0:1].to(dtype) * omega
    y = xy[..., 1:2].to(dtype) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], -1).to(xy.dtype)


# ----------------------------------------------------------------------------------------------------------
# The tracker.


def sequence_loss(preds: list[torch.Tensor], trajs_g: torch.Tensor, valids: torch.Tensor | None = None,
                  gamma: float = 0.8) -> torch.Tensor:
    """Gamma-weighted masked L1 over K per-iteration predictions (B,S,N,2), divided by K."""
    K = len(preds)
    if valids is None:
        valids = torch.ones(trajs_g.shape[:3], device=trajs_g.device)
    dtype = torch.promote_types(preds[0].dtype, torch.float32)
    valids = valids.to(dtype)
    total = trajs_g.new_zeros((), dtype=dtype)
    for i, pred in enumerate(preds):
        err = (pred.to(dtype) - trajs_g.to(dtype)).abs().mean(-1)
        total = total + gamma ** (K - i - 1) * (err * valids).sum() / (1e-6 + valids.sum())
    return total / K


def default_encoder_chunk(on_cuda: bool, checkpointing: bool) -> int:
    """Frames encoded at a time when Pips(encoder_chunk=None): 1 on the CPU (cache locality) and whenever the
    encoder is checkpointed (a recomputation then holds one frame's activations: at 512x896, 16 frames cost
    9.2 GiB instead of 1.4, docs/BENCHMARKS.md), 16 on CUDA otherwise (larger kernels run faster there)."""
    return 16 if on_cuda and not checkpointing else 1


class Pips(nn.Module):
    """PIPs++: iterative multi-template point tracking over S frames.

    corr_impl: "local" (default; samples features around each point) or "volume" (reference semantics).
    encoder_chunk: frames encoded at a time; None = `default_encoder_chunk` (1 on the CPU and under gradient
    checkpointing, 16 on CUDA); 0 = the whole clip at once.
    channels_last: run the encoder in channels-last memory format; None = on CUDA and under autocast
    (faster there); CPU float32 stays contiguous, whose oneDNN kernels round closer to the reference.
    delta_impl: "auto" (Winograd delta block for CPU float32 inference) or "direct" (conv1d everywhere).
    """

    def __init__(self, stride: int = 8, corr_levels: int = 4, corr_radius: int = 3, corr_impl: str = "local",
                 encoder_chunk: int | None = None, channels_last: bool | None = None, delta_impl: str = "auto"):
        super().__init__()
        self.stride = stride
        self.latent_dim = 128
        self.corr_levels, self.corr_radius = corr_levels, corr_radius
        self.corr_impl = corr_impl
        self.encoder_chunk = encoder_chunk
        self.channels_last = channels_last
        self.corr_chunk = 1 << 22  # floats of gathered patches held at once; 0 = all at once (ONNX export)
        # training memory: recompute each encoder chunk and each delta-block call in backward instead of
        # storing their activations (the outputs are identical; a step costs about one extra forward)
        self.grad_checkpoint = False
        self.fnet = BasicEncoder(output_dim=self.latent_dim, stride=stride)
        corr_dim = 3 * corr_levels * (2 * corr_radius + 1) ** 2
        self.delta_block = DeltaBlock(corr_dim=corr_dim, embed_dim=self.latent_dim, impl=delta_impl)
        self.norm = nn.GroupNorm(1, self.latent_dim)  # in the checkpoint, unused by the forward pass

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, in which features, correlations and coordinates are computed."""
        return self.fnet.conv1.weight.dtype

    def encode(self, rgbs: torch.Tensor) -> torch.Tensor:
        """Frames (B,S,3,H,W) in [0,255] -> feature maps (B,S,128,H/8,W/8) in the model's dtype."""
        return self.encode_nhwc(rgbs).permute(0, 1, 4, 2, 3)

    def encode_nhwc(self, rgbs: torch.Tensor) -> torch.Tensor:
        """Frames (B,S,3,H,W) in [0,255] -> channels-last feature maps (B,S,H/8,W/8,128) in the model's dtype."""
        B, S, _, H, W = rgbs.shape
        if H < MIN_SIZE or W < MIN_SIZE:
            raise ValueError(f"frames must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {H}x{W}")
        x = rgbs.reshape(B * S, 3, H, W)
        # instance norm is per frame, so chunks give the same maps; 0 = the whole clip at once
        checkpointing = self.grad_checkpoint and torch.is_grad_enabled()
        chunk = self.encoder_chunk if self.encoder_chunk is not None else default_encoder_chunk(x.is_cuda,
                                                                                             checkpointing)
        chunk = chunk or B * S
        H8, W8 = H // self.stride, W // self.stride
        dtype = self.dtype
        outs = []
        for s in range(0, B * S, chunk):
            xs = 2 * (x[s:s + chunk].to(dtype) / 255.0) - 1.0
            if self._channels_last(xs):
                xs = xs.contiguous(memory_format=torch.channels_last)
            if checkpointing:
                fm = checkpoint(self.fnet, xs, use_reentrant=False)
            else:
                fm = self.fnet(xs)
            outs.append(fm.to(dtype).permute(0, 2, 3, 1))
        if len(outs) == 1:
            out = outs[0].contiguous()
        elif torch.is_grad_enabled() and any(o.requires_grad for o in outs):
            out = torch.cat(outs, 0)
        else:  # one copy of the maps, not the chunks plus their concatenation
            out = torch.empty((B * S, H8, W8, self.latent_dim), device=x.device, dtype=dtype)
            for k, o in enumerate(outs):
                out[k * chunk:k * chunk + o.shape[0]] = o
            del outs
        return out.reshape(B, S, H8, W8, self.latent_dim)

    def _channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return x.is_cuda or autocast_enabled(x.device.type)

    def forward(self, trajs_e0: torch.Tensor, rgbs: torch.Tensor | None, iters: int = 3, feat_init=None,
                trajs_g: torch.Tensor | None = None, vis_g: torch.Tensor | None = None,
                valids: torch.Tensor | None = None, fmaps: torch.Tensor | None = None, **unused):
        """Track: trajs_e0 (B,S,N,2) pixels with frame 0 the queries, rgbs (B,S,3,H,W) in [0,255].

        Returns (per-iteration estimates + final, [initial, per-iteration..., final], (feats1, feats2,
        feats4), loss or None). vis_g is accepted for compatibility; PIPs++ predicts positions only.
        `fmaps` (B,S,H/8,W/8,128) from `encode_nhwc` may be passed instead of rgbs to reuse an encoding
        across batches of points.
        """
        B, S, N, D = trajs_e0.shape
        if fmaps is None:
            assert D == 2 and rgbs.shape[:2] == (B, S), "trajs_e0 (B,S,N,2) and rgbs (B,S,3,H,W) must agree"
            fmaps = self.encode_nhwc(rgbs)  # B,S,H8,W8,C
        assert fmaps.shape[:2] == (B, S), "trajs_e0 (B,S,N,2) and fmaps (B,S,H8,W8,C) must agree"
        stride = float(self.stride)
        device = trajs_e0.device
        H8, W8 = fmaps.shape[2:4]
        fmaps_bs = fmaps.reshape(B * S, H8, W8, self.latent_dim)
        pyramid = CorrPyramid(fmaps, self.corr_levels, self.corr_radius, impl=self.corr_impl,
                              chunk_elems=self.corr_chunk)

        dtype = self.dtype
        coords = trajs_e0.to(dtype) / stride
        query = coords[:, 0].clone()
        if feat_init is not None:
            feats1, feats2, feats4 = feat_init
        else:
            first = torch.arange(B, device=device) * S
            feats1 = sample_features(fmaps_bs, query, first).unsqueeze(1).expand(B, S, N, self.latent_dim)
            feats2 = feats4 = feats1
        t = torch.arange(S, device=device)
        frame = t.repeat(B) + torch.arange(B, device=device).repeat_interleave(S) * S  # index into B*S

        preds, anim = [], [coords.detach() * stride]
        for itr in range(iters):
            coords = coords.detach()
            if itr >= 1:
                feats2 = self._sample_past(fmaps_bs, coords, frame, 2, B, S, N)
                feats4 = self._sample_past(fmaps_bs, coords, frame, 4, B, S, N)
            targets = torch.stack([feats1, feats2, feats4], 3)  # B,S,N,3,C
            fcorrs = pyramid(targets, coords)  # B,S,N,588
            flows = coords[:, 1:] - coords[:, :-1]
            flows = torch.cat([flows, flows[:, -1:]], 1)
            to_bn = lambda a: a.permute(0, 2, 1, 3).reshape(B * N, S, a.shape[-1])  # noqa: E731
            if self.grad_checkpoint and torch.is_grad_enabled():
                delta = checkpoint(self.delta_block, to_bn(fcorrs), to_bn(flows), use_reentrant=False).to(dtype)
            else:
                delta = self.delta_block(to_bn(fcorrs), to_bn(flows)).to(dtype)
            coords = coords + delta.reshape(B, N, S, 2).permute(0, 2, 1, 3)
            preds.append(coords * stride)
            coords = torch.cat([query.unsqueeze(1), coords[:, 1:]], 1)
            anim.append(coords * stride)  # as the reference: the animation shows frame 0 back at the query

        loss = None
        if trajs_g is not None:
            loss = sequence_loss(preds, trajs_g, valids)
        preds.append(coords * stride)
        anim.append(coords * stride)
        return preds, anim, (feats1, feats2, feats4), loss

    def _sample_past(self, fmaps_bs, coords, frame, lag, B, S, N):
        """Feature at the current estimate in frame max(t - lag, 0) of the same clip, for every frame t."""
        t = torch.arange(S, device=coords.device)
        src = (t - lag).clamp(min=0)
        src_frame = (frame.view(B, S) - t + src).reshape(-1)
        xy = coords[:, src].reshape(B * S, N, 2)
        return sample_features(fmaps_bs, xy, src_frame).reshape(B, S, N, self.latent_dim)
