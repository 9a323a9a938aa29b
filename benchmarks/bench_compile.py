"""torch.compile (TorchInductor, CPU) against the forward's own eager forms, side by side in one run, at the
forward benchmark's size (a): the question is whether compiled kernels are the way to a float32 forward twice as
fast as the authors' code (docs/BENCHMARKS.md, "Inference targets still open").

1. encoder: the 36 frames of size (a) one at a time, as track() runs them: the default plan's encoder (eager,
   layout-keeping group norms) against `torch.compile(fnet)` with Inductor's weight freezing (oneDNN-packed
   weights, fused element-wise work), each fed as in track().
2. delta block: one iteration's call at N=128 points, S=36: the default plan's form (Winograd F(4,3) for the wide
   layers) against `torch.compile` of the reference DeltaBlock (conv1d).

Float32, `inference_mode`, golden weights; best of `repeats`; the compile time is reported apart. Inductor needs a
C++ compiler on the machine: it is not something this project can require of its users.

    python benchmarks/bench_compile.py --json_out=docs/bench_compile_cpu.json
"""

from __future__ import annotations

import time

import fire
import torch
from common import best_time, machine_description, save_results

from pips2.nets.pips2 import Pips
from pips2.utils.golden import load_golden_weights

S, N, H, W = 36, 128, 256, 384  # size (a) of bench_model.py


def main(repeats: int = 3, json_out: str | None = None) -> dict:
    """Print and return the eager and compiled times of the encoder and the delta block."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: oneDNN's packed layout, computed once
    torch.manual_seed(0)
    model = load_golden_weights(Pips()).eval()
    frames = (torch.rand(S, 3, H, W) * 2 - 1).contiguous(memory_format=torch.channels_last)
    fcorr, flow = torch.randn(N, S, 588), torch.randn(N, S, 2)
    res: dict = {"machine": machine_description(), "size": {"S": S, "N": N, "H": H, "W": W}, "repeats": repeats}
    with torch.inference_mode():
        eager_enc = lambda: [model.forms.encoder(model.fnet, frames[i:i + 1]) for i in range(S)]  # noqa: E731
        compiled_fnet = torch.compile(model.fnet)
        t0 = time.perf_counter()
        compiled_fnet(frames[:1])
        compile_enc = time.perf_counter() - t0
        comp_enc = lambda: [compiled_fnet(frames[i:i + 1]) for i in range(S)]  # noqa: E731
        diff_enc = max(float((a - b).abs().max()) for a, b in zip(eager_enc(), comp_enc(), strict=True))
        t_eager_enc, t_comp_enc = [], []
        for _ in range(repeats):  # alternated: a slow spell of the machine falls on both
            t_eager_enc.append(best_time(eager_enc, 1))
            t_comp_enc.append(best_time(comp_enc, 1))

        delta = model.forms.delta_block(model.delta_block)
        compiled_delta = torch.compile(model.delta_block)
        t0 = time.perf_counter()
        compiled_delta(fcorr, flow)
        compile_delta = time.perf_counter() - t0
        diff_delta = float((delta(fcorr, flow) - compiled_delta(fcorr, flow)).abs().max())
        t_eager_delta, t_comp_delta = [], []
        for _ in range(repeats):
            t_eager_delta.append(best_time(lambda: delta(fcorr, flow), 1))
            t_comp_delta.append(best_time(lambda: compiled_delta(fcorr, flow), 1))
    res["encoder"] = {"eager_s": min(t_eager_enc), "compiled_s": min(t_comp_enc), "compile_s": compile_enc,
                      "speedup": min(t_eager_enc) / min(t_comp_enc), "max_abs_diff": diff_enc}
    res["delta_block"] = {"eager_winograd_s": min(t_eager_delta), "compiled_conv1d_s": min(t_comp_delta),
                          "compile_s": compile_delta, "speedup": min(t_eager_delta) / min(t_comp_delta),
                          "max_abs_diff": diff_delta}
    for part in ("encoder", "delta_block"):
        print(part, {k: round(v, 4) if isinstance(v, float) else v for k, v in res[part].items()})
    if json_out:
        save_results(json_out, res)
    return res


if __name__ == "__main__":
    fire.Fire(main)
