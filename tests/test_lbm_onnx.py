"""The per-frame LBM step (nets.lbm.LBMStep) exported to ONNX with a dynamic number of points, run by onnxruntime.

The export itself takes about a minute on a busy 2-core CPU, hence the `slow` mark and the small model
(the graph has the same operators at any width).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pips2.nets.lbm import LBM, LBMOnlineState, LBMStep, sample_points

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

HW = (64, 64)
NAMES = ["frame", "query", "collision", "stream", "vis_mask", "mem_mask"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, onnxruntime session) for a small random LBM."""
    torch.manual_seed(0)
    model = LBM(input_size=HW, embed_dim=64, num_layers=2, memory_size=4, top_k_regions=4).eval()
    with torch.no_grad():
        # about half the frames visible: memory entries count
        model.get_parameter("transformer.vis_head.net.3.bias")[0] = 1.4
    step = LBMStep(model).eval()
    g = torch.Generator().manual_seed(0)
    N, M, C = 5, model.memory_size, model.embed_dim
    example = (torch.rand(1, 3, *HW, generator=g) * 255, torch.randn(1, N, C, generator=g),
               torch.randn(1, N, M, C, generator=g), torch.randn(1, N, M, C, generator=g),
               torch.rand(1, N, M, generator=g) > 0.5, torch.rand(1, N, M, generator=g) > 0.5)
    n = torch.export.Dim("N", min=1, max=65536)
    path = tmp_path_factory.mktemp("onnx") / "lbm_step.onnx"
    torch.onnx.export(step, example, str(path), dynamo=True, input_names=NAMES,
                      output_names=["points", "vis_logit", "rho", "collision_next", "stream_next", "vis_mask_next",
                                    "mem_mask_next"],
                      dynamic_shapes={k: (None if k == "frame" else {1: n}) for k in NAMES}, verbose=False)
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("n", [1, 3, 17])
def test_onnx_step_equals_pytorch(exported, n):
    model, sess = exported
    g = torch.Generator().manual_seed(n)
    M, C = model.memory_size, model.embed_dim
    inputs = (torch.rand(1, 3, *HW, generator=g) * 255, torch.randn(1, n, C, generator=g),
              torch.randn(1, n, M, C, generator=g), torch.randn(1, n, M, C, generator=g),
              torch.rand(1, n, M, generator=g) > 0.5, torch.rand(1, n, M, generator=g) > 0.5)
    inputs[4][:, 0] = True  # one query with nothing to remember
    with torch.no_grad():
        ref = LBMStep(model)(*inputs)
    got = sess.run(None, {k: v.numpy() for k, v in zip(NAMES, inputs, strict=True)})
    for name, a, b in zip(["points", "vis_logit", "rho", "collision", "stream"], got, ref, strict=False):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-3, err_msg=name)
    assert np.array_equal(got[5], ref[5].numpy()) and np.array_equal(got[6], ref[6].numpy())


def test_onnx_steps_track_like_lbm_online(exported):
    model, sess = exported
    g = torch.Generator().manual_seed(7)
    frames = torch.rand(4, 1, 3, *HW, generator=g) * 255
    xy = torch.rand(6, 2, generator=g) * torch.tensor([HW[1], HW[0]])
    tracker = LBMOnlineState(model)
    with torch.no_grad():
        query = sample_points(model.backbone(frames[0]), xy.unsqueeze(0), model.input_hw)
        memory = model.empty_memory(1, 6, query)
    state = [memory.collision.numpy(), memory.stream.numpy(), memory.vis_mask.numpy(), memory.mem_mask.numpy()]
    for t in range(len(frames)):
        res = tracker.init(xy, frames[0]) if t == 0 else tracker.track(frames[t])
        out = sess.run(None, dict(zip(NAMES, [frames[t].numpy(), query.numpy(), *state], strict=True)))
        state = out[3:]
        np.testing.assert_allclose(out[0][0], res["points"].numpy(), rtol=0, atol=1e-3)  # input size = source size
    assert not state[2].all()  # some entries were visible, so the memory attention was in use
