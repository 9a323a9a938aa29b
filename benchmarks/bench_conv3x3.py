"""Can the encoder's 3x3 convolutions cost less than oneDNN's direct convolution in float32 on the CPU?

The encoder's stride-1 3x3 convolutions are 89 % of its multiply-adds (docs/BENCHMARKS.md). Winograd F(2x2, 3x3)
does 2.25x fewer multiplies, F(4x4, 3x3) 4x fewer, but written with torch operations (no fused kernel) each tile's
input and output transforms go through memory. This measures, side by side in one process, for each such
convolution of the encoder at one frame size:

    direct      F.conv2d (oneDNN), channels-first, as the float32 default runs it
    direct_cl   F.conv2d on a channels-last tensor
    wino2       Winograd F(2x2,3x3): transforms as additions over strided views of a channels-last tensor,
                16 batched GEMMs (torch.bmm), an inverse transform by additions
    wino2_gemm  the 16 GEMMs of wino2 alone (its floor, were the transforms free)
    wino4       Winograd F(4x4,3x3) with its transforms as small matrix products (torch.matmul)

and the encoder's instance norm (a batch norm of one image, then ReLU) three ways. Each form is checked in
float64 against F.conv2d first (max |diff| printed). The forms here are this benchmark's own, not the model's.

    python benchmarks/bench_conv3x3.py                         # a 960x544 frame, the encoder's shapes
    python benchmarks/bench_conv3x3.py --H=256 --W=384 --json_out=/tmp/conv3x3.json
"""

from __future__ import annotations

import fire
import torch
import torch.nn.functional as F
from common import interleaved_times, machine_description, save_results

# (name, channels in, channels out, the input's stride against the frame) of the encoder's stride-1 3x3
# convolutions (nets/pips2.BasicEncoder): layer1's four, the second of layer2/3/4's blocks and their first blocks'
# second convolution, and conv2 over the four stages' 416 channels
SHAPES = [("layer1 (x4)", 64, 64, 2), ("layer2 (x3)", 96, 96, 4), ("layer3 (x3)", 128, 128, 8),
          ("layer4 (x3)", 128, 128, 16), ("conv2", 416, 256, 8)]

B_T2 = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G2 = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
B_T4 = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1))
G4 = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
A_T4 = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def filters(weight: torch.Tensor, g: tuple) -> torch.Tensor:
    """(K,C,3,3) -> (t*t, C, K): G w G^T per filter, computed in float64."""
    G = torch.tensor(g, dtype=torch.float64)
    t = G.shape[0]
    u = G @ weight.double() @ G.T
    return u.permute(2, 3, 1, 0).reshape(t * t, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _rows(d: list[torch.Tensor]) -> list[torch.Tensor]:
    """B^T d for F(2,3) over four strided views: d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def wino2(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor, gemm_only: torch.Tensor | None = None
          ) -> torch.Tensor:
    """F(2x2,3x3) convolution, padding 1, of a channels-last (B,C,H,W) x with filters U (16,C,K)."""
    B, C, H, W = x.shape
    K = U.shape[-1]
    if gemm_only is not None:
        return torch.bmm(gemm_only, U)
    nh, nw = -(-H // 2), -(-W // 2)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * nw + 1 - W, 1, 2 * nh + 1 - H))  # (B, 2nh+2, 2nw+2, C)
    r = _rows([xp[:, a:a + 2 * nh:2] for a in range(4)])  # each (B, nh, 2nw+2, C)
    V = x.new_empty(16, B * nh * nw, C)
    for a in range(4):
        cols = _rows([r[a][:, :, b:b + 2 * nw:2] for b in range(4)])
        for b in range(4):
            V[4 * a + b].view(B, nh, nw, C).copy_(cols[b])
    M = torch.bmm(V, U).view(4, 4, B, nh, nw, K)
    # A^T M A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
    t0, t1 = M[0] + M[1] + M[2], M[1] - M[2] - M[3]  # (4, B, nh, nw, K) over the column index
    out = x.new_empty(B, nh, 2, nw, 2, K)
    for i, t in enumerate((t0, t1)):
        torch.add(t[0] + t[1], t[2], out=out[:, :, i, :, 0])
        torch.sub(t[1] - t[2], t[3], out=out[:, :, i, :, 1])
    y = out.view(B, 2 * nh, 2 * nw, K)[:, :H, :W].permute(0, 3, 1, 2)
    return y + bias.view(1, -1, 1, 1)


def wino4(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F(4x4,3x3) convolution, padding 1, of a (B,C,H,W) x with filters U (36,C,K); transforms by matmul."""
    BT, AT = torch.tensor(B_T4, dtype=x.dtype), torch.tensor(A_T4, dtype=x.dtype)
    B, C, H, W = x.shape
    K = U.shape[-1]
    nh, nw = -(-H // 4), -(-W // 4)
    xp = F.pad(x, (1, 4 * nw + 1 - W, 1, 4 * nh + 1 - H))
    d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, nh, nw, 6, 6)
    V = (BT @ d @ BT.T).permute(4, 5, 0, 2, 3, 1).reshape(36, B * nh * nw, C)
    M = torch.bmm(V, U).view(6, 6, B, nh, nw, K).permute(2, 3, 4, 5, 0, 1)
    y = (AT @ M @ AT.T).permute(0, 3, 1, 4, 2, 5).reshape(B, K, 4 * nh, 4 * nw)[:, :, :H, :W]
    return y + bias.view(1, -1, 1, 1)


def norm_forms(x: torch.Tensor) -> dict:
    """The encoder's norm + ReLU of one image: what the model runs, and two others."""
    def batch_norm_train():
        return F.relu_(F.batch_norm(x, None, None, training=True, eps=1e-5))

    def var_mean_then_eval():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return F.relu_(F.batch_norm(x, mean, var, training=False, eps=1e-5))

    def instance_norm():
        return F.relu_(F.instance_norm(x, eps=1e-5))

    return {"norm_model": batch_norm_train, "norm_var_mean": var_mean_then_eval, "norm_instance": instance_norm}


def conv_forms(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor) -> dict:
    """The convolution's forms on input x, then the norm's on its output."""
    xcl = x.contiguous(memory_format=torch.channels_last)
    U2, U4 = filters(wt, G2), filters(wt, G4)
    h, w = x.shape[-2:]
    V = torch.randn(16, -(-h // 2) * -(-w // 2), x.shape[1])
    runs = {"direct": lambda: F.conv2d(x, wt, b, padding=1),
            "direct_cl": lambda: F.conv2d(xcl, wt, b, padding=1),
            "wino2": lambda: wino2(xcl, U2, b),
            "wino2_gemm": lambda: wino2(xcl, U2, b, gemm_only=V),
            "wino4": lambda: wino4(x, U4, b)}
    return {**runs, **norm_forms(F.conv2d(x, wt, b, padding=1))}


def main(H: int = 544, W: int = 960, rounds: int = 3, per_round: int = 3, json_out: str | None = None) -> None:
    """Time each form of each shape, interleaved; print ms and ratios to `direct`."""
    torch.manual_seed(0)
    report: dict = {"machine": machine_description(), "frame": [H, W], "shapes": {}}
    print(f"frame {W}x{H}, torch threads {torch.get_num_threads()}")
    for name, cin, cout, stride in SHAPES:
        h, w = H // stride, W // stride
        w64 = torch.randn(cout, cin, 3, 3, dtype=torch.float64) / (3 * cin ** 0.5)
        b64 = torch.randn(cout, dtype=torch.float64)
        x64 = torch.randn(1, cin, h, w, dtype=torch.float64)
        ref = F.conv2d(x64, w64, b64, padding=1)
        err2 = (wino2(x64.contiguous(memory_format=torch.channels_last), filters(w64, G2), b64) - ref).abs().max()
        err4 = (wino4(x64, filters(w64, G4), b64) - ref).abs().max()
        runs = conv_forms(x64.float(), w64.float(), b64.float())
        with torch.inference_mode():
            times = interleaved_times(runs, rounds, per_round)
        best = {k: min(v) for k, v in times.items()}
        row = {k: {"ms": 1e3 * t, "vs_direct": best["direct"] / t} for k, t in best.items()}
        row["float64_max_abs_diff"] = {"wino2": float(err2), "wino4": float(err4)}
        report["shapes"][name] = row
        print(f"{name:12s} {cin}->{cout} at {w}x{h}: " + ", ".join(
            f"{k} {1e3 * t:.1f} ms ({best['direct'] / t:.2f}x)" for k, t in best.items())
            + f"; float64 |diff| wino2 {float(err2):.1e}, wino4 {float(err4):.1e}")
    if json_out:
        save_results(json_out, report)


if __name__ == "__main__":
    fire.Fire(main)
