"""Triton's per-version statistics (ModelStatistics), kept by each model version."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStats:
    """Triton's statistics for one model version."""

    inference_count: int = 0
    """Rows (batch elements) inferred."""
    execution_count: int = 0
    """Batched forward calls."""
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    """Rows per forward call -> compute time of those calls."""
    cache_hit: Duration = field(default_factory=Duration)
    """Requests answered from the response cache; time to look up and decode."""
    cache_miss: Duration = field(default_factory=Duration)
    """Requests the cache did not have; time to look up and to store the answer."""
