"""What each model-side optimisation is worth, measured side by side in one process (size (a) by default).

    python benchmarks/bench_encoder.py --json_out=docs/bench_encoder_cpu.json
"""

from __future__ import annotations

from dataclasses import replace

import fire
import torch
from common import best_time, save_results

from pips2.nets import fast
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils.golden import load_golden_weights


def main(S: int = 36, N: int = 128, H: int = 256, W: int = 384, iters: int = 6, repeats: int = 2,
         json_out: str | None = None) -> None:
    """Encoder chunking, channels-last, bf16, the Winograd delta block, the gather workspace,
    inference_mode vs no_grad, and the encoder's share of a forward."""
    torch.manual_seed(0)
    rgbs = torch.rand(1, S, 3, H, W) * 255
    trajs = (torch.rand(1, 1, N, 2) * torch.tensor([W - 1.0, H - 1.0])).repeat(1, S, 1, 1)
    auto, auto_bf16 = ExecPlan.auto("cpu"), ExecPlan.auto("cpu", torch.bfloat16)
    model = Pips(auto)
    load_golden_weights(model).eval()
    res = {}

    def encode_time(plan: ExecPlan) -> float:
        model.set_plan(plan)
        return best_time(lambda: model.encode_nhwc(rgbs), repeats)

    with torch.inference_mode():
        model.encode_nhwc(rgbs[:, :2])
        for chunk in (1, 2, 4, 8, 0):
            res[f"encoder_chunk_{chunk or S}"] = encode_time(replace(auto, encoder_chunk=chunk))
        for cl in (False, True):
            res[f"encoder_channels_last_{cl}"] = encode_time(replace(auto, channels_last=cl))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for cl in (False, True):
                res[f"encoder_bf16_channels_last_{cl}"] = encode_time(replace(auto_bf16, channels_last=cl))
            res["encoder_bf16"] = encode_time(auto_bf16)

        # the delta block at this size: conv1d against Winograd F(4,3) for the widest layers
        fcorr, flow = torch.randn(N, S, 588), torch.randn(N, S, 2)
        block = model.delta_block
        filters = fast.winograd_filters(block)
        res["delta_block_direct"] = best_time(lambda: block(fcorr, flow), repeats + 2)
        res["delta_block_auto"] = best_time(lambda: fast.delta_block_time_major(block, fcorr, flow, filters),
                                            repeats + 2)

        # the whole forward with the correlation gathers going into fresh tensors instead of one reused
        # workspace (a microbenchmark of the gather alone hides this: there the allocator reuses the block)
        model.set_plan(replace(auto, gather="plain"))
        res["forward_gather_fresh"] = best_time(lambda: model(trajs, rgbs, iters=iters), repeats)
        model.set_plan(auto)
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
        save_results(json_out, res)


if __name__ == "__main__":
    fire.Fire(main)
