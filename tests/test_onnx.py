"""ONNX export with fixed S and dynamic N; onnxruntime agrees with PyTorch within 1e-3 px."""

import pytest
import torch
from helpers import golden_model

pytest.importorskip("onnxruntime", reason="optional: pip install -r requirements-onnx.txt")

import export_onnx  # noqa: E402


def test_onnx_matches_pytorch_for_several_n(tmp_path):
    model = golden_model()
    path = export_onnx.export(model, tmp_path / "m.onnx", S=6, hw=(128, 128), iters=2)
    diff = export_onnx.check(path, golden_model(), S=6, hw=(128, 128), iters=2, Ns=(3, 17))
    assert diff < 1e-3
    # the check is not vacuous: a different model is far off
    other = golden_model()
    with torch.no_grad():
        other.delta_block.dense.bias.add_(1.0)
    assert export_onnx.check(path, other, S=6, hw=(128, 128), iters=2, Ns=(3,)) > 1e-2
