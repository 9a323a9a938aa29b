"""Metrics against hand-computed values."""

import numpy as np
import pytest

from pips2.utils import metrics


def _case():
    # 3 frames, 2 points, 256x256 input: errors per (frame, point) set along x
    gt = np.zeros((3, 2, 2))
    err = np.array([[0.0, 0.0], [0.5, 10.0], [3.0, 20.0]])
    est = gt.copy()
    est[..., 0] = err
    return est, gt, np.ones((3, 2))


def test_closed_form_values():
    est, gt, valid = _case()
    m = metrics.track_metrics(est, gt, valid, (256, 256))
    # frames >= 1 hold errors 0.5, 3, 10, 20
    assert m["d_1"] == pytest.approx(25.0, abs=1e-4)
    assert m["d_2"] == pytest.approx(25.0, abs=1e-4)
    assert m["d_4"] == pytest.approx(50.0, abs=1e-4)
    assert m["d_8"] == pytest.approx(50.0, abs=1e-4)
    assert m["d_16"] == pytest.approx(75.0, abs=1e-4)
    assert m["d_avg"] == pytest.approx(45.0, abs=1e-4)
    assert m["survival_16"] == pytest.approx(100 * 5 / 6, abs=1e-4)  # point 1 dies at frame 2
    assert m["median_l2"] == pytest.approx((0.5 + 10.0) / 2)  # medians of [0,.5,3] and [0,10,20]


def test_scaling_to_256():
    gt = np.zeros((2, 1, 2))
    est = gt.copy()
    est[1, 0] = [896 / 256 * 1.5, 0]  # 1.5 px in the 256 frame
    m = metrics.track_metrics(est, gt, np.ones((2, 1)), (512, 896))
    assert m["d_1"] == 0 and m["d_2"] == pytest.approx(100.0, abs=1e-3)
    est[1, 0] = [0, 512 / 256 * 3]  # 3 px along y
    m = metrics.track_metrics(est, gt, np.ones((2, 1)), (512, 896))
    assert m["d_2"] == 0 and m["d_4"] == pytest.approx(100.0, abs=1e-3)


def test_invalid_entries_are_ignored_and_even_median_averages():
    est, gt, valid = _case()
    valid[2, 1] = 0  # point 1's 20-px frame no longer counts
    m = metrics.track_metrics(est, gt, valid, (256, 256))
    assert m["d_16"] == pytest.approx(100.0, abs=1e-4)
    assert m["survival_16"] == pytest.approx(100.0)
    assert m["median_l2"] == pytest.approx((0.5 + 5.0) / 2)  # [0, 10] has median 5


def test_average_is_a_plain_mean_over_videos():
    a = dict.fromkeys(metrics.METRIC_NAMES, 10.0)
    b = dict.fromkeys(metrics.METRIC_NAMES, 30.0)
    assert metrics.average([a, b])["d_avg"] == 20.0


def test_tapvid_metrics_closed_form():
    gt = np.zeros((2, 4, 2))
    pred = gt.copy()
    pred[0, :, 0] = [0, 0.5, 3, 100]
    pred[1, :, 0] = [0, 0, 0, 0]
    occ = np.zeros((2, 4), bool)
    occ[1, 2:] = True
    q = np.array([0, 1])
    m = metrics.tapvid_metrics(pred, gt, occ, q, (256, 256), pred_occluded=occ)
    # scored: point 0 frames 1..3 (errors .5, 3, 100), point 1 frames 2..3 (occluded: not in delta)
    assert m["pts_within_1"] == pytest.approx(100 / 3)
    assert m["pts_within_4"] == pytest.approx(200 / 3)
    assert m["occlusion_accuracy"] == pytest.approx(100.0)
    assert m["delta_avg"] == pytest.approx(100 * np.mean([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3]))


def test_roc_auc_closed_form_cases():
    from pips2.utils.metrics import roc_auc

    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5  # ties count half
    # 3 positives x 2 negatives: pairs won 0 + 2 + 2 = 4 of 6
    assert abs(roc_auc([0.3, 0.6, 0.9, 0.4, 0.5], [True, True, True, False, False]) - 4 / 6) < 1e-12
    assert np.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_thresholds_are_strict_and_survival_keeps_an_error_of_exactly_16():
    """An error exactly on a threshold misses it (err < t); survival ends only above 16 px (err > 16)."""
    S, N = 3, 2
    g = np.zeros((S, N, 2), np.float32) + 100
    e = g.copy()
    e[1:, 0, 0] += 2.0  # exactly 2 px (256x256 frame: no scaling)
    e[1:, 1, 1] += 16.0  # exactly 16 px
    res = metrics.track_metrics(e, g, np.ones((S, N)), (256, 256))
    got = [res[f"d_{t}"] for t in (1, 2, 4, 8, 16)]
    assert got == pytest.approx([0.0, 0.0, 50.0, 50.0, 50.0], abs=1e-3)
    assert res["survival_16"] == 100.0
