"""What one training step computes, free of run set-up: PIPs++ (docs/MODEL.md#training-recipe-of-the-reference-model)
and LBM (docs/LBM.md#training).

Every random choice of a step is drawn from a CPU generator seeded by (seed, step, micro-batch, rank), so a
step is the same on every device and after a resume.
"""

from __future__ import annotations

import functools
import math

import torch

from pips2.datasets.training import Sample
from pips2.utils import metrics
from pips2.utils.amp import autocast


def init_estimates(trajs_g: torch.Tensor, hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Initial estimates: per point a random mix of truth and uniform noise over the image; half of the
    points zero-velocity instead; frame 0 always the truth (docs/MODEL.md)."""
    B, S, N, _ = trajs_g.shape
    H, W = hw
    dev = trajs_g.device
    # drawn on the CPU generator whatever the device, so a step's randomness is the same everywhere
    noise = (torch.rand(B, S, N, 2, generator=gen) * torch.tensor([W - 1.0, H - 1.0])).to(dev)
    mix = torch.rand(B, 1, N, 1, generator=gen).to(dev)
    zero_vel = (torch.rand(B, 1, N, 1, generator=gen) < 0.5).to(dev)
    est = mix * trajs_g + (1 - mix) * noise
    est = torch.where(zero_vel, trajs_g[:, :1].expand(B, S, N, 2), est)
    return torch.cat([trajs_g[:, :1], est[:, 1:]], 1)


def maybe_transpose(rgbs: torch.Tensor, trajs: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability 0.5 swap x and y (frames transposed H<->W)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        return rgbs.transpose(-1, -2), trajs.flip(-1)
    return rgbs, trajs


def forward_loss(model, batch: Sample, device: torch.device, iters: int, gen: torch.Generator, amp: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor, Sample]:
    """One micro-batch with the training semantics (random transpose, initial estimates, loss) on `device`.

    Returns (loss, final estimate, the batch on `device` as the model saw it).
    """
    batch = batch.to(device)
    rgbs, trajs_g = maybe_transpose(batch.rgbs, batch.trajs, gen)
    seen = batch._replace(rgbs=rgbs, trajs=trajs_g)
    trajs_e0 = init_estimates(trajs_g, (rgbs.shape[-2], rgbs.shape[-1]), gen)
    with autocast(device.type, amp):
        preds, _, _, loss = model(trajs_e0, rgbs, iters=iters, trajs_g=trajs_g, valids=batch.valids)
    return loss, preds[-1], seen


def optimizer_update(model, optimizer, scheduler, scaler, max_norm: float = 5.0) -> None:
    """Unscale, clip the gradient norm, step optimizer, scaler and schedule, clear the gradients."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch of one step on one rank."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank)


def batch_figures(trajs_e: torch.Tensor, trajs_g: torch.Tensor, visibs: torch.Tensor, valids: torch.Tensor,
                  hw: tuple[int, int]) -> dict[str, float]:
    """Metrics of a batch (mean over clips) plus ATE on visible and occluded valid points (pixels)."""
    rows = [metrics.track_metrics(trajs_e[b], trajs_g[b], valids[b], hw) for b in range(trajs_g.shape[0])]
    out = metrics.average(rows)
    err = (trajs_e - trajs_g).float().norm(dim=-1)
    vis, occ = valids * visibs, valids * (1 - visibs)
    out["ate_vis"] = float((err * vis).sum() / (1e-6 + vis.sum()))
    out["ate_occ"] = float((err * occ).sum() / (1e-6 + occ.sum()))
    return out


# ---------------------------------------------------------------------------------------------------------
# LBM (docs/LBM.md#training)

LBM_LOSSES = ("classification_loss", "visibility_loss", "regression_loss", "uncertainty_loss", "uncertainty_loss_topk")


def sample_queries(trajs: torch.Tensor, visible: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Queries (B,N,3) rows (t,x,y) as the authors train LBM: each point is queried at a frame where it is
    visible, the first quarter of the points at a random such frame, the others at the first one (frame 0 for
    a point never visible)."""
    B, S, N = visible.shape
    vis = visible.bool().cpu()
    first = vis.to(torch.uint8).argmax(dim=1)  # argmax returns the first of equal maxima: the first visible frame
    # a uniform pick among the visible frames: the largest of random scores, the invisible ones scored -1
    scores = torch.where(vis, torch.rand(B, S, N, generator=gen), torch.full((B, S, N), -1.0))
    rand = scores.argmax(dim=1)
    t = torch.where(torch.arange(N) < N // 4, rand, first).to(trajs.device)
    xy = trajs.gather(1, t.view(B, 1, N, 1).expand(B, 1, N, 2)).squeeze(1)
    return torch.cat([t.unsqueeze(-1).to(trajs.dtype), xy], dim=-1)


def lbm_forward_loss(model, batch: Sample, device: torch.device, gen: torch.Generator, amp: str | None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Sample]:
    """One LBM micro-batch on `device`: queries sampled as the authors do, the model's training forward.

    Returns (the sum of the five losses, the model's output dict, the batch on `device`). A point counts as
    visible where it is both visible and valid. Dropout draws from a generator seeded by `gen`, so the step is
    the same after a resume whatever the process did before.
    """
    batch = batch.to(device)
    visible = (batch.visibs * batch.valids) > 0
    queries = sample_queries(batch.trajs, visible, gen)
    seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with autocast(device.type, amp):
            out = model(batch.rgbs, queries, batch.trajs, visible)
    loss = functools.reduce(torch.add, [out[k].float() for k in LBM_LOSSES])
    return loss, out, batch


def lbm_figures(out: dict[str, torch.Tensor], batch: Sample) -> dict[str, float]:
    """batch_figures of LBM's points, plus its five losses and the occlusion accuracy over valid points."""
    figs = batch_figures(out["points"].detach().float(), batch.trajs, batch.visibs, batch.valids,
                         (batch.rgbs.shape[-2], batch.rgbs.shape[-1]))
    figs.update({k: float(out[k].detach()) for k in LBM_LOSSES})
    right = (out["visibility"] == (batch.visibs > 0)).float() * batch.valids
    figs["occ_acc"] = float(right.sum() / batch.valids.sum().clamp(min=1))
    return figs


def warmup_cosine(total_steps: int, warmup_frac: float = 0.01, start_factor: float = 1e-5):
    """The authors' LBM schedule as a LambdaLR factor: linear warm-up from `start_factor` over the first 1% of
    the steps, then cosine annealing to 0 (their SequentialLR of LinearLR and CosineAnnealingLR, in closed form)."""
    warmup = max(1, int(total_steps * warmup_frac))
    rest = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return start_factor + (1.0 - start_factor) * step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, rest) / rest))

    return factor
