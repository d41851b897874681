"""Scalar series that are merged, never dropped: down-sampled into buckets instead.

A :class:`ScalarSeriesBuffer` holds the points of one series since they were
last taken. When it would hold more than ``max_points`` buckets, neighbouring
buckets are merged pairwise (min of mins, count-weighted mean, max of maxes,
last step), so memory stays bounded, every step range stays covered and the
curve keeps its extremes. :class:`ScalarBuffer` does that for many series and
converts to and from ``tensorwire.common.v1.ScalarBatch``.

This merge is the only one on the live path. Three stages hold points, each in its
own ScalarBuffer with its own bound, on purpose: one buffer each would not bound
what the other two hold.

- the training loop (``services/trainer/loop.py``, 512): points between two
  publisher ticks; bounds the trainer when nothing takes them (no streamer target,
  a stalled event loop);
- each streamer link's outbox (``publishing.Link``, 512): points while that one
  streamer is slow or down (one per address: a slow streamer must not hold back
  or thin the points of a fast one);
- the streamer's hub (``services/streamer/hub.py``): the run's history for new
  subscribers (1024), and per subscriber what it has not yet been sent, merged to
  the ``max_points`` it asked for (and coarser on a slow link).

Whichever stage merged it, a bucket's min, max and mean are exact over the points
it covers; only how many buckets remain differs. Not this merge: :func:`bucketize` (the SDK's
numpy fast path for a fresh run of points) and the run store's SQL levels
(``services/trainer/store.py``), which read a stored series back in buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tensorwire.common.v1 import common_pb2 as cpb

MAX_SERIES = 1000
"""Most distinct scalar names one run may have (the streamer refuses more with
INVALID_ARGUMENT; the SDK warns and leaves the new names out)."""


@dataclass(slots=True)
class Bucket:
    """Points of one series merged together: the last step they cover and stats."""

    first_step: int
    step: int
    mean: float
    lo: float
    hi: float
    count: int

    def merge(self, other: Bucket) -> Bucket:
        """Both buckets as one. A NaN or infinite point makes the mean NaN (a gap in
        the chart, never a crash); min and max keep the finite extremes."""
        n = self.count + other.count
        mean = (self.mean * self.count + other.mean * other.count) / n
        return Bucket(
            min(self.first_step, other.first_step),
            max(self.step, other.step),
            mean if math.isfinite(mean) else math.nan,
            _finite_min(self.lo, other.lo),
            _finite_max(self.hi, other.hi),
            n,
        )


def _finite_min(a: float, b: float) -> float:
    if not math.isfinite(a):
        return b if math.isfinite(b) else a
    return a if not math.isfinite(b) or a <= b else b


def _finite_max(a: float, b: float) -> float:
    if not math.isfinite(a):
        return b if math.isfinite(b) else a
    return a if not math.isfinite(b) or a >= b else b


class ScalarSeriesBuffer:
    """One series' points since the last take, at most ``max_points`` buckets."""

    def __init__(self, max_points: int) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = max_points
        self.buckets: list[Bucket] = []

    def add(self, step: int, value: float) -> None:
        self.add_bucket(Bucket(step, step, value, value, value, 1))

    def add_bucket(self, bucket: Bucket) -> None:
        self.buckets.append(bucket)
        if len(self.buckets) > self.max_points:
            self._halve()

    def _halve(self) -> None:
        """Merge neighbours into buckets of about equal step span, at most half as
        many. (Merging by index pairs instead would give the oldest points the
        most merges: after a long run one bucket would hold most of the curve.)"""
        b = self.buckets
        span = b[-1].step - b[0].first_step + 1
        # Two neighbouring outputs together span more than `target`, so there are
        # at most 2 * span / target + 1 = max_points / 2 + 1 of them.
        target = span * 4 / self.max_points
        merged = [b[0]]
        for bucket in b[1:]:
            if bucket.step - merged[-1].first_step + 1 <= target:
                merged[-1] = merged[-1].merge(bucket)
            else:
                merged.append(bucket)
        if len(merged) > self.max_points // 2 + 1:  # steps out of order: by index
            merged = [b[i].merge(b[i + 1]) for i in range(0, len(b) - 1, 2)]
            if len(b) % 2:
                merged.append(b[-1])
        self.buckets = merged

    def take(self) -> list[Bucket]:
        out, self.buckets = self.buckets, []
        return out

    def __len__(self) -> int:
        return len(self.buckets)


class ScalarBuffer:
    """Many named series, each bounded by down-sampling, never by dropping."""

    def __init__(self, max_points: int = 256) -> None:
        self.max_points = max_points
        self._series: dict[str, ScalarSeriesBuffer] = {}

    def _get(self, name: str) -> ScalarSeriesBuffer:
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = ScalarSeriesBuffer(self.max_points)
        return series

    def add(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._get(name).add(step, value)

    def add_batch(self, batch: cpb.ScalarBatch) -> None:
        for name, buckets in from_batch(batch).items():
            series = self._get(name)
            for bucket in buckets:
                series.add_bucket(bucket)

    def extend(self, other: Mapping[str, Iterable[Bucket]]) -> None:
        for name, buckets in other.items():
            series = self._get(name)
            for bucket in buckets:
                series.add_bucket(bucket)

    def take(self) -> dict[str, list[Bucket]]:
        out = {name: s.take() for name, s in self._series.items() if len(s)}
        return out

    def peek(self) -> dict[str, list[Bucket]]:
        return {name: list(s.buckets) for name, s in self._series.items() if len(s)}

    def __bool__(self) -> bool:
        return any(len(s) for s in self._series.values())

    def __contains__(self, name: object) -> bool:
        return name in self._series

    @property
    def series_count(self) -> int:
        """Distinct names seen (taking points out does not forget a name)."""
        return len(self._series)

    def last_step(self) -> int:
        return max((s.buckets[-1].step for s in self._series.values() if len(s)), default=0)


def bucketize(steps: Sequence[int], values: Sequence[float], max_points: int) -> list[Bucket]:
    """A fresh run of points as buckets: one per point when they fit in ``max_points``,
    else about ``max_points / 2`` buckets of equal point count, reduced with numpy (the
    SDK's drain: far cheaper than adding points one by one). NaN/inf make a bucket's
    mean NaN (a gap); min/max skip NaN."""
    n = len(steps)
    if n <= max_points:
        return [Bucket(s, s, v, v, v, 1) for s, v in zip(steps, values)]
    import numpy as np

    starts = np.unique(np.linspace(0, n, max(2, max_points // 2), endpoint=False).astype(np.int64))
    vals = np.asarray(values, dtype=np.float64)
    st = np.asarray(steps, dtype=np.int64)
    counts = np.diff(np.append(starts, n))
    with np.errstate(invalid="ignore", over="ignore"):
        means = np.add.reduceat(vals, starts) / counts
    means[~np.isfinite(means)] = np.nan
    lows, highs = np.fmin.reduceat(vals, starts), np.fmax.reduceat(vals, starts)
    firsts, lasts = np.minimum.reduceat(st, starts), np.maximum.reduceat(st, starts)
    return [Bucket(int(f), int(la), float(m), float(lo), float(hi), int(c))
            for f, la, m, lo, hi, c in zip(firsts, lasts, means, lows, highs, counts)]


def to_batch(series: Mapping[str, list[Bucket]]) -> cpb.ScalarBatch:
    """Buckets as a ScalarBatch; min/max are filled only where points were merged."""
    batch = cpb.ScalarBatch()
    for name, buckets in series.items():
        if not buckets:
            continue
        out = batch.series.add(name=name)
        out.steps.extend(b.step for b in buckets)
        out.values.extend(b.mean for b in buckets)
        if any(b.count > 1 for b in buckets):
            out.min.extend(b.lo for b in buckets)
            out.max.extend(b.hi for b in buckets)
            out.first_steps.extend(b.first_step for b in buckets)
    return batch


def from_batch(batch: cpb.ScalarBatch) -> dict[str, list[Bucket]]:
    """Buckets of a ScalarBatch (the inverse of :func:`to_batch`; a bucket's
    count is its step span, which keeps merged means fair)."""
    out: dict[str, list[Bucket]] = {}
    for s in batch.series:
        n = len(s.steps)
        has_range = len(s.min) == n and len(s.max) == n
        has_first = len(s.first_steps) == n
        buckets = out.setdefault(s.name, [])
        for i, step in enumerate(s.steps):
            value = s.values[i] if i < len(s.values) else 0.0
            lo = s.min[i] if has_range else value
            hi = s.max[i] if has_range else value
            first = min(s.first_steps[i], step) if has_first else step
            buckets.append(Bucket(first, step, value, lo, hi, step - first + 1))
    return out
