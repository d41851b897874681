"""tensorwire.rpc.histogram: Prometheus' le buckets, cumulative, with a sum."""

from __future__ import annotations

import pytest

from tensorwire.rpc.histogram import Histogram


def test_values_fall_in_le_buckets_and_accumulate() -> None:
    h = Histogram((1, 2, 4))
    h.observe_all([0.5, 1, 1.5, 2, 3, 9])
    assert h.cumulative() == [("1.0", 2.0), ("2.0", 4.0), ("4.0", 5.0), ("+Inf", 6.0)]
    assert h.count == 6 and h.sum == pytest.approx(17.0)
    snapshot = h.copy()
    h.observe(1)
    assert snapshot.count == 6 and h.count == 7


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((2, 1))
