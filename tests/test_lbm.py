"""LBM (nets/lbm.py) against the authors' golden vectors (tests/data/lbm; docs/LBM.md) and its own contracts.

`golden_forward.npz` holds the authors' float32 CPU outputs for an 8-query, 6-frame clip at input size
96x128 from a 120x160 source, with queries starting on frames 0..5; `state_dict.json` lists the authors'
keys, shapes and dtypes in order. The weights come from the golden recipe in docs/LBM.md (one generator per entry).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pips2.hub import load_model
from pips2.nets.lbm import LBM, LBMLayer, LBMOnlineState, load_backbone_init
from pips2.utils.checkpoint import CheckpointError
from pips2.utils.golden import lbm_golden_state_dict

DATA = Path(__file__).parent / "data" / "lbm"
LBM_STATE = json.loads((DATA / "state_dict.json").read_text())
GOLDEN = np.load(DATA / "golden_forward.npz", allow_pickle=False)
LOSSES = ["classification_loss", "visibility_loss", "regression_loss", "uncertainty_loss", "uncertainty_loss_topk"]
TOL = 1e-3


def golden_weights(model: LBM) -> dict[str, torch.Tensor]:
    """Golden recipe (docs/LBM.md): entry i of state_dict.json (file order) from its own generator seeded 5000 + i."""
    entries = [(e["name"], tuple(e["shape"]), getattr(torch, e["dtype"])) for e in LBM_STATE["keys"]]
    return lbm_golden_state_dict(entries, model.state_dict())


@pytest.fixture(scope="module")
def model() -> LBM:
    """The golden LBM in eval mode."""
    m = LBM(**LBM_STATE["config"])
    m.load_state_dict(golden_weights(m), strict=True)
    return m.eval()


def golden_inputs():
    """video (float), queries, gt_tracks, gt_visibility as tensors."""
    return (torch.from_numpy(GOLDEN["video"]).float(), torch.from_numpy(GOLDEN["queries"]),
            torch.from_numpy(GOLDEN["gt_tracks"]), torch.from_numpy(GOLDEN["gt_visibility"]))


def clip_queries(queries: torch.Tensor, n: int, last_frame: int) -> torch.Tensor:
    """The first n queries with their query frames capped at last_frame (for shortened clips)."""
    q = queries[:, :n].clone()
    q[..., 0] = q[..., 0].clamp(max=last_frame)
    return q


def test_state_dict_matches_authors_keys_shapes_dtypes_order():
    sd = LBM(**LBM_STATE["config"]).state_dict()
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    assert got == [(e["name"], e["shape"], e["dtype"]) for e in LBM_STATE["keys"]]
    # the contract's count of floats (parameters and batch-norm statistics)
    assert sum(v.numel() for v in sd.values() if v.is_floating_point()) == LBM_STATE["params"]


def test_golden_training_forward(model):
    video, queries, gt_tracks, gt_vis = golden_inputs()
    q_before = queries.clone()
    with torch.no_grad():
        out = model(video, queries, gt_tracks, gt_vis, with_raw=True)
    assert torch.equal(queries, q_before), "forward must not change its inputs"
    for k in LOSSES:
        assert abs(float(out[k]) - float(GOLDEN[k])) < TOL, (k, float(out[k]), float(GOLDEN[k]))
    for k in ("points", "offset", "vis_logit", "rho"):
        np.testing.assert_allclose(out[k].numpy(), GOLDEN[f"train_{k}"], rtol=0, atol=TOL, err_msg=k)
    assert np.array_equal(out["visibility"].numpy(), GOLDEN["train_visibility"])


def test_golden_inference(model):
    _, queries, _, _ = golden_inputs()
    video = torch.from_numpy(GOLDEN["video"])  # uint8, as a decoder gives it
    out = model.inference(video, queries, with_raw=True)
    for k in ("points", "offset", "vis_logit", "rho"):
        np.testing.assert_allclose(out[k].numpy(), GOLDEN[f"infer_{k}"], rtol=0, atol=TOL, err_msg=k)
    assert np.array_equal(out["visibility"].numpy(), GOLDEN["infer_visibility"])
    plain = model.inference(video, queries)
    assert set(plain) == {"points", "visibility"}
    assert torch.equal(plain["points"], out["points"])
    with pytest.raises(ValueError, match=r"query frames must lie in \[0, 4\], got 0..5"):
        model.inference(video[:, :5], queries)


def test_no_queries_track_to_empty_outputs(model):
    # zero queries read no frame: query_vectors made no vectors and inference stopped on None
    video = torch.from_numpy(GOLDEN["video"])
    none = torch.zeros(1, 0, 3)
    q0 = model.query_vectors(lambda t: model.backbone(video[:, t]), none, video.shape[1])
    assert q0.shape == (1, 0, model.embed_dim) and q0.dtype == model.backbone.frame_pos_embedding.dtype
    out = model.inference(video, none)
    assert out["points"].shape == (1, video.shape[1], 0, 2) and out["visibility"].shape == (1, video.shape[1], 0)


@pytest.fixture(scope="module")
def model_remembering(model) -> LBM:
    """The golden model with a visibility bias that makes many frames visible (the golden clip keeps every
    memory entry masked, so this is what exercises the memory attention)."""
    m = LBM(**LBM_STATE["config"])
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.get_parameter("transformer.vis_head.net.3.bias")[0] += 1.6
    return m.eval()


def test_memory_is_used(model_remembering):
    m = model_remembering
    video, queries, _, _ = golden_inputs()
    q_in = torch.cat([queries[..., :1], m.to_input_px(queries[..., 1:], video.shape[-2:])], dim=-1)
    q0 = m.query_vectors(lambda t: m.backbone(video[:, t]), q_in, video.shape[1])
    memory = m.empty_memory(1, q0.shape[1], q0)
    readable = []
    with torch.no_grad():
        for t in range(video.shape[1]):
            readable.append(int((~(memory.vis_mask | memory.mem_mask)).any(-1).sum()))
            _, memory = m.step(q0, m.backbone(video[:, t]), memory, q_in[..., 0] <= t)
    assert readable[0] == 0 and sum(readable) >= 5, readable


def test_memory_path_matches_authors_transformer(model_remembering):
    """`memory_path.npz` (points in input pixels, logits; frames x queries) was computed by the authors'
    LBMTransformer (cf39292, its pure-PyTorch deformable attention) with these weights, fed the golden clip's
    frame features and query vectors and stepped with their update rule: it covers the memory reads."""
    ref = np.load(DATA / "memory_path.npz", allow_pickle=False)
    m = model_remembering
    assert float(ref["vis_bias_shift"]) == pytest.approx(1.6)
    video, queries, _, _ = golden_inputs()
    out = m.inference(video, queries, with_raw=True)
    points_in = m.to_input_px(out["points"], video.shape[-2:])
    np.testing.assert_allclose(points_in.numpy(), ref["points"], rtol=0, atol=TOL)
    np.testing.assert_allclose(out["vis_logit"].numpy(), ref["vis_logit"], rtol=0, atol=TOL)
    np.testing.assert_allclose(out["rho"].numpy(), ref["rho"], rtol=0, atol=TOL)


def test_online_equals_inference(model_remembering):
    m = model_remembering
    video, queries, _, _ = golden_inputs()
    ref = m.inference(video, queries)
    times = queries[0, :, 0].long()
    xy = queries[0, :, 1:]
    tracker = LBMOnlineState(m)
    T = video.shape[1]
    for t in range(T):
        new = xy[times == t]
        res = tracker.init(new, video[:, 0]) if t == 0 else tracker.track(video[:, t], add=new)
        started = times <= t  # queries are appended in order of their times, as in the golden file
        assert tracker.num_queries == int(started.sum())
        np.testing.assert_allclose(res["points"].numpy(), ref["points"][0, t, started].numpy(), rtol=0, atol=1e-4)
        assert torch.equal(res["visibility"], ref["visibility"][0, t, started])
    assert ref["visibility"].any() and (~ref["visibility"]).any()


def test_online_remove_keeps_others(model_remembering):
    m = model_remembering
    video, queries, _, _ = golden_inputs()
    first = queries[:, :3].clone()
    first[..., 0] = 0
    ref = m.inference(video, first)
    tracker = LBMOnlineState(m)
    tracker.init(first[0, :, 1:], video[:, 0])
    tracker.track(video[:, 1])
    res = tracker.track(video[:, 2], remove=torch.tensor([False, True, False]))
    assert tracker.num_queries == 2
    np.testing.assert_allclose(res["points"].numpy(), ref["points"][0, 2, [0, 2]].numpy(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="no queries"):
        tracker.track(video[:, 3], remove=torch.ones(2, dtype=torch.bool))


def test_training_mode_gradients_are_finite():
    torch.manual_seed(0)
    m = LBM(**LBM_STATE["config"]).train()
    video, queries, gt_tracks, gt_vis = golden_inputs()
    out = m(video[:, :3], clip_queries(queries, 4, 2), gt_tracks[:, :3, :4], gt_vis[:, :3, :4])
    torch.stack([out[k] for k in LOSSES]).sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads) > 100 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("wrap", ["model", "bare_module", "model_module"])
def test_load_lbm_strict(model, tmp_path, wrap):
    sd = model.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {"model": sd, "epoch": 3} if wrap == "model" else prefixed if wrap == "bare_module" else {"model": prefixed}
    path = tmp_path / "lbm.pt"
    torch.save(obj, path)
    loaded = load_model(path, "cpu", kind="lbm", **LBM_STATE["config"])
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_lbm_rejects_wrong_checkpoints(model, tmp_path):
    sd = dict(model.state_dict())
    sd.pop("transformer.vis_head.net.3.bias")
    path = tmp_path / "short.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"short\.pt.*missing keys.*vis_head"):
        load_model(path, kind="lbm", **LBM_STATE["config"])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"short\.pt: not a checkpoint \(a text file"):
        load_model(path, kind="lbm", **LBM_STATE["config"])
    # the authors' training checkpoints also pickle their argparse arguments: refused, not unpickled
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=5e-4)}, path)
    with pytest.raises(CheckpointError, match=r"short\.pt: refused: it holds more than tensors.*Namespace.*converter"):
        load_model(path, kind="lbm", **LBM_STATE["config"])
    # a model at another input size has another positional embedding: a strict load must refuse it
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="frame_pos_embedding"):
        load_model(path, kind="lbm", **{**LBM_STATE["config"], "input_size": (128, 128)})


def test_set_memory_size_interpolates_linearly():
    m = LBM(**LBM_STATE["config"])
    M, C = 12, 256
    slope, start = torch.randn(C), torch.randn(C)
    layer = m.transformer.layers[1]
    assert isinstance(layer, LBMLayer)
    with torch.no_grad():
        layer.collision_time_emb[0, :M] = start + torch.arange(M).unsqueeze(1) * slope
        layer.stream_time_emb[0, :M] = start - torch.arange(M).unsqueeze(1) * slope
    now_c, now_s = layer.collision_time_emb[0, M].clone(), layer.stream_time_emb[0, M].clone()
    m.set_memory_size(48)
    assert m.memory_size == 48
    for lay in m.transformer.layers:
        assert lay.collision_time_emb.shape == (1, 49, C) and lay.stream_time_emb.shape == (1, 49, C)
    pos = torch.arange(48).unsqueeze(1) * (M - 1) / 47  # align_corners: first and last slot keep their place
    torch.testing.assert_close(layer.collision_time_emb[0, :48], start + pos * slope, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.stream_time_emb[0, :48], start - pos * slope, atol=1e-5, rtol=0)
    assert torch.equal(layer.collision_time_emb[0, 48], now_c) and torch.equal(layer.stream_time_emb[0, 48], now_s)
    # the model then runs with the new memory length
    video, queries, _, _ = golden_inputs()
    assert m.eval().inference(video[:, :2], clip_queries(queries, 2, 1))["points"].shape == (1, 2, 2, 2)


def fake_torchvision_resnet18(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict laid out like torchvision's resnet18 (random values, classifier included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(c, generator=g)
        sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("bn1", 64)
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(c, cin if b == 0 else c, 3, 3, generator=g)
            bn(f"{p}.bn1", c)
            sd[f"{p}.conv2.weight"] = torch.randn(c, c, 3, 3, generator=g)
            bn(f"{p}.bn2", c)
            if b == 0 and cin != c:
                sd[f"{p}.downsample.0.weight"] = torch.randn(c, cin, 1, 1, generator=g)
                bn(f"{p}.downsample.1", c)
        cin = c
    sd["fc.weight"] = torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


def lbm_key(tv_key: str) -> str:
    """Where the authors' Backbone keeps a torchvision resnet18 weight."""
    for src, dst in (("conv1.", "layer1.0."), ("bn1.", "layer1.1."), ("layer1.", "layer1.4.")):
        if tv_key.startswith(src):
            return "backbone." + dst + tv_key[len(src):]
    return "backbone." + tv_key


def test_backbone_init_from_torchvision_resnet18(tmp_path):
    tv = fake_torchvision_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv, path)
    m = LBM(**LBM_STATE["config"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    load_backbone_init(m, path)
    after = m.state_dict()
    used = [k for k in tv if not k.startswith(("layer4.", "fc."))]
    assert len(used) == 90
    for k in used:
        assert torch.equal(after[lbm_key(k)], tv[k]), k
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {lbm_key(k) for k in used}
    # the constructor option does the same, and an older file without batch-norm counters is accepted
    no_counters = {k: v for k, v in tv.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, path)
    m2 = LBM(**LBM_STATE["config"], backbone_init=path)
    assert torch.equal(m2.get_parameter("backbone.layer3.0.downsample.0.weight"), tv["layer3.0.downsample.0.weight"])


def test_backbone_init_rejects_foreign_files(tmp_path):
    tv = fake_torchvision_resnet18()
    tv["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(tv, path)
    with pytest.raises(CheckpointError, match=r"wrong\.pth: .*layer2\.0\.conv1\.weight has shape"):
        load_backbone_init(LBM(**LBM_STATE["config"]), path)
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"wrong\.pth: .*unexpected key encoder\.weight"):
        load_backbone_init(LBM(**LBM_STATE["config"]), path)
    # weights that load but are wrong: a NaN, or integers where the model has floats
    tv = fake_torchvision_resnet18()
    tv["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    tv["layer3.1.bn2.bias"] = tv["layer3.1.bn2.bias"].long()
    torch.save(tv, path)
    with pytest.raises(CheckpointError, match=r"wrong\.pth: .*layer1\.0\.conv1\.weight holds 1 NaN or infinite "
                                              r"value; layer3\.1\.bn2\.bias is torch\.int64, the model's is "
                                              r"torch\.float32$"):
        load_backbone_init(LBM(**LBM_STATE["config"]), path)


def test_folded_correlation_equals_the_authors_per_level_maps():
    """LBMLayer.correlation folds the 1x1 mix into the features; the authors upsample and mix per query."""
    torch.manual_seed(0)
    layer = LBMLayer((32, 48), 4, 16, 2, 4, 9, 3, 0.0).double()
    with torch.no_grad():
        layer.corr_conv.weight.normal_()
        layer.get_parameter("corr_conv.bias").normal_()
    q = torch.randn(2, 5, 16, dtype=torch.float64)
    feat = torch.randn(2, 16, 8, 12, dtype=torch.float64)
    pooled = [feat] + [F.avg_pool2d(feat, 2 ** i) for i in range(1, 4)]
    up = torch.stack([F.interpolate(F.normalize(p, dim=1), size=(8, 12), mode="bilinear", align_corners=False)
                      for p in pooled], 1).reshape(2, 4, -1)
    mixed = (layer.mix_weights() @ up).reshape(2, 16, 96)
    qn = F.normalize(q, dim=-1)
    maps = []
    for p in pooled:
        c = torch.einsum("bnc,bchw->bnhw", qn, F.normalize(p, dim=1)).reshape(10, 1, *p.shape[-2:])
        maps.append(F.interpolate(c, size=(8, 12), mode="bilinear", align_corners=False))
    maps = torch.cat(maps, 1)
    want = F.conv2d(maps, layer.corr_conv.weight, layer.corr_conv.bias) + maps[:, :1]
    torch.testing.assert_close(layer.correlation(q, mixed), want.reshape(2, 5, 96), rtol=1e-12, atol=1e-12)
