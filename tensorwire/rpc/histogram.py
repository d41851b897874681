"""Fixed-bucket histograms kept by plain objects (a batcher, the model loader) and
exported as Prometheus histograms at scrape time: the core stays free of
prometheus_client, and a distribution is never flattened into an average gauge.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Requests per batch."""
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Seconds a request waited for its batch."""
LOAD_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds a model version took to load."""


@dataclass
class Histogram:
    """Counts of observations per bucket (``value <= bound``, Prometheus' ``le``)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """One per bound, then one for values above the last (non-cumulative)."""
    sum: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing, got {self.bounds!r}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_all(self, values: Iterable[float]) -> None:
        for value in values:
            self.observe(float(value))

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of values <= le)`` for each bound and ``+Inf`` (what
        ``HistogramMetricFamily.add_metric`` takes)."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)
