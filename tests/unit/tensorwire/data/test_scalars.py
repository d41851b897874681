"""tensorwire.data.scalars: merged, never dropped; bounded by down-sampling."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tensorwire.data.scalars import ScalarBuffer, ScalarSeriesBuffer, from_batch, to_batch


def _covered(buckets: list) -> list[int]:
    steps: list[int] = []
    for b in buckets:
        steps.extend(range(b.first_step, b.step + 1))
    return steps


@given(st.integers(min_value=1, max_value=3000), st.integers(min_value=2, max_value=64))
def test_every_step_stays_covered_and_bounded(count: int, max_points: int) -> None:
    buf = ScalarSeriesBuffer(max_points)
    for step in range(1, count + 1):
        buf.add(step, float(step % 7))
        assert len(buf) <= max_points
    buckets = buf.take()
    assert _covered(buckets) == list(range(1, count + 1))
    assert sum(b.count for b in buckets) == count
    assert min(b.lo for b in buckets) == min(s % 7 for s in range(1, count + 1))
    assert max(b.hi for b in buckets) == max(s % 7 for s in range(1, count + 1))
    assert len(buf) == 0


def test_mean_is_count_weighted() -> None:
    buf = ScalarSeriesBuffer(2)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        buf.add(step, value)
    buckets = buf.take()
    total = sum(b.mean * b.count for b in buckets)
    assert abs(total - 15.0) < 1e-9


def test_batch_round_trip_keeps_ranges() -> None:
    buf = ScalarBuffer(max_points=8)
    for step in range(1, 101):
        buf.add(step, {"loss": 1.0 / step, "accuracy": step / 100})
    series = buf.take()
    batch = to_batch(series)
    names = {s.name for s in batch.series}
    assert names == {"loss", "accuracy"}
    for s in batch.series:
        assert len(s.steps) <= 8 and len(s.first_steps) == len(s.steps) == len(s.min) == len(s.max)
        assert s.first_steps[0] == 1 and s.steps[-1] == 100
        for i in range(1, len(s.steps)):
            assert s.first_steps[i] == s.steps[i - 1] + 1
    back = from_batch(batch)
    assert _covered(back["loss"]) == list(range(1, 101))
    # Merging batches into a smaller buffer still covers everything.
    small = ScalarBuffer(max_points=3)
    small.add_batch(batch)
    small.add(101, {"loss": 0.0})
    assert _covered(small.take()["loss"]) == list(range(1, 102))


def test_unmerged_points_have_no_ranges() -> None:
    buf = ScalarBuffer(max_points=10)
    buf.add(5, {"loss": 0.5})
    batch = to_batch(buf.take())
    assert list(batch.series[0].steps) == [5]
    assert not batch.series[0].min and not batch.series[0].first_steps
    assert _covered(from_batch(batch)["loss"]) == [5]


def test_long_history_keeps_an_even_resolution() -> None:
    """After a long run every part of the curve keeps about the same resolution;
    the oldest points are not folded into one bucket (a chart would start late)."""
    from tensorwire.data.scalars import ScalarSeriesBuffer

    buffer = ScalarSeriesBuffer(1024)
    steps = 100_000
    for step in range(steps):
        buffer.add(step, float(step))
    spans = [b.step - b.first_step + 1 for b in buffer.buckets]
    assert 256 < len(buffer.buckets) <= 1024
    assert sum(b.count for b in buffer.buckets) == steps
    assert buffer.buckets[0].first_step == 0 and buffer.buckets[-1].step == steps - 1
    assert max(spans) <= 4 * steps / 1024, max(spans)
    # contiguous: no step range is missing
    assert all(a.step + 1 == b.first_step for a, b in zip(buffer.buckets, buffer.buckets[1:]))
