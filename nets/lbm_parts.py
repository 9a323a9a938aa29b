"""Building blocks of LBM (nets/lbm.py): a ResNet-18 trunk, multi-head attention with the key names of
`nn.MultiheadAttention`, multi-scale deformable attention in plain PyTorch, and the two-layer MLP.

Everything here runs on any device and exports to ONNX: no compiled extension, no data-dependent Python
branches. Parameter names are chosen so that LBM's state_dict matches the authors' checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# ResNet-18 trunk (the stages up to stride 16; LBM does not use layer4 or the classifier)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's key names: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,cin,H,W) -> (B,cout,H/stride,W/stride)."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


def resnet_stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Two basic blocks, the first one changing width and resolution."""
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


def resnet_stem_and_stage1() -> nn.Sequential:
    """conv 7x7/2, BN, ReLU, max-pool 3x3/2, then stage 1: stride 4, 64 channels (indices 0, 1, 4 hold weights)."""
    conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                         resnet_stage(64, 64, 1))


# ----------------------------------------------------------------------------------------------------------
# Attention


class MLP(nn.Module):
    """Linear, GELU, dropout, linear, dropout (keys net.0 and net.3)."""

    def __init__(self, dim: int, out_dim: int, expansion: int = 4, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * expansion, out_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., out_dim)."""
        return self.net(x)


class Attention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention`'s parameters and key names (batch first).

    Written out so that the masked form exports to ONNX and so that a row whose keys are all ignored is
    the caller's business (it passes a mask that keeps at least one key and discards the result).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ignore: torch.Tensor | None = None) -> torch.Tensor:
        """q (B,Lq,C), k and v (B,Lk,C), ignore (B,Lk) True for keys not to attend to -> (B,Lq,C)."""
        B, Lq, C = q.shape
        Lk = k.shape[1]
        h, d = self.heads, C // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        # 2-D inputs: under CPU autocast a (B,1,C) input makes F.linear broadcast the weight to (B,C,C) (a bmm)
        q = F.linear(q.reshape(B * Lq, C), wq, bq).view(B, Lq, h, d).transpose(1, 2)
        k = F.linear(k.reshape(B * Lk, C), wk, bk).view(B, Lk, h, d).transpose(1, 2)
        v = F.linear(v.reshape(B * Lk, C), wv, bv).view(B, Lk, h, d).transpose(1, 2)
        scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-1, -2)  # B h Lq Lk
        if ignore is not None:
            scores = scores.masked_fill(ignore[:, None, None, :], float("-inf"))
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(B, Lq, C)
        return self.out_proj(out)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), the reference's parameters, in plain PyTorch.

    Each query reads `points` bilinear samples per head and level around its reference point, weighted by a
    softmax over levels x points. As in the reference, the result is `dropout(output) + query`.
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int, dropout: float = 0.1):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        """Deformable DETR's start: offsets fan out in one direction per head, 1..P cells; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = direction.view(self.heads, 1, 1, 2) * scale  # heads 1 P 2
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B,Q,C); value (B,S,C), levels flattened row-major one after the other with sizes `shapes`
        [(h,w), ...]; reference (B,Q,levels,2) as (x,y) in [0,1] of each level's extent -> (B,Q,C)."""
        B, Q, C = query.shape
        H, L, P = self.heads, self.levels, self.points
        d = C // H
        v = self.value_proj(value)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        out = None
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            # one level's values as (B*heads, d, h, w) images, sampled at the reference plus its offsets
            v_l = v[:, start:start + h * w].reshape(B, h * w, H, d).permute(0, 2, 3, 1).reshape(B * H, d, h, w)
            start += h * w
            off = offsets[:, :, :, lvl] / offsets.new_tensor([w, h])  # B Q H P 2, in units of the level's extent
            loc = reference[:, :, None, lvl, None, :] + off
            grid = (2 * loc - 1).transpose(1, 2).reshape(B * H, Q, P, 2)
            sampled = F.grid_sample(v_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            w_l = weights[:, :, :, lvl].transpose(1, 2).reshape(B * H, 1, Q, P)
            part = (sampled * w_l).sum(-1)  # B*H d Q
            out = part if out is None else out + part
        assert out is not None, "no levels in shapes"
        out = out.reshape(B, C, Q).transpose(1, 2)
        return self.dropout(self.output_proj(out)) + query
