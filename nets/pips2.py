"""PIPs++ (PointOdyssey, ICCV 2023): the model, readable top to bottom.

This file holds the reference semantics only: feature sampling, the correlation pyramid, the feature
encoder `fnet`, the temporal `DeltaBlock`, then `Pips` with its forward pass and loss. Three steps (the
encoder, the correlation look-ups and the delta block) run in the form an `ExecPlan` (nets/plan.py) picks:
`Pips` hands its plan to `fast.Forms` (nets/fast.py), which supplies those forms and keeps their caches; the
reference form of each is the code here. State-dict keys match the authors' checkpoint exactly
(docs/MODEL.md), so `load_state_dict(strict=True)` works on `model-000200000.pth`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pips2.nets import fast
from pips2.nets.plan import ExecPlan
from pips2.utils.amp import autocast_off

MIN_SIZE = 128  # four pyramid levels at stride 8 must stay >= 2x2


# ----------------------------------------------------------------------------------------------------------
# Sampling. All coordinates are (x, y) with x=0 the centre of the first column.


def sample_features(fmap: torch.Tensor, xy: torch.Tensor, frame: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear sample of channels-last maps (F,H,W,C) at xy (M,N,2), border replication -> (M,N,C) in fmap's dtype.

    Row m reads map `frame[m]` (default: map m, so M == F). As in the reference, the position and the four
    bilinear weights are float32 whatever the maps' dtype (this is what a float64 run of it computes).
    """
    Fr, H, W, C = fmap.shape
    M, N, _ = xy.shape
    if frame is None:
        frame = torch.arange(Fr, device=xy.device)
    x = xy[..., 0].float()
    y = xy[..., 1].float()
    # As the reference: the corners are floor(x) and floor(x) + 1, their indices clipped to the map, the weights
    # taken from the unclipped corners. On or beyond the last row or column both corners read it and the
    # weights add up to one only up to float32 rounding (clamping the position first rounds otherwise).
    x0, y0 = x.floor(), y.floor()
    x1, y1 = x0 + 1, y0 + 1
    flat = fmap.reshape(Fr * H * W, C)

    def index(v: torch.Tensor, size: int) -> torch.Tensor:
        # a NaN coordinate must give NaN features, not an out-of-range index: index with 0, weight with NaN
        return v.nan_to_num(0).clamp(0, size - 1).long()

    rows = frame.view(M, 1) * (H * W)
    top, bottom = rows + index(y0, H) * W, rows + index(y1, H) * W
    left, right = index(x0, W), index(x1, W)
    corners = (top + left, top + right, bottom + left, bottom + right)
    weights = tuple(w.unsqueeze(-1) for w in ((x1 - x) * (y1 - y), (x - x0) * (y1 - y), (x1 - x) * (y - y0),
                                              (x - x0) * (y - y0)))
    if torch.is_grad_enabled() and fmap.requires_grad:
        # one gather for the four corners: its backward allocates one map-sized gradient, not four
        taps = flat.index_select(0, torch.stack(corners).reshape(-1)).view(4, M, N, C).unbind(0)
    else:  # one corner at a time holds less memory
        taps = (flat.index_select(0, idx.reshape(-1)).view(M, N, C) for idx in corners)
    out = None
    for tap, weight in zip(taps, weights, strict=True):
        term = tap * weight.to(fmap.dtype)
        out = term if out is None else out + term
    assert out is not None  # four corners
    return out


def avg_pool2x2_nhwc(x: torch.Tensor) -> torch.Tensor:
    """avg_pool2d(kernel 2, stride 2) for channels-last (F,H,W,C); an odd last row/column is dropped."""
    Fr, H, W, C = x.shape
    h, w = H // 2, W // 2
    return x[:, : 2 * h, : 2 * w].reshape(Fr, h, 2, w, 2, C).mean((2, 4))



# ----------------------------------------------------------------------------------------------------------
# Correlation pyramid


def corr_scale(C: int) -> float:
    """sqrt(C) as the reference computes it, in float32 (a float64 run of the reference divides by this too)."""
    return float(torch.tensor(float(C), dtype=torch.float32).sqrt())


class CorrPyramid:
    """Feature pyramid of S frames that answers correlation look-ups for several templates at once.

    Calling it is the reference form (`volume` below); `fast.LocalCorrelation` computes the same values from
    local patches.
    """

    def __init__(self, fmaps: torch.Tensor, num_levels: int = 4, radius: int = 3):
        """fmaps: channels-last maps (B,S,H,W,C); correlations are computed in their dtype."""
        B, S, H, W, C = fmaps.shape
        self.radius, self.scale = radius, corr_scale(C)
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
            out = self.volume(targets.to(dtype), coords.to(dtype))
        return out.reshape(B, S, N, -1).float()

    def volume(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The reference: each template's whole volume pyramid, then bilinear look-ups with zeros outside."""
        B, S, N, T, C = targets.shape
        r = self.radius
        maps = [lv.reshape(B, S, -1, C).transpose(2, 3) for lv in self.levels]  # B,S,C,hw
        volumes = [[torch.matmul(targets[:, :, :, t], m) / self.scale for m in maps] for t in range(T)]
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
# Feature encoder: ResNet-style, instance norm without affine parameters, 128 channels at stride 8.


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """InstanceNorm2d without affine parameters, eps 1e-5 (the reference)."""
    return F.instance_norm(x, eps=1e-5)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm; a strided block gets a 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        # a Sequential so that the checkpoint's key stays downsample.0.*; the norm after it has no weights
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride)) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place ReLUs act on fresh norm outputs, which no backward needs
        y = F.relu_(instance_norm(self.conv1(x)))
        y = F.relu_(instance_norm(self.conv2(y)))
        if self.downsample is not None:
            x = instance_norm(self.downsample[0](x))
        return F.relu_(x + y)


class BasicEncoder(nn.Module):
    """Frames (N,3,H,W) in [-1,1] -> features (N,128,H/8,W/8) from four stages fused at stride 8."""

    layer1: nn.ModuleList  # made in a loop below: named here for readers and type checkers
    layer2: nn.ModuleList
    layer3: nn.ModuleList
    layer4: nn.ModuleList

    def __init__(self, output_dim: int = 128, stride: int = 8):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        widths, strides = (64, 96, 128, 128), (1, 2, 2, 2)
        in_planes = 64
        for k, (width, s) in enumerate(zip(widths, strides, strict=True)):
            setattr(self, f"layer{k + 1}", nn.ModuleList([ResidualBlock(in_planes, width, s),
                                                          ResidualBlock(width, width, 1)]))
            in_planes = width
        self.conv2 = nn.Conv2d(sum(widths), output_dim * 2, 3, padding=1)
        self.conv3 = nn.Conv2d(output_dim * 2, output_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        size = (H // self.stride, W // self.stride)
        x = F.relu_(instance_norm(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
            feats.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
        x = F.relu_(instance_norm(self.conv2(torch.cat(feats, 1))))
        return self.conv3(x)


# ----------------------------------------------------------------------------------------------------------
# Delta block: a 1-D ResNet over time, per point.


def sincos_embed_xy(xy: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sin-cos embedding of (...,2) with dim//4 frequencies per axis: [sin x, cos x, sin y, cos y]."""
    q = dim // 4
    dtype = torch.promote_types(xy.dtype, torch.float32)  # float64 stays float64; half types compute in float32
    # the frequencies are float32 in the reference, also in a float64 run of it
    omega = (1.0 / temperature ** (torch.arange(q, device=xy.device, dtype=torch.float32) / (q - 1))).to(dtype)
    x = xy[..., 0:1].to(dtype) * omega
    y = xy[..., 1:2].to(dtype) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], -1).to(xy.dtype)


class Conv1dSame(nn.Module):
    """Conv1d with TensorFlow-style 'same' padding (left p//2, right p - p//2)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(cin, cout, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size - 1
        if p % 2 == 0:  # symmetric: let the convolution pad instead of copying the input into a padded one
            return F.conv1d(x, self.conv.weight, self.conv.bias, padding=p // 2)
        return self.conv(F.pad(x, (p // 2, p - p // 2)))


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


class DeltaBlock(nn.Module):
    """(correlations, flow) per point and frame -> coordinate update in stride-8 units."""

    def __init__(self, corr_dim: int = 588, embed_dim: int = 128, kernel_size: int = 3):
        super().__init__()
        self.embed_dim = embed_dim
        self.first_block_conv = Conv1dSame(corr_dim + embed_dim + 2, 128, kernel_size)
        widths = [128, 128, 128, 256, 256, 512, 512, 1024, 1024]
        self.basicblock_list = nn.ModuleList(
            BasicBlock1d(widths[k], widths[k + 1], kernel_size, first=(k == 0)) for k in range(8))
        self.dense = nn.Linear(1024, 2)

    def inputs(self, fcorr: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """(M,S,588), (M,S,2) -> the time-major input (M,S,718): correlations, embedded flow, flow."""
        return torch.cat([fcorr.to(flow.dtype), sincos_embed_xy(flow, self.embed_dim), flow], 2)

    def forward(self, fcorr: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """fcorr (M,S,588), flow (M,S,2) -> delta (M,S,2)."""
        x = F.relu(self.first_block_conv(self.inputs(fcorr, flow).transpose(1, 2)))
        for block in self.basicblock_list:
            x = block(x)
        return self.dense(F.relu(x).transpose(1, 2))


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


class Pips(nn.Module):
    """PIPs++: iterative multi-template point tracking over S frames.

    plan: how to run (nets/plan.py); default `ExecPlan.auto()`, CPU float32 inference. Training needs a
    training plan, e.g. `ExecPlan.auto(device, training=True)`; inference plans refuse to record gradients.
    """

    def __init__(self, plan: ExecPlan | None = None, *, stride: int = 8, corr_levels: int = 4,
                 corr_radius: int = 3):
        super().__init__()
        self.stride = stride
        self.latent_dim = 128
        self.corr_levels, self.corr_radius = corr_levels, corr_radius
        self.fnet = BasicEncoder(output_dim=self.latent_dim, stride=stride)
        corr_dim = 3 * corr_levels * (2 * corr_radius + 1) ** 2
        self.delta_block = DeltaBlock(corr_dim=corr_dim, embed_dim=self.latent_dim)
        # in the authors' checkpoint, unused by the forward pass: kept for strict loading, never trained
        self.norm = nn.GroupNorm(1, self.latent_dim).requires_grad_(False)
        self.set_plan(plan if plan is not None else ExecPlan.auto())

    def set_plan(self, plan: ExecPlan) -> None:
        """Run from now on as `plan` says (what the forms of the previous plan kept is dropped)."""
        self.forms = fast.Forms(plan)

    @property
    def plan(self) -> ExecPlan:
        """The execution plan the model runs (`set_plan` changes it)."""
        return self.forms.plan

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
        frames = rgbs.reshape(B * S, 3, H, W)
        # instance norm is per frame, so encoding in chunks gives the same maps
        maps = [self._encode_frames(chunk) for chunk in self.forms.frame_chunks(frames)]
        H8, W8 = H // self.stride, W // self.stride
        out = fast.stack_frames(maps, (B * S, H8, W8, self.latent_dim))
        return out.reshape(B, S, H8, W8, self.latent_dim)

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (n,3,H,W) in [0,255] -> channels-last maps (n,H/8,W/8,128)."""
        x = 2 * (frames.to(self.dtype) / 255.0) - 1.0
        fm = self.forms.encoder(self.fnet, x)  # self.fnet(x) in the plan's form
        return fm.to(self.dtype).permute(0, 2, 3, 1)

    def forward(self, trajs_e0: torch.Tensor, rgbs: torch.Tensor | None, iters: int = 3,
                feat_init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                trajs_g: torch.Tensor | None = None, vis_g: torch.Tensor | None = None,
                valids: torch.Tensor | None = None, fmaps: torch.Tensor | None = None, *,
                sw: object = None, is_train: bool = False, beautify: bool = False):
        """Track: trajs_e0 (B,S,N,2) pixels with frame 0 the queries, rgbs (B,S,3,H,W) in [0,255].

        Returns (per-iteration estimates + final, [initial, per-iteration..., final], (feats1, feats2,
        feats4), loss or None). `fmaps` (B,S,H/8,W/8,128) from `encode_nhwc` may be passed instead of rgbs to
        reuse an encoding across batches of points. vis_g (PIPs++ predicts positions only), sw, is_train and
        beautify are the authors' arguments (logging, training flags), accepted and ignored.
        """
        self.forms.check_grad_mode(self.fnet.conv1.weight)
        B, S, N, D = trajs_e0.shape
        if fmaps is None:
            assert rgbs is not None, "Pips.forward needs rgbs or fmaps"
            assert D == 2 and rgbs.shape[:2] == (B, S), "trajs_e0 (B,S,N,2) and rgbs (B,S,3,H,W) must agree"
            fmaps = self.encode_nhwc(rgbs)  # B,S,H8,W8,C
        assert fmaps.shape[:2] == (B, S), "trajs_e0 (B,S,N,2) and fmaps (B,S,H8,W8,C) must agree"
        stride = float(self.stride)
        device = trajs_e0.device
        H8, W8 = fmaps.shape[2:4]
        fmaps_bs = fmaps.reshape(B * S, H8, W8, self.latent_dim)
        # pyramid(targets, coords) in the plan's form, for this forward pass
        correlate = self.forms.correlation(CorrPyramid(fmaps, self.corr_levels, self.corr_radius))

        coords = trajs_e0.to(self.dtype) / stride
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
        delta_block = self.forms.delta_block(self.delta_block)  # for this forward pass, shared by its iterations
        for itr in range(iters):
            coords = coords.detach()
            if itr >= 1:
                feats2, feats4 = self._sample_past(fmaps_bs, coords, frame, (2, 4), B, S, N)
            targets = torch.stack([feats1, feats2, feats4], 3)  # B,S,N,3,C
            fcorrs = correlate(targets, coords)  # B,S,N,588
            flows = coords[:, 1:] - coords[:, :-1]
            flows = torch.cat([flows, flows[:, -1:]], 1)
            to_bn = lambda a: a.permute(0, 2, 1, 3).reshape(B * N, S, a.shape[-1])  # noqa: E731
            delta = delta_block(to_bn(fcorrs), to_bn(flows)).to(self.dtype)
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

    def _sample_past(self, fmaps_bs, coords, frame, lags, B, S, N):
        """Features at the current estimates in frames max(t - lag, 0) of the same clip, for every frame t and
        each lag in `lags` (one gather for all lags)."""
        t = torch.arange(S, device=coords.device)
        xy, src_frame = [], []
        for lag in lags:
            src = (t - lag).clamp(min=0)
            src_frame.append((frame.view(B, S) - t + src).reshape(-1))
            xy.append(coords[:, src].reshape(B * S, N, 2))
        out = sample_features(fmaps_bs, torch.cat(xy), torch.cat(src_frame))
        return out.view(len(lags), B, S, N, self.latent_dim).unbind(0)
