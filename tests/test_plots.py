"""utils/plots.py and the survival curve of utils/metrics.py: known curves give known points, the PNG is a
real image of the expected size, and the figure reaches TensorBoard."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pips2.utils import metrics, plots


def _failing_tracks(fail_at: list[int | None], S: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, truth) of len(fail_at) tracks in a 256x256 frame: track n is off by 20 px from frame
    fail_at[n] on for one frame, then back on the truth (a failure is final all the same)."""
    gt = np.zeros((S, len(fail_at), 2))
    est = gt.copy()
    for n, t in enumerate(fail_at):
        if t is not None:
            est[t, n, 0] = 20.0
    return est, gt


def test_survival_curve_is_the_step_curve_of_known_failures():
    est, gt = _failing_tracks([2, 5, None, 5])
    valid = np.ones(gt.shape[:2])
    curve = metrics.survival_curve(est, gt, valid, (256, 256))
    assert curve.tolist() == [1, 1, 0.75, 0.75, 0.75, 0.25, 0.25, 0.25, 0.25, 0.25]
    # its mean is the survival_16 figure
    assert 100 * curve.mean() == pytest.approx(metrics.track_metrics(est, gt, valid, (256, 256))["survival_16"])


def test_survival_ignores_invalid_frames_and_scales_to_256():
    est, gt = _failing_tracks([3, 6])
    valid = np.ones(gt.shape[:2])
    valid[3, 0] = 0  # the failure of track 0 falls on an unannotated frame: it never fails
    assert metrics.survival_curve(est, gt, valid, (256, 256)).tolist() == [1] * 6 + [0.5] * 4
    # 20 px in a 512-wide frame is 10 px at 256: under the 16-px threshold
    assert metrics.survival_curve(est, gt, np.ones(gt.shape[:2]), (256, 512)).tolist() == [1] * 10
    # a batch (B,S,N) gives one curve per video
    batch = metrics.survival_curve(np.stack([est, gt]), np.stack([gt, gt]), np.ones((2, 10, 2)), (256, 256))
    assert batch.shape == (2, 10) and batch[1].tolist() == [1] * 10 and batch[0, -1] == 0


def test_mean_curve_averages_the_videos_that_reach_each_frame():
    assert metrics.mean_curve([[1, 0.5, 0.5], [1, 1]]).tolist() == [1, 0.75, 0.5]
    assert metrics.mean_curve([]).shape == (0,)


def test_curves_of_known_tracks():
    est, gt = _failing_tracks([2, None])
    est[:, 1, 0] = 3.0  # track 1 is 3 px off everywhere: within 4, 8, 16 but not 1, 2
    c = plots.curves_of(torch.from_numpy(est), torch.from_numpy(gt), torch.ones(10, 2), (256, 256))
    # frames 1..9 scored: track 0 is exact except at frame 2 (20 px off), track 1 always 3 px off
    assert c["accuracy"] == pytest.approx([100 * 8 / 18, 100 * 8 / 18, 100 * 17 / 18, 100 * 17 / 18, 100 * 17 / 18],
                                          abs=1e-4)
    assert c["survival"] == [1, 1] + [0.5] * 8
    both = plots.curves_of(np.stack([est, gt]), np.stack([gt, gt]), np.ones((2, 10, 2)), (256, 256))
    assert both["survival"] == [1, 1] + [0.75] * 8 and both["accuracy"][-1] == pytest.approx((100 * 17 / 18 + 100) / 2,
                                                                                              abs=1e-4)
    mean = plots.mean_curves([c, {"accuracy": [100] * 5, "survival": [1, 1, 1]}])
    assert mean["survival"] == [1, 1, 0.75] + [0.5] * 7 and mean["accuracy"][0] == pytest.approx(50 + 100 * 4 / 18)


def _datasets(n: int) -> dict:
    model = {"accuracy": [10, 30, 60, 80, 95], "survival": list(np.linspace(1, 0.6, 40))}
    zero = {"accuracy": [5, 10, 20, 40, 60], "survival": list(np.linspace(1, 0.2, 40))}
    return {f"set{i}": {"ckpt": model, plots.ZERO_VEL: zero} for i in range(n)}


@pytest.mark.parametrize("n", [1, 2])
def test_png_is_a_valid_image_of_the_expected_size(tmp_path, n):
    out = plots.save_png(_datasets(n), tmp_path / "c.png", title="t")
    assert out == tmp_path / "c.png" and [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temp left
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (900, 320 * n)
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 10  # drawn on, not a blank canvas


def test_png_path_is_beside_the_json(tmp_path):
    assert plots.png_path(tmp_path / "res.json") == tmp_path / "res_curves.png"
    assert plots.png_path("out") == plots.png_path("out.json").with_name("out_curves.png")


def _events(folder):
    """Every Event in the TFRecord files of a tensorboardX log folder (length, crc, data, crc per record)."""
    # protobuf makes Event when the module runs; there is no stub to declare it
    from tensorboardX.proto.event_pb2 import Event  # pyright: ignore[reportAttributeAccessIssue]

    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            yield Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4


def test_figure_reaches_tensorboard(tmp_path):
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        plots.add_to_tensorboard(w, "val/curves", _datasets(1), step=7)
    images = [(e.step, v) for e in _events(tmp_path) for v in e.summary.value if v.HasField("image")]
    assert [(step, v.tag) for step, v in images] == [(7, "val/curves")]
    img = images[0][1].image
    assert (img.width, img.height) == (900, 320)
    with Image.open(io.BytesIO(img.encoded_image_string)) as im:
        assert im.size == (900, 320)


def test_mean_series_relabels_the_model_and_skips_videos_without_curves():
    a: plots.Curves = {"accuracy": [0, 0, 0, 0, 100], "survival": [1, 0]}
    b: plots.Curves = {"accuracy": [100] * 5, "survival": [1, 1, 1]}
    per_video = {"v1": {"model": a, plots.ZERO_VEL: b}, "v2": {"model": b, plots.ZERO_VEL: b}, "v3": {}}
    series = plots.mean_series(per_video, "ck")
    assert list(series) == ["ck", plots.ZERO_VEL]
    assert series["ck"] == {"accuracy": [50, 50, 50, 50, 100], "survival": [1, 0.5, 1]}
    assert plots.mean_series({"v": {plots.ZERO_VEL: b}}, "ck") == {plots.ZERO_VEL: b}
    assert plots.mean_series({}, "ck") == {}
