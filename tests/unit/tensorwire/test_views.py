"""The generic views (tensorwire.views) decode to what they were given; the hub keeps a
run's views apart by name; scalars with NaN/inf merge into gaps, never crash."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.streamer.hub import UpdateHub
from tensorwire import views
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.data.scalars import Bucket, ScalarBuffer
from tensorwire.streamer.v1 import streamer_pb2 as spb


def decoded(view: cpb.View) -> dict[str, np.ndarray]:
    return {a.name: arrays.decode(a) for a in view.arrays}


def test_histograms_of_weights_and_grads() -> None:
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(5, 4)).sum().backward()
    view = views.histograms([("weight", layer.weight, layer.weight.grad), ("bias", layer.bias, None)], bins=8)
    got = decoded(view)
    assert view.kind == "histograms" and list(view.labels) == ["weight", "bias"]
    assert got["weights"].shape == (2, 8) and got["grads"].shape == (2, 8)
    assert got["weights"][0].sum() == pytest.approx(1.0, abs=0.02)  # fractions per layer
    assert got["grads"][1].sum() == pytest.approx(0.0, abs=0.01)  # no grad: zeros
    lo, hi = got["weight_ranges"][0]
    assert lo == pytest.approx(float(layer.weight.min()), abs=1e-2)
    assert hi == pytest.approx(float(layer.weight.max()), abs=1e-2)


@pytest.mark.parametrize("shape", [(6, 8, 8), (6, 1, 8, 8), (6, 3, 5, 7), (6, 5, 7, 3)])
def test_image_grids_from_any_layout(shape: tuple[int, ...]) -> None:
    data = torch.rand(*shape)
    got = decoded(views.as_view(data, "samples"))["images"]
    assert got.dtype == np.uint8 and got.shape[0] == 6 and got.ndim == 4 and got.shape[-1] in (1, 3)
    assert got.max() == 255 and got.min() == 0  # floats scaled from their min..max


def test_scatter_series_and_refusals() -> None:
    pts = np.random.rand(50, 2).astype(np.float32)
    view = views.as_view(pts, "emb")
    assert view.kind == "scatter" and view.name == "emb"
    np.testing.assert_allclose(decoded(view)["points"], pts, atol=0.01)
    line = views.as_view(np.array([1.0, math.nan, 3.0]), "curve")
    assert line.kind == "series" and math.isnan(decoded(line)["values"][0, 1])
    with pytest.raises(ValueError, match="cannot show values of shape"):
        views.as_view(np.zeros((2, 3)), "odd")


def test_the_hub_keeps_a_runs_views_apart_by_name() -> None:
    hub = UpdateHub()
    for name in ("weights", "samples"):
        view = views.images(np.zeros((1, 2, 2), np.uint8), name=name)
        hub.publish(spb.PublishRequest(run_id="r", step=1, view=view))
    sub = hub.subscribe("r")
    frames = [spb.Frame.FromString(f) for f in hub.snapshot(sub)]
    assert sorted(f.view.name for f in frames if f.HasField("view")) == ["samples", "weights"]


def test_non_finite_points_merge_into_gaps() -> None:
    buffer = ScalarBuffer(4)
    for step, value in enumerate([1.0, math.nan, 2.0, math.inf, 3.0, -math.inf, 4.0, 5.0, 6.0], 1):
        buffer.add(step, {"loss": value})
    buckets = buffer.take()["loss"]
    assert sum(b.count for b in buckets) == 9  # every point kept
    assert any(math.isnan(b.mean) for b in buckets)  # a gap where a bad point fell
    assert all(math.isfinite(b.lo) and math.isfinite(b.hi) for b in buckets if b.count > 1)
    assert Bucket(1, 1, math.inf, math.inf, math.inf, 1).merge(Bucket(2, 2, -math.inf, -math.inf, -math.inf, 1)).count == 2


def test_arrays_encoded_once_are_sent_as_if_encoded_in_each_view() -> None:
    rng = np.random.default_rng(3)
    points, labels = rng.uniform(-1, 1, (50, 2)).astype(np.float32), rng.integers(0, 2, 50)
    whole = views.make_view("scatter", [("points", points, views.U8Q), ("labels", labels, views.U8)])
    once = views.make_view("scatter", [("points", views.encoded("points", points, views.U8Q), views.U8Q),
                                       ("labels", views.encoded("labels", labels, views.U8), views.U8)])
    assert once.SerializeToString() == whole.SerializeToString()
    for field in (("points", views.encoded("labels", labels, views.U8), views.U8),   # another name
                  ("points", views.encoded("points", points, views.F16), views.U8Q),  # another dtype
                  ("points", views.encoded("points", points, views.U8Q, cpb.CODEC_ZSTD), views.U8Q)):
        with pytest.raises(ValueError, match="given as 'points'"):
            views.make_view("scatter", [field])
