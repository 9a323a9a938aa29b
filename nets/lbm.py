"""LBM (Lattice Boltzmann Model for pixel dynamicity, NeurIPS 2025): an online point tracker, top to bottom.

Every frame goes through a ResNet-18 trunk to one stride-4 feature map. Each query keeps a feature vector
(sampled on its query frame) and two fixed-size memories of its past: the "collision" memory (features read
at its predicted positions) and the "stream" memory (its refined query vector). Per frame, each of the
`num_layers` transformer layers attends from the query to both memories, correlates it with the frame,
takes the top-k correlation peaks as reference points, reads the frame around them with deformable
attention ("lattice") and folds them back into the query. Heads then give a sub-cell offset to the last
layer's single reference point, a visibility logit and an uncertainty logit `rho`.

Layout: backbone, transformer layer, transformer, memory, losses, `LBM` (training forward, `inference`,
per-frame `step`), `LBMOnlineState` (the online state of one video, stepped frame by frame, queries added and
removed), `LBMStep` (the per-frame step as a pure function for ONNX), checkpoint helpers. Key names, shapes
and order of the state_dict equal the authors' checkpoint (docs/LBM.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from pips2.nets.lbm_parts import MLP, Attention, MSDeformAttn, resnet_stage, resnet_stem_and_stage1
from pips2.utils.checkpoint import (
    CheckpointError,
    load_model_state,
    load_weights_only,
    strip_module_prefix,
    weight_problem,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIS_THRESHOLD = 0.8  # visible = sigmoid(logit) > 0.8; also the memory's "was visible" test
UNCERTAIN_PX = 8.0  # a prediction this far (input pixels) from the truth counts as uncertain
CLS_TEMPERATURE = 0.05
LEVELS = 4  # the frame is read at strides 4, 8, 16, 32 (the average-pooled copies below)


# ----------------------------------------------------------------------------------------------------------
# Backbone: frames -> stride-4 features with a learned positional embedding


class Backbone(nn.Module):
    """ResNet-18 stages 1-3 fused to one `embed_dim`-channel map at stride 4, plus a positional embedding."""

    def __init__(self, input_hw: tuple[int, int], stride: int, embed_dim: int, proj_dim: int = 64):
        super().__init__()
        self.input_hw = input_hw
        self.frame_pos_embedding = nn.Parameter(torch.zeros(1, embed_dim, input_hw[0] // stride,
                                                            input_hw[1] // stride))
        nn.init.trunc_normal_(self.frame_pos_embedding, std=0.02)
        self.layer1 = resnet_stem_and_stage1()
        self.layer2 = resnet_stage(64, 128, 2)
        self.layer3 = resnet_stage(128, 256, 2)
        self.proj1 = nn.Conv2d(64, proj_dim, 1)
        self.proj2 = nn.Conv2d(128, proj_dim, 1)
        self.proj3 = nn.Conv2d(256, proj_dim, 1)
        self.fusion = nn.Sequential(nn.Conv2d(3 * proj_dim, embed_dim, 1), nn.BatchNorm2d(embed_dim), nn.GELU())

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B,3,H,W) in [0,255], any size -> features (B,C,H_in/stride,W_in/stride)."""
        x = frames.to(self.frame_pos_embedding.dtype) / 255.0
        x = F.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False)
        # the mean and std in the frames' dtype, made from the decimal constants (torchvision's Normalize, which
        # the reference uses, does so): a float64 run does not use their float32 roundings
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        size = c1.shape[-2:]
        up = lambda c: F.interpolate(c, size=size, mode="bilinear", align_corners=False)
        f = self.fusion(torch.cat([self.proj1(c1), up(self.proj2(c2)), up(self.proj3(c3))], dim=1))
        return f + self.frame_pos_embedding


def sample_points(feat: torch.Tensor, xy: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear read (border padding, align_corners=False) of feat (B,C,h,w) at xy (B,N,2) input px -> (B,N,C)."""
    grid = xy / xy.new_tensor([hw[1], hw[0]]) * 2 - 1
    out = F.grid_sample(feat, grid.unsqueeze(2), mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(-1).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Transformer


def add_block(owner: nn.Module, prefix: str, reader_name: str, reader: nn.Module, dim: int, dropout: float) -> None:
    """Register a reader (attention) and the post-norm residual block around it under the authors' names:
    `reader_name`, then `prefix`_dropout, _norm, _ffn, _norm2 (this order is the checkpoint's)."""
    setattr(owner, reader_name, reader)
    setattr(owner, f"{prefix}_dropout", nn.Dropout(dropout))
    setattr(owner, f"{prefix}_norm", nn.LayerNorm(dim))
    setattr(owner, f"{prefix}_ffn", MLP(dim, dim, dropout=dropout))
    setattr(owner, f"{prefix}_norm2", nn.LayerNorm(dim))


def run_block(owner: nn.Module, prefix: str, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The post-norm residual block of `add_block`: norm2(y + ffn(y)) with y = norm(x + dropout(update))."""
    y = getattr(owner, f"{prefix}_norm")(x + getattr(owner, f"{prefix}_dropout")(update))
    return getattr(owner, f"{prefix}_norm2")(y + getattr(owner, f"{prefix}_ffn")(y))


def peak_coords(indices: torch.Tensor, w: int, stride: int) -> torch.Tensor:
    """Flat indices into an (h,w) grid of stride-sized cells -> cell centres (..., 2) as (x, y) pixels."""
    x = (indices % w) * stride + 0.5 * stride
    y = torch.div(indices, w, rounding_mode="floor") * stride + 0.5 * stride
    return torch.stack([x, y], dim=-1)


def level_references(points: torch.Tensor, hw: tuple[int, int], peaks: bool = False) -> torch.Tensor:
    """Pixels (B,N,k,2) -> (B,N*k,LEVELS,2) positions in [0,1] for the deformable attention, same on every level.

    `peaks`: the points are cell centres of correlation peaks, which the reference holds in float32 (also in
    a float64 run), so their division by the input size is a float32 one there and here.
    """
    B, N, k, _ = points.shape
    if peaks:
        size = torch.tensor([hw[1], hw[0]], dtype=torch.float32, device=points.device)
        rel = (points.float() / size).clamp(0, 1).to(points.dtype)
    else:
        rel = (points / points.new_tensor([hw[1], hw[0]])).clamp(0, 1)
    return rel.unsqueeze(3).expand(B, N, k, LEVELS, 2).reshape(B, N * k, LEVELS, 2)


class LBMLayer(nn.Module):
    """Memory attention (collision, then stream), correlation + top-k peaks, lattice reads, query update."""

    # registered under the authors' names (by add_block, and the time embeddings by __init__)
    collision_attention: Attention
    stream_attention: Attention
    collision_time_emb: nn.Parameter
    stream_time_emb: nn.Parameter
    lattice_attention: MSDeformAttn
    lattice_update: Attention

    def __init__(self, input_hw: tuple[int, int], stride: int, dim: int, heads: int, levels: int, neighbors: int,
                 memory_size: int, dropout: float):
        super().__init__()
        self.input_hw, self.stride = input_hw, stride
        self.h, self.w = input_hw[0] // stride, input_hw[1] // stride
        for kind in ("collision", "stream"):
            add_block(self, kind, f"{kind}_attention", Attention(dim, heads, dropout), dim, dropout)
            # time embeddings: entries 0..M-1 for the memory slots (oldest first), entry M for "now"
            emb = nn.init.trunc_normal_(torch.zeros(1, memory_size + 1, dim), std=0.02)
            setattr(self, f"{kind}_time_emb", nn.Parameter(emb))
        self.corr_conv = nn.Conv2d(levels, 1, 1)
        add_block(self, "lattice", "lattice_attention", MSDeformAttn(dim, heads, levels, neighbors, dropout), dim,
                  dropout)
        add_block(self, "lattice_update", "lattice_update", Attention(dim, heads, dropout), dim, dropout)
        self.reference_rho = nn.Linear(dim, 1)

    def read_memory(self, kind: str, q: torch.Tensor, mem: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """One query (B*N,1,C) attends to its `kind` memory (B*N,M,C) with time embeddings; `ignore` (B*N,M)."""
        emb = getattr(self, f"{kind}_time_emb")
        q = q + emb[:, -1:]
        return run_block(self, kind, q, getattr(self, f"{kind}_attention")(q, mem + emb[:, :-1], mem, ignore))

    def mix_weights(self) -> torch.Tensor:
        """(levels,) weights of the similarity maps' mix, the authors' residual level-0 map included."""
        w = self.corr_conv.weight.reshape(-1)
        return torch.cat([w[:1] + 1, w[1:]])

    def correlation(self, q: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the query with each level's cells, upsampled to level 0 and mixed -> (B,N,h*w).

        The authors upsample each level's similarity map per query and mix the maps with a 1x1 convolution.
        Both steps are linear, so the mix is folded into the features instead: `mixed` (B,C,h*w) is
        (1 + w_0) f_0 + sum_l w_l up(f_l) for this layer's weights (LBMTransformer.forward), one per frame.
        """
        bias = self.corr_conv.bias
        assert bias is not None  # nn.Conv2d's default, which __init__ keeps
        return F.normalize(q, p=2, dim=-1) @ mixed + bias

    def forward(self, query: torch.Tensor, feats_cat: torch.Tensor, mixed: torch.Tensor,
                shapes: list[tuple[int, int]], memory: Memory, top_k: int):
        """query (B,N,C) -> (corr (B,N,hw), reference points (B,N,k,2) input px, reference rho (B,N,k), query)."""
        B, N, C = query.shape
        M = memory.size
        ignore = memory.vis_mask | memory.mem_mask  # B N M
        blind = ignore.all(-1, keepdim=True)  # nothing to remember: the query passes through unchanged
        # such rows attend to everything (a finite result) which is then discarded
        ignore_safe = (ignore & ~blind).reshape(B * N, M)
        blind_rows = blind.reshape(B * N, 1, 1)
        q = query.reshape(B * N, 1, C)
        q_col = self.read_memory("collision", q, memory.collision.reshape(B * N, M, C), ignore_safe)
        q_col = torch.where(blind_rows, q, q_col)
        q_str = self.read_memory("stream", q_col, memory.stream.reshape(B * N, M, C), ignore_safe)
        q_str = torch.where(blind_rows, q_col, q_str).reshape(B, N, C)

        corr = self.correlation(q_str, mixed)
        peaks = torch.topk(corr, top_k, dim=-1).indices
        ref = peak_coords(peaks, self.w, self.stride).to(query.dtype)  # B N k 2

        # lattice: one copy of the query per peak reads the frame around it
        q_lat = q_str.unsqueeze(2).expand(B, N, top_k, C).reshape(B, N * top_k, C)
        read = self.lattice_attention(q_lat, feats_cat, level_references(ref, self.input_hw, peaks=True), shapes)
        q_lat = run_block(self, "lattice", q_lat, read).reshape(B, N, top_k, C)
        ref_rho = self.reference_rho(q_lat).squeeze(-1)

        # the query attends to its k lattice copies
        q = q_str.reshape(B * N, 1, C)
        kv = q_lat.reshape(B * N, top_k, C)
        q = run_block(self, "lattice_update", q, self.lattice_update(q, kv, kv))
        return corr, ref, ref_rho, q.reshape(B, N, C)


@dataclass
class Memory:
    """Per query, the last `size` frames (oldest first): collision and stream vectors (B,N,M,C), and masks
    (B,N,M) that are True where the entry must be ignored (not yet queried / predicted invisible)."""

    collision: torch.Tensor
    stream: torch.Tensor
    vis_mask: torch.Tensor
    mem_mask: torch.Tensor

    @property
    def size(self) -> int:
        """Number of memory slots M."""
        return self.vis_mask.shape[-1]

    @staticmethod
    def empty(B: int, N: int, size: int, dim: int, like: torch.Tensor) -> Memory:
        """A memory with every slot ignored."""
        zeros = like.new_zeros(B, N, size, dim)
        ones = torch.ones(B, N, size, dtype=torch.bool, device=like.device)
        return Memory(zeros, zeros.clone(), ones, ones.clone())

    def push(self, collision: torch.Tensor, stream: torch.Tensor, vis_logit: torch.Tensor,
             active: torch.Tensor) -> Memory:
        """Drop the oldest slot, append this frame's vectors (B,N,C) and masks; a new Memory."""
        roll = lambda old, new: torch.cat([old[:, :, 1:], new.unsqueeze(2)], dim=2)
        return Memory(roll(self.collision, collision), roll(self.stream, stream),
                      roll(self.vis_mask, torch.sigmoid(vis_logit) < VIS_THRESHOLD), roll(self.mem_mask, ~active))

    def select(self, keep: torch.Tensor) -> Memory:
        """Only the queries where keep (N,) is True (batch of one)."""
        return Memory(self.collision[:, keep], self.stream[:, keep], self.vis_mask[:, keep], self.mem_mask[:, keep])

    @staticmethod
    def cat(a: Memory, b: Memory) -> Memory:
        """Queries of a, then those of b."""
        return Memory(*(torch.cat([x, y], dim=1) for x, y in
                        zip((a.collision, a.stream, a.vis_mask, a.mem_mask),
                            (b.collision, b.stream, b.vis_mask, b.mem_mask), strict=True)))


@dataclass
class StepOutput:
    """One frame's results in input pixels; the per-layer lists feed the training losses."""

    points: torch.Tensor  # B N 2: last layer's reference point + offset
    offset: torch.Tensor  # B N 2
    vis_logit: torch.Tensor  # B N
    rho: torch.Tensor  # B N, uncertainty logit
    corr: list[torch.Tensor]  # per layer, B N hw
    ref_points: list[torch.Tensor]  # per layer, B N k 2
    ref_rho: list[torch.Tensor]  # per layer, B N k
    collision: torch.Tensor  # B N C, this frame's entries for the memories
    stream: torch.Tensor


class LBMTransformer(nn.Module):
    """The layers plus the offset, visibility and collision-memory heads, each a deformable read of the frame."""

    # the readers add_block registers under the authors' names
    offset_layer: MSDeformAttn
    vis_layer: MSDeformAttn
    collision_mem_layer: MSDeformAttn

    def __init__(self, input_hw: tuple[int, int], stride: int, num_layers: int, dim: int, heads: int, levels: int,
                 neighbors: int, memory_size: int, top_k: int, dropout: float):
        super().__init__()
        if levels != LEVELS:
            raise ValueError(f"num_levels must be {LEVELS} (the frame is read at 4 strides), got {levels}")
        self.input_hw, self.stride = input_hw, stride
        h, w = input_hw[0] // stride, input_hw[1] // stride
        if h % 8 or w % 8:
            raise ValueError(f"input_size {input_hw} must be a multiple of 8*stride={8 * stride} in both dimensions")
        self.shapes = [(h >> i, w >> i) for i in range(LEVELS)]
        # kept for the checkpoint's sake; the computation uses the Python ints in self.shapes
        self.register_buffer("spatial_shapes", torch.tensor(self.shapes, dtype=torch.long))
        starts = [sum(a * b for a, b in self.shapes[:i]) for i in range(LEVELS)]
        self.register_buffer("start_levels", torch.tensor(starts, dtype=torch.long))
        self.top_k = [top_k] + [4] * (num_layers - 2) + [1]  # the last layer keeps one reference point
        self.layers = nn.ModuleList([LBMLayer(input_hw, stride, dim, heads, levels, neighbors, memory_size, dropout)
                                     for _ in range(num_layers)])

        add_block(self, "offset", "offset_layer", MSDeformAttn(dim, heads, levels, neighbors, dropout), dim, dropout)
        self.offset_head = MLP(dim, 2, expansion=1, dropout=0.0)
        add_block(self, "vis", "vis_layer", MSDeformAttn(dim, heads, levels, neighbors, dropout), dim, dropout)
        self.vis_head = MLP(dim, 2, expansion=1, dropout=0.0)
        add_block(self, "collision_mem", "collision_mem_layer", MSDeformAttn(dim, heads, levels, 4, dropout), dim,
                  dropout)

    def forward(self, query: torch.Tensor, feat: torch.Tensor, memory: Memory, active: torch.Tensor) -> StepOutput:
        """query (B,N,C) initial query vectors, feat (B,C,h,w) this frame, active (B,N) queried now or before."""
        B, C = feat.shape[:2]
        pooled = [feat] + [F.avg_pool2d(feat, 2 ** i, 2 ** i) for i in range(1, LEVELS)]
        feats = [p.flatten(2).transpose(1, 2) for p in pooled]  # per level B hw C
        feats_cat = torch.cat(feats, dim=1)
        # every layer's mixed similarity features (LBMLayer.correlation) in one pass over the upsampled levels,
        # in the features' dtype: under autocast the maps would be cast to half once per layer
        h, w = pooled[0].shape[-2:]
        up = torch.stack([F.interpolate(F.normalize(p, p=2, dim=1), size=(h, w), mode="bilinear",
                                        align_corners=False) if lvl else F.normalize(p, p=2, dim=1)
                          for lvl, p in enumerate(pooled)], 1)  # B L C h w
        layers = cast("Iterable[LBMLayer]", self.layers)  # it holds only those
        mix = torch.stack([layer.mix_weights() for layer in layers]).to(up.dtype)  # layers L
        with torch.autocast(feat.device.type, enabled=False):
            mixed = (mix @ up.reshape(B, LEVELS, -1)).reshape(B, len(self.layers), C, h * w)
        corr, refs, rhos = [], [], []
        q = query
        for i, (layer, k) in enumerate(zip(self.layers, self.top_k, strict=True)):
            c, ref, rho, q = layer(q, feats_cat, mixed[:, i], self.shapes, memory, k)
            corr.append(c)
            refs.append(ref)
            rhos.append(rho)
        ref = refs[-1]  # B N 1 2
        ref_levels = level_references(ref, self.input_hw, peaks=True)

        q_off = run_block(self, "offset", q, self.offset_layer(q, feats_cat, ref_levels, self.shapes))
        offset = torch.tanh(self.offset_head(q_off)) * self.stride

        # what the frame shows at the predicted position becomes this frame's collision-memory entry
        at_pred = level_references(ref + offset.unsqueeze(2), self.input_hw)
        col = run_block(self, "collision_mem", q, self.collision_mem_layer(q, feats_cat, at_pred, self.shapes))
        col = torch.where(active.unsqueeze(-1), col, query)

        q_vis = run_block(self, "vis", q, self.vis_layer(q, feats_cat, ref_levels, self.shapes))
        vis_rho = self.vis_head(q_vis)
        return StepOutput(points=ref[:, :, 0] + offset, offset=offset, vis_logit=vis_rho[..., 0],
                          rho=vis_rho[..., 1], corr=corr, ref_points=refs, ref_rho=rhos, collision=col, stream=q)


# ----------------------------------------------------------------------------------------------------------
# Losses (coordinates in input pixels)


def loss_masks(gt_visibility: torch.Tensor, query_times: torch.Tensor,
               after_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(point mask: visible and after the query frame, time mask: after the query frame), both (B,T,N) float."""
    B, T, N = gt_visibility.shape
    if after_query:
        t = torch.arange(T, device=gt_visibility.device).view(1, T, 1)
        time_mask = (t > query_times.unsqueeze(1)).float()
    else:
        time_mask = torch.ones(B, T, N, device=gt_visibility.device)
    return gt_visibility.float() * time_mask, time_mask


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of loss*mask over the sum of mask."""
    return (loss * mask).sum() / mask.sum()


def cell_indices(xy: torch.Tensor, hw: tuple[int, int], stride: int) -> torch.Tensor:
    """Flat index of the stride cell holding each point (..., 2); points outside the image map to cell 0."""
    H, W = hw
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < W) & (xy[..., 1] >= 0) & (xy[..., 1] < H)
    cell = torch.floor(xy / stride).long()
    return (cell[..., 1] * (W // stride) + cell[..., 0]) * inside.long()


def uncertainty_loss(rho: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, gt_vis: torch.Tensor,
                     time_mask: torch.Tensor) -> torch.Tensor:
    """BCE teaching rho to flag predictions that are occluded or more than UNCERTAIN_PX from the truth."""
    far = (pred - gt).pow(2).sum(-1).sqrt() > UNCERTAIN_PX
    target = (far | ~gt_vis).to(rho.dtype)
    return masked_mean(F.binary_cross_entropy_with_logits(rho, target, reduction="none"), time_mask)


# ----------------------------------------------------------------------------------------------------------
# The model


class LBM(nn.Module):
    """LBM with the authors' configuration keys; `forward` trains, `inference` tracks a whole clip."""

    def __init__(self, input_size=(384, 512), stride: int = 4, num_layers: int = 3, embed_dim: int = 256,
                 num_heads: int = 4, num_levels: int = 4, num_neighbors: int = 9, top_k_regions: int = 9,
                 dropout: float = 0.1, memory_size: int = 12, N: int = 256, T: int = 24, lambda_cls: float = 3.0,
                 lambda_vis: float = 1.0, lambda_reg: float = 1.0, lambda_unc: float = 1.0, lambda_ref: float = 1.0,
                 loss_after_query: bool = True, random_memory_mask_drop: float = 0.1,
                 backbone_init: str | os.PathLike | None = None):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        # input_size is the authors' configuration key (their configs and checkpoints); inside it is input_hw
        self.input_hw = input_hw = (int(input_size[0]), int(input_size[1]))
        self.stride, self.num_layers, self.embed_dim = stride, num_layers, embed_dim
        self.memory_size, self.N, self.T = memory_size, N, T
        self.visibility_threshold = VIS_THRESHOLD
        self.lambda_cls, self.lambda_vis, self.lambda_reg = lambda_cls, lambda_vis, lambda_reg
        self.lambda_unc, self.lambda_ref = lambda_unc, lambda_ref
        self.loss_after_query = loss_after_query
        # accepted for config compatibility: the authors' model never passes it to its transformer
        self.random_memory_mask_drop = random_memory_mask_drop
        self.h, self.w = input_hw[0] // stride, input_hw[1] // stride
        self.backbone = Backbone(input_hw, stride, embed_dim)
        self.transformer = LBMTransformer(input_hw, stride, num_layers, embed_dim, num_heads, num_levels, num_neighbors,
                                          memory_size, top_k_regions, dropout)
        if backbone_init is not None:
            load_backbone_init(self, backbone_init)

    def set_memory_size(self, memory_size: int) -> None:
        """Resample every layer's past time embeddings to `memory_size` slots (linear, ends kept); "now" stays."""
        for layer in self.transformer.layers:
            for name in ("collision_time_emb", "stream_time_emb"):
                emb = getattr(layer, name).data
                past = F.interpolate(emb[:, :-1].transpose(1, 2), size=memory_size, mode="linear",
                                     align_corners=True).transpose(1, 2)
                setattr(layer, name, nn.Parameter(torch.cat([past, emb[:, -1:]], dim=1)))
        self.memory_size = memory_size

    # --- pieces shared by training, inference and online tracking

    def to_input_px(self, xy: torch.Tensor, src_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) source pixels -> input-size pixels by the plain size ratio (divided, then multiplied, as the
        reference rounds it)."""
        return xy / xy.new_tensor([src_hw[1], src_hw[0]]) * xy.new_tensor([self.input_hw[1], self.input_hw[0]])

    def to_source_px(self, xy: torch.Tensor, src_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) input-size pixels -> source pixels (inverse of to_input_px)."""
        return xy / xy.new_tensor([self.input_hw[1], self.input_hw[0]]) * xy.new_tensor([src_hw[1], src_hw[0]])

    def empty_memory(self, B: int, N: int, like: torch.Tensor) -> Memory:
        """Fresh memory for N queries."""
        return Memory.empty(B, N, self.memory_size, self.embed_dim, like)

    def step(self, query: torch.Tensor, feat: torch.Tensor, memory: Memory,
             active: torch.Tensor) -> tuple[StepOutput, Memory]:
        """One frame: query (B,N,C) vectors, feat (B,C,h,w) from `backbone`, active (B,N) -> (output, new memory)."""
        out = self.transformer(query, feat, memory, active)
        return out, memory.push(out.collision, out.stream, out.vis_logit, active)

    def query_vectors(self, frames_at: Callable[[int], torch.Tensor], q_in: torch.Tensor,
                      num_frames: int) -> torch.Tensor:
        """Initial query vectors (B,N,C): each query (t,x,y) in input px reads the features of its own frame.

        `frames_at(t)` returns frame t's features (B,C,h,w); it is called once per distinct query time.
        """
        times = q_in[..., 0].long()
        if times.numel() and (times.min() < 0 or times.max() >= num_frames):
            lo, hi = int(times.min()), int(times.max())
            raise ValueError(f"queries: query frames must lie in [0, {num_frames - 1}], got {lo}..{hi}")
        out = None
        for t in torch.unique(times).tolist():
            v = sample_points(frames_at(t), q_in[..., 1:], self.input_hw)
            out = v if out is None else torch.where((times == t).unsqueeze(-1), v, out)
        if out is None:  # no queries (N = 0): no frame to read them from
            return self.backbone.frame_pos_embedding.new_zeros(q_in.shape[0], 0, self.embed_dim)
        return out

    # --- training

    def forward(self, video: torch.Tensor, queries: torch.Tensor, gt_tracks: torch.Tensor,
                gt_visibility: torch.Tensor, with_raw: bool = False) -> dict[str, torch.Tensor]:
        """Track a clip and score it: video (B,T,3,H,W) [0,255], queries (B,N,3) (t,x,y) source px, gt_tracks
        (B,T,N,2) source px, gt_visibility (B,T,N). Returns points (source px), visibility and the five losses
        (with_raw adds the per-frame offset, vis_logit and rho)."""
        B, T, _, H, W = video.shape
        gt_vis = gt_visibility.bool()
        q_in = torch.cat([queries[..., :1], self.to_input_px(queries[..., 1:], (H, W))], dim=-1)
        gt = self.to_input_px(gt_tracks, (H, W))
        times = q_in[..., 0].long()
        # all frames in one batch, as the authors train (batch norm statistics see the whole clip)
        feats = self.backbone(video.flatten(0, 1)).unflatten(0, (B, T))
        q_init = self.query_vectors(lambda t: feats[:, t], q_in, T)
        memory = self.empty_memory(B, q_init.shape[1], q_init)
        outs = []
        for t in range(T):
            out, memory = self.step(q_init, feats[:, t], memory, times <= t)
            outs.append(out)
        stack = lambda get: torch.stack([get(o) for o in outs], dim=1)  # over time: B T ...
        offsets, vis_logit, rho = stack(lambda o: o.offset), stack(lambda o: o.vis_logit), stack(lambda o: o.rho)
        corr = [stack(lambda o, i=i: o.corr[i]) for i in range(self.num_layers)]
        ref_pts = [stack(lambda o, i=i: o.ref_points[i]) for i in range(self.num_layers)]
        ref_rho = [stack(lambda o, i=i: o.ref_rho[i]) for i in range(self.num_layers)]

        point_mask, time_mask = loss_masks(gt_vis, times, self.loss_after_query)
        cells = cell_indices(gt, self.input_hw, self.stride)
        cls = 0
        for c in corr:
            ce = F.cross_entropy(c.flatten(0, 2) / CLS_TEMPERATURE, cells.flatten(), reduction="none")
            cls = cls + masked_mean(ce.view_as(point_mask), point_mask) * self.lambda_cls
        vis_bce = F.binary_cross_entropy_with_logits(vis_logit, gt_vis.to(vis_logit.dtype), reduction="none")
        ref_last = ref_pts[-1][..., 0, :]
        reg = (F.l1_loss(offsets, gt - ref_last, reduction="none").sum(-1) * point_mask).clamp(0, 2 * self.stride)
        pred = ref_last + offsets
        # the reference scales both uncertainty terms by lambda_unc once more (identical at the default 1.0)
        unc = uncertainty_loss(rho, pred, gt, gt_vis, time_mask) * self.lambda_unc ** 2
        topk = [uncertainty_loss(ref_rho[i][..., j], ref_pts[i][..., j, :], gt, gt_vis, time_mask)
                for i in range(self.num_layers - 1) for j in range(ref_rho[i].shape[-1])]
        out = {
            "classification_loss": cls / self.num_layers,
            "visibility_loss": masked_mean(vis_bce, time_mask) * self.lambda_vis,
            "regression_loss": reg.sum() / point_mask.sum() * self.lambda_reg,
            "uncertainty_loss": unc,
            "uncertainty_loss_topk": sum(topk) / len(topk) * self.lambda_unc * self.lambda_ref,
            "points": self.to_source_px(pred, (H, W)),
            "visibility": torch.sigmoid(vis_logit) > self.visibility_threshold,
        }
        if with_raw:
            out.update(offset=offsets, vis_logit=vis_logit, rho=rho)
        return out

    # --- evaluation

    @torch.no_grad()
    def inference(self, video: torch.Tensor, queries: torch.Tensor, with_raw: bool = False) -> dict[str, torch.Tensor]:
        """Track a clip frame by frame: video (B,T,3,H,W) [0,255], queries (B,N,3) (t,x,y) source px ->
        points (B,T,N,2) source px, visibility (B,T,N) bool (with_raw: plus offset, vis_logit, rho).

        As in the reference, a query also gets outputs before its query frame (computed from its vector,
        with its memory masked); from its query frame on, they equal `LBMOnlineState` with the query added there."""
        B, T, _, H, W = video.shape
        q_in = torch.cat([queries[..., :1], self.to_input_px(queries[..., 1:], (H, W))], dim=-1)
        times = q_in[..., 0].long()
        q_init = self.query_vectors(lambda t: self.backbone(video[:, t]), q_in, T)
        memory = self.empty_memory(B, q_init.shape[1], q_init)
        outs = []
        for t in range(T):
            out, memory = self.step(q_init, self.backbone(video[:, t]), memory, times <= t)
            outs.append(out)
        points = torch.stack([o.points for o in outs], dim=1)
        vis_logit = torch.stack([o.vis_logit for o in outs], dim=1)
        res = {"points": self.to_source_px(points, (H, W)),
               "visibility": torch.sigmoid(vis_logit) > self.visibility_threshold}
        if with_raw:
            res.update(offset=torch.stack([o.offset for o in outs], dim=1), vis_logit=vis_logit,
                       rho=torch.stack([o.rho for o in outs], dim=1))
        return res


# ----------------------------------------------------------------------------------------------------------
# Online tracking: one call per frame, fixed memory per query


class LBMOnlineState:
    """The model's online state for one video (batch of one): per query its vector and fixed-size memory,
    stepped one frame at a time.

    `init(points, first_frame)` starts the queries on the first frame and returns that frame's result;
    `track(frame, add=..., remove=...)` first drops the queries where `remove` (N,) is True, then starts the
    points `add` (M,2) on this frame (appended after the kept ones), then tracks all of them on this frame.
    A query started on frame t gives exactly what `LBM.inference` gives for a query with time t, from t on.
    """

    def __init__(self, model: LBM):
        self.model = model.eval()
        self.query: torch.Tensor | None = None
        self.memory: Memory | None = None
        self.src_hw: tuple[int, int] | None = None  # the size of the frames given
        self.t = 0

    @property
    def num_queries(self) -> int:
        """Number of queries currently tracked."""
        return 0 if self.query is None else self.query.shape[1]

    @torch.no_grad()
    def init(self, query_points: torch.Tensor, first_frame: torch.Tensor) -> dict[str, torch.Tensor]:
        """query_points (N,2) (x,y) source px, first_frame (1,3,H,W) [0,255] -> the first frame's result."""
        self.query, self.memory, self.t = None, None, 0
        return self.track(first_frame, add=query_points)

    @torch.no_grad()
    def track(self, frame: torch.Tensor, add: torch.Tensor | None = None,
              remove: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """frame (1,3,H,W) [0,255] -> points (N,2) source px, visibility (N,) bool, vis_prob, rho_prob (N,)."""
        m = self.model
        self.src_hw = (frame.shape[-2], frame.shape[-1])
        feat = m.backbone(frame)
        if remove is not None and self.query is not None and self.memory is not None:
            keep = ~remove.to(torch.bool)
            self.query, self.memory = self.query[:, keep], self.memory.select(keep)
        if add is not None and len(add):
            q_new = sample_points(feat, m.to_input_px(add.to(feat).unsqueeze(0), self.src_hw), m.input_hw)
            mem_new = m.empty_memory(1, q_new.shape[1], q_new)
            if self.query is None or self.memory is None or self.query.shape[1] == 0:
                self.query, self.memory = q_new, mem_new
            else:
                self.query = torch.cat([self.query, q_new], dim=1)
                self.memory = Memory.cat(self.memory, mem_new)
        if self.query is None or self.memory is None or self.query.shape[1] == 0:
            raise ValueError("LBMOnlineState.track: no queries to track (call init or pass add=...)")
        active = torch.ones(self.query.shape[:2], dtype=torch.bool, device=feat.device)
        out, self.memory = m.step(self.query, feat, self.memory, active)
        self.t += 1
        vis_prob = torch.sigmoid(out.vis_logit[0])
        return {"points": m.to_source_px(out.points[0], self.src_hw), "visibility": vis_prob > m.visibility_threshold,
                "vis_prob": vis_prob, "rho_prob": torch.sigmoid(out.rho[0])}


class LBMStep(nn.Module):
    """The per-frame step as a pure function of tensors (for ONNX): a frame at input size and the state in,
    points (1,N,2) input px, visibility and rho logits (1,N) and the next state out. Every query is active."""

    def __init__(self, model: LBM):
        super().__init__()
        self.model = model.eval()

    def forward(self, frame: torch.Tensor, query: torch.Tensor, collision: torch.Tensor, stream: torch.Tensor,
                vis_mask: torch.Tensor, mem_mask: torch.Tensor):
        """frame (1,3,H_in,W_in) [0,255]; query (1,N,C); collision, stream (1,N,M,C); masks (1,N,M) bool."""
        feat = self.model.backbone(frame)
        active = torch.ones_like(vis_mask[..., 0])
        out, mem = self.model.step(query, feat, Memory(collision, stream, vis_mask, mem_mask), active)
        return out.points, out.vis_logit, out.rho, mem.collision, mem.stream, mem.vis_mask, mem.mem_mask


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of `{'model': state_dict, ...}` or of a bare state_dict, `module.` prefixes removed."""
    # the authors' training checkpoints also pickle their `args`, which a weights-only load refuses
    ckpt = load_weights_only(path, "cpu", refused_hint="keep only {'model': state_dict} (the authors' "
                                                       "tools/ckpt_converter.py does)")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not an LBM checkpoint (expected {{'model': state_dict}} or a state_dict)")
    return strip_module_prefix(state, str(path))


# Bounds on the sizes a state_dict may make build_lbm build (docs/LBM.md, "Checkpoints"), checked before any model
# is: the authors' model has 3 layers of 256 channels, a 384x512 input, 12 memory slots, 9 neighbours and
# 17,827,042 weights (71 MB); a file may ask for a few times that, not for the 3 GB of 400 layers.
MAX_LAYERS = 12
MAX_EMBED_DIM = 1024
MAX_INPUT_SIDE = 2048  # pixels: the frame position embedding grows with the input's area
MAX_MEMORY_SIZE = 256
MAX_NEIGHBORS = 64
MAX_WEIGHTS = 4 * 17_827_042  # in the model built (285 MB as float32), counted on the meta device first


def lbm_config_from_state(state: dict[str, torch.Tensor]) -> dict:
    """The LBM sizes a state_dict fixes: input_size, embed_dim, num_layers, memory_size and num_neighbors
    (this one assuming the authors' 4 heads); other keys keep the authors' defaults. A size beyond the bounds
    above raises CheckpointError (without the file's name: the caller adds it)."""
    pos = state.get("backbone.frame_pos_embedding")
    emb = state.get("transformer.layers.0.collision_time_emb")
    offsets = state.get("transformer.layers.0.lattice_attention.sampling_offsets.weight")
    if pos is None or emb is None or offsets is None or pos.dim() != 4 or emb.dim() < 2 or offsets.dim() < 1:
        return {}  # not an LBM state_dict: the strict load names what is missing
    layers = {k.split(".")[2] for k in state if k.startswith("transformer.layers.")}
    stride = 4
    cfg = {"input_size": (pos.shape[2] * stride, pos.shape[3] * stride), "embed_dim": pos.shape[1],
           "num_layers": len(layers), "memory_size": emb.shape[1] - 1,
           "num_neighbors": offsets.shape[0] // (4 * 4 * 2)}
    for what, value, bound in (("transformer layers", cfg["num_layers"], MAX_LAYERS),
                               ("embedding channels", cfg["embed_dim"], MAX_EMBED_DIM),
                               ("input pixels per side", max(cfg["input_size"]), MAX_INPUT_SIDE),
                               ("memory slots", cfg["memory_size"], MAX_MEMORY_SIZE),
                               ("neighbours", cfg["num_neighbors"], MAX_NEIGHBORS)):
        if value > bound:
            raise CheckpointError(f"declares an LBM of {value} {what}, more than {bound}")
    return cfg


def _weights_of(config: dict) -> int:
    """How many numbers an LBM of `config` holds, counted without allocating them."""
    sizes = {k: v for k, v in config.items() if k != "backbone_init"}  # a file to read: not a size
    with torch.device("meta"):
        return sum(v.numel() for v in LBM(**sizes).state_dict().values())


def build_lbm(state: dict[str, torch.Tensor], source: str = "checkpoint", **config) -> LBM:
    """An LBM holding `state` (loaded strictly), on the CPU in train mode as built. Its sizes come from the weights
    (`lbm_config_from_state`, bounded); `config` given here wins, so weights of other sizes are refused, naming the
    keys. Errors are one line starting with `source`; reading a file is pips2.hub's (the one loader)."""
    try:
        found = lbm_config_from_state(state)
        cfg = {**found, **config}
        if found and (n := _weights_of(cfg)) > MAX_WEIGHTS:
            raise CheckpointError(f"declares an LBM of {n} weights, more than {MAX_WEIGHTS}")
        model = LBM(**cfg)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    load_model_state(model, state, source=source)
    return model


def torchvision_resnet18_keys(key: str) -> str | None:
    """The LBM backbone key for a torchvision resnet18 key; None for parts LBM does not use (layer4, fc)."""
    if key.startswith(("fc.", "layer4.")):
        return None
    for src, dst in (("conv1.", "layer1.0."), ("bn1.", "layer1.1."), ("layer1.", "layer1.4."),
                     ("layer2.", "layer2."), ("layer3.", "layer3.")):
        if key.startswith(src):
            return "backbone." + dst + key[len(src):]
    return ""


def load_backbone_init(model: LBM, path: str | os.PathLike) -> None:
    """Copy a torchvision-format resnet18 state_dict (ImageNet weights) into the ResNet trunk of `model`."""
    state = read_state_dict(path)
    own = model.state_dict()
    trunk = [k for k in own if k.startswith(("backbone.layer1.", "backbone.layer2.", "backbone.layer3."))]
    mapped, problems = {}, []
    for k, v in state.items():
        dst = torchvision_resnet18_keys(k)
        if dst is None:
            continue
        if dst not in own:
            problems.append(f"unexpected key {k}")
        elif own[dst].shape != v.shape:
            problems.append(f"{k} has shape {tuple(v.shape)}, expected {tuple(own[dst].shape)}")
        else:
            mapped[dst] = v
            if problem := weight_problem(k, v, own[dst]):  # NaN, inf or int64 weights would train as such
                problems.append(problem)
    # old torchvision files carry no num_batches_tracked counters; the model's own are kept then
    missing = [k for k in trunk if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"{len(missing)} trunk weights missing, e.g. {missing[0]}")
    if problems:
        raise CheckpointError(f"{path}: not a torchvision resnet18 state_dict: " + "; ".join(problems[:3]))
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
