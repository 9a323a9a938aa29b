"""ONNX export with fixed S and dynamic N; onnxruntime agrees with PyTorch within 1e-3 px.

One refinement iteration: export time grows with the traced graph (~560 nodes per iteration, half the
graph at iters=1). Later iterations add only the feats2/feats4 refresh (a constant frame index, then the
bilinear sampling the first iteration's templates use); test_golden.py checks the export plan's numbers
over four iterations.
"""

import pytest
import torch
from helpers import golden_model

pytest.importorskip("onnxruntime", reason="optional: pip install -r requirements-onnx.txt")

from pips2.cli import export_onnx  # noqa: E402
from pips2.nets.plan import ExecPlan  # noqa: E402

S, HW, ITERS = 6, (128, 128), 1


def test_onnx_matches_pytorch_for_several_n(tmp_path):
    model = golden_model()
    path = export_onnx.export(model, tmp_path / "m.onnx", S=S, hw=HW, iters=ITERS)
    assert model.plan == ExecPlan.export()
    diff = export_onnx.check(path, golden_model(), S=S, hw=HW, iters=ITERS, Ns=(3, 17))
    assert diff < 1e-3
    # the check is not vacuous: a different model is far off
    other = golden_model()
    with torch.no_grad():
        other.delta_block.dense.bias.add_(1.0)
    assert export_onnx.check(path, other, S=S, hw=HW, iters=ITERS, Ns=(3,)) > 1e-2
