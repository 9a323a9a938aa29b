"""The model against its definitions (docs/MODEL.md) and itself (the authors' numbers: test_golden.py)."""


from dataclasses import FrozenInstanceError, replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, golden_model, state_dict_spec

from pips2.nets import fast
from pips2.nets.pips2 import (
    BasicEncoder,
    CorrPyramid,
    Pips,
    instance_norm,
    sample_features,
    sequence_loss,
    sincos_embed_xy,
)
from pips2.nets.plan import ExecPlan

GOLDEN = np.load(DATA / "golden_forward.npz")


def test_state_dict_matches_reference_keys_and_shapes():
    spec = state_dict_spec()
    sd = Pips().state_dict()
    assert list(sd) == [e["name"] for e in spec]
    for e in spec:
        assert list(sd[e["name"]].shape) == e["shape"], e["name"]
        assert str(sd[e["name"]].dtype) == "torch." + e["dtype"]
    assert sum(v.numel() for v in sd.values()) == 17_565_410


def test_loss_matches_direct_computation():
    torch.manual_seed(0)
    model = golden_model()
    rgbs = torch.from_numpy(GOLDEN["rgbs"]).float()
    trajs0 = torch.from_numpy(GOLDEN["trajs0"])
    trajs_g = trajs0 + torch.randn_like(trajs0) * 3
    valids = (torch.rand(1, 8, 16) > 0.3).float()
    K = 3
    with torch.no_grad():
        preds, _, _, loss = model(trajs0, rgbs, iters=K, trajs_g=trajs_g, valids=valids)
    direct = 0.0
    for i in range(K):
        err = (preds[i] - trajs_g).abs().mean(-1).numpy()
        m = valids.numpy()
        direct += 0.8 ** (K - i - 1) * (err * m).sum() / (1e-6 + m.sum())
    assert loss.item() == pytest.approx(direct / K, rel=1e-5)
    assert sequence_loss(preds[:K], trajs_g, valids).item() == pytest.approx(direct / K, rel=1e-5)


def test_sincos_embedding_closed_form():
    xy = torch.tensor([[[0.5, -2.0]]])
    e = sincos_embed_xy(xy, 128)[0, 0]
    k = torch.arange(32, dtype=torch.float64)
    om = 1 / 10000 ** (k / 31)
    ref = torch.cat([(0.5 * om).sin(), (0.5 * om).cos(), (-2 * om).sin(), (-2 * om).cos()])
    torch.testing.assert_close(e.double(), ref, atol=1e-6, rtol=0)


def test_nan_coordinates_give_nan_not_a_crash():
    model = golden_model()
    trajs = torch.full((1, 3, 2, 2), 40.0)
    trajs[:, :, 1] = float("nan")
    with torch.no_grad():
        out = model(trajs, torch.rand(1, 3, 3, 128, 128) * 255, iters=2)[0][-1]
    assert torch.isfinite(out[:, :, 0]).all() and torch.isnan(out[:, 1:, 1]).all()


def test_pyramid_levels_are_avg_pool2d():
    from pips2.nets.pips2 import avg_pool2x2_nhwc

    x = torch.randn(2, 4, 13, 10)
    got = avg_pool2x2_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, F.avg_pool2d(x, 2, stride=2))


def test_encoder_chunking_is_exact():
    model = golden_model().double()
    rgbs = torch.rand(1, 5, 3, 128, 160, dtype=torch.float64) * 255
    with torch.no_grad():
        model.set_plan(ExecPlan(encoder_chunk=2))
        a = model.encode(rgbs)
        model.set_plan(ExecPlan(encoder_chunk=0))
        b = model.encode(rgbs)
    assert a.shape == (1, 5, 128, 16, 20) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_instance_norm_keeps_layout_and_equals_reference():
    torch.manual_seed(6)
    for n in (1, 3):
        x = torch.randn(n, 16, 9, 13) * 3 + 2
        for fmt in (torch.contiguous_format, torch.channels_last):
            y = fast.instance_norm_keep_layout(x.contiguous(memory_format=fmt))
            torch.testing.assert_close(y, F.instance_norm(x), atol=2e-5, rtol=0)
            if n == 1:  # the per-frame encoder path must not silently convert back to contiguous
                assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("tile", [4, 2])  # F(4,3) and F(2,3)
@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 7, 36])
def test_winograd_conv_equals_conv1d(S, tile):
    torch.manual_seed(S)
    x = torch.randn(3, S, 40)
    w, b = torch.randn(24, 40, 3) / 8, torch.randn(24)
    got = fast.conv1d_k3_winograd(x, fast.winograd_weights(w, tile), b)
    ref = F.conv1d(x.double().transpose(1, 2), w.double(), b.double(), padding=1).transpose(1, 2)
    assert got.shape == (3, S, 24)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=0)
    # in groups of sequences (bounded memory) the result is the same
    grouped = fast.conv1d_k3_winograd(x, fast.winograd_weights(w, tile), b,
                                      max_elems=(tile + 2) * 40 * -(-S // tile))
    torch.testing.assert_close(grouped, got, atol=1e-5, rtol=0)
    assert ref.abs().max() > 1


@pytest.mark.parametrize("S", [1, 2, 5, 36])
def test_gemm_conv_equals_conv1d_with_gradients(S):
    torch.manual_seed(S)
    x = torch.randn(3, S, 40, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(24, 40, 3, dtype=torch.float64) / 8).requires_grad_()
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, S, 24, dtype=torch.float64)
    got = fast.conv1d_k3_gemm(x, w, b)
    ref = F.conv1d(x.transpose(1, 2), w, b, padding=1).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    with torch.no_grad():  # the no-autograd path (validation of a training plan) computes the same
        torch.testing.assert_close(fast.conv1d_k3_gemm(x, w, b), ref, atol=1e-12, rtol=0)
    g_got = torch.autograd.grad((got * weights).sum(), [x, w, b])
    g_ref = torch.autograd.grad((ref * weights).sum(), [x, w, b])
    for a, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("tile", [4, 2])
@pytest.mark.parametrize("S", [1, 3, 4, 6, 36])
def test_winograd_conv_gradients_equal_conv1d(S, tile):
    # the training form's backward (transposed transforms) against conv1d's, in float64; M=5 sequences also
    # go through in groups of two (the memory bound), which must not change anything
    torch.manual_seed(S)
    x = torch.randn(5, S, 40, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(24, 40, 3, dtype=torch.float64) / 8).requires_grad_()
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, S, 24, dtype=torch.float64)
    ref = F.conv1d(x.transpose(1, 2), w, b, padding=1).transpose(1, 2)
    g_ref = torch.autograd.grad((ref * weights).sum(), [x, w, b])
    for max_elems in (1 << 23, 2 * (tile + 2) * 40 * -(-S // tile)):
        got = fast.conv1d_k3_winograd_train(x, w, b, fast.winograd_weights(w.detach(), tile), max_elems)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        g_got = torch.autograd.grad((got * weights).sum(), [x, w, b])
        for a, r in zip(g_got, g_ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-12, rtol=0)
    assert all(g.abs().max() > 0.1 for g in g_ref)


@pytest.mark.parametrize("tile", [4, 2])
@pytest.mark.parametrize("S", [2, 5, 36])
def test_winograd_conv_of_normed_input_equals_conv1d_with_gradients(S, tile):
    # the Winograd Function that makes relu(InstanceNorm1d(x)) of its input itself and keeps only x: the same
    # output and gradients as the separate norm, ReLU and conv1d, in float64, also in groups of sequences
    torch.manual_seed(S)
    x = (torch.randn(5, S, 40, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = (torch.randn(24, 40, 3, dtype=torch.float64) / 8).requires_grad_()
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, S, 24, dtype=torch.float64)
    y = F.relu(F.instance_norm(x.transpose(1, 2), eps=1e-5))
    ref = F.conv1d(y, w, b, padding=1).transpose(1, 2)
    g_ref = torch.autograd.grad((ref * weights).sum(), [x, w, b])
    for max_elems in (1 << 23, 2 * (tile + 2) * 40 * -(-S // tile)):
        got = fast.conv1d_k3_winograd_train(x, w, b, fast.winograd_weights(w.detach(), tile), max_elems,
                                            norm_eps=1e-5)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        g_got = torch.autograd.grad((got * weights).sum(), [x, w, b])
        for a, r in zip(g_got, g_ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-11, rtol=0)
    assert all(g.abs().max() > 0.1 for g in g_ref)


def test_winograd_conv_of_normed_input_partial_gradients_and_bf16():
    # only the input's or only the filters' gradient wanted (a frozen layer, a constant input); and bf16 inputs
    # (normalised in float32, products in bf16) within bf16's rounding of the float64 result
    torch.manual_seed(11)
    x = torch.randn(4, 9, 40, dtype=torch.float64) * 2
    w, b = torch.randn(24, 40, 3, dtype=torch.float64) / 8, torch.randn(24, dtype=torch.float64)
    def ref_fn(x, w):
        return F.conv1d(F.relu(F.instance_norm(x.transpose(1, 2), eps=1e-5)), w, b, padding=1).transpose(1, 2)
    for wants in ((True, False), (False, True)):
        xs, ws = x.clone().requires_grad_(wants[0]), w.clone().requires_grad_(wants[1])
        leaf = xs if wants[0] else ws
        got = fast.conv1d_k3_winograd_train(xs, ws, b, fast.winograd_weights(w), norm_eps=1e-5)
        (g_got,), (g_ref,) = torch.autograd.grad(got.sum(), [leaf]), torch.autograd.grad(ref_fn(xs, ws).sum(), [leaf])
        torch.testing.assert_close(g_got, g_ref, atol=1e-11, rtol=0)
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    got = fast.conv1d_k3_winograd_train(xb, wb, b.bfloat16(), fast.winograd_weights(wb.detach()), norm_eps=1e-5)
    assert got.dtype == torch.bfloat16
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = ref_fn(x64, w64)
    torch.testing.assert_close(got.double(), ref, atol=0.1, rtol=0.05)
    weights = torch.randn(4, 9, 24, dtype=torch.float64)  # not a plain sum: its input gradient nearly cancels
    gx, gw = torch.autograd.grad((got.double() * weights).sum(), [xb, wb])
    rx, rw = torch.autograd.grad((ref * weights).sum(), [x64, w64])
    assert gx.dtype == gw.dtype == torch.bfloat16
    for a, r in ((gx, rx), (gw, rw)):
        assert (a.double() - r).norm() / r.norm() < 0.03


def test_bf16_winograd_2_keeps_the_error_of_a_bf16_gemm():
    # why bf16 training runs F(2,3) and not F(4,3): against float64, F(2,3)'s bf16 output and gradients stay
    # within 1.6x the error of the bf16 GEMM form (measured ~1.3x); F(4,3)'s are ~3x (docs/BENCHMARKS.md)
    torch.manual_seed(5)
    M, S, C = 16, 36, 256
    x = torch.randn(M, S, C, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(C, C, 3, dtype=torch.float64) / (3 * C) ** 0.5, torch.randn(C, dtype=torch.float64) / 4
    g = torch.randn(M, S, C, dtype=torch.float64)
    def run(tile):  # the normed layer as the delta block runs it: bf16 input, float32 master weights
        xb, wf = x.bfloat16().requires_grad_(), w.float().requires_grad_()
        if tile is None:
            y = fast.conv1d_k3_gemm(fast._instance_norm_relu_time_major(xb), wf.bfloat16(), b.bfloat16())
        else:
            wt = fast.winograd_weights(wf.detach(), tile).bfloat16()
            y = fast.conv1d_k3_winograd_train(xb, wf.bfloat16(), b.bfloat16(), wt, norm_eps=1e-5)
        return (y, *torch.autograd.grad(y, (xb, wf), g.bfloat16()))
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y64 = F.conv1d(F.relu(F.instance_norm(x64.transpose(1, 2), eps=1e-5)), w64, b, padding=1).transpose(1, 2)
    ref = (y64, *torch.autograd.grad(y64, (x64, w64), g))
    def errors(tile):
        return torch.stack([(a.double() - r).norm() / r.norm() for a, r in zip(run(tile), ref, strict=True)])
    gemm, f23, f43 = errors(None), errors(2), errors(4)
    assert (gemm < 0.03).all() and (gemm > 1e-4).all()
    assert (f23 <= 1.6 * gemm).all(), (f23, gemm)
    assert (f43[[0, 2]] > 1.6 * gemm[[0, 2]]).all(), (f43, gemm)  # the bound tells the two apart


def test_time_major_norm_relu_function_equals_autograd():
    torch.manual_seed(3)
    x = (torch.randn(4, 9, 6, dtype=torch.float64) * 2 - 1).requires_grad_()
    g = torch.randn(4, 9, 6, dtype=torch.float64)
    got = fast._instance_norm_relu_time_major(x)
    ref = F.relu(F.instance_norm(x.transpose(1, 2), eps=1e-5)).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-13, rtol=0)
    (gx,), (rx,) = torch.autograd.grad((got * g).sum(), [x]), torch.autograd.grad((ref * g).sum(), [x])
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(fast._instance_norm_relu_time_major, (x[:2, :5, :3].detach().requires_grad_(),))
    with torch.no_grad():  # the in-place path
        torch.testing.assert_close(fast._instance_norm_relu_time_major(x.detach().clone()), ref, atol=1e-13, rtol=0)


def test_delta_block_winograd_equals_direct_and_follows_new_weights():
    torch.manual_seed(7)
    fcorr, flow = torch.randn(6, 11, 588), torch.randn(6, 11, 2) * 4
    block64 = golden_model().delta_block.double()
    with torch.inference_mode():
        # float64: the Winograd form is the same arithmetic as conv1d up to float64 rounding
        ref64 = block64(fcorr.double(), flow.double())
        for tile in (4, 2):
            filters = fast.winograd_filters(block64, tile)
            got64 = fast.delta_block_time_major(block64, fcorr.double(), flow.double(), filters)
            assert sum(f is not None for f in filters) == 7  # the widest layers take the Winograd form
            assert all(f is None or f.shape[0] == tile + 2 for f in filters)
            torch.testing.assert_close(got64, ref64, atol=1e-10, rtol=0)

    # the model under the CPU inference plan: Winograd filters built on first use, from the current weights
    model = golden_model(plan=ExecPlan(delta="winograd"))
    block = model.delta_block
    delta = lambda fc, fl: model.forms.delta_block(block)(fc, fl)  # noqa: E731  (as forward calls it)
    with torch.inference_mode():
        ref = block(fcorr, flow)
        got = delta(fcorr, flow)
    assert model.forms.winograd is not None, "the Winograd path did not run"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # new weights (load_state_dict copies in place) must not reuse the filters of the old ones
    other = Pips().delta_block
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.05)
    kept = model.forms.winograd
    block.load_state_dict(other.state_dict())
    with torch.inference_mode():
        want = other(fcorr, flow)
        assert (want - got).abs().max() > 0.05  # stale filters would be caught
        torch.testing.assert_close(delta(fcorr, flow), want, atol=1e-4, rtol=1e-3)
    assert model.forms.winograd is not kept
    # so must a cast (.double(), .to()) and a new plan
    kept = model.forms.winograd
    model.double()
    with torch.inference_mode():
        torch.testing.assert_close(delta(fcorr.double(), flow.double()), want.double(), atol=1e-4, rtol=1e-3)
    assert model.forms.winograd is not kept
    model.set_plan(replace(ExecPlan.auto(training=True), delta="winograd"))
    assert model.forms.winograd is None
    # a training plan's Winograd form has a backward, and its filters follow every optimiser step: a fused
    # AdamW step changes the weights in place without bumping their versions, so nothing may be cached
    opt = torch.optim.AdamW(block.parameters(), lr=0.05, fused=True)
    for _ in range(2):
        out = delta(fcorr.double(), flow.double())
        torch.testing.assert_close(out, block(fcorr.double(), flow.double()), atol=1e-10, rtol=0)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert model.forms.winograd is None


def test_winograd_filters_follow_in_place_edits_casts_and_copies():
    # the inference plan's kept filters are remade whenever the wide weights they come from change: an in-place
    # edit under no_grad, a round trip through another dtype (a freed storage must not pass for a new one at its
    # address), a copy of the model (which keeps no filters of the original's weights)
    import copy

    torch.manual_seed(8)
    fcorr, flow = torch.randn(4, 9, 588), torch.randn(4, 9, 2) * 4
    model = golden_model(plan=ExecPlan(delta="winograd"))
    block = model.delta_block
    wide = dict(block.named_parameters())["basicblock_list.7.conv2.conv.weight"]
    with torch.inference_mode():
        model.forms.delta_block(block)(fcorr, flow)
        kept = model.forms.winograd
        with torch.no_grad():
            wide.mul_(3.0)
        want = block(fcorr, flow)
        torch.testing.assert_close(model.forms.delta_block(block)(fcorr, flow), want, atol=1e-4, rtol=1e-3)
        assert model.forms.winograd is not kept
        kept = model.forms.winograd
        model.forms.delta_block(block)(fcorr, flow)
        assert model.forms.winograd is kept  # unchanged weights: the filters are reused, not remade
        model.half().float()
        torch.testing.assert_close(model.forms.delta_block(block)(fcorr, flow), block(fcorr, flow), atol=1e-4,
                                   rtol=1e-3)
        assert model.forms.winograd is not kept
        twin = copy.deepcopy(model)
        assert twin.plan == model.plan and twin.forms.winograd is None
        with torch.no_grad():
            dict(twin.delta_block.named_parameters())["basicblock_list.7.conv2.conv.weight"].mul_(0.5)
        torch.testing.assert_close(twin.forms.delta_block(twin.delta_block)(fcorr, flow),
                                   twin.delta_block(fcorr, flow), atol=1e-4, rtol=1e-3)


def test_encoder_form_runner_is_the_reference_encoder():
    # fast.run_encoder walks BasicEncoder.forward with the norm and convolutions as arguments (the layout-keeping
    # norm and the replay go through it): with the reference norm it computes exactly what the module does
    torch.manual_seed(9)
    enc = BasicEncoder()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (torch.rand(2, 3, 128, 136) * 2 - 1).contiguous(memory_format=layout)
        with torch.no_grad():
            assert torch.equal(fast.run_encoder(enc, x, instance_norm), enc(x))


def test_model_file_has_no_plan_branches():
    # nets/pips2.py is the reference model: it hands its plan to fast.Forms once and never reads a field of it
    # or names a form, so no step of it depends on the plan; nor does it keep state for the fast forms
    import ast
    import inspect

    import pips2.nets.pips2 as m
    from pips2.nets.plan import _CHOICES

    forms = {v for values in _CHOICES.values() for v in values}
    tree = ast.parse(inspect.getsource(m))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name == "plan":
                bad.append(f"line {node.lineno}: reads plan.{node.attr}")
            if node.attr in ("register_load_state_dict_post_hook", "_apply"):
                bad.append(f"line {node.lineno}: {node.attr} (derived weights are kept by fast.Forms)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in forms:
            bad.append(f"line {node.lineno}: names the form {node.value!r}")
        elif isinstance(node, ast.FunctionDef) and node.name == "_apply":
            bad.append(f"line {node.lineno}: overrides _apply (derived weights are kept by fast.Forms)")
    assert not bad, "\n".join(bad)


def test_sample_features_is_border_bilinear():
    torch.manual_seed(1)
    fmap = torch.randn(3, 5, 9, 11)
    xy = torch.rand(3, 40, 2) * torch.tensor([16.0, 14.0]) - 3  # inside, near and outside the borders
    got = sample_features(fmap.permute(0, 2, 3, 1), xy)
    grid = torch.stack([2 * xy[..., 0] / 10 - 1, 2 * xy[..., 1] / 8 - 1], -1).unsqueeze(1)
    ref = F.grid_sample(fmap, grid, align_corners=True, padding_mode="border")[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # integer positions read the map exactly
    assert torch.allclose(sample_features(fmap.permute(0, 2, 3, 1), torch.tensor([[[4.0, 2.0]]]).expand(3, 1, 2))[:, 0],
                          fmap[:, :, 2, 4])


def test_sample_features_on_and_beyond_the_last_row_weights_the_unclipped_corners():
    """The reference's rule to the last bit: the position in float32, corners floor(p) and floor(p) + 1 clipped
    to the map, float32 weights from the unclipped corners. On or beyond the last row or column both corners
    read it and their weights add up to one only up to float32 rounding, so clamping the position first (the
    same value in exact arithmetic) gives other float64 features there."""
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(2, 5, 6, 4, generator=g, dtype=torch.float64)  # F,H,W,C
    xy = torch.tensor([[[1.6, 4.3], [5.7, 2.2], [5.3, 4.9], [-0.6, 1.3], [2.4, -1.7], [8.1, 9.3]],
                       [[1.6, 4.0], [5.0, 2.6], [3.3, 3.7], [-7.2, 6.6], [0.25, 0.5], [6.2, -0.1]]],
                      dtype=torch.float64)
    got = sample_features(fmap, xy)
    H, W = fmap.shape[1:3]
    for f in range(2):
        for n in range(xy.shape[1]):
            x, y = xy[f, n].float()
            x0, y0 = x.floor(), y.floor()
            corners = [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]
            weights = [(x0 + 1 - x) * (y0 + 1 - y), (x - x0) * (y0 + 1 - y), (x0 + 1 - x) * (y - y0),
                       (x - x0) * (y - y0)]  # float32 products
            want = torch.zeros_like(got[f, n])
            for (cy, cx), w in zip(corners, weights, strict=True):
                want = want + fmap[f, int(cy.clamp(0, H - 1)), int(cx.clamp(0, W - 1))] * w.double()
            assert torch.equal(got[f, n], want), (f, n, (got[f, n] - want).abs().max())


@pytest.mark.parametrize("size", [(16, 24), (17, 21)])
def test_local_correlation_equals_volume(size):
    torch.manual_seed(2)
    B, S, N, C = 2, 3, 21, 32
    H, W = size
    fmaps = torch.randn(B, S, C, H, W)
    targets = torch.randn(B, S, N, 3, C)
    # points well inside, on the border, just outside, far outside
    coords = torch.rand(B, S, N, 2) * torch.tensor([W + 12.0, H + 12.0]) - 6
    coords[0, 0, :4] = torch.tensor([[0.0, 0.0], [W - 1.0, H - 1.0], [-0.5, 3.2], [W - 0.7, -1.3]])
    coords[1, 2, :2] = torch.tensor([[-500.0, 7.0], [3.0, 1e6]])
    nhwc = fmaps.permute(0, 1, 3, 4, 2)
    pyramid = CorrPyramid(nhwc.double(), 4, 3)
    local = fast.local_corr(pyramid, targets.double(), coords.double(), 5000, "workspace")
    volume = pyramid.volume(targets.double(), coords.double())
    assert local.shape == (B, S, N, 3 * 4 * 49) and local.dtype == torch.float64
    torch.testing.assert_close(local, volume.reshape(local.shape), atol=1e-10, rtol=0)
    # the public call returns float32, as the reference's correlations are
    out = fast.Forms(ExecPlan(corr="local")).correlation(CorrPyramid(nhwc.double(), 4, 3))(targets, coords)
    assert out.dtype == torch.float32 and torch.equal(out, local.float())
    assert volume.abs().max() > 1  # not all zeros


def test_correlation_offset_order_x_outer():
    # a map that is zero except one hot cell: the response index tells which offset is outer
    fmaps = torch.zeros(1, 1, 1, 16, 16)
    fmaps[0, 0, 0, 5, 9] = 1.0  # y=5, x=9
    coords = torch.tensor([[[[8.0, 5.0]]]])  # x offset +1 hits it: i = 4, j = 3 -> k = 31
    for impl in ("local", "volume"):
        pyramid = fast.Forms(ExecPlan(corr=impl)).correlation(CorrPyramid(fmaps.permute(0, 1, 3, 4, 2), 1, 3))
        out = pyramid(torch.ones(1, 1, 1, 1, 1), coords)[0, 0, 0]
        assert out.argmax().item() == 7 * 4 + 3, impl


def test_local_and_volume_gradients_agree():
    torch.manual_seed(3)
    fmaps = torch.randn(1, 2, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(1, 2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(1, 2, 5, 2, dtype=torch.float64) * 20 - 2
    grads = []
    # local: one recomputing Function per level (coordinates without gradient, as in the model); then with a
    # coordinate gradient (a checkpoint per chunk); one chunk of one frame, or all frames at once
    for impl, chunk, xy in (("local", 100, coords), ("local", 0, coords), ("local", 100, coords.requires_grad_()),
                            ("volume", 0, coords)):
        pyr = CorrPyramid(fmaps.permute(0, 1, 3, 4, 2), 4, 3)
        if impl == "local":
            out = fast.local_corr(pyr, targets, xy, chunk, "checkpoint")
        else:
            out = pyr.volume(targets, coords.detach()).reshape(1, 2, 5, -1)
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)
        gf, gt = torch.autograd.grad((out * weights).sum(), [fmaps, targets])
        grads.append((gf, gt))
    assert grads[-1][0].abs().max() > 0.1 and grads[-1][1].abs().max() > 0.1
    for local in grads[:-1]:
        torch.testing.assert_close(local[0], grads[-1][0], atol=1e-10, rtol=0)
        torch.testing.assert_close(local[1], grads[-1][1], atol=1e-10, rtol=0)


def test_optimised_model_equals_plain_reference_path():
    torch.manual_seed(4)
    fastest = golden_model(plan=ExecPlan(encoder_chunk=3, channels_last=True, delta="winograd")).double()
    plain = golden_model(plan=ExecPlan.reference()).double()
    rgbs = torch.rand(1, 7, 3, 128, 136, dtype=torch.float64) * 255
    trajs = (torch.rand(1, 1, 10, 2, dtype=torch.float64) * torch.tensor([136.0, 128.0])).repeat(1, 7, 1, 1)
    with torch.inference_mode():
        a = fastest(trajs, rgbs, iters=3)[0][-1]
    with torch.no_grad():
        b = plain(trajs, rgbs, iters=3)[0][-1]
    assert (a - trajs).abs().max() > 0.5  # the points moved
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_training_loss_matches_reference_path_and_gradients_flow():
    # gradient equality itself is tested on the correlation (test_local_and_volume_gradients_agree): with
    # random weights the encoder's gradients move by ~10% when its features move by 1e-6, so comparing them
    # here would test float noise
    torch.manual_seed(5)
    rgbs = torch.rand(1, 4, 3, 128, 128, dtype=torch.float64) * 255
    trajs = (torch.rand(1, 1, 6, 2, dtype=torch.float64) * 128).repeat(1, 4, 1, 1)
    trajs_g = trajs + torch.randn_like(trajs)
    losses = []
    for plan in (ExecPlan.auto(training=True), ExecPlan.reference()):
        model = golden_model(plan=plan).double().train()
        loss = model(trajs, rgbs, iters=2, trajs_g=trajs_g)[3]
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            if not name.startswith("norm."):
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(6)
    rgbs = torch.rand(1, 4, 3, 128, 128, dtype=torch.float64) * 255
    trajs = (torch.rand(1, 1, 5, 2, dtype=torch.float64) * 128).repeat(1, 4, 1, 1)
    trajs_g = trajs + torch.randn_like(trajs)
    out = []
    for ckpt in (False, True):
        model = golden_model(plan=ExecPlan.auto(training=True, checkpointing=ckpt)).double().train()
        loss = model(trajs, rgbs, iters=2, trajs_g=trajs_g)[3]
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert out[0][0] == out[1][0]
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) > 70
    for n, g in out[0][1].items():
        torch.testing.assert_close(g, out[1][1][n], atol=1e-12, rtol=1e-9, msg=n)


TRAINING_FORMS = {
    "gemm delta": dict(delta="gemm"),
    "recompute cheap": dict(recompute_cheap=True),
    # the default on fewer than 128 points above the small crops
    "conv1d + recompute cheap": dict(delta="conv1d", recompute_cheap=True, channels_last=True),
    "recompute cheap, channels-last": dict(recompute_cheap=True, channels_last=True),  # its CPU plan
    "gemm + recompute cheap": dict(delta="gemm", recompute_cheap=True),
    "gemm + checkpointing": dict(delta="gemm", checkpointing=True),
    "winograd delta": dict(delta="winograd"),
    "winograd + recompute cheap": dict(delta="winograd", recompute_cheap=True),
    "winograd + checkpointing": dict(delta="winograd", checkpointing=True),
    "winograd2 delta": dict(delta="winograd2"),  # F(2,3), the bf16 plan's
}


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_encoder_replay_gives_autograds_gradients(frames, layout):
    # float64: keeping only conv outputs and norm statistics, then replaying in backward, gives the same encoder
    # output and the same gradients for every weight and for the frames as plain autograd (one frame: the
    # norm is a batch norm of one image; several: instance statistics per image)
    torch.manual_seed(3)
    enc = BasicEncoder().double()
    x = (torch.rand(frames, 3, 128, 136, dtype=torch.float64) * 2 - 1).contiguous(memory_format=layout)
    g = torch.randn(frames, 128, 16, 17, dtype=torch.float64)
    out = []
    for replay in (False, True):
        xg = x.clone().requires_grad_(True)
        enc.zero_grad()
        y = fast.encode_keeping_convs(enc, xg) if replay else enc(xg)
        y.backward(g)
        grads = {n: p.grad for n, p in enc.named_parameters()}
        assert all(g is not None for g in grads.values())
        out.append((y.detach(), xg.grad, {n: g.clone() for n, g in grads.items() if g is not None}))
    (y0, gx0, gw0), (y1, gx1, gw1) = out
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=1e-9)
    assert len(gw0) > 40
    for n, v in gw0.items():
        torch.testing.assert_close(gw1[n], v, atol=1e-10, rtol=1e-9, msg=n)


def test_encoder_replay_keeps_half_the_tensors():
    # what backward holds: the frames, the 3x3 (and wider) convolutions' outputs and two statistics per norm,
    # not the norms' outputs, ReLUs or sums between them
    enc = BasicEncoder()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast.encode_keeping_convs(enc, x)
    def maps(ts):  # the activations (one image's maps), not the weights; each storage once
        return list({t.data_ptr(): t for t in ts if t.dim() == 4 and t.shape[0] == 1 and t.shape[-1] >= 16}.values())

    big = maps(saved)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and fast._costly(m.weight)]
    assert len(big) <= 1 + len(convs)  # the frames and kept outputs (the smallest maps fall under the filter)
    kept_numel = sum(t.numel() for t in big)
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        enc(x.clone().requires_grad_(True))
    plain_numel = sum(t.numel() for t in maps(plain))
    assert kept_numel < 0.6 * plain_numel


@pytest.mark.parametrize("form", list(TRAINING_FORMS))
def test_training_forms_give_the_same_loss_and_gradients(form):
    # float64 from the same weights: every training form computes the conv1d training plan's loss and gradients
    # (biases before a norm have a true gradient of 0, so the tolerance is relative to the largest gradient)
    torch.manual_seed(7)
    rgbs = torch.rand(1, 5, 3, 128, 136, dtype=torch.float64) * 255
    trajs = (torch.rand(1, 1, 6, 2, dtype=torch.float64) * 128).repeat(1, 5, 1, 1)
    trajs_g = trajs + torch.randn_like(trajs)
    base = ExecPlan.auto(training=True)
    sd = golden_model(plan=base).state_dict()
    out = []
    for plan in (replace(base, delta="conv1d", recompute_cheap=False, checkpointing=False),
                 replace(base, **TRAINING_FORMS[form])):
        model = Pips(plan)
        model.load_state_dict(sd)
        model = model.double().train()
        loss = model(trajs, rgbs, iters=2, trajs_g=trajs_g)[3]
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ref, g_ref), (loss, g) = out
    assert loss == pytest.approx(loss_ref, rel=1e-12) and g.keys() == g_ref.keys() and len(g) > 70
    scale = max(v.abs().max().item() for v in g_ref.values())
    for n, v in g_ref.items():
        torch.testing.assert_close(g[n], v, atol=1e-9 * scale, rtol=0, msg=n)


@pytest.mark.parametrize("plan", ["float32 plan", "bf16 plan"])
def test_bf16_autocast_runs_and_stays_close(plan):
    model = golden_model(plan=ExecPlan.auto("cpu", torch.bfloat16)) if plan == "bf16 plan" else golden_model()
    rgbs = torch.from_numpy(GOLDEN["rgbs"]).float()
    trajs0 = torch.from_numpy(GOLDEN["trajs0"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds, _, feats, _ = model(trajs0, rgbs, iters=int(GOLDEN["iters"]))
    out = preds[-1]
    assert out.dtype == torch.float32 and feats[0].dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - torch.from_numpy(GOLDEN["out"])).abs().mean() < 1.0


@pytest.mark.parametrize("hw", [(120, 160), (128, 96)])
def test_too_small_frames_are_rejected(hw):
    with pytest.raises(ValueError, match="at least 128x128"), torch.no_grad():
        Pips()(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, *hw))


def test_module_has_no_hard_coded_device():
    import inspect

    import pips2.nets.pips2 as m

    src = inspect.getsource(m) + inspect.getsource(fast)
    assert ".cuda(" not in src and "'cuda'" not in src and '"cuda"' not in src


def test_auto_plans():
    cpu, cuda = ExecPlan.auto("cpu"), ExecPlan.auto("cuda")
    assert (cpu.delta, cpu.gather, cpu.encoder_chunk, cpu.channels_last) == ("winograd", "workspace", 1, False)
    assert (cuda.delta, cuda.encoder_chunk, cuda.channels_last) == ("conv1d", 16, True)
    bf16 = ExecPlan.auto("cpu", torch.bfloat16)
    assert bf16.delta == "winograd2" and bf16.channels_last  # F(2,3) under bf16, F(4,3) in float32
    train = ExecPlan.auto("cpu", training=True)
    assert not train.inference_only and train.gather == "checkpoint" and train.delta == "winograd"
    # under bf16 F(2,3): F(4,3)'s transformed tiles lose too much to 8-bit mantissas
    assert ExecPlan.auto("cpu", torch.bfloat16, training=True).delta == "winograd2"
    # CPU float32 training replays the cheap operations unless told not to (as fast, about half the memory),
    # channels-last; not on small crops, not on CUDA (not measured there)
    assert train.recompute_cheap and train.channels_last
    assert not ExecPlan.auto("cpu", training=True, recompute_cheap=False).recompute_cheap
    assert not ExecPlan.auto("cpu", training=True, crop_hw=(128, 192)).recompute_cheap
    assert not ExecPlan.auto("cuda", training=True).recompute_cheap
    assert ExecPlan.auto("cuda", training=True, recompute_cheap=True).recompute_cheap
    assert ExecPlan.auto("cuda", training=True).delta == "conv1d"
    # selective recomputation is float32 only (under autocast it cannot replay the forward's cached casts)
    assert not ExecPlan.auto("cpu", torch.bfloat16, training=True, recompute_cheap=True).recompute_cheap
    # nor by default under bf16 or with checkpointing, nor in inference
    assert not ExecPlan.auto("cpu", torch.bfloat16, training=True).recompute_cheap
    assert not ExecPlan.auto("cpu", training=True, checkpointing=True).recompute_cheap
    assert not ExecPlan.auto("cpu").recompute_cheap
    # F(2,3) only under CPU bf16, in inference and in training on many points
    for plan in (ExecPlan.auto("cuda", torch.bfloat16, training=True),
                 ExecPlan.auto("cpu", torch.float16, training=True),
                 ExecPlan.auto("cpu", torch.bfloat16, training=True, points=64), ExecPlan.auto("cuda", torch.bfloat16)):
        assert plan.delta != "winograd2", plan
    # checkpointed training recomputes a chunk at a time: one frame, not 16 (9.2 vs 1.4 GiB at 512x896)
    assert ExecPlan.auto("cuda", training=True, checkpointing=True).encoder_chunk == 1
    assert ExecPlan.auto("cuda", training=True).encoder_chunk == 16
    assert ExecPlan.reference().corr == "volume" and ExecPlan.export().corr_chunk == 0
    # small CPU training batches: full volume, conv1d delta block and all frames at once (the demo's shape);
    # large ones not, and inference never builds the volume
    small = ExecPlan.auto("cpu", training=True, points=64, crop_hw=(128, 192))
    assert (small.corr, small.gather, small.delta, small.encoder_chunk) == ("volume", "plain", "conv1d", 0)
    stage1 = ExecPlan.auto("cpu", training=True, points=128, crop_hw=(256, 384))
    assert (stage1.corr, stage1.delta, stage1.encoder_chunk) == ("local", "winograd", 1)
    assert ExecPlan.auto("cpu", points=64, crop_hw=(128, 192)).corr == "local"
    assert ExecPlan.auto("cpu", training=True, checkpointing=True, points=64, crop_hw=(128, 192)).encoder_chunk == 1


def test_plan_is_frozen_and_validated():
    plan = ExecPlan.auto()
    with pytest.raises(FrozenInstanceError):
        plan.__setattr__("delta", "conv1d")  # (an assignment, which the type checker refuses as well)
    with pytest.raises(ValueError, match="corr"):
        ExecPlan(corr="dense")
    # the encoder norm's forms are named for what they do (both compute an instance norm)
    assert (ExecPlan.auto().norm, ExecPlan.reference().norm, ExecPlan.export().norm) == ("layout", "reference",
                                                                                        "reference")
    with pytest.raises(ValueError, match=r"^ExecPlan\.norm must be one of layout, reference, got 'batch'$"):
        ExecPlan(norm="batch")
    with pytest.raises(ValueError, match="checkpointing"):
        ExecPlan(gather="workspace", checkpointing=True)
    ExecPlan(delta="winograd", gather="checkpoint", checkpointing=True)  # Winograd has a backward
    untyped: Any = "auto"  # what code without type checking may pass
    with pytest.raises(TypeError, match="ExecPlan"):
        Pips(plan=untyped)


def test_misspelled_forward_argument_is_an_error():
    model = golden_model()
    trajs, rgbs = torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 128, 128)
    with torch.no_grad():
        model(trajs, rgbs, iters=1, sw=None, is_train=False, beautify=False)  # the authors' names are accepted
        with pytest.raises(TypeError, match="valid"):
            model(trajs, rgbs, iters=1, valid=torch.ones(1, 2, 3))


def test_unused_norm_is_frozen():
    model = Pips()
    assert not any(p.requires_grad for p in model.norm.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("norm."))
    model.load_state_dict(golden_model().state_dict())
    assert not any(p.requires_grad for p in model.norm.parameters())


def test_inference_plan_refuses_to_record_gradients():
    model = golden_model()
    with pytest.raises(RuntimeError, match="training plan"):
        model(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 128, 128), iters=1)
