"""What each model-side optimisation is worth, measured side by side in one process (size (a) by default).

    python benchmarks/bench_encoder.py --json_out=docs/bench_encoder_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import best_time  # noqa: E402

from nets.pips2 import Pips  # noqa: E402
from utils.golden import load_golden_weights  # noqa: E402


def main(S: int = 36, N: int = 128, H: int = 256, W: int = 384, iters: int = 6, repeats: int = 2,
         json_out: str | None = None) -> None:
    """Encoder chunking, channels-last, bf16, the Winograd delta block, the gather workspace,
    inference_mode vs no_grad, and the encoder's share of a forward."""
    torch.manual_seed(0)
    rgbs = torch.rand(1, S, 3, H, W) * 255
    trajs = (torch.rand(1, 1, N, 2) * torch.tensor([W - 1.0, H - 1.0])).repeat(1, S, 1, 1)
    model = load_golden_weights(Pips()).eval()
    res = {}
    with torch.inference_mode():
        model.encode_nhwc(rgbs[:, :2])
        for chunk in (1, 2, 4, 8, 0):
            model.encoder_chunk = chunk
            res[f"encoder_chunk_{chunk or S}"] = best_time(lambda: model.encode_nhwc(rgbs), repeats)
        model.encoder_chunk = None
        for cl in (False, True):
            model.channels_last = cl
            res[f"encoder_channels_last_{cl}"] = best_time(lambda: model.encode_nhwc(rgbs), repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for cl in (False, True):
                model.channels_last = cl
                res[f"encoder_bf16_channels_last_{cl}"] = best_time(lambda: model.encode_nhwc(rgbs), repeats)
            model.channels_last = None
            res["encoder_bf16"] = best_time(lambda: model.encode_nhwc(rgbs), repeats)

        # the delta block at this size: conv1d against Winograd F(4,3) for the widest layers
        fcorr, flow = torch.randn(N, S, 588), torch.randn(N, S, 2)
        for impl in ("direct", "auto"):
            model.delta_block.impl = impl
            res[f"delta_block_{impl}"] = best_time(lambda: model.delta_block(fcorr, flow), repeats + 2)

        model.delta_block.impl = "auto"

        # the whole forward with the correlation gathers going into fresh tensors instead of one reused
        # workspace (a microbenchmark of the gather alone hides this: there the allocator reuses the block)
        import nets.pips2 as pips2

        reuse = pips2._patch_corr
        pips2._patch_corr = lambda *args, workspace=None: reuse(*args)
        try:
            res["forward_gather_fresh"] = best_time(lambda: model(trajs, rgbs, iters=iters), repeats)
        finally:
            pips2._patch_corr = reuse
        res["forward_inference_mode"] = best_time(lambda: model(trajs, rgbs, iters=iters), repeats)
    with torch.no_grad():
        res["forward_no_grad"] = best_time(lambda: model(trajs, rgbs, iters=iters), repeats)
    res["encoder_share"] = res["encoder_chunk_1"] / res["forward_inference_mode"]
    for k, v in res.items():
        print(f"{k:28s} {v:7.3f}" + (" s" if k != "encoder_share" else ""))
    print(f"per-frame encoding vs whole clip: {res[f'encoder_chunk_{S}'] / res['encoder_chunk_1']:.2f}x; "
          f"channels-last on the CPU: {res['encoder_channels_last_False'] / res['encoder_channels_last_True']:.2f}x; "
          f"bf16 encoder: {res['encoder_chunk_1'] / res['encoder_bf16']:.2f}x; channels-last under bf16: "
          f"{res['encoder_bf16_channels_last_False'] / res['encoder_bf16_channels_last_True']:.2f}x; "
          f"inference_mode vs no_grad: {res['forward_no_grad'] / res['forward_inference_mode']:.2f}x")
    print(f"delta block, Winograd vs conv1d: {res['delta_block_direct'] / res['delta_block_auto']:.2f}x; "
          f"forward with gathers into one workspace vs fresh tensors: "
          f"{res['forward_gather_fresh'] / res['forward_inference_mode']:.2f}x")
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
